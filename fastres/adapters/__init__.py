"""Adapters: one library's residual blocks as the canonical description plans work on
(:class:`fastres.plans.description.ResidualBlock`), one file per library.

torchvision's adapter is always there, first (fastres/adapters/torchvision.py, with its fast
classes :class:`fastres.FastBottleneck`, :class:`fastres.FastBasicBlock` and
:class:`fastres.FastResNet`). Every adapter builds its fast classes on the mixins of
fastres/fast_block.py. The others are
registered only when their library imports: ``import fastres`` needs none of them, and
:func:`adapters` imports each library once, when a model is first converted or reverted. Every
library's blocks go through the same interface: converted, or left alone with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["LibraryAdapter", "adapters"]


@dataclass(frozen=True)
class LibraryAdapter:
    """What :func:`fastres.convert` needs of one library.

    Attributes:
        library: the library's import name.
        fast_classes: each of the library's block classes -> the fast class that convert()
            retypes it into (and revert() back from).
        left_alone: why a module of one of those classes is not converted ("" when it is): a
            layer the fused ops do not reproduce (squeeze-excitation, anti-aliasing, another
            activation or norm, ...); None when the module is not a candidate at all (a class
            that serves as a stem only in some of its instances), so nothing is said of it.
    """

    library: str
    fast_classes: dict[type[nn.Module], type[nn.Module]]
    left_alone: Callable[[Any], str | None]  # takes the library's block classes


# The other libraries' adapters, by module; each defines ADAPTER.
_OPTIONAL = (
    "fastres.adapters.timm",
    "fastres.adapters.transformers",
    "fastres.adapters.ultralytics",
)
_LOADED: list[LibraryAdapter] | None = None


def adapters() -> list[LibraryAdapter]:
    """torchvision's adapter, then those of the other libraries that import here (each tried
    once)."""
    global _LOADED
    if _LOADED is None:
        from fastres.adapters import torchvision

        loaded = [torchvision.ADAPTER]
        for name in _OPTIONAL:
            try:
                loaded.append(importlib.import_module(name).ADAPTER)
            except ImportError:  # the library is not installed: nothing of it to convert
                continue
        _LOADED = loaded
    return _LOADED
