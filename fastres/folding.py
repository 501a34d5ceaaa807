"""Inference with BatchNorm folded into the convolutions.

In eval mode a BatchNorm is an affine map, so ``bn(conv(x))`` is one convolution with a new weight
and bias (:func:`fold_bn`). The fast blocks use that to run each convolution once, with its
bias, the residual add and the ReLU fused into the convolution (oneDNN post-ops on CPU, reached
through ATen's ``mkldnn::_convolution_pointwise``), from weights folded and prepacked once.

The folded weights are cached per block under a key built from every tensor they depend on
(identity, version counter, dtype, device), so any change — an optimizer step, ``load_state_dict``,
an in-place edit, ``.to()`` — is seen on the next call and the weights are folded again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["fold_bn"]


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    Args:
        conv: a ``Conv2d`` (with or without bias), weight ``(C_out, C_in / groups, kH, kW)``.
        bn: a ``BatchNorm2d`` over ``C_out`` channels with running statistics.

    Returns:
        ``(weight, bias)``: weight of conv's shape, dtype and memory format; bias ``(C_out,)``.
        Differentiable with respect to the conv and BatchNorm parameters. Matches
        ``torch.nn.utils.fusion.fuse_conv_bn_weights``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn: bn has no running statistics (track_running_stats=False), "
                         "so eval-mode BatchNorm is not an affine map to fold")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_bn: bn has {bn.num_features} channels but conv has "
                         f"{conv.out_channels} output channels")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.to(conv.weight.dtype).reshape(-1, 1, 1, 1)
    return weight, shift.to(conv.weight.dtype)


class _Stage:
    """One folded convolution: its weight and bias, prepacked for oneDNN on first use."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        self.conv = conv
        with torch.no_grad():
            self.weight, self.bias = fold_bn(conv, bn)
        self.packed: Optional[Tensor] = None

    def run(self, x: Tensor, *, relu: bool, residual: Optional[Tensor] = None) -> Tensor:
        c = self.conv
        geometry = (list(c.padding), list(c.stride), list(c.dilation), c.groups)
        if self.packed is None:
            # oneDNN picks the weight layout for this input shape; packing for the shape that
            # really arrives avoids a reorder on every call. Other batch sizes stay correct.
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_convolution_weight(
                    self.weight.contiguous(memory_format=torch.channels_last), *geometry[:3],
                    c.groups, list(x.shape))
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.packed, self.bias, *geometry, "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, self.packed, self.bias, *geometry, "add", 1.0,
            "relu" if relu else "none", [], "")


def _state_key(tensors: list[Optional[Tensor]]) -> tuple:
    return tuple((None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device))
                 for t in tensors)


class FoldedBlock:
    """The folded, prepacked convolutions of one fast block, rebuilt whenever the block changes.

    ``pairs`` are the block's (conv, bn) pairs in order; ``downsample`` the pair of its
    downsample branch or None.
    """

    def __init__(self):
        self._key: Optional[tuple] = None
        self._stages: list[_Stage] = []
        self._downsample: Optional[_Stage] = None

    def stages(self, pairs, downsample) -> tuple[list[_Stage], Optional[_Stage]]:
        modules = list(pairs) + ([downsample] if downsample else [])
        tensors = [t for conv, bn in modules
                   for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                             bn.running_var)]
        key = _state_key(tensors) + tuple(bn.eps for _, bn in modules)
        if key != self._key:
            self._stages = [_Stage(conv, bn) for conv, bn in pairs]
            self._downsample = _Stage(*downsample) if downsample else None
            self._key = key
        return self._stages, self._downsample


def folding_available() -> bool:
    """oneDNN's fused convolutions are in every x86 and Arm CPU build of torch; check anyway."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_convolution_pointwise")
