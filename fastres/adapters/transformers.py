"""Hugging Face transformers' ResNet layers (``ResNetBasicLayer`` / ``ResNetBottleNeckLayer``,
the blocks of ``ResNetModel`` and ``ResNetForImageClassification``) as the canonical
residual-block description, and their stem (``ResNetEmbeddings``); imported only when
transformers is installed.

Each layer is a ``layer`` Sequential of ``ResNetConvLayer`` (``convolution``, ``normalization``,
``activation``; the last one's activation is Identity), a ``shortcut`` (``ResNetShortCut``:
convolution and BatchNorm, or Identity), the add and ``activation``. The stem is one
``ResNetConvLayer`` (``embedder``, 7x7/2) and a max-pool (``pooler``); it folds in eval.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from transformers.models.resnet.modeling_resnet import (
    ResNetBasicLayer,
    ResNetBottleNeckLayer,
    ResNetConvLayer,
    ResNetEmbeddings,
    ResNetShortCut,
)

from fastres.activation import ACTIVATIONS
from fastres.adapters import LibraryAdapter
from fastres.fast_block import FastBlockMixin, FastStemMixin
from fastres.plans.description import ResidualBlock, Stage, activation_name

__all__ = [
    "ADAPTER",
    "FastResNetBasicLayer",
    "FastResNetBottleNeckLayer",
    "FastResNetEmbeddings",
    "describe",
]


def _stage(conv: nn.Module) -> Stage:
    if not isinstance(conv, ResNetConvLayer):
        raise TypeError(f"a ResNet layer's layer holds ResNetConvLayer modules, got {conv}")
    return Stage(conv.convolution, conv.normalization, activation_name(conv.activation))


def describe(
    layer: ResNetBasicLayer | ResNetBottleNeckLayer, reference: Callable[[Tensor], Tensor]
) -> ResidualBlock:
    """The description of a transformers ResNet layer; ``reference`` runs its own forward."""
    stages = tuple(_stage(conv) for conv in layer.layer)
    shortcut = None if type(layer.shortcut) is nn.Identity else layer.shortcut
    shortcut_stage = (
        Stage(shortcut.convolution, shortcut.normalization, "identity")
        if type(shortcut) is ResNetShortCut
        else None
    )
    return ResidualBlock(
        module=layer,
        stages=stages,
        shortcut=shortcut,
        shortcut_stage=shortcut_stage,
        activation=activation_name(layer.activation),
        reference=reference,
    )


def stem(embeddings: ResNetEmbeddings) -> tuple[Stage, nn.Module]:
    """The stem's (convolution, BatchNorm, activation) stage and the pooling after it."""
    return _stage(embeddings.embedder), embeddings.pooler


def left_alone(module: ResNetBasicLayer | ResNetBottleNeckLayer | ResNetEmbeddings) -> str:
    """Why convert() leaves a transformers ResNet layer or stem alone ("" when it converts
    it)."""
    if isinstance(module, ResNetEmbeddings):
        if type(module.embedder) is not ResNetConvLayer:
            return f"transformers ResNetEmbeddings with a {type(module.embedder).__name__} embedder"
        return stem(module)[0].issue(ACTIVATIONS)
    layer = module
    others = [type(m).__name__ for m in layer.layer if type(m) is not ResNetConvLayer]
    if others:
        return f"transformers {type(layer).__name__} with {', '.join(others)} in its layer"
    return describe(layer, layer.forward).fusion_issue()


class FastResNetBasicLayer(FastBlockMixin, ResNetBasicLayer):
    """transformers' ``ResNetBasicLayer`` on fused ops (made by :func:`fastres.convert`)."""

    _describe_with = staticmethod(describe)


class FastResNetBottleNeckLayer(FastBlockMixin, ResNetBottleNeckLayer):
    """transformers' ``ResNetBottleNeckLayer`` on fused ops (made by :func:`fastres.convert`)."""

    _describe_with = staticmethod(describe)


class FastResNetEmbeddings(FastStemMixin, ResNetEmbeddings):
    """transformers' ``ResNetEmbeddings`` (the stem), folded in eval (made by
    :func:`fastres.convert`)."""

    _stem_with = staticmethod(stem)


ADAPTER = LibraryAdapter(
    library="transformers",
    fast_classes={
        ResNetBasicLayer: FastResNetBasicLayer,
        ResNetBottleNeckLayer: FastResNetBottleNeckLayer,
        ResNetEmbeddings: FastResNetEmbeddings,
    },
    left_alone=left_alone,
)
