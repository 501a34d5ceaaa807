"""What a plan supports, declared as data, and the reasons a call falls outside it.

Every plan holds a :class:`Support`: the backends, compute dtypes, modes, norm layers and
activations it runs, and whether it runs under autocast, with autograd on in eval, while
``torch.compile`` traces and while the model is traced or exported. :func:`unsupported_reasons`
checks one call against it (the block or stem, the input, the resolved backend, the mode and
flags of the moment) and says, for each field the call falls outside, why, as xformers' attention
dispatch does with its operators' ``SUPPORTED_*`` fields and ``not_supported_reasons``. A plan
adds only what no field can say (the Triton chain's uniform convolutions, a folded
convolution's availability on this CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from fastres.plans.autocast import autocast_dtype, compute_dtype
from fastres.plans.exporting import tracing_or_exporting

__all__ = [
    "ALL_BACKENDS",
    "ALL_NORMS",
    "ANY",
    "ANY_CALL",
    "BOTH_MODES",
    "FASTRES_BACKENDS",
    "FLOAT_DTYPES",
    "Described",
    "Support",
    "norm_kind",
    "unsupported_reasons",
]

ANY: tuple[()] = ()  # a Support field that takes any value (dtypes: whatever the ops accept)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_BACKENDS = ("cpu", "cuda", "triton", "torch")
FASTRES_BACKENDS = ("cpu", "cuda", "triton")
ALL_NORMS = ("BatchNorm2d", "SyncBatchNorm2d")
BOTH_MODES = ("training", "eval")


class Described(Protocol):
    """What the checks read of a block or stem description (fastres/plans/description.py)."""

    @property
    def module(self) -> nn.Module: ...

    @property
    def norms(self) -> list[nn.Module]: ...

    @property
    def activations(self) -> tuple[str, ...]: ...

    @property
    def layers(self) -> list[nn.Module]: ...

    @property
    def add_position(self) -> str: ...

    def fusion_issue(self) -> str: ...


@dataclass(frozen=True)
class Support:
    """What a plan runs.

    Attributes:
        backends: the resolved backends (``cpu``, ``cuda``, ``triton``, ``torch``).
        dtypes: the dtypes the convolutions compute in (the input's, or autocast's under
            autocast); :data:`ANY` for whatever the ops accept (they raise otherwise).
        modes: ``"training"`` and/or ``"eval"`` (the block's or stem's module flag).
        norms: the norm layers, by :func:`norm_kind`; :data:`ANY` for any layer.
        activations: the activations of every stage and after the add; :data:`ANY` for any.
        add_positions: where the block adds its shortcut (description.ADD_POSITIONS).
        fused_layers_only: only blocks whose every layer the fused ops reproduce
            (``fusion_issue()`` empty); False for the library's own forward.
        autocast: runs under ``torch.autocast``.
        gradients_in_eval: runs in eval with autograd on and the input or a parameter requiring
            grad (folded weights are constants: no).
        compiling: runs while ``torch.compile`` traces.
        tracing: runs while the model is traced or exported (its trace must hold the library's
            ATen ops).
    """

    backends: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    modes: tuple[str, ...]
    norms: tuple[str, ...]
    activations: tuple[str, ...]
    add_positions: tuple[str, ...]
    fused_layers_only: bool
    autocast: bool
    gradients_in_eval: bool
    compiling: bool
    tracing: bool


# The library's own forward runs any call: the last plan of every list.
ANY_CALL = Support(
    backends=ALL_BACKENDS,
    dtypes=ANY,
    modes=BOTH_MODES,
    norms=ANY,
    activations=ANY,
    add_positions=ANY,
    fused_layers_only=False,
    autocast=True,
    gradients_in_eval=True,
    compiling=True,
    tracing=True,
)


def norm_kind(norm: nn.Module) -> str:
    """``"BatchNorm2d"``, ``"SyncBatchNorm2d"`` (:class:`fastres.SyncBatchNorm2d`, by the marker
    its class defines: plans do not import the module layer), else the layer's class name."""
    if type(norm) is nn.BatchNorm2d:
        return "BatchNorm2d"
    if vars(type(norm)).get("synchronises_statistics", False):
        return "SyncBatchNorm2d"
    return type(norm).__name__


def _names(values: Sequence[object]) -> str:
    return ", ".join(str(v).removeprefix("torch.") for v in values)


def unsupported_reasons(
    support: Support, described: Described, x: Tensor, backend: str
) -> list[str]:
    """Why ``support`` does not cover running ``described`` on ``x`` now; [] when it does.
    Only failing checks build their message (this runs at every forward)."""
    reasons = []
    if backend not in support.backends:
        reasons.append(f"the backend is {backend!r}, not {_names(support.backends)}")
    if not support.tracing and tracing_or_exporting():
        reasons.append("the model is traced or exported")
    if not support.compiling and torch.compiler.is_compiling():
        reasons.append("torch.compile is tracing (the fused ops trace; folded weights do not)")
    if support.fused_layers_only and (why := described.fusion_issue()):
        reasons.append(why)
    module = described.module
    mode = "training" if module.training else "eval"
    if mode not in support.modes:
        reasons.append(f"{type(module).__name__} is in {mode} mode")
    if support.dtypes and (dtype := compute_dtype(x)) not in support.dtypes:
        reasons.append(f"it computes in {_names([dtype])}, not {_names(support.dtypes)}")
    if not support.autocast and autocast_dtype(x) is not None:
        reasons.append("autocast is on")
    if support.norms and (kinds := {norm_kind(n) for n in described.norms}) - set(support.norms):
        reasons.append(f"a norm layer is {_names(sorted(kinds - set(support.norms)))}")
    if support.activations and not set(described.activations) <= set(support.activations):
        reasons.append(f"an activation is not {_names(support.activations)}")
    if support.add_positions and described.add_position not in support.add_positions:
        reasons.append(f"the shortcut is added {described.add_position}")
    if (
        not support.gradients_in_eval
        and mode == "eval"
        and torch.is_grad_enabled()
        and (
            x.requires_grad
            or any(p.requires_grad for layer in described.layers for p in layer.parameters())
        )
    ):
        reasons.append("autograd is on and the input or a parameter requires grad")
    return reasons
