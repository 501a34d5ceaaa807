"""BatchNorm folded into a convolution: in eval mode a BatchNorm is an affine map, so
``bn(conv(x))`` is one convolution with a new weight and bias (:func:`fold_bn`).

The arithmetic only; the folded convolutions that run it (oneDNN, cuDNN, the Triton epilogue)
are the folded-eval plan's: fastres/plans/folded_convolution.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["fold_bn"]


def fold_bn(
    conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    Args:
        conv: a ``Conv2d`` (with or without bias), weight ``(C_out, C_in / groups, kH, kW)``.
        bn: a ``BatchNorm2d`` over ``C_out`` channels with running statistics.
        dtype: the dtype of the result; default conv's weight's. The folding itself runs in
            float32 at least, so a bfloat16 or float16 model's weights are rounded once, at
            the end.

    Returns:
        ``(weight, bias)``: weight of conv's shape and memory format; bias ``(C_out,)``.
        Differentiable with respect to the conv and BatchNorm parameters. Matches
        ``torch.nn.utils.fusion.fuse_conv_bn_weights``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_bn: bn has no running statistics (track_running_stats=False), "
            "so eval-mode BatchNorm is not an affine map to fold"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fold_bn: bn has {bn.num_features} channels but conv has "
            f"{conv.out_channels} output channels"
        )
    dtype = dtype or conv.weight.dtype
    compute = torch.promote_types(conv.weight.dtype, torch.float32)

    def wide(t: Tensor) -> Tensor:
        return t.to(compute)

    scale = torch.rsqrt(wide(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = wide(bn.weight) * scale
    shift = -wide(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + wide(bn.bias)
    if conv.bias is not None:
        shift = shift + wide(conv.bias) * scale
    weight = wide(conv.weight) * scale.reshape(-1, 1, 1, 1)
    return weight.to(dtype), shift.to(dtype)
