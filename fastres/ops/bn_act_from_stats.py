"""bn_act from batch statistics computed elsewhere, and its backward through them.

The batch mean and variance of ``x`` may come from somewhere other than a reduction over ``x``:
the epilogue of the Triton convolution that produced ``x`` (fastres/plans/triton_chain.py), or a
collective over every process of a group (synchronized BatchNorm, fastres/ops/sync_bn_act.py).
Forward is then one elementwise pass; backward differentiates through the statistics as
functions of ``x`` (over the group's batch when a group is given), exactly as bn_act's training
backward does: one reduction, the sums all-reduced over the group if any, one elementwise pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastres.activation import check_activation
from fastres.backends import resolve_backend
from fastres.batch_norm import values_per_channel
from fastres.ops.bn_act import check_args, silu_input_grad
from fastres.ops.bn_act_pieces import BnActPieces, pieces_for

__all__ = ["BnActFromStats", "all_reduce_sums", "backward_from_sums", "bn_act_from_stats"]


def all_reduce_sums(
    sum_grad: Tensor, sum_grad_centred: Tensor, group: Any
) -> tuple[Tensor, Tensor]:
    """The two per-channel sums over every process of ``group`` (in float64); as they are for
    ``group`` None."""
    if group is None:  # statistics of this process's batch alone
        return sum_grad, sum_grad_centred
    both = torch.cat([sum_grad, sum_grad_centred]).to(torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    both = both.to(sum_grad.dtype)
    return both[: sum_grad.numel()], both[sum_grad.numel() :]


def backward_from_sums(
    ops: BnActPieces,
    group: Any,
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    mask: Tensor,
    count: int,
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_act's training backward given the batch statistics: (grad_x, grad_weight, grad_bias,
    grad_residual). The per-channel sums are all-reduced over ``group`` (None: this process's
    batch alone); the parameter gradients stay this process's share, as nn.SyncBatchNorm's."""
    sum_grad, sum_grad_centred = ops.backward_reduce(grad, x, mean, mask, relu)
    grad_bias = sum_grad.clone()
    grad_weight = sum_grad_centred * torch.rsqrt(var + eps)
    global_grad, global_grad_centred = all_reduce_sums(sum_grad, sum_grad_centred, group)
    grad_x, grad_residual = ops.backward_apply(
        grad,
        x,
        weight,
        mean,
        var,
        mask,
        global_grad,
        global_grad_centred,
        count,
        eps,
        relu,
        residual_grad,
    )
    return grad_x, grad_weight, grad_bias, grad_residual


class BnActFromStats(torch.autograd.Function):
    """activation(batch_norm(x) + residual) from given batch statistics of x (over ``group``'s
    batch, or x's own when ``group`` is None); backward through the statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, var, count, eps, activation, group, ops):
        out, _, _, mask = ops.forward(
            x, weight, bias, residual, mean, var, False, 0.0, eps, activation
        )
        silu = activation == "silu"  # recomputes its input in backward (see silu_input_grad)
        ctx.save_for_backward(
            x, weight, mean, var, mask, bias if silu else None, residual if silu else None
        )
        ctx.count, ctx.eps, ctx.activation, ctx.group, ctx.ops = count, eps, activation, group, ops
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, var, mask, bias, residual = ctx.saved_tensors
        needs = ctx.needs_input_grad
        residual_grad = ctx.has_residual and needs[3]
        if ctx.activation == "silu":
            grad_out = silu_input_grad(
                ctx.ops.forward, grad_out, x, weight, bias, residual, mean, var, ctx.eps
            )
        grad_x, grad_weight, grad_bias, grad_residual = backward_from_sums(
            ctx.ops,
            ctx.group,
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
        )
        return (
            grad_x,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            grad_residual if residual_grad else None,
        ) + (None,) * 7


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
    epilogue of the convolution that produced ``x``, see :mod:`fastres.ops.fused_conv2d`) are taken
    as given: one elementwise pass forward. The backward differentiates through them as
    functions of ``x``, exactly as bn_act's training backward does. Running statistics are the
    caller's to update.
    """
    check_args(x, weight, bias, None, None, residual, True, 0.0, eps)
    check_activation(activation, "bn_act_from_stats")
    ops = pieces_for(resolve_backend(backend, x.device, x.dtype))
    count = values_per_channel(x)
    return BnActFromStats.apply(
        x, weight, bias, residual, mean, var, count, eps, activation, None, ops
    )
