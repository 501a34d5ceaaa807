"""Triton convolutions with BatchNorm fused into their prologue and epilogue, as custom ops.

``fastres::bn_act_conv2d_stats_triton`` is one convolution of a residual block on the Triton backend
(kernels in ``fastres/triton/conv.py``)::

    out = conv2d(activation(batch_norm(x)) if a BatchNorm is given else x, weight)
    mean, var = batch statistics of out           (when stats=True, for the next BatchNorm)

``activation`` is ``"relu"``, ``"silu"`` or ``"identity"``. The BatchNorm and activation before
the convolution are applied as its input is loaded and never written; the statistics come out of
the convolution's epilogue. Chained, they make a bottleneck's training forward ``conv1(+stats)
-> [BN1+act]conv2(+stats) -> [BN2+act]conv3(+stats) -> BN3 + residual + act`` with no standalone
BatchNorm or activation pass before the last one (see ``fastres/plans/triton_chain.py``).

Backward: the input gradient and the weight gradient are implicit GEMMs that recompute
``activation(batch_norm(x))`` from the saved pre-BatchNorm ``x`` instead of loading a saved
activation; the input-gradient epilogue applies the activation's derivative (at the recomputed
``batch_norm(x)``) and computes BatchNorm's two backward reductions, and bn_act's Triton
elementwise pass finishes the BatchNorm (through the batch statistics when ``bn_training``).
The ``mean``/``var`` outputs are not differentiable: the op that consumes them (the next
``bn_act_conv2d_stats_triton``, or :func:`fastres.ops.sync_bn_act.bn_act_from_stats`)
differentiates through them as part of its own BatchNorm backward, which is exact because they
are the batch statistics of its input.

``fastres::conv2d_bias_act_triton`` is the inference form: a convolution (BatchNorm folded into
its weight and bias) with bias, residual add and activation in the epilogue;
``fastres::conv2d_bias_act_add_triton`` the same with the residual added after the activation
(Ultralytics' YOLO Bottleneck).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastres.activation import check_activation

__all__ = [
    "bn_act_conv2d_stats_triton",
    "bn_act_conv2d_stats_backward_triton",
    "conv2d_bias_act_add_triton",
    "conv2d_bias_act_triton",
]


def _geometry(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int, groups: int):
    from fastres.triton.conv import ConvGeometry

    return ConvGeometry.of(x.shape, weight.shape, stride, padding, dilation, groups)


def _prologue(bn_mean, bn_var, bn_weight, bn_bias, eps, activation):
    if bn_mean is None:
        return None
    from fastres.triton.conv import prologue_from_stats

    return prologue_from_stats(bn_mean, bn_var, bn_weight, bn_bias, eps, activation)


def _channels_last(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("fastres::bn_act_conv2d_stats_triton", mutates_args=())
def bn_act_conv2d_stats_triton(
    x: Tensor,
    weight: Tensor,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    bn_training: bool,
    eps: float,
    activation: str,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``conv2d(activation(batch_norm(x)))`` (or ``conv2d(x)`` when ``bn_mean`` is None), and
    the batch statistics of the result.

    Args:
        x: ``(N, C_in, H, W)`` float32, float16 or bfloat16 (computed channels_last).
        weight: ``(C_out, C_in / groups, KH, KW)``, x's dtype. No convolution bias; zero padding.
        bn_mean, bn_var, bn_weight, bn_bias: the BatchNorm applied to x before the convolution:
            its statistics (``(C_in,)`` float32: the batch statistics of x when ``bn_training``,
            else the running ones) and affine parameters (or None); all None: no prologue.
        bn_training: whether ``bn_mean``/``bn_var`` are x's batch statistics (the backward then
            differentiates through them).
        eps: the BatchNorm's eps.
        activation: ``"relu"``, ``"silu"`` or ``"identity"``, applied after the BatchNorm
            (checked, and ignored, without one).
        stride, padding, dilation, groups: as for ``F.conv2d`` (the same along H and W).
        stats: also return the batch mean and biased variance of the output per channel.

    Returns:
        ``(out, mean, var)``: ``(N, C_out, OH, OW)`` channels_last in x's dtype, and ``(C_out,)``
        float32 statistics (empty when not ``stats``).
    """
    from fastres.triton import launch_device
    from fastres.triton.conv import conv_forward, finalize_stats

    check_activation(activation, "bn_act_conv2d_stats_triton")
    geometry = _geometry(x, weight, stride, padding, dilation, groups)
    with launch_device(x):
        prologue = _prologue(bn_mean, bn_var, bn_weight, bn_bias, eps, activation)
        out, partials = conv_forward(
            _channels_last(x), weight, geometry, prologue=prologue, stats=stats
        )
        if not stats:
            empty = x.new_empty((0,), dtype=torch.float32)
            return out, empty, empty.clone()
        assert partials is not None  # conv_forward returns them when stats
        mean, var, _ = finalize_stats(partials, None, None, eps)
    return out, mean, var


@bn_act_conv2d_stats_triton.register_fake
def _bn_act_conv2d_stats_fake(
    x,
    weight,
    bn_mean,
    bn_var,
    bn_weight,
    bn_bias,
    bn_training,
    eps,
    activation,
    stride,
    padding,
    dilation,
    groups,
    stats,
):
    check_activation(activation, "bn_act_conv2d_stats_triton")
    g = _geometry(x, weight, stride, padding, dilation, groups)
    out = x.new_empty((g.N, g.C_OUT, g.OH, g.OW)).contiguous(memory_format=torch.channels_last)
    channels = g.C_OUT if stats else 0
    return (
        out,
        x.new_empty((channels,), dtype=torch.float32),
        x.new_empty((channels,), dtype=torch.float32),
    )


def _bn_act_conv2d_stats_setup(ctx, inputs, output):
    (
        x,
        weight,
        bn_mean,
        bn_var,
        bn_weight,
        bn_bias,
        bn_training,
        eps,
        activation,
        stride,
        padding,
        dilation,
        groups,
        _stats,
    ) = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, bn_mean, bn_var, bn_weight, bn_bias)
    ctx.bn_training, ctx.eps, ctx.activation = bn_training, eps, activation
    ctx.conv = (stride, padding, dilation, groups)


@torch.library.custom_op("fastres::bn_act_conv2d_stats_backward_triton", mutates_args=())
def bn_act_conv2d_stats_backward_triton(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    bn_training: bool,
    eps: float,
    activation: str,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``bn_act_conv2d_stats_triton``: ``(grad_x, grad_weight, grad_bn_weight,
    grad_bn_bias)``.

    ``grad_x`` (and, with a BatchNorm prologue, the BatchNorm parameters' gradients) only when
    ``input_grad``, ``grad_weight`` only when ``weight_grad``; the others are empty. An op of its
    own, so that autograd's tracing (torch.compile) sees one node instead of raw kernel launches.
    """
    from fastres.triton import launch_device
    from fastres.triton.bn_act import bn_backward_from_partials
    from fastres.triton.conv import conv_input_grad, conv_weight_grad

    check_activation(activation, "bn_act_conv2d_stats_backward_triton")
    x = _channels_last(x)
    geometry = _geometry(x, weight, stride, padding, dilation, groups)

    def empty(dtype=x.dtype):  # a fresh one each time: outputs must not alias each other
        return x.new_empty((0,), dtype=dtype)

    grad_x, grad_bn_weight, grad_bn_bias = empty(), empty(torch.float32), empty(torch.float32)
    with launch_device(x):
        prologue = _prologue(bn_mean, bn_var, bn_weight, bn_bias, eps, activation)
        grad_weight = (
            conv_weight_grad(x, grad_out, geometry, weight, prologue) if weight_grad else empty()
        )
        if input_grad and prologue is None:
            grad_x = conv_input_grad(grad_out, weight, geometry)[0]
        elif input_grad:
            # Gradient with respect to batch_norm(x) (through the activation's derivative) with
            # BatchNorm's backward reductions in the same kernel's epilogue; then its
            # elementwise pass.
            grad_bn, sums = conv_input_grad(grad_out, weight, geometry, x, prologue)
            # A prologue comes with its statistics, and conv_input_grad then returns the sums.
            assert bn_mean is not None and bn_var is not None and sums is not None
            grad_x, grad_bn_weight, grad_bn_bias = bn_backward_from_partials(
                grad_bn, x, bn_weight, bn_mean, bn_var, sums, bn_training, eps
            )
    return grad_x, grad_weight, grad_bn_weight, grad_bn_bias


@bn_act_conv2d_stats_backward_triton.register_fake
def _bn_act_conv2d_stats_backward_fake(
    grad_out,
    x,
    weight,
    bn_mean,
    bn_var,
    bn_weight,
    bn_bias,
    bn_training,
    eps,
    activation,
    stride,
    padding,
    dilation,
    groups,
    input_grad,
    weight_grad,
):
    check_activation(activation, "bn_act_conv2d_stats_backward_triton")
    empty = x.new_empty((0,))
    channels = x.shape[1] if input_grad and bn_mean is not None else 0
    return (
        torch.empty_like(x, memory_format=torch.channels_last) if input_grad else empty,
        torch.empty_like(weight) if weight_grad else empty,
        x.new_empty((channels,), dtype=torch.float32),
        x.new_empty((channels,), dtype=torch.float32),
    )


def _bn_act_conv2d_stats_backward(ctx, grad_out, _grad_mean, _grad_var):
    x, weight, bn_mean, bn_var, bn_weight, bn_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    input_grad = needs[0] or needs[4] or needs[5]
    grad_x, grad_weight, grad_bn_weight, grad_bn_bias = bn_act_conv2d_stats_backward_triton(
        grad_out,
        x,
        weight,
        bn_mean,
        bn_var,
        bn_weight,
        bn_bias,
        ctx.bn_training,
        ctx.eps,
        ctx.activation,
        *ctx.conv,
        input_grad,
        needs[1],
    )
    return (
        grad_x if needs[0] else None,
        grad_weight if needs[1] else None,
        None,
        None,
        grad_bn_weight if bn_weight is not None and needs[4] else None,
        grad_bn_bias if bn_bias is not None and needs[5] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


bn_act_conv2d_stats_triton.register_autograd(
    _bn_act_conv2d_stats_backward, setup_context=_bn_act_conv2d_stats_setup
)


def _conv2d_with_epilogue(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    activation: str,
    conv_args: tuple[int, int, int, int],
    residual_after_activation: bool,
    op_name: str,
) -> Tensor:
    """The two inference ops' one kernel launch; ``conv_args`` (stride, padding, dilation,
    groups)."""
    from fastres.triton import launch_device
    from fastres.triton.conv import conv_forward

    check_activation(activation, op_name)
    geometry = _geometry(x, weight, *conv_args)
    out_shape = (geometry.N, geometry.C_OUT, geometry.OH, geometry.OW)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(
            f"{op_name}: residual must have the output's shape {out_shape}, got "
            f"{tuple(residual.shape)}"
        )
    with launch_device(x):
        out, _ = conv_forward(
            _channels_last(x),
            weight,
            geometry,
            bias=bias,
            residual=_channels_last(residual) if residual is not None else None,
            activation=activation,
            residual_after_activation=residual_after_activation,
        )
    return out


def _conv2d_with_epilogue_fake(
    x: Tensor, weight: Tensor, activation: str, conv_args: tuple[int, int, int, int], op_name: str
) -> Tensor:
    check_activation(activation, op_name)
    g = _geometry(x, weight, *conv_args)
    return x.new_empty((g.N, g.C_OUT, g.OH, g.OW)).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("fastres::conv2d_bias_act_triton", mutates_args=())
def conv2d_bias_act_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    activation: str,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
) -> Tensor:
    """``activation(conv2d(x, weight, bias) + residual)`` in one kernel (inference; no
    autograd); ``activation`` is ``"relu"``, ``"silu"`` or ``"identity"``.

    x and residual ``(N, C, H, W)`` (computed channels_last), weight ``(C_out, C_in / groups, KH,
    KW)`` and bias ``(C_out,)`` in x's dtype. Returns ``(N, C_out, OH, OW)`` channels_last.
    """
    conv_args = (stride, padding, dilation, groups)
    return _conv2d_with_epilogue(
        x, weight, bias, residual, activation, conv_args, False, "conv2d_bias_act_triton"
    )


@conv2d_bias_act_triton.register_fake
def _conv2d_bias_act_fake(x, weight, bias, residual, activation, stride, padding, dilation, groups):
    conv_args = (stride, padding, dilation, groups)
    return _conv2d_with_epilogue_fake(x, weight, activation, conv_args, "conv2d_bias_act_triton")


@torch.library.custom_op("fastres::conv2d_bias_act_add_triton", mutates_args=())
def conv2d_bias_act_add_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    activation: str,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
) -> Tensor:
    """``activation(conv2d(x, weight, bias)) + residual`` in one kernel (inference; no
    autograd): :func:`conv2d_bias_act_triton` with the residual added after the activation
    (Ultralytics' YOLO Bottleneck). Shapes and layout as there; ``residual`` is required."""
    conv_args = (stride, padding, dilation, groups)
    return _conv2d_with_epilogue(
        x, weight, bias, residual, activation, conv_args, True, "conv2d_bias_act_add_triton"
    )


@conv2d_bias_act_add_triton.register_fake
def _conv2d_bias_act_add_fake(
    x, weight, bias, residual, activation, stride, padding, dilation, groups
):
    conv_args = (stride, padding, dilation, groups)
    return _conv2d_with_epilogue_fake(
        x, weight, activation, conv_args, "conv2d_bias_act_add_triton"
    )
