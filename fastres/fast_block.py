"""What every fast module shares, whatever library its block comes from: the mixins the adapters
(fastres/adapters/) build their fast classes on.

:class:`FastBlockMixin` describes the block (``_describe_with``, the library's adapter) and runs
the first execution plan that applies (fastres/plans/): BatchNorm folded into the convolutions
in eval without autograd, the Triton convolution chain on ``triton``, the fused ops, and the
library's own forward for whatever they do not support (the ``torch`` backend, layers the fused
ops do not reproduce, tracing and export). :class:`FastStemMixin` runs a library's stem by the
stem plans, the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastres.backends import check_backend_name, resolve_backend
from fastres.plans import Plan, plan_for, plan_label, plans_passed_over
from fastres.plans.decisions import recorder
from fastres.plans.description import NetworkStem, ResidualBlock, Stage
from fastres.plans.folded_eval import release_eval_state
from fastres.plans.stem import stem_plan_choice, stem_plan_label
from fastres.sync_batch_norm import sync_batch_norms

__all__ = ["BlockInputError", "FastBlockMixin", "FastStemMixin", "scripting_refused"]


class BlockInputError(RuntimeError, ValueError):
    """A fast block's input has the wrong shape (not 4-D, or not the block's input channels).

    A RuntimeError, as the library's block raises from its convolution for the same input, so
    that code catching that keeps working after :func:`fastres.convert`; and a ValueError, as
    fastres raised before."""


def _check_block_input(x: Tensor, conv: nn.Module, block: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{block}: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise BlockInputError(
            f"{block}: x must be a 4-D (N, C, H, W) tensor, got {x.dim()}-D with "
            f"shape {tuple(x.shape)}"
        )
    # While tracing, a size is a traced value and comparing it warns, for every block, that the
    # trace may not generalise; the library's convolution checks the channels there.
    if not torch.jit.is_tracing() and x.shape[1] != conv.in_channels:
        raise BlockInputError(
            f"{block}: x must have {conv.in_channels} channels (the block's "
            f"inplanes), got {x.shape[1]}"
        )


def scripting_refused(module: nn.Module) -> RuntimeError:
    """The error ``torch.jit.script`` meets in a fast module's ``__prepare_scriptable__``.

    TorchScript cannot compile the forward (it chooses a plan in Python), and returning the
    library's module from ``__prepare_scriptable__`` instead is no way out: torch.jit.script
    writes what that returns into the parent's ``_modules``, which would retype the caller's
    model."""
    return RuntimeError(
        f"fastres: torch.jit.script cannot compile {type(module).__name__} (its forward chooses "
        "among fused ops in Python); the model is left as it was. Script the model that "
        "fastres.revert() returns (the library's own modules, on the same tensors), or trace or "
        "export this one (torch.jit.trace, torch.export.export, torch.onnx.export), which "
        "records the library's forward."
    )


class FastBlockMixin(nn.Module):
    """The forward every fast block shares, whatever library its block comes from: describe the
    block (``_describe_with``, the library's adapter), run the first plan that applies. Placed
    before the library's block class in the bases, so that ``super()`` is the library's block
    and its forward is the reference."""

    backend: str
    # The adapter's describe(block, reference); typed loosely: each takes its library's blocks.
    _describe_with: Callable[..., ResidualBlock]

    def _describe(self) -> ResidualBlock:
        return self._describe_with(self, super().forward)

    def _configure(self, backend: str, sync_bn: bool, process_group: Any | None) -> None:
        """The fast blocks' own constructor options (after torchvision's constructor)."""
        self.backend = check_backend_name(backend)
        if sync_bn:
            sync_batch_norms(self, process_group, backend)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, input_is_scratch=False)

    def _run(self, x: Tensor, *, input_is_scratch: bool) -> Tensor:
        """forward; ``input_is_scratch=True`` (from :class:`FastResNet` only) says x is an
        activation the network owns and needs no more, which folded eval may overwrite."""
        block = self._describe()
        _check_block_input(x, block.stages[0].conv, type(self).__name__)
        backend = resolve_backend(self.backend, x.device, x.dtype)
        rec = recorder()
        if rec is None:
            plan = plan_for(block, x, backend)
            return plan.run(block, x, backend, input_is_scratch=input_is_scratch)
        choice = plans_passed_over(block, x, backend)  # fastres.explain is recording
        with rec.ran(self, plan_label(choice.plan, backend), choice.passed_over):
            return choice.plan.run(block, x, backend, input_is_scratch=input_is_scratch)

    def fusion_issue(self) -> str:
        """Why the fused ops cannot reproduce this block, "" when they can (then, on any
        backend but ``torch``, forward runs fused; otherwise the library's own forward)."""
        return self._describe().fusion_issue()

    def plan_for(self, x: Tensor) -> Plan:
        """The execution plan forward would run for ``x`` now (see :mod:`fastres.plans`)."""
        return plan_for(self._describe(), x, resolve_backend(self.backend, x.device, x.dtype))

    def train(self, mode: bool = True):
        release_eval_state(self)  # folded weights are for eval only
        return super().train(mode)

    def __prepare_scriptable__(self) -> nn.Module:
        raise scripting_refused(self)


class FastStemMixin(nn.Module):
    """A library's stem, ``pool(activation(norm(conv(x))))``, run by the first stem plan that
    applies (:mod:`fastres.plans.stem`): in eval its convolution, BatchNorm and activation as
    one fused convolution from folded weights, as the blocks' are; in training, under autograd
    and for anything the fused ops do not reproduce, the library's own forward. ``_stem_with``
    (the library's adapter) gives the stage and the pooling after it. Placed before the
    library's class in the bases, so that ``super()`` is the library's module."""

    backend: str
    _stem_with: Callable[..., tuple[Stage, nn.Module]]

    def forward(self, x: Tensor) -> Tensor:
        stage, pool = self._stem_with(self)
        stem = NetworkStem(self, stage, pool, super().forward)
        choice = stem_plan_choice(stem, x, self.backend)
        # The folded stem's output is channels_last whatever x's layout (the same values): the
        # blocks after it then fold without converting each output back to NCHW (see FastResNet).
        rec = recorder()
        if rec is None:
            out: Tensor = choice.plan.run(stem, x, self.backend)
            return out
        label = stem_plan_label(choice.plan, x, self.backend)  # fastres.explain is recording
        with rec.ran(self, label, choice.passed_over):
            out = choice.plan.run(stem, x, self.backend)
            return out

    def train(self, mode: bool = True):
        release_eval_state(self)  # folded weights are for eval only
        return super().train(mode)

    def __prepare_scriptable__(self) -> nn.Module:
        raise scripting_refused(self)
