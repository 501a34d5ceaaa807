"""Drop-in residual blocks: torchvision's ``Bottleneck`` and ``BasicBlock`` on fused ops.

``FastBottleneck`` and ``FastBasicBlock`` subclass torchvision's blocks and keep their
constructor and attributes (``conv1 bn1 conv2 bn2 conv3 bn3 relu downsample stride``), so state
dicts are interchangeable and ``ResNet(zero_init_residual=True)`` keeps working.

Their forward describes the block (fastres/adapters/torchvision.py) and runs the first execution
plan that applies (fastres/plans/): torchvision's own forward on the ``torch`` backend or for
layers the fused ops do not reproduce (a norm layer other than an exact ``nn.BatchNorm2d`` or
:class:`SyncBatchNorm2d`, an activation other than ``nn.ReLU``, a convolution with a bias or
non-zero padding mode), BatchNorm folded into the convolutions in eval without autograd, the
Triton convolution chain on ``triton``, the fused ops otherwise. ``FastResNet`` (what the builders
return) folds the stem's convolution the same way.

With ``sync_bn=True`` (or after ``fastres.convert(model, sync_bn=True)``) every BatchNorm of a
block is a :class:`SyncBatchNorm2d`: in training the fused ops compute batch statistics over every
process of its ``process_group`` (fastres/ops/sync_bn_act.py), on CPU (gloo) as on CUDA (NCCL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastres.adapters import torchvision as torchvision_adapter
from fastres.backends import check_backend_name, resolve_backend
from fastres.plans import Plan, plan_for, plans_passed_over
from fastres.plans.decisions import recorded, recorder
from fastres.plans.description import ResidualBlock, Stage, activation_name
from fastres.plans.folded_eval import (
    FOLDED,
    FoldedEvalPlan,
    hooks_can_see_activations,
    run_folded_stem,
    stage_folding_choice,
)
from fastres.plans.folded_program import PROGRAMS, program_decision, run_program
from fastres.sync_batch_norm import SyncBatchNorm2d, sync_batch_norms

__all__ = [
    "BlockInputError",
    "FastBasicBlock",
    "FastBlockMixin",
    "FastBottleneck",
    "FastResNet",
    "FastStemMixin",
    "SyncBatchNorm2d",
    "sync_batch_norms",
]


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


def _scripting_refused(module: nn.Module) -> RuntimeError:
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


def _run_plan(
    plan: Plan, block: ResidualBlock, x: Tensor, backend: str, input_is_scratch: bool
) -> Tensor:
    if input_is_scratch and isinstance(plan, FoldedEvalPlan):
        return plan.run(block, x, backend, input_is_scratch=True)
    return plan.run(block, x, backend)


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
            return _run_plan(plan_for(block, x, backend), block, x, backend, input_is_scratch)
        choice = plans_passed_over(block, x, backend)  # fastres.explain is recording
        with rec.ran(self, choice.plan.name, choice.passed_over):
            return _run_plan(choice.plan, block, x, backend, input_is_scratch)

    def fusion_issue(self) -> str:
        """Why the fused ops cannot reproduce this block, "" when they can (then, on any
        backend but ``torch``, forward runs fused; otherwise the library's own forward)."""
        return self._describe().fusion_issue()

    def plan_for(self, x: Tensor) -> Plan:
        """The execution plan forward would run for ``x`` now (see :mod:`fastres.plans`)."""
        return plan_for(self._describe(), x, resolve_backend(self.backend, x.device, x.dtype))

    def train(self, mode: bool = True):
        FOLDED.pop(self, None)  # folded weights are for eval only; free them
        return super().train(mode)

    def __prepare_scriptable__(self) -> nn.Module:
        raise _scripting_refused(self)


class FastBottleneck(FastBlockMixin, Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) on fused ops.

    Same constructor as torchvision's, plus ``backend`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"triton"`` or ``"torch"``) and ``sync_bn`` / ``process_group``: with ``sync_bn=True`` every
    BatchNorm of the block, the downsample branch's included, becomes a :class:`SyncBatchNorm2d`
    over ``process_group`` (None: the default group). Input ``(N, inplanes, H, W)``; output
    ``(N, planes * 4, H / stride, W / stride)``, dtype and memory format as torchvision's.
    """

    _describe_with = staticmethod(torchvision_adapter.describe)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str = "auto",
        sync_bn: bool = False,
        process_group: Any | None = None,
    ) -> None:
        super().__init__(
            inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer
        )
        self._configure(backend, sync_bn, process_group)


class FastBasicBlock(FastBlockMixin, BasicBlock):
    """torchvision's ``BasicBlock`` on fused ops; see :class:`FastBottleneck`.

    Input ``(N, inplanes, H, W)``; output ``(N, planes, H / stride, W / stride)``.
    """

    _describe_with = staticmethod(torchvision_adapter.describe)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str = "auto",
        sync_bn: bool = False,
        process_group: Any | None = None,
    ) -> None:
        super().__init__(
            inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer
        )
        self._configure(backend, sync_bn, process_group)


def _run_on_scratch(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` for an ``x`` the network owns and needs no more (the stem's or a previous
    block's output): the fast blocks of a plain ``nn.Sequential`` run with
    ``input_is_scratch=True``, so that folded eval adds each block's residual in place into
    its input instead of allocating a new output (ResNet-50, batch 16, 2-thread CPU, 25
    interleaved rounds: 1.10x [0.97-1.30], not significant on that noisy machine).
    Anything else runs as ``layer(x)``."""
    blocks = [b for b in layer.children() if isinstance(b, FastBlockMixin)]
    if type(layer) is not nn.Sequential or len(blocks) != len(layer):
        out: Tensor = layer(x)
        return out
    for block in blocks:
        x = block._run(x, input_is_scratch=True)
    return x


_PROGRAM = "whole-network oneDNN program"


class FastResNet(ResNet):
    """torchvision's ``ResNet`` whose stem runs like the fast blocks in eval:
    ``relu(bn1(conv1(x)))`` as one convolution with bn1 folded in and the ReLU fused
    (fastres/folding.py), so that every convolution of the model is folded. Everything else
    (training, attributes, state dict, the blocks, pooling, fc) is ResNet's.
    :func:`fastres.resnet50` and the other builders return one; :func:`fastres.convert` retypes
    an exact ``ResNet`` into one on the same tensors and :func:`fastres.revert` back.
    """

    backend: str

    def _forward_impl(self, x: Tensor) -> Tensor:
        stem = Stage(self.conv1, self.bn1, activation_name(self.relu))
        backend, not_folded = stage_folding_choice(self, stem, x, self.backend)
        if backend is None:
            with recorded(self, "ResNet's own forward", {"folded stem": not_folded}):
                return super()._forward_impl(x)
        program, no_program = program_decision(self, stem, x) if backend == "cpu" else (None, "")
        if program is not None:  # the whole network in one oneDNN call
            with recorded(self, _PROGRAM, calls=("fastres._onednn FoldedProgram.run",)):
                out = run_program(program, x)
                if program.includes_head:
                    return out
                return self.fc(torch.flatten(self.avgpool(out), 1))
        passed_over = {_PROGRAM: [no_program or f"the {backend!r} backend folds block by block"]}
        with recorded(self, "folded stem, then block by block", passed_over):
            return self._folded_block_by_block(stem, x, backend)

    def _folded_block_by_block(self, stem: Stage, x: Tensor, backend: str) -> Tensor:
        # Folded eval runs on channels_last (oneDNN's and cuDNN's layout): reordering the input
        # once here keeps every block on it, where an NCHW input would make each block convert
        # its output back (measured: ResNet-50, batch 16, CPU: 1268 ms NCHW vs 655 ms).
        x = run_folded_stem(self, stem, self.maxpool, x, backend)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if hooks_can_see_activations(self):
            for layer in layers:
                x = layer(x)
        else:
            for layer in layers:
                x = _run_on_scratch(layer, x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def train(self, mode: bool = True):
        FOLDED.pop(self, None)  # folded weights and programs are for eval only; free them
        PROGRAMS.pop(self, None)
        return super().train(mode)

    def __prepare_scriptable__(self) -> nn.Module:
        raise _scripting_refused(self)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class FastStemMixin(nn.Module):
    """A library's stem, ``pool(activation(norm(conv(x))))``, whose convolution, BatchNorm and
    activation run in eval as one fused convolution from folded weights, as the blocks' do
    (:func:`fastres.plans.folded_eval.run_folded_stage`). Training, autograd and anything the
    fused ops do not reproduce run the library's own forward. ``_stem_with`` (the library's
    adapter) gives the stage and the pooling after it. Placed before the library's class in the
    bases, so that ``super()`` is the library's module."""

    backend: str
    _stem_with: Callable[..., tuple[Stage, nn.Module]]

    def forward(self, x: Tensor) -> Tensor:
        stage, pool = self._stem_with(self)
        backend, not_folded = stage_folding_choice(self, stage, x, self.backend)
        if backend is None:
            with recorded(self, "the library's own forward", {"folded stem": not_folded}):
                return super().forward(x)
        # The output is channels_last whatever x's layout (the same values): the blocks after
        # the stem then fold without converting each output back to NCHW (see FastResNet).
        with recorded(self, "folded stem"):
            return run_folded_stem(self, stage, pool, x, backend)

    def train(self, mode: bool = True):
        FOLDED.pop(self, None)  # folded weights are for eval only; free them
        return super().train(mode)

    def __prepare_scriptable__(self) -> nn.Module:
        raise _scripting_refused(self)
