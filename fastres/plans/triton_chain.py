"""Plan: the Triton convolution chain, BatchNorms inside the convolutions (ops/fused_conv2d.py).

``conv1(+stats) -> [BN1+act1]conv2(+stats) -> ... -> act(BN_last + shortcut)``: each BatchNorm
but the last is applied, with its stage's activation (ReLU, SiLU or none), in the next
convolution's prologue, each batch statistic comes from the previous convolution's epilogue, so
no standalone BatchNorm or activation pass runs before the last. The last pass adds the
shortcut before the block's activation (ResNet), after the last stage's (YOLO's Bottleneck:
``act(BN_last) + shortcut``), or adds nothing. Computed channels_last; the result has x's memory
format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastres._layout import memory_format_of
from fastres.activation import ACTIVATIONS
from fastres.batch_norm import (
    BatchNormStep,
    require_fused_dtypes,
    require_more_than_one_value,
    values_per_channel,
)
from fastres.ops.bn_act import bn_act
from fastres.ops.bn_act_add import bn_act_add
from fastres.ops.bn_act_from_stats import bn_act_add_from_stats, bn_act_from_stats
from fastres.ops.fused_conv2d import bn_act_conv2d_stats_triton
from fastres.plans.autocast import autocast_dtype
from fastres.plans.description import (
    ADD_AFTER_ACTIVATION,
    ADD_BEFORE_ACTIVATION,
    ADD_POSITIONS,
    NO_ADD,
    ResidualBlock,
)
from fastres.plans.support import BOTH_MODES, FLOAT_DTYPES, Support, unsupported_reasons

__all__ = ["TritonChainPlan"]


def _uniform(conv: nn.Module) -> bool:
    """Square kernel, and one stride, padding and dilation for H and W (every ResNet's)."""
    return all(
        len(set(getattr(conv, name))) == 1
        for name in ("kernel_size", "stride", "padding", "dilation")
    )


@dataclass(frozen=True)
class _Pending:
    """A BatchNorm still to be applied, with the statistics it normalises with: the batch's
    (training, from the convolution's epilogue) or the running ones (eval), and the activation
    of its stage."""

    step: BatchNormStep
    mean: Tensor
    var: Tensor
    activation: str

    def prologue(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, bool, float, str]:
        """The arguments of bn_act_conv2d_stats_triton that apply it in the next prologue."""
        step = self.step
        return (
            self.mean,
            self.var,
            step.weight,
            step.bias,
            step.training,
            step.eps,
            self.activation,
        )


def _no_prologue(eps: float) -> tuple[None, None, None, None, bool, float, str]:
    """The same arguments for a convolution with no BatchNorm before it (the block's first)."""
    return (None, None, None, None, False, eps, "identity")


class TritonChainPlan:
    name = "triton convolution chain"
    # Synchronized BatchNorm keeps the fused-ops plan: its statistics need a collective.
    support = Support(
        backends=("triton",),
        dtypes=FLOAT_DTYPES,
        modes=BOTH_MODES,
        norms=("BatchNorm2d",),
        activations=ACTIVATIONS,
        add_positions=ADD_POSITIONS,
        fused_layers_only=True,
        autocast=True,
        gradients_in_eval=True,
        compiling=True,
        tracing=False,
    )

    def engine(self, backend: str) -> str:
        return ""  # Triton's kernels, as the name says

    def not_supported_reasons(self, block: ResidualBlock, x: Tensor, backend: str) -> list[str]:
        """:attr:`support`, and square uniform convolutions (every block of ResNet-50, ResNeXt
        and YOLO's Bottleneck and Conv). A prologue applies any of ACTIVATIONS; with the add
        before the activation the last BatchNorm's goes after the add, so its stage has none
        (``fusion_issue`` checks that)."""
        if issues := unsupported_reasons(self.support, block, x, backend):
            return issues
        if not all(_uniform(conv) for conv in block.convs):
            return ["a convolution is not square with one stride, padding and dilation"]
        return []

    def run(
        self, block: ResidualBlock, x: Tensor, backend: str, *, input_is_scratch: bool = False
    ) -> Tensor:
        require_fused_dtypes(block.module, block.norms, x)
        compute_dtype = autocast_dtype(x) or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            h, last = self._main_branch(block, x.to(compute_dtype))
        residual = None
        if block.add_position != NO_ADD:
            # After the main branch, as in torchvision (an error there leaves the shortcut's
            # BatchNorm untouched), and under the caller's autocast.
            residual = x if block.shortcut is None else block.shortcut(x)
        with torch.autocast(x.device.type, enabled=False):
            if residual is not None:
                residual = residual.to(h.dtype)
            # The block's activation follows an add before it; otherwise the last stage's.
            before = block.add_position == ADD_BEFORE_ACTIVATION
            activation = block.activation if before else last.activation
            add_after = block.add_position == ADD_AFTER_ACTIVATION
            out = _last_pass(h, last, residual, activation, add_after)
        return out.contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def _main_branch(block: ResidualBlock, h: Tensor) -> tuple[Tensor, _Pending]:
        """Every convolution of the main branch; returns the last one's output and the last
        BatchNorm, still to be applied with its stage's activation."""
        pending: _Pending | None = None  # the BatchNorm waiting to be applied to h
        for stage in block.stages:
            step = BatchNormStep.of(stage.norm)
            momentum = step.start()
            conv = stage.conv
            if not isinstance(conv, nn.Conv2d):
                raise TypeError(f"the triton chain needs nn.Conv2d layers, got {conv}")
            h, mean, var = bn_act_conv2d_stats_triton(
                h,
                conv.weight.to(h.dtype),
                *(pending.prologue() if pending else _no_prologue(step.eps)),
                conv.stride[0],
                conv.padding[0],
                conv.dilation[0],
                conv.groups,
                step.training,
            )
            if step.training:
                require_more_than_one_value(h.size())  # where, and as, torchvision's would
                step.update(mean, var, momentum, values_per_channel(h))
                pending = _Pending(step, mean, var, stage.activation)
            else:
                pending = _Pending(step, *step.running_statistics(), stage.activation)
        assert pending is not None  # a block has at least one stage
        return h, pending


def _last_pass(
    h: Tensor, last: _Pending, residual: Tensor | None, activation: str, add_after: bool
) -> Tensor:
    """The last BatchNorm with the batch statistics from the last convolution's epilogue in
    training (the running ones in eval), ``activation``, and the add of ``residual``: before
    the activation (``activation(BN_last(h) + residual)``; no add for None) or, with
    ``add_after``, after it (``activation(BN_last(h)) + residual``)."""
    step = last.step
    args = (h, step.weight, step.bias, last.mean, last.var)
    kwargs: dict[str, Any] = dict(
        residual=residual, eps=step.eps, activation=activation, backend="triton"
    )
    if step.training:
        from_stats = bn_act_add_from_stats if add_after else bn_act_from_stats
        return from_stats(*args, **kwargs)
    with_running_stats = bn_act_add if add_after else bn_act
    return with_running_stats(*args, training=False, **kwargs)
