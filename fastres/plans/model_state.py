"""A snapshot of everything a module tree's forward is decided and computed from, to check
cheaply that nothing changed since a decision was taken.

The whole-network oneDNN program (fastres/plans/folded_program.py) is built after checking every
block's plan, folding every weight and walking the tree for hooks: some 0.7 ms of Python per
call, which a ResNet-50 image at batch 1 in bfloat16 notices. Comparing a snapshot instead covers
what those checks read: each module's attributes (its settings, ``training``, a backend name),
its children, parameters and buffers (replaced or re-registered), its forward hooks, and each
tensor's version counter (in-place updates: ``load_state_dict``, optimiser steps), storage
(``.data =``, ``.to()``), dtype and ``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

__all__ = ["ModelState"]


def _structure(module: nn.Module) -> tuple[int, ...]:
    """The identities of the module's children, parameters and buffers, in order. (A snapshot
    keeps the objects themselves alive, so that no new object can take an old one's id.)"""
    return tuple(
        map(
            id,
            (
                *module._modules.values(),
                *module._parameters.values(),
                *module._buffers.values(),
            ),
        )
    )


def _tensor_state(t: Tensor) -> tuple[object, ...]:
    return (t._version, t.data_ptr(), t.dtype, t.requires_grad)


def _same_attributes(module: nn.Module, saved: dict[str, Any]) -> bool:
    """``module.__dict__ == saved``, where a value replaced by a tensor (whose ``==`` is
    elementwise) counts as a change. Unchanged values are the same objects: compared by
    identity, they cost no ``__eq__``."""
    try:
        return bool(module.__dict__ == saved)
    except (RuntimeError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class ModelState:
    """The state of a model's modules when :meth:`of` was called. It holds the submodules and
    tensors, not the model itself: a cache keyed weakly by the model may keep it."""

    submodules: tuple[nn.Module, ...]
    attributes: tuple[dict[str, Any], ...]
    structure: tuple[tuple[int, ...], ...]
    tensors: tuple[Tensor, ...]
    tensor_states: tuple[tuple[object, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> ModelState:
        modules = tuple(model.modules())
        tensors = tuple(
            t
            for m in modules
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        )
        return cls(
            modules[1:],
            tuple(dict(m.__dict__) for m in modules),
            tuple(_structure(m) for m in modules),
            tensors,
            tuple(_tensor_state(t) for t in tensors),
        )

    def unchanged(self, model: nn.Module) -> bool:
        """Whether ``model`` (the one :meth:`of` was given) and every module and tensor under it
        are as they were, with no forward hook (on these modules or global)."""
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return False
        modules = (model, *self.submodules)
        for module, attributes, structure in zip(
            modules, self.attributes, self.structure, strict=True
        ):
            if module._forward_hooks or module._forward_pre_hooks:
                return False
            if not _same_attributes(module, attributes) or _structure(module) != structure:
                return False
        return all(
            _tensor_state(t) == state
            for t, state in zip(self.tensors, self.tensor_states, strict=True)
        )
