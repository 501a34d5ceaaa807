"""Triton kernels and launchers of bn_act (the ``triton`` backend).

Same algorithm and results as the C++ kernels (csrc/cpu, csrc/cuda):

* forward statistics: split reduction over (rows x channels) tiles, each tile's mean and M2
  computed two-pass in registers and Chan-merged, then a finalize kernel merging the splits;
* elementwise pass: normalise, add the residual, apply the activation (identity, ReLU or SiLU,
  fastres/triton/activation.py); for ReLU, pack its mask (bit i % 8 of byte i // 8 is
  out[i] > 0, in memory order);
* backward: one split reduction (sum gm, sum gm * (x - mean)), a finalize kernel producing
  grad_weight, grad_bias and per-channel coefficients, and one elementwise pass. It applies
  ReLU's mask itself (``relu``); for SiLU the caller passes the gradient at SiLU's input
  (fastres/ops/) and ``relu=False``.

Tensors are made dense in their suggested memory format (NCHW-contiguous or channels_last) by the
launchers, and per-channel vectors (any 1-D stride) dense too (:func:`dense_channels`); the
kernels address elements by memory offset. Runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import overload

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres._layout import memory_format_of
from fastres.activation import activation_code
from fastres.triton.activation import RELU, apply_activation

ELEMENTWISE_BLOCK = 1024  # elements per program; a multiple of 8 (one mask byte per 8)
REDUCE_BLOCK_ROWS = 32
REDUCE_BLOCK_CHANNELS = 32
REDUCE_BLOCK_SPLITS = 64  # partial rows the finalize kernels merge per step


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _tile_offsets(rows, channels, hw, C, CHANNELS_LAST: tl.constexpr):
    """Memory offsets of a (rows x channels) tile; row r is (n, h, w) flattened."""
    if CHANNELS_LAST:
        return rows[:, None] * C + channels[None, :]
    return (rows[:, None] // hw) * (C * hw) + channels[None, :] * hw + rows[:, None] % hw


@triton.jit
def _stats_partial_kernel(
    x_ptr,
    count_ptr,
    mean_ptr,
    m2_ptr,
    C,
    hw,
    total_rows,
    rows_per_split,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, total_rows)
    n = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < row_end)[:, None] & channel_ok[None, :]
        x = tl.load(
            x_ptr + _tile_offsets(rows, channels, hw, C, CHANNELS_LAST), mask=ok, other=0.0
        ).to(tl.float32)
        tile_n = tl.minimum(row_end - r0, BLOCK_R).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / tile_n
        dev = tl.where(ok, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        # Chan et al.: merge (n, mean, m2) with the tile's statistics.
        total = n + tile_n
        delta = tile_mean - mean
        mean = mean + delta * (tile_n / total)
        m2 = m2 + tile_m2 + delta * delta * (n * tile_n / total)
        n = total
    out = split * C + channels
    tl.store(count_ptr + out, n, mask=channel_ok)
    tl.store(mean_ptr + out, mean, mask=channel_ok)
    tl.store(m2_ptr + out, m2, mask=channel_ok)


@triton.jit
def _stats_finalize_kernel(
    count_ptr,
    mean_ptr,
    m2_ptr,
    splits,
    C,
    weight_ptr,
    bias_ptr,
    eps,
    save_mean_ptr,
    save_var_ptr,
    scale_ptr,
    shift_ptr,
    TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = channels < C
    if TRAINING:
        n = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        # BLOCK_S rows at a time: a convolution's epilogue leaves a row per tile of output
        # rows, thousands of them at ResNet's early layers, too many to merge one by one.
        for s0 in range(0, splits, BLOCK_S):
            rows = s0 + tl.arange(0, BLOCK_S)
            slot = rows[:, None] * C + channels[None, :]
            row_ok = (rows < splits)[:, None] & ok[None, :]
            part_n = tl.load(count_ptr + slot, mask=row_ok, other=0.0)
            # A row with no elements adds nothing, whatever it holds.
            filled = part_n > 0
            part_mean = tl.where(filled, tl.load(mean_ptr + slot, mask=row_ok, other=0.0), 0.0)
            part_m2 = tl.where(filled, tl.load(m2_ptr + slot, mask=row_ok, other=0.0), 0.0)
            # The block's rows merged at once (the pairwise formula generalised to many
            # groups: M2 = sum of M2_i + sum of n_i (mean_i - mean)^2), then Chan et al.'s
            # merge of the block into the running (n, mean, m2).
            block_n = tl.sum(part_n, axis=0)
            block_mean = tl.sum(part_n * part_mean, axis=0) / tl.where(block_n > 0, block_n, 1.0)
            spread = tl.where(filled, part_mean - block_mean[None, :], 0.0)
            block_m2 = tl.sum(part_m2 + part_n * spread * spread, axis=0)
            total = n + block_n
            safe_total = tl.where(total > 0, total, 1.0)
            delta = block_mean - mean
            mean = mean + delta * (block_n / safe_total)
            m2 = m2 + block_m2 + delta * delta * (n * block_n / safe_total)
            n = total
        var = m2 / tl.where(n > 0, n, 1.0)  # channels past C (masked) have n == 0
        tl.store(save_mean_ptr + channels, mean, mask=ok)
        tl.store(save_var_ptr + channels, var, mask=ok)
    else:
        var = tl.load(save_var_ptr + channels, mask=ok, other=1.0)
    # out = (x - mean) * scale + shift: centring first keeps full accuracy for a large mean.
    invstd = 1.0 / tl.sqrt(var + eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = tl.load(weight_ptr + channels, mask=ok, other=1.0) * invstd
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        shift = tl.load(bias_ptr + channels, mask=ok, other=0.0)
    tl.store(scale_ptr + channels, scale, mask=ok)
    tl.store(shift_ptr + channels, shift, mask=ok)


@triton.jit
def _group_offsets(BLOCK: tl.constexpr):
    """This program's elements as (BLOCK // 8 mask bytes) x 8 bits, and its byte indices."""
    byte_index = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    return byte_index[:, None] * 8 + tl.arange(0, 8)[None, :], byte_index


@triton.jit
def _channel_of(offsets, C, hw, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offsets % C
    return (offsets // hw) % C


@triton.jit
def _apply_kernel(
    x_ptr,
    residual_ptr,
    mean_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    mask_ptr,
    numel,
    C,
    hw,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    RESIDUAL_AFTER_ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, byte_index = _group_offsets(BLOCK)
    ok = offsets < numel
    c = _channel_of(offsets, C, hw, CHANNELS_LAST)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    centred = x - tl.load(mean_ptr + c, mask=ok, other=0.0)
    y = centred * tl.load(scale_ptr + c, mask=ok, other=0.0) + tl.load(
        shift_ptr + c, mask=ok, other=0.0
    )
    if RESIDUAL_AFTER_ACTIVATION:  # act(bn(x)) + residual
        y = apply_activation(y, ACTIVATION)
        y += tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        out = y.to(out_ptr.dtype.element_ty)
    else:  # act(bn(x) + residual)
        if HAS_RESIDUAL:
            y += tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        out = apply_activation(y, ACTIVATION).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, out, mask=ok)
    # The mask ReLU's backward reads; SiLU's, and any with the residual after the activation,
    # recomputes the activation's input.
    if ACTIVATION == RELU and not RESIDUAL_AFTER_ACTIVATION:
        positive = (ok & (out.to(tl.float32) > 0.0)).to(tl.int32)
        bits = tl.sum(positive << tl.arange(0, 8)[None, :], axis=1)
        tl.store(mask_ptr + byte_index, bits.to(tl.uint8), mask=byte_index * 8 < numel)


@triton.jit
def _grad_partial_kernel(
    grad_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    sum_g_ptr,
    sum_gx_ptr,
    C,
    hw,
    total_rows,
    rows_per_split,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    mean = tl.load(mean_ptr + channels, mask=channel_ok, other=0.0)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, total_rows)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < row_end)[:, None] & channel_ok[None, :]
        offsets = _tile_offsets(rows, channels, hw, C, CHANNELS_LAST)
        if RELU:
            byte = tl.load(mask_ptr + offsets // 8, mask=ok, other=0).to(tl.int32)
            ok = ok & (((byte >> (offsets % 8)) & 1) != 0)
        g = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(tl.where(ok, g * (x - mean[None, :]), 0.0), axis=0)
    out = split * C + channels
    tl.store(sum_g_ptr + out, sum_g, mask=channel_ok)
    tl.store(sum_gx_ptr + out, sum_gx, mask=channel_ok)


@triton.jit
def _grad_finalize_kernel(
    sum_g_ptr,
    sum_gx_ptr,
    splits,
    C,
    reduce_size,
    var_ptr,
    weight_ptr,
    eps,
    grad_weight_ptr,
    grad_bias_ptr,
    k_grad_ptr,
    k_x_ptr,
    k_const_ptr,
    TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = channels < C
    g = tl.zeros([BLOCK_C], dtype=tl.float32)
    gx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        slot = rows[:, None] * C + channels[None, :]
        row_ok = (rows < splits)[:, None] & ok[None, :]
        g += tl.sum(tl.load(sum_g_ptr + slot, mask=row_ok, other=0.0), axis=0)
        gx += tl.sum(tl.load(sum_gx_ptr + slot, mask=row_ok, other=0.0), axis=0)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + channels, mask=ok, other=1.0) + eps)
    k_grad = invstd
    if HAS_WEIGHT:
        k_grad = tl.load(weight_ptr + channels, mask=ok, other=1.0) * invstd
    tl.store(grad_bias_ptr + channels, g, mask=ok)
    tl.store(grad_weight_ptr + channels, gx * invstd, mask=ok)
    tl.store(k_grad_ptr + channels, k_grad, mask=ok)
    if TRAINING:
        # d/dx of w * (x - mean) * invstd through the batch mean and invstd.
        k_x = -k_grad * invstd * invstd * gx / reduce_size
        k_const = -k_grad * g / reduce_size
    else:
        k_x = tl.zeros([BLOCK_C], dtype=tl.float32)
        k_const = tl.zeros([BLOCK_C], dtype=tl.float32)
    tl.store(k_x_ptr + channels, k_x, mask=ok)
    tl.store(k_const_ptr + channels, k_const, mask=ok)


@triton.jit
def _backward_apply_kernel(
    grad_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    k_grad_ptr,
    k_x_ptr,
    k_const_ptr,
    grad_x_ptr,
    grad_residual_ptr,
    numel,
    C,
    hw,
    RELU: tl.constexpr,
    RESIDUAL_GRAD: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets, byte_index = _group_offsets(BLOCK)
    ok = offsets < numel
    c = _channel_of(offsets, C, hw, CHANNELS_LAST)
    g = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        byte = tl.load(mask_ptr + byte_index, mask=byte_index * 8 < numel, other=0).to(tl.int32)
        keep = ((byte[:, None] >> tl.arange(0, 8)[None, :]) & 1) != 0
        g = tl.where(keep, g, 0.0)  # masked off: exactly 0, even for a non-finite gradient
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    grad_x = (
        tl.load(k_grad_ptr + c, mask=ok, other=0.0) * g
        + tl.load(k_x_ptr + c, mask=ok, other=0.0) * (x - tl.load(mean_ptr + c, mask=ok, other=0.0))
        + tl.load(k_const_ptr + c, mask=ok, other=0.0)
    )
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=ok)
    if RESIDUAL_GRAD:
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers


def _splits(rows: int, channel_blocks: int, device: torch.device) -> int:
    """How many row ranges to reduce in parallel: fill the GPU, a few programs when interpreting."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    by_work = triton.cdiv(rows, 4 * REDUCE_BLOCK_ROWS)
    return max(1, min(triton.cdiv(target, channel_blocks), by_work))


def _channel_grid(channels: int):
    return (triton.cdiv(channels, REDUCE_BLOCK_CHANNELS),)


INT32_OFFSET_LIMIT = 2**31  # the kernels compute element offsets in int32


def check_int32_offsets(op: str, name: str, shape) -> None:
    """Raises ValueError when a tensor of ``shape`` has more elements than the Triton kernels'
    int32 offsets reach (ResNet-50 at batch 2,700 and 224 px, say), instead of wrapping."""
    numel = 1
    for size in shape:
        numel *= int(size)
    if numel >= INT32_OFFSET_LIMIT:
        raise ValueError(
            f"{op}: the triton backend addresses {name} with 32-bit offsets, so it "
            f"takes fewer than 2**31 elements; got {numel} (shape {tuple(shape)}). "
            "Split the batch."
        )


@overload
def dense_channels(vector: Tensor) -> Tensor: ...
@overload
def dense_channels(vector: None) -> None: ...
def dense_channels(vector: Tensor | None) -> Tensor | None:
    """A per-channel vector ((C,), any 1-D stride, or None) as the kernels read it, at
    ``ptr + channel``: with stride 1. A column of a (C, k) tensor or an expanded scalar is copied
    (C values: cheap beside any kernel that reads it), a dense one passed through; the caller's
    tensor is never written. Every launcher passes its per-channel inputs through this."""
    return vector.contiguous() if vector is not None else None


def dense_rows(partials: Tensor) -> Tensor:
    """A (..., rows, C) tensor of per-row, per-channel partials with each (rows, C) plane
    row-major (strides (C, 1)), as the finalize kernels index them (``row * C + channel``). The
    convolutions' partials are such planes already, a slice of rows of a larger buffer: no copy
    then."""
    rows, channels = partials.shape[-2:]
    if partials.stride(-1) == 1 and (partials.stride(-2) == channels or rows <= 1):
        return partials
    return partials.contiguous()


class _Dense:
    """x (and grad_out) made dense in x's memory format, with the sizes the launchers need."""

    def __init__(self, x: Tensor, grad_out: Tensor | None = None):
        check_int32_offsets("bn_act", "x", x.shape)
        self.format = memory_format_of(x)
        self.x = x.contiguous(memory_format=self.format)
        self.grad_out = (
            grad_out.contiguous(memory_format=self.format) if grad_out is not None else None
        )
        N, self.C, H, W = x.shape
        self.hw, self.rows, self.numel = H * W, N * H * W, x.numel()
        self.channels_last = self.format == torch.channels_last

    def channel_vector(self) -> Tensor:
        return torch.empty(self.C, dtype=torch.float32, device=self.x.device)


def _check_dtype(x: Tensor) -> None:
    if x.dtype == torch.float64:
        raise TypeError(
            "bn_act: the triton backend takes float32, float16 or bfloat16 x, got "
            "torch.float64 (float64 runs on the cpu and torch backends)"
        )


def _stats_partials(d: _Dense) -> Tensor:
    """Per-split count, mean and M2 of every channel: a (3, splits, C) float32 tensor."""
    channel_blocks = triton.cdiv(d.C, REDUCE_BLOCK_CHANNELS)
    splits = _splits(d.rows, channel_blocks, d.x.device)
    partials = torch.empty((3, splits, d.C), dtype=torch.float32, device=d.x.device)
    _stats_partial_kernel[(splits, channel_blocks)](
        d.x,
        partials[0],
        partials[1],
        partials[2],
        d.C,
        d.hw,
        d.rows,
        triton.cdiv(d.rows, splits),
        CHANNELS_LAST=d.channels_last,
        BLOCK_R=REDUCE_BLOCK_ROWS,
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return partials


def _finalize_stats(
    d: _Dense,
    partials: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mean: Tensor,
    var: Tensor,
) -> tuple[Tensor, Tensor]:
    """Merges the partials into mean / var (training; ``partials`` None: eval, mean / var are
    read) and returns the per-channel scale and shift of the elementwise pass."""
    scale, shift = d.channel_vector(), d.channel_vector()
    training = partials is not None
    if partials is None:
        partials = torch.empty((3, 1, d.C), dtype=torch.float32, device=d.x.device)  # not read
    _stats_finalize_kernel[_channel_grid(d.C)](
        partials[0],
        partials[1],
        partials[2],
        partials.shape[1],
        d.C,
        weight,
        bias,
        eps,
        mean,
        var,
        scale,
        shift,
        TRAINING=training,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_S=REDUCE_BLOCK_SPLITS,
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return scale, shift


def bn_act_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    activation: str,
    residual_after_activation: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``fastres::bn_act_forward`` in csrc/fastres.cpp (``residual_after_activation``:
    ``fastres::bn_act_add_forward``'s ``act(bn(x)) + residual``); float32/float16/bfloat16 x;
    ``activation`` one of fastres.activation.ACTIVATIONS. The mask (one bit an element) is
    empty unless ``activation`` is ``"relu"`` with the residual before it."""
    _check_dtype(x)
    code = activation_code(activation)
    d = _Dense(x)
    weight, bias = dense_channels(weight), dense_channels(bias)
    residual = residual.contiguous(memory_format=d.format) if residual is not None else None
    out = torch.empty_like(d.x, memory_format=d.format)
    relu_mask = activation == "relu" and not residual_after_activation
    mask_bytes = (d.numel + 7) // 8 if relu_mask else 0
    mask = torch.empty((mask_bytes,), dtype=torch.uint8, device=x.device)
    if training:
        save_mean, save_var = d.channel_vector(), d.channel_vector()
    else:  # outputs never alias inputs (a custom-op rule)
        # The op layer has checked that eval comes with running statistics.
        assert running_mean is not None and running_var is not None
        # Dense clones (the running statistics may have any 1-D stride, see dense_channels).
        save_mean = running_mean.clone(memory_format=torch.contiguous_format)
        save_var = running_var.clone(memory_format=torch.contiguous_format)
    if d.numel == 0:
        if training:  # an empty batch has no statistics; PyTorch reports NaN for them
            save_mean.fill_(float("nan"))
            save_var.fill_(float("nan"))
        return out, save_mean, save_var, mask
    partials = _stats_partials(d) if training else None
    scale, shift = _finalize_stats(d, partials, weight, bias, eps, save_mean, save_var)
    _apply_kernel[(triton.cdiv(d.numel, ELEMENTWISE_BLOCK),)](
        d.x,
        residual,
        save_mean,
        scale,
        shift,
        out,
        mask,
        d.numel,
        d.C,
        d.hw,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=code,
        RESIDUAL_AFTER_ACTIVATION=residual_after_activation,
        CHANNELS_LAST=d.channels_last,
        BLOCK=ELEMENTWISE_BLOCK,
    )
    return out, save_mean, save_var, mask


def _grad_partials(d: _Dense, relu_mask: Tensor, save_mean: Tensor, relu: bool) -> Tensor:
    """Per-split sums of gm and gm * (x - mean): a (2, splits, C) float32 tensor."""
    channel_blocks = triton.cdiv(d.C, REDUCE_BLOCK_CHANNELS)
    splits = _splits(d.rows, channel_blocks, d.x.device)
    partials = torch.empty((2, splits, d.C), dtype=torch.float32, device=d.x.device)
    _grad_partial_kernel[(splits, channel_blocks)](
        d.grad_out,
        d.x,
        relu_mask,
        save_mean,
        partials[0],
        partials[1],
        d.C,
        d.hw,
        d.rows,
        triton.cdiv(d.rows, splits),
        RELU=relu,
        CHANNELS_LAST=d.channels_last,
        BLOCK_R=REDUCE_BLOCK_ROWS,
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return partials


def _grad_coefficients(
    d: _Dense,
    partials: Tensor,
    reduce_size: int,
    save_var: Tensor,
    weight: Tensor | None,
    eps: float,
    training: bool,
    grad_weight: Tensor,
    grad_bias: Tensor,
) -> Tensor:
    """Merges the partials into grad_weight / grad_bias and returns the (3, C) coefficients of
    grad_x = k_grad * gm + k_x * (x - mean) + k_const."""
    coefficients = torch.empty((3, d.C), dtype=torch.float32, device=d.x.device)
    _grad_finalize_kernel[_channel_grid(d.C)](
        partials[0],
        partials[1],
        partials.shape[1],
        d.C,
        reduce_size,
        save_var,
        weight,
        eps,
        grad_weight,
        grad_bias,
        coefficients[0],
        coefficients[1],
        coefficients[2],
        TRAINING=training,
        HAS_WEIGHT=weight is not None,
        BLOCK_S=REDUCE_BLOCK_SPLITS,
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return coefficients


def _grad_apply(
    d: _Dense,
    relu_mask: Tensor,
    save_mean: Tensor,
    coefficients: Tensor,
    relu: bool,
    grad_x: Tensor,
    grad_residual: Tensor,
    residual_grad: bool,
) -> None:
    _backward_apply_kernel[(triton.cdiv(d.numel, ELEMENTWISE_BLOCK),)](
        d.grad_out,
        d.x,
        relu_mask,
        save_mean,
        coefficients[0],
        coefficients[1],
        coefficients[2],
        grad_x,
        grad_residual,
        d.numel,
        d.C,
        d.hw,
        RELU=relu,
        RESIDUAL_GRAD=residual_grad,
        CHANNELS_LAST=d.channels_last,
        BLOCK=ELEMENTWISE_BLOCK,
    )


def _grad_outputs(d: _Dense, residual_grad: bool) -> tuple[Tensor, Tensor]:
    grad_x = torch.empty_like(d.x, memory_format=d.format)
    grad_residual = (
        torch.empty_like(d.x, memory_format=d.format) if residual_grad else d.x.new_empty((0,))
    )
    return grad_x, grad_residual


def bn_act_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    relu_mask: Tensor,
    training: bool,
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See ``fastres::bn_act_backward`` in csrc/fastres.cpp."""
    d = _Dense(x, grad_out)
    weight = dense_channels(weight)
    save_mean, save_var = dense_channels(save_mean), dense_channels(save_var)
    grad_x, grad_residual = _grad_outputs(d, residual_grad)
    grad_weight = torch.zeros(d.C, dtype=torch.float32, device=x.device)
    grad_bias = torch.zeros(d.C, dtype=torch.float32, device=x.device)
    if d.numel > 0:
        partials = _grad_partials(d, relu_mask, save_mean, relu)
        coefficients = _grad_coefficients(
            d, partials, d.rows, save_var, weight, eps, training, grad_weight, grad_bias
        )
        _grad_apply(
            d, relu_mask, save_mean, coefficients, relu, grad_x, grad_residual, residual_grad
        )
    return grad_x, grad_weight, grad_bias, grad_residual


# ---------------------------------------------------------------------------------------------
# Synchronized BatchNorm's pieces (see the schemas of the same names in csrc/fastres.cpp)


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of x, float32 (NaN for an empty batch)."""
    _check_dtype(x)
    d = _Dense(x)
    mean, var = d.channel_vector(), d.channel_vector()
    if d.numel == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    _finalize_stats(d, _stats_partials(d), None, None, 1e-5, mean, var)
    return mean, var


def bn_act_backward_reduce(
    grad_out: Tensor, x: Tensor, save_mean: Tensor, relu_mask: Tensor, relu: bool
) -> tuple[Tensor, Tensor]:
    """Per-channel sums of gm and gm * (x - save_mean), float32."""
    d = _Dense(x, grad_out)
    save_mean = dense_channels(save_mean)
    if d.numel == 0:
        return (
            torch.zeros(d.C, dtype=torch.float32, device=x.device),
            torch.zeros(d.C, dtype=torch.float32, device=x.device),
        )
    partials = _grad_partials(d, relu_mask, save_mean, relu)
    return partials[0].sum(dim=0), partials[1].sum(dim=0)  # over the few splits


def bn_act_backward_apply(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    relu_mask: Tensor,
    sum_grad: Tensor,
    sum_grad_centred: Tensor,
    count: int,
    eps: float,
    relu: bool,
    residual_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Training grad_x (and grad_residual) from sums over every process, ``count`` values a
    channel in all."""
    d = _Dense(x, grad_out)
    weight = dense_channels(weight)
    save_mean, save_var = dense_channels(save_mean), dense_channels(save_var)
    grad_x, grad_residual = _grad_outputs(d, residual_grad)
    if d.numel > 0:
        # One "split"; stack copies the sums whatever their strides.
        sums = torch.stack([sum_grad, sum_grad_centred]).unsqueeze(1)
        unused = d.channel_vector()
        coefficients = _grad_coefficients(
            d, sums, count, save_var, weight, eps, True, unused, unused.clone()
        )
        _grad_apply(
            d, relu_mask, save_mean, coefficients, relu, grad_x, grad_residual, residual_grad
        )
    return grad_x, grad_residual


def bn_backward_from_partials(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_var: Tensor,
    partials: Tensor,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's backward (no ReLU) when its reductions are already done: ``partials`` is a
    (2, splits, C) float32 tensor of partial sums of ``grad`` and ``grad * (x - save_mean)``
    (from the epilogue of a convolution's input gradient). Returns (grad_x, grad_weight,
    grad_bias); one finalize and one elementwise pass."""
    d = _Dense(x, grad)
    weight = dense_channels(weight)
    save_mean, save_var = dense_channels(save_mean), dense_channels(save_var)
    partials = dense_rows(partials)
    grad_x, unused = _grad_outputs(d, False)
    grad_weight = torch.zeros(d.C, dtype=torch.float32, device=x.device)
    grad_bias = torch.zeros(d.C, dtype=torch.float32, device=x.device)
    if d.numel > 0:
        coefficients = _grad_coefficients(
            d, partials, d.rows, save_var, weight, eps, training, grad_weight, grad_bias
        )
        _grad_apply(d, unused, save_mean, coefficients, False, grad_x, unused, False)
    return grad_x, grad_weight, grad_bias
