"""Which op runs on which backend: one rule for names, one lookup for every op family.

Ops are named by what they compute, in the order they compute it: ``bn_act`` is BatchNorm, then
the activation; ``bn_act_conv2d`` BatchNorm, activation, then the convolution;
``bn_act_conv2d_stats`` the same, then the batch statistics of the convolution's output;
``conv2d_bias_act`` a convolution, its bias, then the activation; ``_from_stats`` says the batch
statistics come in as arguments. A backward op adds ``_backward``. The family adds its suffix,
and no schema takes a backend name: the backend is which op is called.

========  ================  ==========================================================
backend   family suffix     ops
========  ================  ==========================================================
cpu       (none)            ``torch.ops.fastres.<name>``: C++ kernels; the dispatch key
cuda      (none)            picks the CPU or the CUDA kernel (schemas: csrc/fastres.cpp)
triton    ``_triton``       ``torch.ops.fastres.<name>_triton``: Triton kernels
torch     (not ops)         PyTorch's composition with the op's arguments and results,
                            the reference the ops are checked against; each op family's
                            file registers its own (:func:`register_reference`)
========  ================  ==========================================================

:func:`op` is the one lookup: the public functions of fastres/ops/ call ``op(name, backend)``
for every backend, the ``torch`` one included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["FAMILY_SUFFIX", "op", "register_reference"]

FAMILY_SUFFIX = {"cpu": "", "cuda": "", "triton": "_triton"}

# op name -> the torch backend's composition (same arguments and results as the op)
_REFERENCES: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def register_reference(name: str) -> Callable[[F], F]:
    """Registers the decorated function as op ``name`` of the ``torch`` backend."""

    def register(reference: F) -> F:
        if name in _REFERENCES:
            raise RuntimeError(f"fastres: op {name!r} has a torch reference already")
        _REFERENCES[name] = reference
        return reference

    return register


def op(name: str, backend: str) -> Any:
    """Op ``name`` of ``backend``'s family: ``torch.ops.fastres.<name><suffix>``, or for the
    ``torch`` backend the composition its family's file registered.

    Raises ValueError for an unknown backend or an op the ``torch`` backend has no composition
    for, and AttributeError when the family has no such op (the compiled family without
    fastres._C).
    """
    if backend == "torch":
        if name not in _REFERENCES:
            raise ValueError(f"fastres: op {name!r} has no torch reference")
        return _REFERENCES[name]
    if backend not in FAMILY_SUFFIX:
        raise ValueError(
            f"no fastres op family for backend {backend!r}: ops exist for "
            f"{sorted(FAMILY_SUFFIX) + ['torch']}"
        )
    return getattr(torch.ops.fastres, name + FAMILY_SUFFIX[backend])
