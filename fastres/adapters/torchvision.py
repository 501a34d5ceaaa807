"""torchvision's ``Bottleneck`` and ``BasicBlock`` as the canonical residual-block description.

Both keep their layers as ``conv1 bn1 conv2 bn2 (conv3 bn3) relu downsample``: each stage but
the last is ``relu(bn_i(conv_i(h)))``, the last ``bn_k(conv_k(h))`` meets ``downsample(x)`` (or
``x``), and ``relu`` follows the add. The one ``relu`` module serves every activation.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck

from fastres.plans.description import ResidualBlock, Stage, activation_name, conv_norm_stage

__all__ = ["describe"]

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
