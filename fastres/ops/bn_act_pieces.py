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
family: ``torch.ops.fastres.<name>_triton``, defined here. The ``torch`` backend's pieces are
plain PyTorch (the reference). :func:`pieces_for` gives a backend's four pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.activation import apply_activation
from fastres.backends import STATUS
from fastres.ops.registry import op

__all__ = ["BnActPieces", "pieces_for"]


class BnActPieces(NamedTuple):
    """One backend's pieces of bn_act (signatures as the schemas in csrc/fastres.cpp)."""

    stats: Callable[..., tuple[Tensor, Tensor]]
    forward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]  # bn_act_forward
    backward_reduce: Callable[..., tuple[Tensor, Tensor]]
    backward_apply: Callable[..., tuple[Tensor, Tensor]]


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
# The torch backend: the same pieces in plain PyTorch. Its "mask" is a bool tensor of out > 0.


def _stats_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:  # an empty batch has no statistics; PyTorch reports NaN for them
        nan = x.new_full((x.shape[1],), float("nan"), dtype=param_dtype_of(x))
        return nan, nan.clone()
    var, mean = torch.var_mean(x.to(param_dtype_of(x)), dim=(0, 2, 3), correction=0)
    return mean, var


def _forward_torch(x, weight, bias, residual, mean, var, training, momentum, eps, activation):
    # Called with training=False (the normalising pass with given statistics): nothing updated.
    y = F.batch_norm(x, mean, var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    relu = activation == "relu"
    out = apply_activation(y, activation)
    return (
        out,
        mean.clone(),
        var.clone(),
        (out > 0) if relu else x.new_empty((0,), dtype=torch.bool),
    )


def _masked_grad(grad_out: Tensor, relu_mask: Tensor, relu: bool) -> Tensor:
    grad = grad_out.to(param_dtype_of(grad_out))
    return torch.where(relu_mask, grad, 0.0) if relu else grad


def _backward_reduce_torch(grad_out, x, save_mean, relu_mask, relu):
    gm = _masked_grad(grad_out, relu_mask, relu)
    centred = x.to(gm.dtype) - save_mean[:, None, None]
    return gm.sum(dim=(0, 2, 3)), (gm * centred).sum(dim=(0, 2, 3))


def _backward_apply_torch(
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
    gm = _masked_grad(grad_out, relu_mask, relu)
    invstd = torch.rsqrt(save_var + eps)
    k_grad = invstd if weight is None else weight * invstd
    k_x = -k_grad * invstd * invstd * sum_grad_centred / count
    k_const = -k_grad * sum_grad / count
    centred = x.to(gm.dtype) - save_mean[:, None, None]
    grad_x = k_grad[:, None, None] * gm + k_x[:, None, None] * centred + k_const[:, None, None]
    grad_residual = gm.to(x.dtype) if residual_grad else x.new_empty((0,))
    return grad_x.to(x.dtype), grad_residual


# ---------------------------------------------------------------------------------------------
# Registration


def _register_fakes(family_suffix: str) -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"fastres::{name}{family_suffix}", fake)


_register_fakes("_triton")
if STATUS["cpu"].built:  # the compiled family exists once fastres._C is loaded
    _register_fakes("")

_TORCH_PIECES = BnActPieces(
    _stats_torch, _forward_torch, _backward_reduce_torch, _backward_apply_torch
)


def pieces_for(backend: str) -> BnActPieces:
    """``backend``'s pieces of bn_act: its family's ops (fastres/ops/registry.py), or PyTorch's
    composition for the ``torch`` backend."""
    if backend == "torch":
        return _TORCH_PIECES
    return BnActPieces(
        op("bn_stats", backend),
        op("bn_act_forward", backend),
        op("bn_act_backward_reduce", backend),
        op("bn_act_backward_apply", backend),
    )
