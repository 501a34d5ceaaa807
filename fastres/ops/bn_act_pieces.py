"""bn_act's pieces: its computation split where synchronized BatchNorm communicates.

A synchronized BatchNorm needs per-channel values from every process at two points: the batch
statistics in forward, and the two per-channel gradient sums in backward. These ops expose the
kernels of :mod:`fastres.ops.bn_act` around those points, one set per backend:

* ``bn_stats(x) -> (mean, var)``: the forward reduction (batch mean, biased variance);
* the forward's elementwise pass is ``bn_act_forward`` itself, with ``training=False`` and the
  global statistics passed as the "running" ones;
* ``bn_act_backward_reduce(grad_out, x, save_mean, relu_mask, relu) -> (sum_grad,
  sum_grad_centred)``: sums of ``gm = grad_out * relu_mask`` and ``gm * (x - save_mean)``;
* ``bn_act_backward_apply(..., sum_grad, sum_grad_centred, count, ...) -> (grad_x,
  grad_residual)``: the training backward's elementwise pass from sums over every process.

Compiled family (cpu, cuda): ``torch.ops.fastres.<name>``, schemas in ``csrc/fastres.cpp``. Triton
family: ``torch.ops.fastres.<name>_triton``, defined here. The ``torch`` backend has
``bn_stats`` only (:func:`bn_stats_reference`). Look any of them up with
``fastres.ops.registry.op(name, backend)``; the ops built on them are in
fastres/ops/bn_act_from_stats.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.backends import STATUS
from fastres.ops.registry import register_reference

__all__ = ["bn_stats_reference"]


# ---------------------------------------------------------------------------------------------
# Fake kernels, shared by the compiled and Triton families


def _channel_pair(x: Tensor) -> tuple[Tensor, Tensor]:
    channels = x.shape[1]
    return (
        x.new_empty((channels,), dtype=param_dtype_of(x)),
        x.new_empty((channels,), dtype=param_dtype_of(x)),
    )


def _stats_fake(x):
    return _channel_pair(x)


def _backward_reduce_fake(grad_out, x, save_mean, relu_mask, relu):
    return _channel_pair(x)


def _backward_apply_fake(
    grad_out,
    x,
    weight,
    save_mean,
    save_var,
    relu_mask,
    sum_grad,
    sum_grad_centred,
    count,
    eps,
    relu,
    residual_grad,
):
    fmt = memory_format_of(x)
    grad_residual = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty((0,))
    return torch.empty_like(x, memory_format=fmt), grad_residual


_FAKES: dict[str, Callable[..., Any]] = {
    "bn_stats": _stats_fake,
    "bn_act_backward_reduce": _backward_reduce_fake,
    "bn_act_backward_apply": _backward_apply_fake,
}


# ---------------------------------------------------------------------------------------------
# The Triton family


@torch.library.custom_op("fastres::bn_stats_triton", mutates_args=())
def bn_stats_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """Triton twin of ``fastres::bn_stats``."""
    from fastres.triton import bn_act as kernels
    from fastres.triton import launch_device

    with launch_device(x):
        return kernels.bn_stats(x)


@torch.library.custom_op("fastres::bn_act_backward_reduce_triton", mutates_args=())
def bn_act_backward_reduce_triton(
    grad_out: Tensor, x: Tensor, save_mean: Tensor, relu_mask: Tensor, relu: bool
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``fastres::bn_act_backward_reduce``."""
    from fastres.triton import bn_act as kernels
    from fastres.triton import launch_device

    with launch_device(x):
        return kernels.bn_act_backward_reduce(grad_out, x, save_mean, relu_mask, relu)


@torch.library.custom_op("fastres::bn_act_backward_apply_triton", mutates_args=())
def bn_act_backward_apply_triton(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    relu_mask: Tensor,
    sum_grad: Tensor,
    sum_grad_centred: Tensor,
    count: int,
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Triton twin of ``fastres::bn_act_backward_apply``."""
    from fastres.triton import bn_act as kernels
    from fastres.triton import launch_device

    with launch_device(x):
        return kernels.bn_act_backward_apply(
            grad_out,
            x,
            weight,
            save_mean,
            save_var,
            relu_mask,
            sum_grad,
            sum_grad_centred,
            count,
            eps,
            relu,
            residual_grad,
        )


# ---------------------------------------------------------------------------------------------
# The torch backend: the statistics in plain PyTorch (the other pieces are the compiled and
# Triton families' only: the torch backend's from-stats ops recompute differentiably, see
# fastres/ops/bn_act_from_stats.py)


@register_reference("bn_stats")
def bn_stats_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """``bn_stats`` of the ``torch`` backend: mean and biased variance per channel."""
    if x.numel() == 0:  # an empty batch has no statistics; PyTorch reports NaN for them
        nan = x.new_full((x.shape[1],), float("nan"), dtype=param_dtype_of(x))
        return nan, nan.clone()
    var, mean = torch.var_mean(x.to(param_dtype_of(x)), dim=(0, 2, 3), correction=0)
    return mean, var


# ---------------------------------------------------------------------------------------------
# Registration


def _register_fakes(family_suffix: str) -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastres::{name}{family_suffix}", fake)


_register_fakes("_triton")
if STATUS["cpu"].built:  # the compiled family exists once fastres._C is loaded
    _register_fakes("")
