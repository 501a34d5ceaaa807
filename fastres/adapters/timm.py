"""timm's ResNet blocks (``timm.models.resnet.BasicBlock`` / ``Bottleneck``) as the canonical
residual-block description; imported only when timm is installed.

A timm Bottleneck is ``conv1 bn1 act1 conv2 bn2 drop_block act2 aa conv3 bn3 se drop_path``, the
``downsample`` shortcut, the add and ``act3``; a BasicBlock ``conv1 bn1 drop_block act1 aa conv2
bn2 se drop_path``, ``downsample``, add, ``act2``. It is the plain chain the fused ops run when
``drop_block`` and ``aa`` are Identity and ``se`` is None; anything else is left alone, with the
reason. A ``drop_path`` (stochastic depth, DropPath with a non-zero rate) is an identity in eval:
such a block converts, runs fused in eval and timm's own forward in training. resnet50d's
downsample (AvgPool, conv, BatchNorm) runs as its own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from fastres.adapters import LibraryAdapter
from fastres.fast_block import FastBlockMixin
from fastres.plans.description import ResidualBlock, Stage, activation_name, conv_norm_stage

__all__ = ["ADAPTER", "FastTimmBasicBlock", "FastTimmBottleneck", "describe"]


def describe(
    block: BasicBlock | Bottleneck, reference: Callable[[Tensor], Tensor]
) -> ResidualBlock:
    """The description of a timm BasicBlock or Bottleneck (its optional layers aside: see
    :func:`left_alone`); ``reference`` runs timm's own forward."""
    stages: tuple[Stage, ...]
    if isinstance(block, Bottleneck):
        stages = (
            Stage(block.conv1, block.bn1, activation_name(block.act1)),
            Stage(block.conv2, block.bn2, activation_name(block.act2)),
            Stage(block.conv3, block.bn3, "identity"),
        )
        activation = activation_name(block.act3)
    else:
        stages = (
            Stage(block.conv1, block.bn1, activation_name(block.act1)),
            Stage(block.conv2, block.bn2, "identity"),
        )
        activation = activation_name(block.act2)
    drop_path = block.drop_path
    return ResidualBlock(
        module=block,
        stages=stages,
        shortcut=block.downsample,
        shortcut_stage=conv_norm_stage(block.downsample),
        activation=activation,
        reference=reference,
        layer_issue="drop_path (stochastic depth) in training"
        if drop_path is not None and drop_path.training
        else "",
    )


def left_alone(block: BasicBlock | Bottleneck) -> str:
    """Why convert() leaves a timm block alone ("" when it converts it)."""
    extras = {
        "squeeze-excitation / attention (se)": block.se is not None,
        "drop_block": type(block.drop_block) is not nn.Identity,
        "anti-aliasing (aa)": type(block.aa) is not nn.Identity,
    }
    found = [name for name, present in extras.items() if present]
    if found:
        return f"timm {type(block).__name__} with {', '.join(found)}"
    # A DropPath in training only makes the block run timm's forward until eval (layer_issue).
    return replace(describe(block, block.forward), layer_issue="").fusion_issue()


class FastTimmBasicBlock(FastBlockMixin, BasicBlock):
    """timm's ``BasicBlock`` on fused ops (made by :func:`fastres.convert`)."""

    _describe_with = staticmethod(describe)


class FastTimmBottleneck(FastBlockMixin, Bottleneck):
    """timm's ``Bottleneck`` on fused ops (made by :func:`fastres.convert`)."""

    _describe_with = staticmethod(describe)


ADAPTER = LibraryAdapter(
    library="timm",
    fast_classes={BasicBlock: FastTimmBasicBlock, Bottleneck: FastTimmBottleneck},
    left_alone=left_alone,
)
