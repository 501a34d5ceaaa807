"""The dtype a block computes in, under autocast or not: helpers every plan shares."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["autocast_dtype", "autocast_off", "compute_dtype"]


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs convolutions in for x's device, or None outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def autocast_off(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context with autocast off for x's device (the folded convolutions run in the dtype
    folding_input gave them); no context at all outside autocast, as the folded path runs a
    few times per block."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's convolutions run in: autocast's for a float32, float16 or bfloat16 x
    under autocast (autocast leaves float64 alone), x's own otherwise."""
    low = autocast_dtype(x)
    return low if low is not None and x.dtype != torch.float64 else x.dtype
