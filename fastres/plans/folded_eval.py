"""Plan: eval with every BatchNorm folded into its convolution (folded_convolution.py).

Each stage runs as one convolution with the folded weight and bias, the ReLU fused, and the
residual add fused into the last (oneDNN on cpu, cuDNN on cuda, the Triton epilogue on triton);
the shortcut's (convolution, BatchNorm) is folded the same way. It applies only where that is
exactly the eval computation and nothing needs gradients.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from fastres._layout import memory_format_of
from fastres.activation import ACTIVATIONS
from fastres.backends import resolve_backend
from fastres.plans.autocast import autocast_dtype, autocast_off, compute_dtype
from fastres.plans.description import (
    ADD_AFTER_ACTIVATION,
    ADD_POSITIONS,
    NO_ADD,
    NetworkStem,
    ResidualBlock,
    Stage,
)
from fastres.plans.folded_convolution import FoldedBlock, FoldedStage, folding_kind
from fastres.plans.support import (
    ALL_NORMS,
    FASTRES_BACKENDS,
    FLOAT_DTYPES,
    Support,
    unsupported_reasons,
)

__all__ = [
    "FOLDED",
    "FOLDED_EVAL_SUPPORT",
    "release_eval_state",
    "FoldedEvalPlan",
    "folding_issues",
    "folded_stages",
    "folded_stem",
    "folding_input",
    "hooks_can_see_activations",
    "onednn_dtypes",
    "require_input_dtype",
    "run_folded_stage",
    "run_folded_stem",
    "stem_folding_issues",
]

# Folded weights of each block (and ResNet stem), kept beside the module (not in it: they are
# neither state to save nor something deepcopy should duplicate).
FOLDED: weakref.WeakKeyDictionary[nn.Module, FoldedBlock] = weakref.WeakKeyDictionary()


def release_eval_state(module: nn.Module) -> None:
    """Frees what folded eval keeps beside ``module`` (its folded weights, and the whole-network
    programs of a model): fast modules call it from ``train()``, where it is of no more use."""
    from fastres.plans.folded_program import PROGRAMS  # the program plan builds on this one

    FOLDED.pop(module, None)
    PROGRAMS.pop(module, None)


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's convolutions run in on this CPU: float32, plus bfloat16 with
    AVX512_BF16, AMX or AVX-512 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) and float16
    with AVX512_FP16 or AMX_FP16."""
    dtypes = [torch.float32]
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.append(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.append(torch.float16)
    return tuple(dtypes)


# What folded eval runs, by the fields every plan declares (fastres/plans/support.py); the
# folded stem shares it. folding_issues adds what depends on this machine and the norms' state.
FOLDED_EVAL_SUPPORT = Support(
    backends=FASTRES_BACKENDS,
    dtypes=FLOAT_DTYPES,
    modes=("eval",),
    norms=ALL_NORMS,
    activations=ACTIVATIONS,
    add_positions=ADD_POSITIONS,
    fused_layers_only=True,
    autocast=True,
    gradients_in_eval=False,
    compiling=False,
    tracing=False,
)


def folding_issues(x: Tensor, backend: str, norms: list[nn.Module]) -> list[str]:
    """Why eval with ``norms`` folded cannot run here though :data:`FOLDED_EVAL_SUPPORT` covers
    the call, [] when it can: a backend with no folded convolution here, a BatchNorm in
    training mode or without running statistics, a dtype oneDNN does not run on this CPU
    (:func:`onednn_dtypes`; float16 where it cannot is an error)."""
    if folding_kind(backend) is None:
        return [f"the {backend!r} backend has no folded convolution"]
    if not all(not bn.training and bn.running_mean is not None for bn in norms):
        return ["a BatchNorm is in training mode or keeps no running statistics"]
    dtype = compute_dtype(x)
    if backend == "cpu" and dtype not in onednn_dtypes():
        if dtype == torch.float16:
            raise TypeError(
                "fastres: float16 inference on this CPU has no oneDNN kernels (it needs "
                "AVX512_FP16 or AMX_FP16); run in bfloat16 (torch.autocast('cpu', "
                "dtype=torch.bfloat16), or model.to(torch.bfloat16) with bfloat16 inputs) or in "
                "float32"
            )
        return [f"{dtype} has no folded convolution on this CPU"]
    return []


def require_input_dtype(owner: nn.Module, conv: nn.Module, x: Tensor) -> None:
    """Raises TypeError, naming ``owner`` and what to do, when x's dtype is not the one its
    convolution's weight holds and no autocast reconciles them (the library's convolution
    raises then too: folded weights must not hide it by running in x's dtype)."""
    weight = getattr(conv, "weight", None)
    if autocast_dtype(x) is not None or not isinstance(weight, Tensor) or weight.dtype == x.dtype:
        return
    advice = f"cast the input (x.to({weight.dtype}))"
    if weight.dtype in (torch.bfloat16, torch.float16):
        advice += f" or run under torch.autocast({x.device.type!r}, dtype={weight.dtype})"
    raise TypeError(
        f"{type(owner).__name__}: the input is {x.dtype} but the model's weights are "
        f"{weight.dtype}; {advice}"
    )


def folding_input(x: Tensor, backend: str) -> Tensor:
    """x as folded convolutions take it: in their dtype (:func:`compute_dtype`), and
    channels_last for cuDNN's and Triton's fused convolutions."""
    h = x.to(compute_dtype(x))
    return h if backend == "cpu" else h.contiguous(memory_format=torch.channels_last)


def stem_folding_issues(stem: NetworkStem, x: object, backend: str) -> list[str]:
    """Why the stem cannot run folded for input ``x`` ([] when it can): ``x`` must be a
    (N, C, H, W) tensor with the convolution's channels (anything else gets the library's own
    errors), and the call covered by :data:`FOLDED_EVAL_SUPPORT` and :func:`folding_issues`.
    ``backend`` is the model's setting (``"auto"`` is resolved here)."""
    stage = stem.stage
    if not isinstance(x, Tensor):
        return ["the input is not a tensor"]
    name = resolve_backend(backend, x.device, x.dtype)
    # The support first: while the model is traced, nothing below may read x's values or sizes.
    issues = unsupported_reasons(FOLDED_EVAL_SUPPORT, stem, x, name)
    if not issues and not (x.dim() == 4 and x.shape[1] == getattr(stage.conv, "in_channels", None)):
        issues = ["the input is not (N, C, H, W) with the stem convolution's channels"]
    if issues or (issues := folding_issues(x, name, [stage.norm])):
        return issues
    require_input_dtype(stem.module, stage.conv, x)
    return []


def run_folded_stage(module: nn.Module, stage: Stage, x: Tensor, backend: str) -> Tensor:
    """``activation(norm(conv(x)))`` as one fused convolution from folded weights, cached beside
    ``module`` (see :data:`FOLDED`); in x's memory format."""
    kind = folding_kind(backend)
    assert kind is not None  # stem_folding_issues checked that the backend folds
    folded = folded_stem(module, stage, kind)
    h = folding_input(x, backend)  # before autocast is turned off: it sets the dtype
    with autocast_off(x):
        out = folded.run(h, activation=stage.activation)
    return out.contiguous(memory_format=memory_format_of(x))


def run_folded_stem(
    module: nn.Module, stage: Stage, pool: nn.Module, x: Tensor, backend: str
) -> Tensor:
    """``pool(run_folded_stage(module, stage, x, backend))``, channels_last, in chunks of
    images on oneDNN when ``pool`` works image by image (a max-pool without hooks).

    The stem's convolution output is the network's largest activation (ResNet-50 at batch 16:
    51 MiB, above glibc's 32 MiB mmap threshold, so fresh page-faulted memory on every call)
    and is read once, by the pooling. Convolving and pooling a few images at a time keeps each
    chunk's output in reused heap memory and mostly in cache (measured:
    benchmarks/diagnostics.md)."""
    x = x.contiguous(memory_format=torch.channels_last)
    chunks = _stem_chunks(x, stage.conv)
    if folding_kind(backend) != "onednn" or chunks == 1 or not _pools_image_by_image(pool):
        out: Tensor = pool(run_folded_stage(module, stage, x, backend))
        return out
    parts = x.tensor_split(chunks)
    return torch.cat([pool(run_folded_stage(module, stage, part, backend)) for part in parts])


# The most bytes of stem output run_folded_stem convolves at once: under glibc's 32 MiB mmap
# threshold, and a few images of a 224-pixel stem (3.1 MiB each), the measured best.
STEM_CHUNK_BYTES = 16 * 2**20


def _stem_chunks(x: Tensor, conv: nn.Module) -> int:
    """How many equal chunks of images keep each chunk's stem output under STEM_CHUNK_BYTES."""
    n, _, h, w = x.shape
    stride = getattr(conv, "stride", (1, 1))
    out_pixels = -(-h // stride[0]) * -(-w // stride[1])
    image_bytes = getattr(conv, "out_channels", 1) * out_pixels * x.element_size()
    return max(1, min(n, -(-n * image_bytes // STEM_CHUNK_BYTES)))


def _pools_image_by_image(pool: nn.Module) -> bool:
    """A pooling that computes each image from that image alone, called once per forward by
    nothing that would notice being called per chunk (no hooks)."""
    return type(pool) in (nn.MaxPool2d, nn.Identity) and not hooks_can_see_activations(pool)


def hooks_can_see_activations(model: nn.Module) -> bool:
    """Whether a forward hook (on any module of ``model``, or a global one) could see, keep or
    replace the activations that run through it."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _folded_shortcut(block: ResidualBlock) -> Stage | None:
    """The shortcut stage to fold, when the shortcut is one the fused ops reproduce."""
    stage = block.shortcut_stage
    return stage if stage is not None and not stage.issue(("identity",)) else None


def folded_stages(block: ResidualBlock, kind: str) -> tuple[list[FoldedStage], FoldedStage | None]:
    """The block's folded convolutions on ``kind`` (see :func:`folding_kind`), cached beside the
    block (:data:`FOLDED`) and folded again when anything they are computed from changed: the
    main branch's stages, and the shortcut's when it is a (convolution, BatchNorm) pair."""
    shortcut = _folded_shortcut(block)
    pairs = [(stage.conv, stage.norm) for stage in block.stages]
    cache = FOLDED.setdefault(block.module, FoldedBlock())
    shortcut_pair = (shortcut.conv, shortcut.norm) if shortcut else None
    return cache.stages(pairs, shortcut_pair, kind)


def folded_stem(module: nn.Module, stage: Stage, kind: str) -> FoldedStage:
    """A lone stage's (a stem's) folded convolution on ``kind``, cached beside ``module``."""
    cache = FOLDED.setdefault(module, FoldedBlock())
    (folded,), _ = cache.stages([(stage.conv, stage.norm)], None, kind)
    return folded


_FUSED_CONVOLUTION = {"onednn": "oneDNN", "cudnn": "cuDNN", "triton": "Triton"}


class FoldedEvalPlan:
    name = "folded eval"

    def engine(self, backend: str) -> str:
        return _FUSED_CONVOLUTION.get(folding_kind(backend) or "", "")

    support = FOLDED_EVAL_SUPPORT

    def not_supported_reasons(self, block: ResidualBlock, x: Tensor, backend: str) -> list[str]:
        if issues := unsupported_reasons(self.support, block, x, backend):
            return issues
        shortcut = _folded_shortcut(block)
        return folding_issues(x, backend, block.norms + ([shortcut.norm] if shortcut else []))

    def run(
        self, block: ResidualBlock, x: Tensor, backend: str, *, input_is_scratch: bool = False
    ) -> Tensor:
        """The block's eval from folded weights. ``input_is_scratch=True`` says ``x`` is an
        activation the network owns and needs no more (never a caller's tensor, nothing a hook
        saw): the last convolution may then add into it in place (see ``FoldedStage.run``), as it
        always may into the folded shortcut's own output."""
        require_input_dtype(block.module, block.stages[0].conv, x)
        kind = folding_kind(backend)
        assert kind is not None  # applies() said the backend folds
        stages, folded_shortcut = folded_stages(block, kind)
        # A shortcut that is not (conv, BatchNorm) runs as itself, under autocast.
        unfolded_identity = (
            block.shortcut(x) if folded_shortcut is None and block.shortcut is not None else None
        )
        h = folding_input(x, backend)  # before autocast is turned off: it sets the dtype
        if block.add_position == ADD_AFTER_ACTIVATION:
            # One channels_last copy, read by the first convolution and by the last one's add
            # (a C2f Bottleneck's input is a channel slice of its cv1's output).
            h = h.contiguous(memory_format=torch.channels_last)
        with autocast_off(x):
            out = h
            for stage, described in zip(stages[:-1], block.stages[:-1], strict=True):
                out = stage.run(out, activation=described.activation)
            if block.add_position == NO_ADD:
                out = stages[-1].run(out, activation=block.stages[-1].activation)
                return out.contiguous(memory_format=memory_format_of(x))
            if folded_shortcut is not None:
                identity = folded_shortcut.run(h, activation="identity")
            else:
                identity = h if unfolded_identity is None else unfolded_identity
            if block.add_position == ADD_AFTER_ACTIVATION:
                out = stages[-1].run_add_after_activation(
                    out, activation=block.stages[-1].activation, residual=identity.to(out.dtype)
                )
                return out.contiguous(memory_format=memory_format_of(x))
            owned = folded_shortcut is not None or (input_is_scratch and identity is x)
            identity = identity.to(h.dtype).contiguous(memory_format=memory_format_of(out))
            out = stages[-1].run(
                out, activation=block.activation, residual=identity, into_residual=owned
            )
        return out.contiguous(memory_format=memory_format_of(x))
