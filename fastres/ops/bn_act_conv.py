"""``bn_act_conv2d``: ``conv2d(act(batch_norm(y)))`` without keeping ``act(batch_norm(y))``.

In a residual block every BatchNorm + activation feeds a convolution. Run separately, autograd
keeps both the BatchNorm input ``y`` (for BatchNorm's backward) and the activation's output ``z``
(for the activation's and the convolution's backward). This op keeps only ``y`` and the
per-channel statistics: its backward recomputes ``z`` from them with the same kernel and the
same per-channel values as the forward (bit-identical, but for the CPU kernels' training forward,
which centres on the batch mean to twice float32's precision where the saved mean has float32's:
the two ``z`` then differ by that rounding, scaled by ``weight / std``, and the backward uses the
recomputed one and its ReLU mask throughout), runs the convolution's backward, then bn_act's
fused backward (for SiLU, after SiLU's derivative at its recomputed input,
:func:`fastres.ops.bn_act.silu_input_grad`).

The BatchNorm + activation half runs on a fastres backend: ``fastres::bn_act_conv2d`` on the
compiled kernels (cpu, cuda), ``fastres::bn_act_conv2d_triton`` on Triton's (see
fastres/ops/registry.py); the convolution is ATen's (oneDNN on CPU, cuDNN on CUDA).
:func:`bn_act_conv2d` looks the op up for a backend; the ``torch`` backend's is PyTorch's
composition (:func:`bn_act_conv2d_reference`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.activation import apply_activation, check_activation
from fastres.backends import STATUS, resolve_backend
from fastres.ops.bn_act import silu_input_grad
from fastres.ops.registry import op, register_reference

__all__ = ["bn_act_conv2d", "bn_act_conv2d_reference", "grad_through_conv_and_act"]


def convolution(z: Tensor, weight: Tensor, stride, padding, dilation, groups) -> Tensor:
    """ATen's convolution without bias: oneDNN on CPU, cuDNN on CUDA."""
    return torch.ops.aten.convolution(
        z, weight, None, stride, padding, dilation, False, [0, 0], groups
    )


def bn_act_conv2d(
    y: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    conv_weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    eps: float,
    backend: str = "auto",
    activation: str = "relu",
) -> tuple[Tensor, Tensor, Tensor]:
    """``conv2d(activation(batch_norm(y)), conv_weight)`` (no conv bias, zero padding).

    Args:
        y: the BatchNorm input, ``(N, C, H, W)``; the arguments up to ``running_var`` and
            ``training``/``eps`` are those of :func:`fastres.ops.bn_act` (running statistics are
            read, never written: the caller updates them from the returned statistics).
        conv_weight: ``(C_out, C / groups, kH, kW)``, same dtype as ``y``.
        stride, padding, dilation, groups: as for ``F.conv2d``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (see
            :mod:`fastres.backends`), for the BatchNorm + activation half.
        activation: ``"relu"``, ``"silu"`` or ``"identity"``, between BatchNorm and the
            convolution.

    Returns:
        ``(out, save_mean, save_var)``: the convolution output (``y``'s dtype and memory format)
        and the batch mean and biased variance (training) or copies of the running statistics.
    """
    args = (y, bn_weight, bn_bias, running_mean, running_var, conv_weight)
    conv_args = (stride, padding, dilation, groups)
    check_activation(activation, "bn_act_conv2d")
    name = resolve_backend(backend, y.device, y.dtype)
    return op("bn_act_conv2d", name)(*args, *conv_args, training, eps, activation)


@register_reference("bn_act_conv2d")
def bn_act_conv2d_reference(
    y,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    conv_weight,
    stride,
    padding,
    dilation,
    groups,
    training,
    eps,
    activation,
):
    """The torch backend: PyTorch's composition, with the results of the ops."""
    if training:
        var, mean = torch.var_mean(y.to(param_dtype_of(y)), dim=(0, 2, 3), correction=0)
        stats = (None, None)  # normalise with the batch's, write nothing
    else:
        mean, var = running_mean.clone(), running_var.clone()
        stats = (running_mean, running_var)
    z = apply_activation(
        F.batch_norm(y, *stats, bn_weight, bn_bias, training, 0.0, eps), activation
    )
    return convolution(z, conv_weight, stride, padding, dilation, groups), mean, var


def _define(suffix: str):
    """The ``fastres::bn_act_conv2d<suffix>`` op on the family's bn_act ops, with its fake
    kernel and autograd."""
    forward_op = getattr(torch.ops.fastres, "bn_act_forward" + suffix)
    backward_op = getattr(torch.ops.fastres, "bn_act_backward" + suffix)

    @torch.library.custom_op(f"fastres::bn_act_conv2d{suffix}", mutates_args=())
    def bn_act_conv2d_op(
        y: Tensor,
        bn_weight: Tensor | None,
        bn_bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        conv_weight: Tensor,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        training: bool,
        eps: float,
        activation: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The running statistics are read in eval only: this op returns the batch statistics
        # and leaves their update to the caller (the forward op would update them in training).
        given = (None, None) if training else (running_mean, running_var)
        z, mean, var, _ = forward_op(
            y, bn_weight, bn_bias, None, *given, training, 0.0, eps, activation
        )
        return convolution(z, conv_weight, stride, padding, dilation, groups), mean, var

    bn_act_conv2d_op.register_fake(_bn_act_conv2d_fake)
    bn_act_conv2d_op.register_autograd(
        _make_backward(forward_op, backward_op), setup_context=_setup_context
    )
    return bn_act_conv2d_op


def _bn_act_conv2d_fake(
    y,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    conv_weight,
    stride,
    padding,
    dilation,
    groups,
    training,
    eps,
    activation,
):
    check_activation(activation, "bn_act_conv2d")
    z = torch.empty_like(y, memory_format=memory_format_of(y))
    out = convolution(z, conv_weight, stride, padding, dilation, groups)
    channels = y.shape[1]
    stats = (
        y.new_empty((channels,), dtype=param_dtype_of(y)),
        y.new_empty((channels,), dtype=param_dtype_of(y)),
    )
    return (out,) + stats


def _setup_context(ctx, inputs, output):
    (
        y,
        bn_weight,
        bn_bias,
        _rm,
        _rv,
        conv_weight,
        stride,
        padding,
        dilation,
        groups,
        training,
        eps,
        activation,
    ) = inputs
    _out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(y, bn_weight, bn_bias, mean, var, conv_weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.training, ctx.eps, ctx.activation = training, eps, activation
    ctx.has_bias = bn_bias is not None


def _make_backward(forward_op, backward_op):
    return lambda ctx, grad_out, _grad_mean, _grad_var: _backward(
        ctx, grad_out, forward_op, backward_op
    )


def grad_through_conv_and_act(
    forward_op, ctx: Any, saved: tuple[Tensor, ...], grad_out: Tensor, conv_weight_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The first half of the backward of ``bn_act_conv2d`` and of ``bn_act_conv2d_from_stats``
    (:mod:`fastres.ops.bn_act_from_stats`), whose contexts both hold ``conv_args``, ``eps`` and
    ``activation`` and save ``(y, bn_weight, bn_bias, mean, var, conv_weight)`` (``saved``: the
    caller unpacks ``ctx.saved_tensors`` once, as activation checkpointing requires): recomputes
    ``z = act(batch_norm(y))`` with ``forward_op`` exactly as the forward made it (same kernel,
    same per-channel values), runs the convolution's backward and, for SiLU, SiLU's derivative.

    Returns ``(grad, grad_conv_weight, relu_mask)``: the gradient with respect to the activation's
    input side as bn_act's backward takes it, the convolution weight's gradient (None unless
    ``conv_weight_grad``), and the recomputed ReLU mask for that backward.
    """
    y, bn_weight, bn_bias, mean, var, conv_weight = saved
    stride, padding, dilation, groups = ctx.conv_args
    eps, activation = ctx.eps, ctx.activation
    z, _, _, mask = forward_op(y, bn_weight, bn_bias, None, mean, var, False, 0.0, eps, activation)
    grad_z, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
        grad_out,
        z,
        conv_weight,
        None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        [True, conv_weight_grad, False],
    )
    del z
    if activation == "silu":
        grad_z = silu_input_grad(forward_op, grad_z, y, bn_weight, bn_bias, None, mean, var, eps)
    return grad_z, grad_conv_weight, mask


def _backward(ctx, grad_out, forward_op, backward_op):
    needs = ctx.needs_input_grad
    saved = ctx.saved_tensors
    grad_z, grad_conv_weight, mask = grad_through_conv_and_act(
        forward_op, ctx, saved, grad_out, needs[5]
    )
    y, bn_weight, _, mean, var, _ = saved
    relu = ctx.activation == "relu"
    grad_y, grad_bn_weight, grad_bn_bias, _ = backward_op(
        grad_z, y, bn_weight, mean, var, mask, ctx.training, ctx.eps, relu, False
    )
    return (
        grad_y if needs[0] else None,
        grad_bn_weight if bn_weight is not None and needs[1] else None,
        grad_bn_bias if ctx.has_bias and needs[2] else None,
        None,
        None,
        grad_conv_weight if needs[5] else None,
    ) + (None,) * 7


bn_act_conv2d_triton = _define("_triton")
if STATUS["cpu"].built:  # the compiled family's bn_act ops exist once fastres._C is loaded
    bn_act_conv2d_compiled = _define("")
