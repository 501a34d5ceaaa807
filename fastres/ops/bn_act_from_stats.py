"""bn_act and bn_act_conv2d from batch statistics computed elsewhere: one op family, with its
backward through those statistics.

The batch mean and variance of ``x`` may come from somewhere other than a reduction over ``x``:
the epilogue of the Triton convolution that produced ``x`` (fastres/plans/triton_chain.py), or
every process of a ``torch.distributed`` group (synchronized BatchNorm,
fastres/ops/sync_bn_act.py, which gathers them). The ops, per family (fastres/ops/registry.py):

* ``bn_act_from_stats(x, weight, bias, residual, mean, var, count, eps, activation,
  group_name) -> (out, relu_mask)``: ``activation(batch_norm(x) + residual)`` with the given
  statistics, one elementwise pass;
* ``bn_act_conv2d_from_stats(y, bn_weight, bn_bias, conv_weight, mean, var, count, stride,
  padding, dilation, groups, eps, activation, group_name) -> out``: the same, then the
  convolution, keeping only ``y`` for backward as :mod:`fastres.ops.bn_act_conv` does;
* ``bn_act_add_from_stats(x, weight, bias, residual, mean, var, count, eps, activation,
  group_name) -> out``: ``activation(batch_norm(x)) + residual`` (the residual after the
  activation, as :mod:`fastres.ops.bn_act_add`), one elementwise pass keeping no mask: the
  backward recomputes the activation's input as bn_act_add's does;
* ``bn_act_from_stats_backward(grad, x, weight, mean, var, relu_mask, count, eps, relu,
  residual_grad, group_name) -> (grad_x, grad_weight, grad_bias, grad_residual)``.

``mean`` and ``var`` (biased) are over ``count`` values per channel: ``x``'s own when
``group_name`` is ``""``, else the whole batch of the process group of that name
(``ProcessGroup.group_name``). The backward differentiates through them as functions of ``x``,
exactly as bn_act's training backward does: one reduction (``bn_act_backward_reduce``), the two
per-channel sums all-reduced over the group inside the backward op (autograd, and AOTAutograd
under ``torch.compile``, see one opaque op), one elementwise pass (``bn_act_backward_apply``).
``grad_weight`` and ``grad_bias`` are this process's share, as ``nn.SyncBatchNorm``'s.

The compiled and Triton families are built here on their bn_act pieces
(fastres/ops/bn_act_pieces.py), with fakes and ``register_autograd``; the ``torch`` backend's
composition recomputes the statistics differentiably (torch.distributed.nn's all_reduce over a
group) and takes the given values.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from fastres._layout import memory_format_of, param_dtype_of
from fastres.activation import apply_activation, check_activation
from fastres.backends import STATUS, resolve_backend
from fastres.batch_norm import values_per_channel
from fastres.ops import bn_act_add, bn_act_pieces  # noqa: F401  (define the Triton ops used here)
from fastres.ops.bn_act import check_args, grad_through_activation, silu_input_grad
from fastres.ops.bn_act_conv import convolution, grad_through_conv_and_act
from fastres.ops.registry import op, register_reference

__all__ = ["bn_act_add_from_stats", "bn_act_from_stats", "process_group_named"]


def process_group_named(group_name: str) -> Any:
    """The ``torch.distributed`` group called ``group_name``; None for ``""`` (the statistics
    are of this process's batch alone)."""
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    # cast: torch 2.13 types the name as its GroupName (a NewType of str), 2.11 as str.
    return cast(Any, _resolve_process_group)(group_name)


def all_reduce_sums(
    sum_grad: Tensor, sum_grad_centred: Tensor, group: Any
) -> tuple[Tensor, Tensor]:
    """The two per-channel sums over every process of ``group`` (in float64); as they are for
    ``group`` None."""
    if group is None:
        return sum_grad, sum_grad_centred
    both = torch.cat([sum_grad, sum_grad_centred]).to(torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    both = both.to(sum_grad.dtype)
    return both[: sum_grad.numel()], both[sum_grad.numel() :]


# ---------------------------------------------------------------------------------------------
# Public entry point


def bn_act_from_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    residual: Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "relu",
    backend: str = "auto",
) -> Tensor:
    """Training-mode :func:`fastres.ops.bn_act` whose batch statistics were computed elsewhere.

    ``mean`` and ``var`` (``(C,)``, the batch mean and biased variance of ``x``, e.g. from the
    epilogue of the convolution that produced ``x``, see :mod:`fastres.ops.fused_conv2d`) are
    taken as given: one elementwise pass forward. The backward differentiates through them as
    functions of ``x``, exactly as bn_act's training backward does. Running statistics are the
    caller's to update.
    """
    check_args(x, weight, bias, None, None, residual, True, 0.0, eps)
    check_activation(activation, "bn_act_from_stats")
    name = resolve_backend(backend, x.device, x.dtype)
    count = values_per_channel(x)
    out, _ = op("bn_act_from_stats", name)(
        x, weight, bias, residual, mean, var, count, eps, activation, ""
    )
    return out


def bn_act_add_from_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    residual: Tensor,
    eps: float = 1e-5,
    activation: str = "silu",
    backend: str = "auto",
) -> Tensor:
    """:func:`bn_act_from_stats` with ``residual`` added after the activation (Ultralytics'
    YOLO Bottleneck): ``activation(batch_norm(x)) + residual``, the batch statistics taken as
    given and differentiated through as functions of ``x``."""
    check_args(x, weight, bias, None, None, residual, True, 0.0, eps, who="bn_act_add_from_stats")
    if residual is None:
        raise TypeError(
            "bn_act_add_from_stats: residual must be a Tensor (it is added after the activation)"
        )
    check_activation(activation, "bn_act_add_from_stats")
    name = resolve_backend(backend, x.device, x.dtype)
    count = values_per_channel(x)
    out: Tensor = op("bn_act_add_from_stats", name)(
        x, weight, bias, residual, mean, var, count, eps, activation, ""
    )
    return out


# ---------------------------------------------------------------------------------------------
# Fake kernels, shared by both families


def _from_stats_fake(x, weight, bias, residual, mean, var, count, eps, activation, group_name):
    check_activation(activation, "bn_act_from_stats")
    out = torch.empty_like(x, memory_format=memory_format_of(x))
    mask_bytes = (x.numel() + 7) // 8 if activation == "relu" else 0
    return out, x.new_empty((mask_bytes,), dtype=torch.uint8)


def _add_from_stats_fake(x, weight, bias, residual, mean, var, count, eps, activation, group_name):
    check_activation(activation, "bn_act_add_from_stats")
    return torch.empty_like(x, memory_format=memory_format_of(x))


def _conv_from_stats_fake(
    y,
    bn_weight,
    bn_bias,
    conv_weight,
    mean,
    var,
    count,
    stride,
    padding,
    dilation,
    groups,
    eps,
    activation,
    group_name,
):
    check_activation(activation, "bn_act_conv2d_from_stats")
    z = torch.empty_like(y, memory_format=memory_format_of(y))
    return convolution(z, conv_weight, stride, padding, dilation, groups)


def _backward_fake(
    grad, x, weight, mean, var, relu_mask, count, eps, relu, residual_grad, group_name
):
    fmt = memory_format_of(x)
    channels = x.shape[1]
    grad_residual = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty((0,))
    return (
        torch.empty_like(x, memory_format=fmt),
        x.new_empty((channels,), dtype=param_dtype_of(x)),
        x.new_empty((channels,), dtype=param_dtype_of(x)),
        grad_residual,
    )


# ---------------------------------------------------------------------------------------------
# The op families on their pieces: ops, fakes and autograd


def _define_backward(suffix: str):
    """``fastres::bn_act_from_stats_backward<suffix>``: reduce, all-reduce over the group,
    apply."""
    reduce_op = getattr(torch.ops.fastres, "bn_act_backward_reduce" + suffix)
    apply_op = getattr(torch.ops.fastres, "bn_act_backward_apply" + suffix)

    @torch.library.custom_op(f"fastres::bn_act_from_stats_backward{suffix}", mutates_args=())
    def backward_op(
        grad: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        var: Tensor,
        relu_mask: Tensor,
        count: int,
        eps: float,
        relu: bool,
        residual_grad: bool,
        group_name: str,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sum_grad, sum_grad_centred = reduce_op(grad, x, mean, relu_mask, relu)
        grad_bias = sum_grad.clone()
        grad_weight = sum_grad_centred * torch.rsqrt(var + eps)
        group = process_group_named(group_name)
        total_grad, total_grad_centred = all_reduce_sums(sum_grad, sum_grad_centred, group)
        grad_x, grad_residual = apply_op(
            grad,
            x,
            weight,
            mean,
            var,
            relu_mask,
            total_grad,
            total_grad_centred,
            count,
            eps,
            relu,
            residual_grad,
        )
        return grad_x, grad_weight, grad_bias, grad_residual

    backward_op.register_fake(_backward_fake)
    return getattr(torch.ops.fastres, f"bn_act_from_stats_backward{suffix}").default


def _define_from_stats(suffix: str, forward_op, backward_op):
    """``fastres::bn_act_from_stats<suffix>`` with its autograd."""

    @torch.library.custom_op(f"fastres::bn_act_from_stats{suffix}", mutates_args=())
    def from_stats_op(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        mean: Tensor,
        var: Tensor,
        count: int,
        eps: float,
        activation: str,
        group_name: str,
    ) -> tuple[Tensor, Tensor]:
        out, _, _, mask = forward_op(
            x, weight, bias, residual, mean, var, False, 0.0, eps, activation
        )
        return out, mask

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, mean, var, count, eps, activation, group_name = inputs
        _out, mask = output
        ctx.mark_non_differentiable(mask)
        silu = activation == "silu"  # recomputes its input in backward (see silu_input_grad)
        ctx.save_for_backward(
            x, weight, mean, var, mask, bias if silu else None, residual if silu else None
        )
        ctx.count, ctx.eps, ctx.activation, ctx.group_name = count, eps, activation, group_name
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.has_residual = residual is not None

    def backward(ctx, grad_out, _grad_mask):
        x, weight, mean, var, mask, bias, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        residual_grad = ctx.has_residual and needs[3]
        if ctx.activation == "silu":
            grad_out = silu_input_grad(
                forward_op, grad_out, x, weight, bias, residual, mean, var, ctx.eps
            )
        grad_x, grad_weight, grad_bias, grad_residual = backward_op(
            grad_out,
            x,
            weight,
            mean,
            var,
            mask,
            ctx.count,
            ctx.eps,
            ctx.activation == "relu",
            residual_grad,
            ctx.group_name,
        )
        return (
            grad_x if needs[0] else None,
            grad_weight if ctx.has_weight and needs[1] else None,
            grad_bias if ctx.has_bias and needs[2] else None,
            grad_residual if residual_grad else None,
        ) + (None,) * 6

    from_stats_op.register_fake(_from_stats_fake)
    from_stats_op.register_autograd(backward, setup_context=setup_context)


def _define_add_from_stats(suffix: str, forward_op, backward_op):
    """``fastres::bn_act_add_from_stats<suffix>`` with its autograd, on the family's
    bn_act_add_forward in eval mode (normalising with the given statistics)."""
    add_forward_op = getattr(torch.ops.fastres, "bn_act_add_forward" + suffix)

    @torch.library.custom_op(f"fastres::bn_act_add_from_stats{suffix}", mutates_args=())
    def add_from_stats_op(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor,
        mean: Tensor,
        var: Tensor,
        count: int,
        eps: float,
        activation: str,
        group_name: str,
    ) -> Tensor:
        out, _, _ = add_forward_op(
            x, weight, bias, residual, mean, var, False, 0.0, eps, activation
        )
        return out

    def setup_context(ctx, inputs, output):
        x, weight, bias, _residual, mean, var, count, eps, activation, group_name = inputs
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.count, ctx.eps, ctx.activation, ctx.group_name = count, eps, activation, group_name

    def backward(ctx, grad_out):
        x, weight, bias, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        activation, eps = ctx.activation, ctx.eps
        grad_y, mask = grad_through_activation(
            forward_op, grad_out, x, weight, bias, mean, var, eps, activation
        )
        grad_x, grad_weight, grad_bias, _ = backward_op(
            grad_y, x, weight, mean, var, mask, ctx.count, eps, activation == "relu", False,
            ctx.group_name,
        )  # fmt: skip
        return (
            grad_x if needs[0] else None,
            grad_weight if weight is not None and needs[1] else None,
            grad_bias if bias is not None and needs[2] else None,
            grad_out if needs[3] else None,
        ) + (None,) * 6

    add_from_stats_op.register_fake(_add_from_stats_fake)
    add_from_stats_op.register_autograd(backward, setup_context=setup_context)


def _define_conv_from_stats(suffix: str, forward_op, backward_op):
    """``fastres::bn_act_conv2d_from_stats<suffix>`` with its autograd."""

    @torch.library.custom_op(f"fastres::bn_act_conv2d_from_stats{suffix}", mutates_args=())
    def conv_from_stats_op(
        y: Tensor,
        bn_weight: Tensor | None,
        bn_bias: Tensor | None,
        conv_weight: Tensor,
        mean: Tensor,
        var: Tensor,
        count: int,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
        eps: float,
        activation: str,
        group_name: str,
    ) -> Tensor:
        z, _, _, _ = forward_op(y, bn_weight, bn_bias, None, mean, var, False, 0.0, eps, activation)
        return convolution(z, conv_weight, stride, padding, dilation, groups)

    def setup_context(ctx, inputs, output):
        y, bn_weight, bn_bias, conv_weight, mean, var, count, *conv_args = inputs[:11]
        eps, activation, group_name = inputs[11:]
        # Laid out as bn_act_conv2d's: grad_through_conv_and_act reads either.
        ctx.save_for_backward(y, bn_weight, bn_bias, mean, var, conv_weight)
        ctx.count, ctx.conv_args, ctx.eps = count, tuple(conv_args), eps
        ctx.activation, ctx.group_name = activation, group_name

    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad
        saved = ctx.saved_tensors
        grad_z, grad_conv_weight, mask = grad_through_conv_and_act(
            forward_op, ctx, saved, grad_out, needs[3]
        )
        y, bn_weight, bn_bias, mean, var, _ = saved
        grad_y, grad_bn_weight, grad_bn_bias, _ = backward_op(
            grad_z,
            y,
            bn_weight,
            mean,
            var,
            mask,
            ctx.count,
            ctx.eps,
            ctx.activation == "relu",
            False,
            ctx.group_name,
        )
        return (
            grad_y if needs[0] else None,
            grad_bn_weight if bn_weight is not None and needs[1] else None,
            grad_bn_bias if bn_bias is not None and needs[2] else None,
            grad_conv_weight if needs[3] else None,
        ) + (None,) * 10

    conv_from_stats_op.register_fake(_conv_from_stats_fake)
    conv_from_stats_op.register_autograd(backward, setup_context=setup_context)


def _define_family(suffix: str) -> None:
    """The family's four ops, on its bn_act_forward, bn_act_add_forward and bn_act pieces."""
    forward_op = getattr(torch.ops.fastres, "bn_act_forward" + suffix)
    backward_op = _define_backward(suffix)
    _define_from_stats(suffix, forward_op, backward_op)
    _define_add_from_stats(suffix, forward_op, backward_op)
    _define_conv_from_stats(suffix, forward_op, backward_op)


_define_family("_triton")
if STATUS["cpu"].built:  # the compiled family's pieces exist once fastres._C is loaded
    _define_family("")


# ---------------------------------------------------------------------------------------------
# The torch backend: PyTorch's composition, through statistics recomputed differentiably


def _statistics_to_differentiate(
    x: Tensor, mean: Tensor, var: Tensor, count: int, group: Any
) -> tuple[Tensor, Tensor]:
    """``mean`` and ``var`` as given, with the gradients of the mean and biased variance of
    ``x`` over ``count`` values per channel across ``group`` (x's own for None)."""
    from torch.distributed.nn.functional import all_reduce

    def over_group(t: Tensor) -> Tensor:
        return t if group is None else all_reduce(t, group=group)

    xs = x.to(param_dtype_of(x))
    batch_mean = over_group(xs.sum(dim=(0, 2, 3))) / count
    centred = xs - batch_mean[:, None, None]
    batch_var = over_group((centred * centred).sum(dim=(0, 2, 3))) / count
    return (
        batch_mean + (mean - batch_mean).detach(),
        batch_var + (var - batch_var).detach(),
    )


@register_reference("bn_act_from_stats")
def bn_act_from_stats_reference(
    x, weight, bias, residual, mean, var, count, eps, activation, group_name
):
    """``bn_act_from_stats`` of the ``torch`` backend (the mask is empty: autograd keeps what
    the composition needs)."""
    mean, var = _statistics_to_differentiate(x, mean, var, count, process_group_named(group_name))
    y = (x.to(mean.dtype) - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None]
    if weight is not None:
        y = y * weight[:, None, None]
    if bias is not None:
        y = y + bias[:, None, None]
    y = y.to(x.dtype)
    if residual is not None:
        y = y + residual
    return apply_activation(y, activation), x.new_empty((0,), dtype=torch.uint8)


@register_reference("bn_act_add_from_stats")
def bn_act_add_from_stats_reference(
    x, weight, bias, residual, mean, var, count, eps, activation, group_name
):
    """``bn_act_add_from_stats`` of the ``torch`` backend."""
    out, _ = bn_act_from_stats_reference(
        x, weight, bias, None, mean, var, count, eps, activation, group_name
    )
    return out + residual


@register_reference("bn_act_conv2d_from_stats")
def bn_act_conv2d_from_stats_reference(
    y,
    bn_weight,
    bn_bias,
    conv_weight,
    mean,
    var,
    count,
    stride,
    padding,
    dilation,
    groups,
    eps,
    activation,
    group_name,
):
    """``bn_act_conv2d_from_stats`` of the ``torch`` backend."""
    z, _ = bn_act_from_stats_reference(
        y, bn_weight, bn_bias, None, mean, var, count, eps, activation, group_name
    )
    return convolution(z, conv_weight, stride, padding, dilation, groups)
