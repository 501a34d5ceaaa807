"""torchvision's ``Bottleneck`` and ``BasicBlock`` as the canonical residual-block description.

Both keep their layers as ``conv1 bn1 conv2 bn2 (conv3 bn3) relu downsample``: each stage but
the last is ``relu(bn_i(conv_i(h)))``, the last ``bn_k(conv_k(h))`` meets ``downsample(x)`` (or
``x``), and ``relu`` follows the add. The one ``relu`` module serves every activation.

A ``ResNet`` itself converts too (to :class:`fastres.FastResNet`: its stem, ``conv1 bn1 relu``,
folds in eval). A block or stem the fused ops do not reproduce (FrozenBatchNorm2d, as in
torchvision's detection backbones, GroupNorm, another activation, ...) is left alone, with the
reason, as every library's adapter does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fastres.activation import ACTIVATIONS
from fastres.adapters import LibraryAdapter
from fastres.plans.description import ResidualBlock, Stage, activation_name, conv_norm_stage

__all__ = ["adapter", "describe", "left_alone"]

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


def adapter() -> LibraryAdapter:
    """torchvision's adapter. Made on request: its fast classes (fastres/modules.py) are built
    on :func:`describe`, so this file cannot import them when it is first imported."""
    from fastres.modules import FastBasicBlock, FastBottleneck, FastResNet

    return LibraryAdapter(
        library="torchvision",
        fast_classes={Bottleneck: FastBottleneck, BasicBlock: FastBasicBlock, ResNet: FastResNet},
        left_alone=left_alone,
    )
