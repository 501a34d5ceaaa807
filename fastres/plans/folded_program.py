"""Plan: a whole ResNet's folded eval as one call into oneDNN (``fastres._onednn``).

Folded eval (fastres/plans/folded_eval.py) runs each block's convolutions through ATen's oneDNN
ops, deciding per block in Python what to run: ATen's per-call work for each convolution and
Python's for each block, a third of a ResNet-50 image at batch 1 in bfloat16 on a CPU with AMX
(benchmarks/profile_cpu_inference.py; benchmarks/diagnostics.md). When every block of a
:class:`fastres.FastResNet` takes the folded path for an input, this plan runs the stem, its
max-pool and every block as one oneDNN program instead (csrc/onednn/folded_program.cpp):
primitives created once per input shape and dtype, weights reordered once, activations in
buffers the program reuses. The same folded weights (the blocks' :data:`FOLDED` caches, folded
again when a tensor changes) feed both paths; the program is rebuilt when any of them is.

It applies on the ``cpu`` backend when fastres._onednn was built, for float32 and bfloat16
(a bfloat16 model or autocast), with no forward hook anywhere in the model (hooks see every
activation on the per-block path), for the plain torchvision layout: an exact max-pool after
the stem and ``nn.Sequential`` layers of fast blocks with (convolution, BatchNorm) or identity
shortcuts. Anything else runs the per-block path, which gives the same results.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastres.backends import onednn_program_class, resolve_backend
from fastres.plans.autocast import compute_dtype
from fastres.plans.description import ResidualBlock, Stage
from fastres.plans.folded_convolution import FoldedStage
from fastres.plans.folded_eval import (
    FoldedEvalPlan,
    folded_stages,
    folded_stem,
    folding_input,
    hooks_can_see_activations,
)
from fastres.plans.model_state import ModelState

__all__ = ["PROGRAMS", "BuiltProgram", "program_decision", "run_program"]

# Dtypes the program runs in, by the name csrc/onednn/folded_program.cpp takes.
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class BuiltProgram:
    """A program, and whether it ends with the model's head (global average pooling and the
    linear classifier: its output is then the model's) or with the last block's output."""

    program: Any  # torch.classes.fastres.FoldedProgram
    includes_head: bool


@dataclass
class _Cached:
    """A decision for one kind of input: the program, or None where the plan does not apply
    (``reason`` says why); ``state`` is the model it was decided for."""

    program: BuiltProgram | None
    state: ModelState
    reason: str = ""


@dataclass
class _Programs:
    """Each model's decisions, one per kind of input (the last few)."""

    by_input: dict[tuple[Any, ...], _Cached] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


# Beside the model, like the folded weights: not state to save or deepcopy.
PROGRAMS: weakref.WeakKeyDictionary[nn.Module, _Programs] = weakref.WeakKeyDictionary()
# Kinds of input a model keeps a decision for (a program holds a copy of the weights).
PROGRAM_SHAPES = 4


def _blocks(model: nn.Module) -> list[Any] | None:
    """The model's fast blocks in order, when its layers are plain Sequentials of them (known
    by the ``_describe`` every fast block has: plans do not import the module layer)."""
    blocks = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, name, None)
        if type(layer) is not nn.Sequential:
            return None
        children = list(layer.children())
        if not all(callable(getattr(b, "_describe", None)) for b in children):
            return None
        blocks += children
    return blocks


def _max_pool(pool: Any) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of an exact square max-pool the program reproduces."""
    if type(pool) is not nn.MaxPool2d or pool.ceil_mode or pool.return_indices:
        return None
    kernel, stride, padding, dilation = pool.kernel_size, pool.stride, pool.padding, pool.dilation
    if dilation != 1:
        return None
    if isinstance(kernel, int) and isinstance(stride, int) and isinstance(padding, int):
        return kernel, stride, padding
    return None


def _plain_conv(stage: Stage) -> bool:
    conv: Any = stage.conv  # an exact nn.Conv2d (the plans checked)
    return (
        tuple(conv.dilation) == (1, 1)
        and not isinstance(conv.padding, str)
        and conv.kernel_size[0] == conv.kernel_size[1]
    )


def _described_blocks(model: nn.Module, x: Tensor) -> list[ResidualBlock] | None:
    """Every block's description, when the per-block dispatcher would run each one folded on
    ``cpu`` for an input like ``x`` with a shortcut the program reproduces."""
    from fastres.plans import plan_for

    blocks = _blocks(model)
    if blocks is None:
        return None
    described = []
    for block in blocks:
        if resolve_backend(block.backend, x.device, x.dtype) != "cpu":
            return None
        description = block._describe()
        if not isinstance(plan_for(description, x, "cpu"), FoldedEvalPlan):
            return None
        shortcut_plain = description.shortcut is None or description.shortcut_stage is not None
        stages = [*description.stages, *filter(None, [description.shortcut_stage])]
        if not shortcut_plain or not all(_plain_conv(s) for s in stages):
            return None
        described.append(description)
    return described


def program_decision(model: nn.Module, stem: Stage, x: Tensor) -> tuple[BuiltProgram | None, str]:
    """The oneDNN program that runs ``model``'s stem, max-pool, blocks (and, in bfloat16, its
    head) folded for ``x``, built or reused, or None where this plan does not apply (see the
    module's notes); and why not ("" when there is a program). The caller (FastResNet) has
    checked that its stem folds on ``cpu`` for ``x``.

    The decision is kept per kind of input (shape, dtype, autocast's dtype, grad mode) with a
    snapshot of the model (:class:`ModelState`): while nothing in the model changed, a call
    compares the snapshot instead of deciding again."""
    program_class = onednn_program_class()
    dtype = compute_dtype(x)
    if program_class is None:
        return None, "fastres._onednn was not built (python -m fastres says why)"
    if dtype not in _DTYPES:
        return None, f"the program runs float32 and bfloat16, not {dtype}"
    if x.shape[0] == 0:
        return None, "the batch is empty"
    cache = PROGRAMS.setdefault(model, _Programs())
    signature = (tuple(x.shape), x.dtype, dtype, torch.is_grad_enabled())
    cached = cache.by_input.get(signature)
    if cached is not None and cached.state.unchanged(model):
        return cached.program, cached.reason
    with cache.lock:
        cached = cache.by_input.get(signature)  # another thread may have decided meanwhile
        if cached is None or not cached.state.unchanged(model):
            cached = _decide(model, stem, x, program_class)
            if len(cache.by_input) >= PROGRAM_SHAPES and signature not in cache.by_input:
                cache.by_input.pop(next(iter(cache.by_input)))
            cache.by_input[signature] = cached
    return cached.program, cached.reason


def _decide(model: nn.Module, stem: Stage, x: Tensor, program_class: Any) -> _Cached:
    """A new program for ``x``, or None. (A program is not reused across a change: a setting
    such as a stride may have changed with the weights the same.)"""
    state = ModelState.of(model)
    pool = _max_pool(getattr(model, "maxpool", None))
    if pool is None:
        return _Cached(None, state, "the stem's pooling is not a max-pool the program reproduces")
    if not _plain_conv(stem):
        return _Cached(None, state, "the stem convolution is dilated, string-padded or not square")
    if hooks_can_see_activations(model):
        return _Cached(None, state, "a forward hook could see the activations")
    described = _described_blocks(model, x)
    if described is None:
        return _Cached(
            None,
            state,
            "a layer is not an nn.Sequential of fast blocks that each run folded on 'cpu' "
            "with a plain (convolution, BatchNorm) or identity shortcut",
        )
    folded_stem_stage = folded_stem(model, stem, "onednn")
    folded = [folded_stages(block, "onednn") for block in described]
    builder = _Builder(program_class(_DTYPES[compute_dtype(x)]))
    # In float32, oneDNN 3.2's inner product doubled the logits' error against float64, beyond
    # the numerical contract (benchmarks/results/cpu-amd-epyc-2-threads/README.md): the
    # float32 head stays ATen's. In bfloat16 the error is unchanged.
    head = _linear_head(model) if compute_dtype(x) == torch.bfloat16 else None
    try:
        builder.add_stem(list(x.shape), stem, folded_stem_stage, pool)
        builder.add_blocks(described, folded)
        if head is not None:
            builder.add_head(head)
    except _NotReproduced:
        return _Cached(None, state, "a layer's input does not fit it (block by block raises)")
    return _Cached(BuiltProgram(builder.program, head is not None), state)


def _linear_head(model: nn.Module) -> nn.Linear | None:
    """The classifier, when the model ends with global average pooling and an exact
    ``nn.Linear`` (torchvision's ``fc(flatten(avgpool(x), 1))``) that the program runs too."""
    pool, fc = getattr(model, "avgpool", None), getattr(model, "fc", None)
    if type(pool) is not nn.AdaptiveAvgPool2d or pool.output_size not in (1, (1, 1)):
        return None
    return fc if type(fc) is nn.Linear else None


def run_program(program: BuiltProgram, x: Tensor) -> Tensor:
    """The program's output for ``x``, in the compute dtype: the model's logits when it
    includes the head, else the last block's output, channels_last."""
    h = folding_input(x, "cpu").contiguous(memory_format=torch.channels_last)
    out: Tensor = program.program.run(h)
    return out


class _NotReproduced(Exception):
    """A layer's input does not fit it (channels, or an output smaller than one pixel)."""


@dataclass
class _Builder:
    """Adds a network's steps to a program, assigning buffers by liveness: each step's output
    gets a free buffer (the program sizes every buffer for its largest use); buffer 0 is the
    input, never written. ``current`` is the buffer holding the latest output, of ``sizes``."""

    program: Any
    free: list[int] = field(default_factory=list)
    next_id: int = 1
    current: int = 0
    sizes: list[int] = field(default_factory=list)

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.next_id += 1
        return self.next_id - 1

    def give_back(self, buffer: int) -> None:
        if buffer != 0:
            self.free.append(buffer)

    def convolution(
        self,
        src: int,
        dst: int,
        sizes: list[int],
        folded: FoldedStage,
        activation: str,
        sum_into_dst: bool = False,
    ) -> list[int]:
        """Adds ``dst = activation(conv(src) [+ dst])``; returns the output's sizes."""
        conv = folded.conv
        out = _conv_sizes(sizes, conv)
        if sizes[1] != conv.in_channels or min(out) < 1:
            raise _NotReproduced  # the block-by-block path raises the error a user can act on
        self.program.add_convolution(
            src,
            dst,
            sum_into_dst,
            folded.weight.float().contiguous(),  # folded in float32 (cast in the program)
            folded.bias.float(),
            sizes,
            out,
            list(conv.stride),
            list(conv.padding),
            conv.groups,
            activation,
        )
        return out

    def add_stem(
        self, shape: list[int], stem: Stage, folded: FoldedStage, pool: tuple[int, int, int]
    ) -> None:
        """The stem's folded convolution from the input, then its max-pool."""
        conv_out = self.take()
        sizes = self.convolution(0, conv_out, shape, folded, stem.activation)
        kernel, stride, padding = pool
        pooled = self.take()
        n, c, h, w = sizes
        side = [(length + 2 * padding - kernel) // stride + 1 for length in (h, w)]
        if min(side) < 1:
            raise _NotReproduced
        self.sizes = [n, c, *side]
        self.program.add_max_pool(
            conv_out, pooled, sizes, self.sizes, [kernel] * 2, [stride] * 2, [padding] * 2
        )
        self.give_back(conv_out)
        self.current = pooled

    def add_blocks(
        self,
        described: list[ResidualBlock],
        folded: list[tuple[list[FoldedStage], FoldedStage | None]],
    ) -> None:
        """Each block: its inner stages into fresh buffers, the shortcut's convolution (if any)
        into the block's output buffer, then the last stage summed into that output (the
        shortcut's, or the block's own input, which the network owns and needs no more) with
        the activation after the add."""
        for block, (stages, shortcut) in zip(described, folded, strict=True):
            h, h_sizes = self.current, self.sizes
            for stage, stage_described in zip(stages[:-1], block.stages[:-1], strict=True):
                out = self.take()
                h_sizes = self.convolution(h, out, h_sizes, stage, stage_described.activation)
                if h != self.current:
                    self.give_back(h)
                h = out
            dst = self.current
            if shortcut is not None:
                dst = self.take()
                self.convolution(self.current, dst, self.sizes, shortcut, "identity")
                self.give_back(self.current)
            self.sizes = self.convolution(
                h, dst, h_sizes, stages[-1], block.activation, sum_into_dst=True
            )
            self.give_back(h)
            self.current = dst

    def add_head(self, fc: nn.Linear) -> None:
        """Global average pooling of the last output, then the classifier."""
        n, c, _, _ = self.sizes
        if fc.in_features != c:
            raise _NotReproduced
        pooled = self.take()
        self.program.add_global_avg_pool(self.current, pooled, self.sizes)
        self.give_back(self.current)
        logits = self.take()
        bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
        weight = fc.weight.detach().float().contiguous()
        self.program.add_linear(pooled, logits, n, weight, bias.detach().float())
        self.give_back(pooled)
        self.current, self.sizes = logits, [n, fc.out_features]


def _conv_sizes(sizes: list[int], conv: Any) -> list[int]:
    n, _, h, w = sizes
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return [n, conv.out_channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1]
