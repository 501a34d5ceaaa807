"""Ultralytics' residual blocks as the canonical residual-block description; imported only when
ultralytics is installed.

Three kinds: the ResNet block (``ultralytics.nn.modules.block.ResNetBlock``, the blocks of
``yolov8-cls-resnet50.yaml`` and of the RT-DETR ResNet backbones); the YOLO detectors'
``Bottleneck`` (inside ``C2f``, ``C3k2``, ``C3k`` and ``C3``): ``cv1`` and ``cv2``, each a
``Conv`` with SiLU, and with ``add`` the input added after cv2's activation,
``x + cv2(cv1(x))`` (description.ADD_AFTER_ACTIVATION), without it no add at all; and every
other ``Conv`` (and ``DWConv``) of a model, one stage without a shortcut: the detectors' other
convolutions (C2f's outer ones, downsampling, SPPF's, the heads').

A ResNetBlock is ``cv1 cv2 cv3``, each an Ultralytics ``Conv`` (``conv``, ``bn``, ``act``: SiLU
for cv1 and cv2, Identity for cv3), a ``shortcut`` (``Sequential(Conv)`` without activation, or
Identity), the add and ``F.relu``. Ultralytics' BatchNorms use eps 1e-3 and momentum 0.03; the
fused ops take them as they are. A model fused by Ultralytics (``model.fuse()``: BatchNorm folded
into the convolutions, ``bn`` deleted) is left alone.

The stem is the first ``ResNetLayer`` (``is_first``): ``Sequential(Conv 7x7/2 + SiLU, MaxPool)``;
it folds in eval. The other ResNetLayers only hold blocks, which convert on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

from torch import Tensor, nn
from ultralytics.nn.modules.block import Bottleneck, ResNetBlock, ResNetLayer
from ultralytics.nn.modules.conv import Conv, DWConv

from fastres.activation import ACTIVATIONS
from fastres.adapters import LibraryAdapter
from fastres.fast_block import FastBlockMixin, FastStemMixin
from fastres.plans.description import (
    ADD_AFTER_ACTIVATION,
    NO_ADD,
    ResidualBlock,
    Stage,
    activation_name,
)

__all__ = [
    "ADAPTER",
    "FastResNetBlock",
    "FastResNetLayer",
    "FastYOLOBottleneck",
    "FastYOLOConv",
    "FastYOLODWConv",
    "describe",
    "describe_bottleneck",
    "describe_conv",
]


def _stage(conv: Conv) -> Stage:
    return Stage(conv.conv, conv.bn, activation_name(conv.act))


def _shortcut_stage(shortcut: nn.Module) -> Stage | None:
    """``Sequential(Conv)`` as one stage, else None (then it runs as its own modules)."""
    if type(shortcut) is nn.Sequential and len(shortcut) == 1 and _is_unfused_conv(shortcut[0]):
        return _stage(shortcut[0])
    return None


def _is_unfused_conv(module: nn.Module) -> TypeGuard[Conv]:
    """An exact Ultralytics Conv that still has its BatchNorm (model.fuse() deletes it)."""
    return type(module) is Conv and hasattr(module, "bn")


def describe(block: ResNetBlock, reference: Callable[[Tensor], Tensor]) -> ResidualBlock:
    """The description of an Ultralytics ResNetBlock; ``reference`` runs its own forward. The
    activation after the add is ``F.relu`` in its forward."""
    shortcut = None if type(block.shortcut) is nn.Identity else block.shortcut
    return ResidualBlock(
        module=block,
        stages=(_stage(block.cv1), _stage(block.cv2), _stage(block.cv3)),
        shortcut=shortcut,
        shortcut_stage=None if shortcut is None else _shortcut_stage(shortcut),
        activation="relu",
        reference=reference,
    )


def describe_bottleneck(block: Bottleneck, reference: Callable[[Tensor], Tensor]) -> ResidualBlock:
    """The description of an Ultralytics Bottleneck; ``reference`` runs its own forward."""
    return ResidualBlock(
        module=block,
        stages=(_stage(block.cv1), _stage(block.cv2)),
        shortcut=None,
        shortcut_stage=None,
        activation="identity",
        reference=reference,
        add_position=ADD_AFTER_ACTIVATION if block.add else NO_ADD,
    )


def describe_conv(conv: Conv, reference: Callable[[Tensor], Tensor]) -> ResidualBlock:
    """An Ultralytics Conv (or DWConv) as a one-stage block without shortcut:
    ``act(bn(conv(x)))``."""
    return ResidualBlock(
        module=conv,
        stages=(_stage(conv),),
        shortcut=None,
        shortcut_stage=None,
        activation="identity",
        reference=reference,
        add_position=NO_ADD,
    )


def stem(layer: ResNetLayer) -> tuple[Stage, nn.Module]:
    """The stem's (convolution, BatchNorm, activation) stage and the pooling after it."""
    conv, pool = layer.layer
    if not _is_unfused_conv(conv):  # convert() checked it (_stem_left_alone)
        raise TypeError(f"an Ultralytics stem starts with a Conv and its BatchNorm, got {conv}")
    return _stage(conv), pool


def _stem_left_alone(layer: ResNetLayer) -> str | None:
    """None for a ResNetLayer of blocks (not a stem: convert() says nothing of it), else why the
    stem is left alone ("" when it converts it)."""
    if not layer.is_first:
        return None
    parts = layer.layer
    if not (len(parts) == 2 and type(parts[1]) is nn.MaxPool2d and _is_unfused_conv(parts[0])):
        return "Ultralytics ResNetLayer stem that is not Conv (with its BatchNorm) + MaxPool2d"
    return stem(layer)[0].issue(ACTIVATIONS)


def _convs_left_alone(block: nn.Module, names: tuple[str, ...]) -> str:
    """Why the block's Conv layers keep it from converting ("" when they do not)."""
    kind = f"Ultralytics {type(block).__name__}"
    for name in names:
        conv = getattr(block, name)
        if type(conv) is not Conv:
            return f"{kind} whose {name} is a {type(conv).__name__}, not a Conv"
        if not hasattr(conv, "bn"):
            return f"{kind} fused by model.fuse() (BatchNorm folded into its conv)"
    return ""


def left_alone(block: ResNetBlock | ResNetLayer | Bottleneck | Conv) -> str | None:
    """Why convert() leaves an Ultralytics ResNetBlock, stem, Bottleneck or Conv alone ("" when
    it converts it; None for a ResNetLayer that is not a stem)."""
    if isinstance(block, ResNetLayer):
        return _stem_left_alone(block)
    if isinstance(block, Bottleneck):
        return _convs_left_alone(block, ("cv1", "cv2")) or (
            describe_bottleneck(block, block.forward).fusion_issue()
        )
    if isinstance(block, Conv):
        if not hasattr(block, "bn"):
            return f"Ultralytics {type(block).__name__} fused by model.fuse()"
        return describe_conv(block, block.forward).fusion_issue()
    return _convs_left_alone(block, ("cv1", "cv2", "cv3")) or (
        describe(block, block.forward).fusion_issue()
    )


class FastResNetBlock(FastBlockMixin, ResNetBlock):
    """Ultralytics' ``ResNetBlock`` on fused ops (made by :func:`fastres.convert`)."""

    _describe_with = staticmethod(describe)


class FastResNetLayer(FastStemMixin, ResNetLayer):
    """Ultralytics' stem ``ResNetLayer`` (``is_first``), folded in eval (made by
    :func:`fastres.convert`)."""

    _stem_with = staticmethod(stem)


class FastYOLOBottleneck(FastBlockMixin, Bottleneck):
    """Ultralytics' ``Bottleneck`` on fused ops (made by :func:`fastres.convert`): the BatchNorm
    and SiLU between cv1 and cv2 run as ``bn_act_conv2d`` (recomputed in backward, not kept),
    cv2's BatchNorm, SiLU and the add as ``bn_act_add``."""

    _describe_with = staticmethod(describe_bottleneck)


class FastYOLOConv(FastBlockMixin, Conv):
    """Ultralytics' ``Conv`` on fused ops (made by :func:`fastres.convert`): in training the
    convolution, then BatchNorm and the activation as one ``bn_act`` (whose output is all that
    is kept, SiLU recomputed in backward); in eval without autograd one folded convolution with
    the activation fused."""

    _describe_with = staticmethod(describe_conv)


class FastYOLODWConv(FastBlockMixin, DWConv):
    """Ultralytics' depthwise ``DWConv`` as :class:`FastYOLOConv`."""

    _describe_with = staticmethod(describe_conv)


ADAPTER = LibraryAdapter(
    library="ultralytics",
    fast_classes={
        ResNetBlock: FastResNetBlock,
        ResNetLayer: FastResNetLayer,
        Bottleneck: FastYOLOBottleneck,
        Conv: FastYOLOConv,
        DWConv: FastYOLODWConv,
    },
    left_alone=left_alone,
)
