"""torchvision's ``Bottleneck`` and ``BasicBlock`` as the canonical residual-block description,
and their fast classes: :class:`FastBottleneck`, :class:`FastBasicBlock` and :class:`FastResNet`.

Both keep their layers as ``conv1 bn1 conv2 bn2 (conv3 bn3) relu downsample``: each stage but
the last is ``relu(bn_i(conv_i(h)))``, the last ``bn_k(conv_k(h))`` meets ``downsample(x)`` (or
``x``), and ``relu`` follows the add. The one ``relu`` module serves every activation.

A ``ResNet`` itself converts too (to :class:`fastres.FastResNet`: its stem, ``conv1 bn1 relu``,
folds in eval). A block or stem the fused ops do not reproduce (FrozenBatchNorm2d, as in
torchvision's detection backbones, GroupNorm, another activation, ...) is left alone, with the
reason, as every library's adapter does.

``FastBottleneck`` and ``FastBasicBlock`` subclass torchvision's blocks and keep their
constructor and attributes (``conv1 bn1 conv2 bn2 conv3 bn3 relu downsample stride``), so state
dicts are interchangeable and ``ResNet(zero_init_residual=True)`` keeps working. With
``sync_bn=True`` (or after ``fastres.convert(model, sync_bn=True)``) every BatchNorm of a block is
a :class:`fastres.SyncBatchNorm2d`: in training the fused ops compute batch statistics over every
process of its ``process_group`` (fastres/ops/sync_bn_act.py), on CPU (gloo) as on CUDA (NCCL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastres.activation import ACTIVATIONS
from fastres.adapters import LibraryAdapter
from fastres.backends import resolve_backend
from fastres.fast_block import FastBlockMixin, scripting_refused
from fastres.plans.decisions import recorded
from fastres.plans.description import (
    NetworkStem,
    ResidualBlock,
    Stage,
    activation_name,
    conv_norm_stage,
)
from fastres.plans.folded_eval import hooks_can_see_activations, release_eval_state
from fastres.plans.folded_program import program_decision, run_program
from fastres.plans.stem import FoldedStemPlan, StemPlan, stem_plan_choice

__all__ = ["ADAPTER", "FastBasicBlock", "FastBottleneck", "FastResNet", "describe", "left_alone"]

_LAYERS = {Bottleneck: ("1", "2", "3"), BasicBlock: ("1", "2")}


def describe(
    block: Bottleneck | BasicBlock, reference: Callable[[Tensor], Tensor]
) -> ResidualBlock:
    """The description of a torchvision block (or a subclass keeping its layout, as
    :class:`fastres.FastBottleneck` does); ``reference`` runs torchvision's own forward."""
    suffixes = next(layers for cls, layers in _LAYERS.items() if isinstance(block, cls))
    activation = activation_name(block.relu)
    stages = tuple(
        Stage(
            getattr(block, f"conv{i}"),
            getattr(block, f"bn{i}"),
            activation if i != suffixes[-1] else "identity",
        )
        for i in suffixes
    )
    return ResidualBlock(
        module=block,
        stages=stages,
        shortcut=block.downsample,
        shortcut_stage=conv_norm_stage(block.downsample),
        activation=activation,
        reference=reference,
    )


def left_alone(module: Bottleneck | BasicBlock | ResNet) -> str:
    """Why convert() leaves a torchvision block or ResNet alone ("" when it converts it): a
    layer the fused ops do not reproduce, in the block or in the ResNet's stem."""
    if isinstance(module, ResNet):
        return Stage(module.conv1, module.bn1, activation_name(module.relu)).issue(ACTIVATIONS)
    return describe(module, module.forward).fusion_issue()


class FastBottleneck(FastBlockMixin, Bottleneck):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) on fused ops.

    Same constructor as torchvision's, plus ``backend`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"triton"`` or ``"torch"``) and ``sync_bn`` / ``process_group``: with ``sync_bn=True`` every
    BatchNorm of the block, the downsample branch's included, becomes a :class:`SyncBatchNorm2d`
    over ``process_group`` (None: the default group). Input ``(N, inplanes, H, W)``; output
    ``(N, planes * 4, H / stride, W / stride)``, dtype and memory format as torchvision's.
    """

    _describe_with = staticmethod(describe)

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

    _describe_with = staticmethod(describe)

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
    its input instead of allocating a new output (measured:
    benchmarks/diagnostics.md). Anything else runs as ``layer(x)``."""
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
    (fastres/plans/folded_convolution.py), so that every convolution of the model is folded.
    Everything else (training, attributes, state dict, the blocks, pooling, fc) is ResNet's.
    :func:`fastres.resnet50` and the other builders return one; :func:`fastres.convert` retypes
    an exact ``ResNet`` into one on the same tensors and :func:`fastres.revert` back.
    """

    backend: str

    def _forward_impl(self, x: Tensor) -> Tensor:
        stage = Stage(self.conv1, self.bn1, activation_name(self.relu))
        stem = NetworkStem(self, stage, self.maxpool, super()._forward_impl)
        choice = stem_plan_choice(stem, x, self.backend)
        if not isinstance(choice.plan, FoldedStemPlan):
            with recorded(self, "ResNet's own forward", choice.passed_over):
                reference: Tensor = choice.plan.run(stem, x, self.backend)
                return reference
        backend = resolve_backend(self.backend, x.device, x.dtype)
        program, no_program = program_decision(self, stage, x) if backend == "cpu" else (None, "")
        if program is not None:  # the whole network in one oneDNN call
            with recorded(self, _PROGRAM, calls=("fastres._onednn FoldedProgram.run",)):
                out = run_program(program, x)
                if program.includes_head:
                    return out
                logits: Tensor = self.fc(torch.flatten(self.avgpool(out), 1))
                return logits
        passed_over = {_PROGRAM: [no_program or f"the {backend!r} backend folds block by block"]}
        with recorded(self, "folded stem, then block by block", passed_over):
            return self._folded_block_by_block(stem, choice.plan, x)

    def _folded_block_by_block(self, stem: NetworkStem, stem_plan: StemPlan, x: Tensor) -> Tensor:
        # Folded eval runs on channels_last (oneDNN's and cuDNN's layout): the folded stem's
        # output is, and keeps every block on it, where an NCHW input would make each block
        # convert its output back (measured: benchmarks/diagnostics.md).
        x = stem_plan.run(stem, x, self.backend)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if hooks_can_see_activations(self):
            for layer in layers:
                x = layer(x)
        else:
            for layer in layers:
                x = _run_on_scratch(layer, x)
        logits: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits

    def train(self, mode: bool = True) -> FastResNet:
        release_eval_state(self)  # folded weights and programs are for eval only
        super().train(mode)
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        raise scripting_refused(self)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


ADAPTER = LibraryAdapter(
    library="torchvision",
    fast_classes={Bottleneck: FastBottleneck, BasicBlock: FastBasicBlock, ResNet: FastResNet},
    left_alone=left_alone,
)
