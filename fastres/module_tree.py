"""Module-tree surgery shared by convert(), revert() and synchronized BatchNorm: retyping a module
in place of itself, and replacing modules of one type throughout a tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)

__all__ = ["replace_modules", "retyped"]


def retyped(module: nn.Module, cls: type[M]) -> M:
    """The same module state under another class: every parameter, buffer, submodule, hook and
    the training flag are the very same objects, so nothing is copied or cast."""
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    return new


def replace_modules(root: nn.Module, kind: type, make: Callable[[Any], nn.Module]) -> list[str]:
    """Replaces, in place, every module of exactly type ``kind`` under ``root`` (not ``root``
    itself) by ``make(module)``; returns their qualified names."""
    targets = [
        (f"{parent_name}.{name}" if parent_name else name, parent, name, child)
        for parent_name, parent in root.named_modules()
        for name, child in parent.named_children()
        if type(child) is kind
    ]
    for _, parent, name, child in targets:
        setattr(parent, name, make(child))
    return [qualified for qualified, *_ in targets]
