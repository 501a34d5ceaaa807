"""``bn_act_conv2d``: ``conv2d(relu(batch_norm(y)))`` without keeping ``relu(batch_norm(y))``.

In a residual block every BatchNorm + ReLU feeds a convolution. Run separately, autograd keeps
both the BatchNorm input ``y`` (for BatchNorm's backward) and the ReLU output ``z`` (for ReLU's
and the convolution's backward). This op keeps only ``y`` and the per-channel statistics:
its backward recomputes ``z`` from them with the same kernel and the same per-channel values
as the forward (so the recomputed ``z``, and its ReLU mask, are bit-identical), runs the
convolution's backward, then bn_act's fused backward.

The BatchNorm + ReLU half runs on a fastres backend (cpu, cuda or triton); the convolution is
ATen's (oneDNN on CPU, cuDNN on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.ops.bn_act import BACKWARD_OPS, FORWARD_OPS

__all__ = ["bn_act_conv2d"]


def convolution(z: Tensor, weight: Tensor, stride, padding, dilation, groups) -> Tensor:
    """ATen's convolution without bias: oneDNN on CPU, cuDNN on CUDA."""
    return torch.ops.aten.convolution(
        z, weight, None, stride, padding, dilation, False, [0, 0], groups
    )


@torch.library.custom_op("fastres::bn_act_conv2d", mutates_args=())
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
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``conv2d(relu(batch_norm(y)), conv_weight)`` (no conv bias, zero padding).

    Args:
        y: the BatchNorm input, ``(N, C, H, W)``; the arguments up to ``running_var`` and
            ``training``/``eps`` are those of :func:`fastres.ops.bn_act` (running statistics are
            read, never written: the caller updates them from the returned statistics).
        conv_weight: ``(C_out, C / groups, kH, kW)``, same dtype as ``y``.
        stride, padding, dilation, groups: as for ``F.conv2d``.
        backend: a concrete fastres backend for the BatchNorm + ReLU half: ``"cpu"``, ``"cuda"``
            or ``"triton"``.

    Returns:
        ``(out, save_mean, save_var)``: the convolution output (``y``'s dtype and memory format)
        and the batch mean and biased variance (training) or copies of the running statistics.
    """
    z, mean, var, _ = FORWARD_OPS[backend](
        y, bn_weight, bn_bias, None, running_mean, running_var, training, eps, True
    )
    return convolution(z, conv_weight, stride, padding, dilation, groups), mean, var


@bn_act_conv2d.register_fake
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
    backend,
):
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
        backend,
    ) = inputs
    _out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(y, bn_weight, bn_bias, mean, var, conv_weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.training, ctx.eps, ctx.backend = training, eps, backend


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    y, bn_weight, bn_bias, mean, var, conv_weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    needs = ctx.needs_input_grad
    # Recompute z exactly as the forward made it: same kernel, same per-channel scale and shift.
    z, _, _, mask = FORWARD_OPS[ctx.backend](
        y, bn_weight, bn_bias, None, mean, var, False, ctx.eps, True
    )
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
        [True, needs[5], False],
    )
    del z
    grad_y, grad_bn_weight, grad_bn_bias, _ = BACKWARD_OPS[ctx.backend](
        grad_z, y, bn_weight, mean, var, mask, ctx.training, ctx.eps, True, False
    )
    return (
        grad_y if needs[0] else None,
        grad_bn_weight if bn_weight is not None and needs[1] else None,
        grad_bn_bias if bn_bias is not None and needs[2] else None,
        None,
        None,
        grad_conv_weight if needs[5] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


bn_act_conv2d.register_autograd(_backward, setup_context=_setup_context)
