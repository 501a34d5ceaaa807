"""Synchronized BatchNorm in the fused ops: batch statistics over every process of a group.

``sync_bn_act`` and ``sync_bn_act_conv2d`` compute what :func:`fastres.ops.bn_act` and
:func:`fastres.ops.bn_act_conv2d` compute on the concatenation of every process's batch, as
``nn.SyncBatchNorm`` does, with the same fused kernels (:mod:`fastres.ops.bn_act_pieces`):

forward, per process::

    local mean, var        = bn_stats(x)                        # one reduction pass
    all_gather (count, mean, var)                              # one collective, 2C + 1 values
    global mean, var       = Chan's merge in float64            # no cancellation: deviations only
    out, relu_mask         = bn_act_forward(x, global stats)    # one elementwise pass

backward, per process::

    sum gm, sum gm * (x - mean) = bn_act_backward_reduce(...)  # one reduction pass
    all_reduce (both sums)                                     # one collective, 2C values
    grad_x, grad_residual       = bn_act_backward_apply(...)   # one elementwise pass

``grad_weight`` and ``grad_bias`` are this process's share (the sums before the all-reduce), as
in ``nn.SyncBatchNorm``: DistributedDataParallel all-reduces parameter gradients itself.

Given the global statistics, both run an op of :mod:`fastres.ops.bn_act_from_stats`
(``bn_act_from_stats``, ``bn_act_conv2d_from_stats``), whose backward all-reduces the sums over
the group named in its arguments; this file holds the forward's collective and the entry points.

Processes may hold different batch sizes, including none at all. Communication goes through
``torch.distributed`` on the given process group: NCCL for CUDA tensors, gloo for CPU tensors
(where ``nn.SyncBatchNorm`` does not run). Eval needs no communication and runs the unsynchronised
ops. The forward's all_gather is an eager Python call: under ``torch.compile`` a synchronized
BatchNorm in training is a graph break.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fastres.activation import check_activation
from fastres.backends import resolve_backend
from fastres.batch_norm import (
    require_more_than_one_value,
    update_running_stats,
    values_per_channel,
)
from fastres.ops import bn_act_from_stats  # noqa: F401  (defines the ops looked up here)
from fastres.ops.bn_act import bn_act, check_args
from fastres.ops.bn_act_conv import bn_act_conv2d
from fastres.ops.registry import op

__all__ = ["sync_bn_act", "sync_bn_act_conv2d", "resolve_process_group"]


def resolve_process_group(process_group: Any | None, who: str = "sync_bn") -> Any:
    """The group to synchronise over: ``process_group``, or the default group when None.

    Raises RuntimeError when torch.distributed is not initialised (statistics cannot be
    synchronised without it), naming ``who`` in the message.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"fastres: {who} needs an initialised torch.distributed process group to compute "
            "batch statistics over every process in training; call "
            "torch.distributed.init_process_group() first (eval mode needs none)"
        )
    return dist.group.WORLD if process_group is None else process_group


# ---------------------------------------------------------------------------------------------
# Collectives


def global_batch_stats(x: Tensor, backend: str, group: Any) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance of every channel over the whole group's batch, and its size.

    Each process contributes (count, mean, var); they are merged with Chan et al.'s formula
    ``var = sum n_i (var_i + (mean_i - mean)^2) / N`` in float64, which adds only non-negative
    terms, so nothing cancels however large the mean. Processes with an empty batch (NaN
    statistics) contribute nothing.
    """
    mean, var = op("bn_stats", backend)(x)
    count = values_per_channel(x)
    # float64 throughout: the count stays exact (float32 would round counts past 2^24).
    local = torch.cat(
        [mean.new_full((1,), count, dtype=torch.float64), mean.double(), var.double()]
    )
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)  # (world, 1 + 2C)
    counts, means, variances = table[:, :1], *table[:, 1:].chunk(2, dim=1)
    total = int(counts.sum().item())
    require_more_than_one_value(x.size(), in_all=total)
    has_data = counts > 0
    means = torch.where(has_data, means, 0.0)
    variances = torch.where(has_data, variances, 0.0)
    global_mean = (counts * means).sum(dim=0) / total
    global_var = (counts * (variances + (means - global_mean) ** 2)).sum(dim=0) / total
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total


# ---------------------------------------------------------------------------------------------
# Public entry points


def _prepare(x: Tensor, backend: str, process_group: Any | None) -> tuple[Any, str] | None:
    """(group, resolved backend), or None when one process makes the whole group: then the
    plain fused ops compute exactly the same thing with no communication."""
    group = resolve_process_group(process_group)
    if dist.get_world_size(group) == 1:
        return None
    return group, resolve_backend(backend, x.device, x.dtype)


def sync_bn_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    residual: Tensor | None = None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    process_group: Any | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`fastres.ops.bn_act` with batch statistics over every process of ``process_group``.

    Arguments and result as :func:`fastres.ops.bn_act`, plus ``process_group`` (a
    ``torch.distributed`` group; None: the default group). In training every process of the
    group must call it, in the same order (it communicates); ``x`` may hold a different number
    of samples on each, including zero. ``running_mean`` / ``running_var`` receive the global
    statistics, identically on every process. In eval it is :func:`fastres.ops.bn_act`.

    Raises RuntimeError in training when torch.distributed is not initialised.
    """
    check_args(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        residual,
        training,
        momentum,
        eps,
        local_batch=True,
    )
    check_activation(activation, "sync_bn_act")
    prepared = _prepare(x, backend, process_group) if training else None
    if prepared is None:
        return bn_act(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            residual=residual,
            training=training,
            momentum=momentum,
            eps=eps,
            activation=activation,
            backend=backend,
        )
    group, name = prepared
    mean, var, count = global_batch_stats(x.detach(), name, group)
    update_running_stats(running_mean, running_var, mean, var, momentum, count)
    out, _ = op("bn_act_from_stats", name)(
        x, weight, bias, residual, mean, var, count, eps, activation, group.group_name
    )
    return out


def sync_bn_act_conv2d(
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
    *,
    training: bool,
    momentum: float,
    eps: float,
    activation: str = "relu",
    process_group: Any | None = None,
    backend: str = "auto",
) -> Tensor:
    """``conv2d(activation(batch_norm(y)))`` with batch statistics over every process of
    ``process_group``, keeping only ``y`` for backward (see :mod:`fastres.ops.bn_act_conv`).

    Unlike :func:`fastres.ops.bn_act_conv2d` (an op that reads running statistics and returns
    the batch ones), this updates ``running_mean`` / ``running_var`` itself, as
    :func:`sync_bn_act` does, and returns the convolution output only.
    """
    check_args(
        y,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        None,
        training,
        momentum,
        eps,
        local_batch=True,
    )
    check_activation(activation, "sync_bn_act_conv2d")
    prepared = _prepare(y, backend, process_group) if training else None
    if prepared is None:
        out, mean, var = bn_act_conv2d(
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
            activation,
        )
        if training:
            count = values_per_channel(y)
            update_running_stats(running_mean, running_var, mean, var, momentum, count)
        return out
    group, name = prepared
    mean, var, count = global_batch_stats(y.detach(), name, group)
    update_running_stats(running_mean, running_var, mean, var, momentum, count)
    conv_args = (list(stride), list(padding), list(dilation), groups)
    op_args = (y, bn_weight, bn_bias, conv_weight, mean, var, count, *conv_args, eps, activation)
    return op("bn_act_conv2d_from_stats", name)(*op_args, group.group_name)
