"""torchvision's ResNet builders on fast blocks: ``fastres.resnet50()`` and the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision import models as tv

from fastres.adapters import torchvision as torchvision_adapter
from fastres.backends import check_backend_name
from fastres.conversion import swap_blocks
from fastres.sync_batch_norm import sync_batch_norms

__all__ = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

_FAST_OF = torchvision_adapter.ADAPTER.fast_classes


def _builder(torchvision_builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = torchvision_builder.__name__

    def build(
        *,
        weights: Any = None,
        progress: bool = True,
        backend: str = "auto",
        sync_bn: bool = False,
        process_group: Any | None = None,
        **kwargs: Any,
    ) -> nn.Module:
        model = torchvision_builder(weights=weights, progress=progress, **kwargs)
        model, _ = swap_blocks(
            model,
            lambda m, n: (_FAST_OF.get(type(m)), ""),
            lambda block: setattr(block, "backend", check_backend_name(backend)),
        )
        if sync_bn:
            sync_batch_norms(model, process_group, backend)
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"torchvision's ``{name}`` built from fast blocks.\n\n"
        f"Takes torchvision's arguments (``weights`` as torchvision's weights enum, ``progress``, "
        f"and ``ResNet`` keyword arguments) plus ``backend``, ``sync_bn`` and ``process_group`` "
        f"(as for :func:`convert`); loads any torchvision {name} state_dict unchanged."
    )
    return build


resnet18 = _builder(tv.resnet18)
resnet34 = _builder(tv.resnet34)
resnet50 = _builder(tv.resnet50)
resnet101 = _builder(tv.resnet101)
resnet152 = _builder(tv.resnet152)
resnext50_32x4d = _builder(tv.resnext50_32x4d)
resnext101_32x8d = _builder(tv.resnext101_32x8d)
resnext101_64x4d = _builder(tv.resnext101_64x4d)
wide_resnet50_2 = _builder(tv.wide_resnet50_2)
wide_resnet101_2 = _builder(tv.wide_resnet101_2)
