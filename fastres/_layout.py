"""Layout facts shared by the op layer and the Triton launchers."""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The dense format fastres computes ``x`` in: channels_last or NCHW-contiguous.

    Must agree with memory_format_of() in csrc/common/bn_act_checks.h (torch's
    suggest_memory_format), so that fake kernels predict the strides the real kernels produce.
    """
    # The unambiguous dense cases first, without torch's general stride analysis: this runs a
    # few times per block on the folded inference path.
    if x.dim() == 4 and min(x.shape[1:]) > 1:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if channels_last != x.is_contiguous():
            return torch.channels_last if channels_last else torch.contiguous_format
    from torch._prims_common import suggest_memory_format

    fmt = suggest_memory_format(x)
    return torch.channels_last if fmt == torch.channels_last else torch.contiguous_format


def param_dtype_of(x: Tensor) -> torch.dtype:
    """Statistics and affine parameters: float64 for float64 activations, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
