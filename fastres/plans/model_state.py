"""A snapshot of everything a module tree's forward is decided and computed from, to check
cheaply that nothing changed since a decision was taken.

The whole-network oneDNN program (fastres/plans/folded_program.py) is built after checking every
block's plan, folding every weight and walking the tree for hooks: Python per call that a
ResNet-50 image at batch 1 in bfloat16 notices. Comparing a snapshot instead covers
what those checks read: each module's attributes (its settings, ``training``, a backend name),
its children, parameters and buffers (replaced or re-registered), its forward hooks, and each
tensor's version counter (in-place updates: ``load_state_dict``, optimiser steps), storage
(``.data =``, ``.to()``) and ``requires_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

__all__ = ["ModelState"]


def _module_state(module: nn.Module) -> tuple[object, ...]:
    """The module's attribute values, then its children, parameters and buffers, in order.
    Compared with ``==``, unchanged entries are the same objects (identity, no ``__eq__``)."""
    return (
        *module.__dict__.values(),
        *module._modules.values(),
        *module._parameters.values(),
        *module._buffers.values(),
    )


def _same_state(module: nn.Module, saved: tuple[object, ...]) -> bool:
    """``_module_state(module) == saved``, where an entry replaced by a tensor (whose ``==`` is
    elementwise) counts as a change."""
    try:
        return bool(_module_state(module) == saved)
    except (RuntimeError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class ModelState:
    """The state of a model's modules when :meth:`of` was called. It holds the submodules and
    tensors, not the model itself: a cache keyed weakly by the model may keep it. (Holding
    every object it compares also keeps a new object from being taken for an old one.)"""

    submodules: tuple[nn.Module, ...]
    module_states: tuple[tuple[object, ...], ...]
    tensors: tuple[Tensor, ...]
    versions: list[int]
    data_ptrs: list[int]
    requires_grad: list[bool]

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
            tuple(_module_state(m) for m in modules),
            tensors,
            [t._version for t in tensors],
            [t.data_ptr() for t in tensors],
            [t.requires_grad for t in tensors],
        )

    def unchanged(self, model: nn.Module) -> bool:
        """Whether ``model`` (the one :meth:`of` was given) and every module and tensor under it
        are as they were, with no forward hook (on these modules or global)."""
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
            return False
        modules = (model, *self.submodules)
        for module, saved in zip(modules, self.module_states, strict=True):
            if module._forward_hooks or module._forward_pre_hooks:
                return False
            if not _same_state(module, saved):
                return False
        tensors = self.tensors
        return (
            [t._version for t in tensors] == self.versions
            and [t.data_ptr() for t in tensors] == self.data_ptrs
            and [t.requires_grad for t in tensors] == self.requires_grad
        )
