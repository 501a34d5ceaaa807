"""Plan: the fused ops on any fastres backend (fastres/ops/).

Training forward of a bottleneck::

    y1 = conv1(x)
    y2 = bn_act_conv2d(y1; bn1, conv2)     # relu(bn1(y1)) is never kept for backward
    y3 = bn_act_conv2d(y2; bn2, conv3)
    out = bn_act(y3; bn3, residual=shortcut(x) or x)

so autograd keeps y1, y2, y3 and 1-bit ReLU masks where torchvision also keeps both ReLU
outputs. A block that adds its shortcut after the last activation (Ultralytics' YOLO
Bottleneck) ends with ``bn_act_add(y; bn, act, residual=x)``, one without a shortcut with
``bn_act(y; bn, act)``. Eval that is not folded runs the same ops with the running statistics. A
synchronized BatchNorm in training takes the synchronized ops (statistics over its process
group).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastres.activation import ACTIVATIONS
from fastres.batch_norm import BatchNormStep, require_fused_dtypes, values_per_channel
from fastres.ops.bn_act import bn_act
from fastres.ops.bn_act_add import bn_act_add
from fastres.ops.bn_act_conv import bn_act_conv2d
from fastres.ops.sync_bn_act import sync_bn_act, sync_bn_act_conv2d
from fastres.plans.autocast import autocast_dtype
from fastres.plans.description import (
    ADD_AFTER_ACTIVATION,
    ADD_POSITIONS,
    NO_ADD,
    ResidualBlock,
)
from fastres.plans.support import (
    ALL_NORMS,
    ANY,
    BOTH_MODES,
    FASTRES_BACKENDS,
    Support,
    unsupported_reasons,
)

__all__ = ["FusedOpsPlan", "bn_act_for", "synchronised"]


def synchronised(bn: nn.Module) -> bool:
    """Whether bn's statistics come from every process of its group: a
    :class:`fastres.SyncBatchNorm2d` (``synchronises_statistics``) in training, as in
    nn.SyncBatchNorm (eval and running statistics need no communication)."""
    return bool(getattr(type(bn), "synchronises_statistics", False)) and bn.training


def bn_act_for(bn: nn.Module) -> Callable[..., Tensor]:
    """The bn_act that computes ``bn``'s statistics: :func:`fastres.ops.sync_bn_act` over its
    process group when it is :func:`synchronised`, else :func:`fastres.ops.bn_act` (same
    arguments)."""
    if synchronised(bn):
        return functools.partial(sync_bn_act, process_group=bn.process_group)
    return bn_act


def _conv_args(conv: nn.Module) -> tuple[Tensor, list[int], list[int], list[int], int]:
    """(weight, stride, padding, dilation, groups) of an nn.Conv2d, as the ops take them."""
    if not isinstance(conv, nn.Conv2d) or isinstance(conv.padding, str):
        raise TypeError(f"the fused-ops plan needs nn.Conv2d with numeric padding, got {conv}")
    return conv.weight, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def bn_act_conv(y: Tensor, bn: nn.Module, activation: str, conv: nn.Module, backend: str) -> Tensor:
    """conv(activation(bn(y))) through bn_act_conv2d, updating bn's running statistics as bn
    would."""
    weight, stride, padding, dilation, groups = _conv_args(conv)
    step = BatchNormStep.of(bn)
    momentum = step.start()
    compute_dtype = autocast_dtype(y)
    if compute_dtype is not None:
        # The fused op is opaque to autocast: cast as autocast would for the convolution.
        y, weight = y.to(compute_dtype), weight.to(compute_dtype)
    bn_args = (y, step.weight, step.bias, step.running_mean, step.running_var)
    with torch.autocast(y.device.type, enabled=False):
        if synchronised(bn):
            return sync_bn_act_conv2d(
                *bn_args,
                weight,
                stride,
                padding,
                dilation,
                groups,
                training=step.training,
                momentum=momentum,
                eps=step.eps,
                activation=activation,
                process_group=bn.process_group,
                backend=backend,
            )
        out, mean, var = bn_act_conv2d(
            *bn_args,
            weight,
            stride,
            padding,
            dilation,
            groups,
            step.training,
            step.eps,
            backend,
            activation,
        )
    step.update(mean, var, momentum, values_per_channel(y))
    return out


def bn_add_act(
    y: Tensor, bn: nn.Module, residual: Tensor | None, activation: str, backend: str
) -> Tensor:
    """activation(bn(y) + residual) through bn_act (no add for residual None)."""
    step = BatchNormStep.of(bn)
    if residual is not None and residual.dtype != y.dtype:  # autocast: the residual path may
        residual = residual.to(y.dtype)  # be in another precision
    args = (y, step.weight, step.bias, step.running_mean, step.running_var)
    return bn_act_for(bn)(
        *args,
        residual=residual,
        training=step.training,
        momentum=step.start(),
        eps=step.eps,
        activation=activation,
        backend=backend,
    )


def bn_act_then_add(
    y: Tensor, bn: nn.Module, activation: str, residual: Tensor, backend: str
) -> Tensor:
    """activation(bn(y)) + residual through bn_act_add; a synchronised BatchNorm's statistics
    come from sync_bn_act, and the add then runs as its own op."""
    if synchronised(bn):
        return bn_add_act(y, bn, None, activation, backend) + residual.to(y.dtype)
    step = BatchNormStep.of(bn)
    args = (y, step.weight, step.bias, step.running_mean, step.running_var)
    return bn_act_add(
        *args,
        residual=residual.to(y.dtype),
        training=step.training,
        momentum=step.start(),
        eps=step.eps,
        activation=activation,
        backend=backend,
    )


_KERNELS = {"cpu": "C++ kernels", "cuda": "CUDA kernels", "triton": "Triton kernels"}


class FusedOpsPlan:
    name = "fused ops"
    support = Support(
        backends=FASTRES_BACKENDS,
        dtypes=ANY,  # the ops raise, naming the block, for a dtype their backend cannot run
        modes=BOTH_MODES,
        norms=ALL_NORMS,
        activations=ACTIVATIONS,
        add_positions=ADD_POSITIONS,
        fused_layers_only=True,
        autocast=True,
        gradients_in_eval=True,
        compiling=True,
        tracing=False,
    )

    def engine(self, backend: str) -> str:
        return _KERNELS.get(backend, "")

    def not_supported_reasons(self, block: ResidualBlock, x: Tensor, backend: str) -> list[str]:
        return unsupported_reasons(self.support, block, x, backend)

    def run(
        self, block: ResidualBlock, x: Tensor, backend: str, *, input_is_scratch: bool = False
    ) -> Tensor:
        require_fused_dtypes(block.module, block.norms, x)
        first, *rest = block.stages
        out = first.conv(x)
        previous = first
        for stage in rest:
            out = bn_act_conv(out, previous.norm, previous.activation, stage.conv, backend)
            previous = stage
        if block.add_position == NO_ADD:
            return bn_add_act(out, previous.norm, None, previous.activation, backend)
        # After the main branch, as in torchvision: an error there leaves the shortcut's
        # BatchNorm untouched.
        identity = x if block.shortcut is None else block.shortcut(x)
        if block.add_position == ADD_AFTER_ACTIVATION:
            return bn_act_then_add(out, previous.norm, previous.activation, identity, backend)
        return bn_add_act(out, previous.norm, identity, block.activation, backend)
