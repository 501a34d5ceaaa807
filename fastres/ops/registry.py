"""Which op runs on which backend: one rule for names, one lookup for every op family.

Ops are named by what they compute, in the order they compute it: ``bn_act`` is BatchNorm, then
the activation; ``bn_act_conv2d`` BatchNorm, activation, then the convolution;
``bn_act_conv2d_stats`` the same, then the batch statistics of the convolution's output;
``conv2d_bias_act`` a convolution, its bias, then the activation. A backward op adds
``_backward``. The family adds its suffix, and no schema takes a backend name: the backend is
which op is called.

========  ================  ==========================================================
backend   family suffix     ops
========  ================  ==========================================================
cpu       (none)            ``torch.ops.fastres.<name>``: C++ kernels; the dispatch key
cuda      (none)            picks the CPU or the CUDA kernel (schemas: csrc/fastres.cpp)
triton    ``_triton``       ``torch.ops.fastres.<name>_triton``: Triton kernels
torch     (no ops)          PyTorch's own composition, the reference the ops are
                            checked against (fastres.ops.bn_act.bn_act_reference, ...)
========  ================  ==========================================================
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILY_SUFFIX", "op"]

FAMILY_SUFFIX = {"cpu": "", "cuda": "", "triton": "_triton"}


def op(name: str, backend: str) -> Any:
    """``torch.ops.fastres.<name><suffix>``: op ``name`` of ``backend``'s family.

    Raises ValueError for the ``torch`` backend (it has no ops) or an unknown backend, and
    AttributeError when the family has no such op (the compiled family without fastres._C).
    """
    if backend not in FAMILY_SUFFIX:
        raise ValueError(
            f"no fastres op family for backend {backend!r}: ops exist for "
            f"{sorted(FAMILY_SUFFIX)}; the torch backend is PyTorch's own composition"
        )
    return getattr(torch.ops.fastres, name + FAMILY_SUFFIX[backend])
