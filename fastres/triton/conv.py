"""Triton implicit-GEMM 2-D convolution (NHWC) with BatchNorm fused around it.

Every convolution of ResNet-50 and ResNeXt-50 (7x7 stride 2 stem, 1x1 stride 1 and 2, 3x3 stride
1 and 2 with padding, grouped 3x3), as three GEMMs over channels_last tensors, none of which
materialises an im2col matrix:

* forward ``out[m, co] = sum_k A[m, k] W[k, co]``: m runs over output pixels (n, oh, ow), k over
  (kh, kw, ci); A is gathered from x on the fly. A *prologue* may apply the previous BatchNorm
  (per-channel ``scale * (x - mean) + shift``) and its activation (identity, ReLU or SiLU) to x
  as it is loaded: the normalised activation never exists in memory, and padding stays zero as
  in the unfused computation. An *epilogue* may add a bias and a residual, apply an activation,
  and write each tile's per-channel count, mean and M2 of the output for the next BatchNorm's
  statistics. The tiles' statistics are merged by bn_act's finalize kernel (Chan et al.'s
  pairwise formula): each tile's M2 is computed around its own mean, so nothing cancels however
  large the mean is against the spread (the naive ``E[y^2] - E[y]^2`` from sums of squares would
  lose all digits then).
* input gradient ``dx[m', ci] = sum dy[m, co] W[co, ci, kh, kw]`` over the (kh, kw, co) that reach
  input pixel m' (a stride-s convolution reaches it only where ``ih + pad - kh * dil`` is a
  multiple of s). With a prologue, the epilogue recomputes the activation's input ``z = scale *
  (x - mean) + shift`` at m' from the saved pre-BatchNorm x and multiplies the gradient by the
  activation's derivative there (ReLU: keeps it where z > 0, without a saved mask), and sums
  that gradient and its product with ``x - mean`` per channel: BatchNorm's backward reductions,
  so that only BatchNorm's elementwise pass is left.
* weight gradient ``dW[k, co] = sum_m A[m, k] dy[m, co]``, A gathered as in forward, prologue
  included (recomputed, not loaded), the sum over m split across programs and added atomically.

The forward and input-gradient kernels reduce in one loop over (tap, channel block), as
Inductor's convolution template does, take a 1x1 stride-1 convolution as a plain GEMM, and visit
tiles in GROUP_M-swizzled order. Weights are read in place through their strides (channels_last
makes each tile one contiguous load); the weight gradient comes back in the weight's layout.

Accumulation is float32; inputs float32 (TF32 on GPUs where torch allows it for cuDNN), float16
or bfloat16. Tile sizes are autotuned on GPUs per problem shape and precision, the batch
bucketed to a power of two (see _SHAPE_KEY, tuning_report()), except under
``torch.use_deterministic_algorithms(True)``: the tiles fix the order of the sums, so each kernel
then runs one fixed configuration (DETERMINISTIC_SHAPES). The interpreter (CPU tests) runs one
small configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres.activation import activation_code
from fastres.triton.activation import activation_grad, apply_activation
from fastres.triton.bn_act import (
    REDUCE_BLOCK_CHANNELS,
    REDUCE_BLOCK_SPLITS,
    _stats_finalize_kernel,
    check_int32_offsets,
    dense_channels,
    dense_rows,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Which tile configurations to autotune over on a GPU: "full" (the default, for speed) or "quick"
# (two of them, a large and a small tile, for runs that only check correctness: the GPU check's
# tests and sanitizer phases, where compiling all nine per kernel would not fit).
AUTOTUNE = os.environ.get("FASTRES_TRITON_AUTOTUNE", "full")
if AUTOTUNE not in ("full", "quick"):
    raise ValueError(f"FASTRES_TRITON_AUTOTUNE must be 'full' or 'quick', got {AUTOTUNE!r}")
# Reduce over one flat (kh, kw, channel) index when a group has fewer channels than this (the
# stem's 3, ResNeXt's 4 per group), over channel blocks per (kh, kw) otherwise.
FLAT_K_BELOW = 16


# The tile parameters' names: rows x columns x reduction block of the forward and input
# gradient; the weight gradient's rows are output channels, its columns k, its reduction m.
TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
WEIGHT_GRAD_TILES = ("BLOCK_K", "BLOCK_N", "BLOCK_M")
# The interpreter's cost is per operation, not per FLOP: large tiles, few iterations.
INTERPRETER_SHAPE = (32, 64, 64, 4, 1)
# The one configuration each convolution kernel runs under
# torch.use_deterministic_algorithms(True) (its three tiles in the order of its names, warps,
# stages): the tiles fix the order of the sums (the reduction block the product's, BLOCK_M the
# statistics' and the weight gradient's), so a configuration chosen by timing could give two
# processes different bits. Each compiles without register spills for sm_90 in every dtype and
# precision, float32 with TF32 off included, with Triton 3.6 and 3.7
# (tests/test_triton_compile.py checks it): the forward 64 x 64 x 32 with 4 warps (in both
# autotuning sets); the input gradient the same tiles with 8 warps (with 4, Triton 3.6 spills 8
# bytes a thread in float32 with TF32 off); the weight gradient 64 x 64 with a reduction block
# of 16 and 8 warps (as _EXACT_FLOAT32_WEIGHT_GRAD: every shared configuration spills in float32
# with TF32 off). The interpreter's one shape when interpreting.
DETERMINISTIC_SHAPES = {
    "_conv_forward_kernel": (64, 64, 32, 4, 4),
    "_conv_input_grad_kernel": (64, 64, 32, 8, 4),
    "_conv_weight_grad_kernel": (64, 64, 16, 8, 4),
}
if INTERPRETING:
    DETERMINISTIC_SHAPES = dict.fromkeys(DETERMINISTIC_SHAPES, INTERPRETER_SHAPE)
# The weight gradient's configurations (BLOCK_K x BLOCK_N x BLOCK_M, warps, stages) in float32
# with TF32 off: its products then run on FMA units, each thread holding its operands' whole
# BLOCK_M slice, and every configuration of _configs spills registers on sm_90 (the 128 x 128
# tiles about 6.5 KB a thread, 64 x 64 x 32 2.5 KB); with a reduction block of 16 these do not
# (tests/test_triton_compile.py checks them). Quick: the largest and a small one.
_EXACT_FLOAT32_WEIGHT_GRAD = [
    (64, 64, 16, 8, 4),
    (64, 32, 16, 4, 4),
    (32, 64, 16, 4, 4),
    (32, 32, 16, 4, 4),
    (32, 32, 16, 2, 2),
]
if AUTOTUNE == "quick":
    _EXACT_FLOAT32_WEIGHT_GRAD = [_EXACT_FLOAT32_WEIGHT_GRAD[0], _EXACT_FLOAT32_WEIGHT_GRAD[3]]


def _config(names: tuple[str, str, str], shape: tuple[int, int, int, int, int]) -> triton.Config:
    """The configuration of ``shape`` (three tile sizes, warps, stages), tiles named ``names``."""
    *tiles, warps, stages = shape
    return triton.Config(dict(zip(names, tiles, strict=True)), num_warps=warps, num_stages=stages)


def _configs(names: tuple[str, str, str]) -> list[triton.Config]:
    """Tile configurations (rows x columns x reduction block) to autotune over."""
    if INTERPRETING:
        shapes = [INTERPRETER_SHAPE]
    else:
        # Larger tiles (128 x 256, 256 x 128, BLOCK_K 64 with 4 warps) spill registers in the
        # epilogues here (tests/test_triton_compile.py checks sm_90 builds).
        shapes = [
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (32, 64, 32, 4, 4),
            (64, 32, 16, 2, 4),
            (32, 32, 16, 2, 4),
        ]
        if AUTOTUNE == "quick":  # the largest tile and a small one
            shapes = [s for s in shapes if s[:3] in ((128, 128, 32), (64, 64, 32))]
    return [_config(names, shape) for shape in shapes]


# What a tuned configuration is kept for: the problem's shape, with the batch only as far as
# the power of two the row count rounds up to (a last partial batch, another evaluation batch
# size, reuse the tiles tuned for it rather than tuning and compiling again mid-epoch; the
# kernels do not specialise on N either). Nor what is fused around the product (prologue,
# epilogue, their activations): per element of a tile it costs little beside the BLOCK_N or
# BLOCK_K products that element takes part in.
_SHAPE_KEY = [
    "ROWS_BUCKET",
    "H",
    "W",
    "C_IN",
    "OH",
    "OW",
    "C_OUT",
    "GROUPS",
    "KH",
    "KW",
    "STRIDE",
    "PADDING",
    "DILATION",
]
# The key of every convolution kernel's tuning: the shape, and the products' precision (float32
# with TF32 and with exact products are different kernels, with different candidates: see
# _weight_grad_candidates).
_TUNING_KEY = _SHAPE_KEY + ["INPUT_PRECISION"]


@triton.jit
def _tile_of(tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile). Programs run in order of program_id(0); taking
    GROUP_M row tiles across every column tile before moving on (instead of one row tile across
    all columns) keeps the input rows being read in L2 while the column tiles reuse them."""
    pid = tl.program_id(0)
    return tl.swizzle2d(pid // tiles_n, pid % tiles_n, tiles_m, tiles_n, GROUP_M)


@triton.jit
def _batch_norm(x, mean, scale, shift):
    """The previous BatchNorm of x, in float32: exactly what bn_act's elementwise pass computes,
    so that recomputing it anywhere gives the same bits."""
    return (x - mean) * scale + shift


@triton.jit
def _apply_prologue(
    a, a_ok, channel, channel_ok, mean_ptr, scale_ptr, shift_ptr, ACTIVATION: tl.constexpr
):
    """activation(bn(a)) for a tile of x whose columns are ``channel``; zero where a_ok is not
    (the padding stays zero, as when the normalised activation is padded), in a's dtype."""
    z = _batch_norm(
        a.to(tl.float32),
        tl.load(mean_ptr + channel, mask=channel_ok, other=0.0)[None, :],
        tl.load(scale_ptr + channel, mask=channel_ok, other=0.0)[None, :],
        tl.load(shift_ptr + channel, mask=channel_ok, other=0.0)[None, :],
    )
    return tl.where(a_ok, apply_activation(z, ACTIVATION), 0.0).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# Forward


# Every statistics row is zeroed before each configuration runs while autotuning: a tile height
# writes only its own rows, and rows left by a configuration tried earlier must not count.
@triton.autotune(
    configs=_configs(TILES),
    key=_TUNING_KEY,
    reset_to_zero=["stat_count_ptr", "stat_mean_ptr", "stat_m2_ptr"],
)
@triton.jit(do_not_specialize=["N"])
def _conv_forward_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    mean_ptr,
    scale_ptr,
    shift_ptr,
    bias_ptr,
    residual_ptr,
    stat_count_ptr,
    stat_mean_ptr,
    stat_m2_ptr,
    N,
    ROWS_BUCKET,
    H,
    W,
    C_IN,
    OH,
    OW,
    C_OUT,
    GROUPS,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE,
    PADDING,
    DILATION,
    W_STRIDE_CO,
    W_STRIDE_CI,
    W_STRIDE_KH,
    W_STRIDE_KW,
    POINTWISE: tl.constexpr,
    PROLOGUE: tl.constexpr,
    PROLOGUE_ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    EPILOGUE_ACTIVATION: tl.constexpr,
    RESIDUAL_AFTER_ACTIVATION: tl.constexpr,
    STATS: tl.constexpr,
    FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Rows: output pixels (n, oh, ow); columns: output channels of one group; reduction:
    k = (kh, kw, ci). PROLOGUE applies BatchNorm and then PROLOGUE_ACTIVATION (a
    fastres.activation.activation_code) to x as it is loaded; EPILOGUE_ACTIVATION is applied
    after the bias and the residual, or between them with RESIDUAL_AFTER_ACTIVATION (YOLO's
    ``x + act(conv(x))``). The weight is read through its strides (contiguous along ci
    when it is channels_last). ROWS_BUCKET (the row count rounded up to a power of two) is only
    the autotuning key's, so that another batch size reuses the tuned tiles."""
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    M = N * OH * OW
    pid_m, pid_n = _tile_of(tl.cdiv(M, BLOCK_M), tl.cdiv(cout_g, BLOCK_N), GROUP_M)
    group = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n, pixel = rows // (OH * OW), rows % (OH * OW)
    ih0, iw0 = (pixel // OW) * STRIDE - PADDING, (pixel % OW) * STRIDE - PADDING
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # within the group
    cols = group * cout_g + col
    col_ok = col < cout_g
    w_cols = w_ptr + cols * W_STRIDE_CO
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few channels per group (the stem's 3, ResNeXt's 4): one reduction index over
        # (kh, kw, ci) fills the tile, where a channel block per (kh, kw) would be mostly masked.
        for k0 in range(0, KH * KW * cin_g, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # = (kh * KW + kw) * cin_g + ci
            k_ok = k < KH * KW * cin_g
            ci, kpos = k % cin_g, k // cin_g
            kh, kw = kpos // KW, kpos % KW
            ih = ih0[:, None] + (kh * DILATION)[None, :]
            iw = iw0[:, None] + (kw * DILATION)[None, :]
            a_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            channel = group * cin_g + ci
            a = tl.load(
                x_ptr + ((n[:, None] * H + ih) * W + iw) * C_IN + channel[None, :],
                mask=a_ok,
                other=0.0,
            )
            if PROLOGUE:
                a = _apply_prologue(
                    a, a_ok, channel, k_ok, mean_ptr, scale_ptr, shift_ptr, PROLOGUE_ACTIVATION
                )
            w_k = ci * W_STRIDE_CI + kh * W_STRIDE_KH + kw * W_STRIDE_KW
            b = tl.load(
                w_cols[None, :] + w_k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One loop over (tap, channel block), as Inductor's convolution template does: a loop
        # per tap would have cin_g / BLOCK_K iterations (2 at C_in 64), too few for the
        # software pipeline to reach its steady state.
        chunks = tl.cdiv(cin_g, BLOCK_K)
        for step in range(0, KH * KW * chunks):
            ci = (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            ci_ok = ci < cin_g
            if POINTWISE:
                # 1x1, stride 1, no padding: a plain GEMM, input row = output row.
                pixel_ok, a_row = row_ok, rows * C_IN
                w_tap = 0
            else:
                tap = step // chunks
                kh, kw = tap // KW, tap % KW
                ih, iw = ih0 + kh * DILATION, iw0 + kw * DILATION
                pixel_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_row = ((n * H + ih) * W + iw) * C_IN
                w_tap = kh * W_STRIDE_KH + kw * W_STRIDE_KW
            a_ok = pixel_ok[:, None] & ci_ok[None, :]
            channel = group * cin_g + ci
            a = tl.load(x_ptr + a_row[:, None] + channel[None, :], mask=a_ok, other=0.0)
            if PROLOGUE:
                a = _apply_prologue(
                    a, a_ok, channel, ci_ok, mean_ptr, scale_ptr, shift_ptr, PROLOGUE_ACTIVATION
                )
            b = tl.load(
                w_cols[None, :] + (w_tap + ci * W_STRIDE_CI)[:, None],
                mask=ci_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(
            residual_ptr + rows[:, None] * C_OUT + cols[None, :], mask=out_ok, other=0.0
        ).to(tl.float32)
        if RESIDUAL_AFTER_ACTIVATION:
            acc = apply_activation(acc, EPILOGUE_ACTIVATION) + residual
        else:
            acc = apply_activation(acc + residual, EPILOGUE_ACTIVATION)
    else:
        acc = apply_activation(acc, EPILOGUE_ACTIVATION)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], out, mask=out_ok)
    if STATS:
        # This tile's count, mean and M2 per channel, of the values as stored (what the next
        # BatchNorm reads), the M2 around the tile's own mean.
        stored = tl.where(out_ok, out.to(tl.float32), 0.0)
        count = tl.sum(row_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(stored, axis=0) / count
        deviation = tl.where(out_ok, stored - tile_mean[None, :], 0.0)
        slot = pid_m * C_OUT + cols
        tl.store(stat_count_ptr + slot, tl.zeros((BLOCK_N,), dtype=tl.float32) + count, mask=col_ok)
        tl.store(stat_mean_ptr + slot, tile_mean, mask=col_ok)
        tl.store(stat_m2_ptr + slot, tl.sum(deviation * deviation, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Input gradient


@triton.jit
def _phase_tap(t, first_h, first_w, taps_w, TAP_STEP):
    """(kh, kw) of the t-th tap (a scalar, or a vector of them) that reaches a phase of the
    input gradient, in row-major order: its taps along each axis are ``first + j * TAP_STEP``
    (see _phase_tap_ranges), ``taps_w`` of them along W."""
    return first_h + (t // taps_w) * TAP_STEP, first_w + (t % taps_w) * TAP_STEP


@triton.autotune(
    configs=_configs(TILES),
    key=_TUNING_KEY,
    reset_to_zero=["sum_grad_ptr", "sum_grad_centred_ptr"],
)
@triton.jit(do_not_specialize=["N"])
def _conv_input_grad_kernel(
    grad_ptr,
    w_ptr,
    grad_x_ptr,
    x_ptr,
    mean_ptr,
    scale_ptr,
    shift_ptr,
    sum_grad_ptr,
    sum_grad_centred_ptr,
    tap_ranges_ptr,
    N,
    ROWS_BUCKET,
    H,
    W,
    C_IN,
    OH,
    OW,
    C_OUT,
    GROUPS,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE,
    PADDING,
    DILATION,
    TAP_STEP,
    PHASE_H,
    PHASE_W,
    W_STRIDE_CO,
    W_STRIDE_CI,
    W_STRIDE_KH,
    W_STRIDE_KW,
    POINTWISE: tl.constexpr,
    PHASED: tl.constexpr,
    PROLOGUE: tl.constexpr,
    PROLOGUE_ACTIVATION: tl.constexpr,
    FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Rows: the input pixels (n, ih, iw) of one phase (ih mod STRIDE, iw mod STRIDE), PHASE_H x
    PHASE_W of them an image; columns: input channels of one group; reduction: the (tap, co)
    that reach the phase (one flat index when a group has few output channels, as in forward).
    A stride-s convolution reaches each input pixel from only the taps of its phase: looping
    over those alone does none of the masked-off products (3/4 of them at stride 2) that
    looping over every tap would. Stride 1: one phase, every tap. PHASED (STRIDE > 1): along
    each axis the phase's taps are ``first + j * TAP_STEP`` for j below a count, read from the
    (STRIDE, 4) int32 table of tap ranges (first_h, count_h, first_w, count_w per phase along
    an axis) once, before the loop (see _phase_tap).
    The weight is read through its strides, as in forward.
    With a prologue, the epilogue multiplies the gradient by PROLOGUE_ACTIVATION's derivative
    (recomputed from x) into gm, the gradient at bn(x), and also writes this tile's per-channel
    sums of gm and of gm * (x - mean): BatchNorm's backward reductions, fused here."""
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    rows_per_phase = N * PHASE_H * PHASE_W
    tiles_m = tl.cdiv(rows_per_phase, BLOCK_M)
    pid_m, pid_n = _tile_of(tiles_m, tl.cdiv(cin_g, BLOCK_N), GROUP_M)
    group, phase = tl.program_id(1) // (STRIDE * STRIDE), tl.program_id(1) % (STRIDE * STRIDE)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n, rest = rows // (PHASE_H * PHASE_W), rows % (PHASE_H * PHASE_W)
    if PHASED:
        ih = phase // STRIDE + (rest // PHASE_W) * STRIDE
        iw = phase % STRIDE + (rest % PHASE_W) * STRIDE
        row_ok = (rows < rows_per_phase) & (ih < H) & (iw < W)
    else:
        ih, iw = rest // W, rest % W
        row_ok = rows < rows_per_phase
    col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # within the group
    cols = group * cin_g + col
    col_ok = col < cin_g
    w_cols = w_ptr + col * W_STRIDE_CI
    if PHASED:
        # Scalars loaded before the K loop: the loop computes its taps from them. (Loading each
        # tap from a table inside the loop cut sm_90's software pipeline from 3 buffers to 2,
        # with no load in flight across iterations: tests/test_triton_compile.py checks it.)
        ranges_h = tap_ranges_ptr + (phase // STRIDE) * 4
        ranges_w = tap_ranges_ptr + (phase % STRIDE) * 4
        first_h, taps_h = tl.load(ranges_h), tl.load(ranges_h + 1)
        first_w, taps_w = tl.load(ranges_w + 2), tl.load(ranges_w + 3)
        taps = taps_h * taps_w
    else:
        first_h, first_w, taps_w = 0, 0, 1  # not read
        taps = KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # (ih + PADDING - kh * DILATION) is a multiple of STRIDE for the phase's taps: the divisions
    # below are exact (and the same truncating or flooring).
    if FLAT_K:
        for k0 in range(0, taps * cout_g, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # = t * cout_g + co, t the phase's t-th tap
            k_ok = k < taps * cout_g
            co = k % cout_g
            if PHASED:
                kh, kw = _phase_tap(k // cout_g, first_h, first_w, taps_w, TAP_STEP)
            else:
                kh, kw = (k // cout_g) // KW, (k // cout_g) % KW
            oh = (ih[:, None] + PADDING - (kh * DILATION)[None, :]) // STRIDE
            ow = (iw[:, None] + PADDING - (kw * DILATION)[None, :]) // STRIDE
            reach = row_ok[:, None] & k_ok[None, :] & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            a = tl.load(
                grad_ptr
                + ((n[:, None] * OH + oh) * OW + ow) * C_OUT
                + (group * cout_g + co)[None, :],
                mask=reach,
                other=0.0,
            )
            w_k = (group * cout_g + co) * W_STRIDE_CO + kh * W_STRIDE_KH + kw * W_STRIDE_KW
            b = tl.load(
                w_cols[None, :] + w_k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        # One loop over (tap, channel block), as in forward.
        chunks = tl.cdiv(cout_g, BLOCK_K)
        for step in range(0, taps * chunks):
            co = group * cout_g + (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            co_ok = co < (group + 1) * cout_g
            if POINTWISE:
                reach, a_row = row_ok, rows * C_OUT  # one phase: the input pixel is the row
                w_tap = 0
            else:
                if PHASED:
                    kh, kw = _phase_tap(step // chunks, first_h, first_w, taps_w, TAP_STEP)
                else:
                    kh, kw = (step // chunks) // KW, (step // chunks) % KW
                oh = (ih + PADDING - kh * DILATION) // STRIDE
                ow = (iw + PADDING - kw * DILATION) // STRIDE
                reach = row_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
                a_row = ((n * OH + oh) * OW + ow) * C_OUT
                w_tap = kh * W_STRIDE_KH + kw * W_STRIDE_KW
            a = tl.load(
                grad_ptr + a_row[:, None] + co[None, :],
                mask=reach[:, None] & co_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_cols[None, :] + (w_tap + co * W_STRIDE_CO)[:, None],
                mask=co_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if PHASED:
        pixel = (n * H + ih) * W + iw  # the row of grad_x and x
    else:
        pixel = rows
    offsets = pixel[:, None] * C_IN + cols[None, :]
    if PROLOGUE:
        # The forward's input was activation(bn(x)): recompute bn(x) here and apply the
        # activation's backward at it, rounded to x's dtype first: PyTorch's unfused computation
        # holds bn(x) in that dtype and differentiates the activation there (a float16 value
        # that rounds to 0 is masked by ReLU there too).
        x = tl.load(x_ptr + offsets, mask=out_ok, other=0.0).to(tl.float32)
        z = _batch_norm(
            x,
            tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :],
            tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :],
            tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :],
        )
        z = z.to(x_ptr.dtype.element_ty).to(tl.float32)
        acc = activation_grad(acc, z, PROLOGUE_ACTIVATION)
    stored = acc.to(grad_x_ptr.dtype.element_ty)
    tl.store(grad_x_ptr + offsets, stored, mask=out_ok)
    if PROLOGUE:
        # Of the values as stored, which BatchNorm's elementwise backward pass reads.
        gm = tl.where(out_ok, stored.to(tl.float32), 0.0)
        centred = x - tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :]
        slot = (phase * tiles_m + pid_m) * C_IN + cols
        tl.store(sum_grad_ptr + slot, tl.sum(gm, axis=0), mask=col_ok)
        tl.store(sum_grad_centred_ptr + slot, tl.sum(gm * centred, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Weight gradient


def _weight_grad_candidates(
    configs: list[triton.Config], named_args: dict, **kwargs
) -> list[triton.Config]:
    """The weight gradient's configurations to time for a launch (Triton's early_config_prune;
    the autotuning key has the dtype and INPUT_PRECISION, so each case keeps its own choice):
    float32 with exact products (TF32 off) times _EXACT_FLOAT32_WEIGHT_GRAD instead of
    ``configs``, which spill registers there. ``configs`` otherwise, and when interpreting."""
    exact = named_args["x_ptr"].dtype == torch.float32 and kwargs["INPUT_PRECISION"] == "ieee"
    if not exact or INTERPRETING:
        return configs
    return [_config(WEIGHT_GRAD_TILES, shape) for shape in _EXACT_FLOAT32_WEIGHT_GRAD]


@triton.autotune(
    configs=_configs(WEIGHT_GRAD_TILES),
    key=_TUNING_KEY + ["SPLIT"],
    reset_to_zero=["grad_w_ptr"],
    prune_configs_by={"early_config_prune": _weight_grad_candidates},
)
@triton.jit(do_not_specialize=["N"])
def _conv_weight_grad_kernel(
    x_ptr,
    grad_ptr,
    grad_w_ptr,
    mean_ptr,
    scale_ptr,
    shift_ptr,
    N,
    ROWS_BUCKET,
    H,
    W,
    C_IN,
    OH,
    OW,
    C_OUT,
    GROUPS,
    KH: tl.constexpr,
    KW: tl.constexpr,
    STRIDE,
    PADDING,
    DILATION,
    SPLIT,
    PROLOGUE: tl.constexpr,
    PROLOGUE_ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows: output channels of one group; columns: k = (kh, kw, ci) of the group; reduction:
    output pixels, split SPLIT ways and added atomically into the float32 grad_w (C_OUT, KH, KW,
    C_IN / GROUPS), a channels_last weight's layout. Output channels are the rows so that a
    tile's columns run along k, contiguous in grad_w: the atomic adds go out in the
    accumulator's own layout, coalesced and vectorised. With a prologue, A is
    PROLOGUE_ACTIVATION(bn(x)), recomputed from the pre-BatchNorm x as in forward."""
    pid_k, pid_n, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    group, split = pid_gs // SPLIT, pid_gs % SPLIT
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < KH * KW * cin_g
    ci, kpos = k % cin_g, k // cin_g
    kh, kw = kpos // KW, kpos % KW
    channel = group * cin_g + ci
    if PROLOGUE:
        mean = tl.load(mean_ptr + channel, mask=k_ok, other=0.0)[None, :]
        scale = tl.load(scale_ptr + channel, mask=k_ok, other=0.0)[None, :]
        shift = tl.load(shift_ptr + channel, mask=k_ok, other=0.0)[None, :]
    cols = group * cout_g + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) < cout_g
    M = N * OH * OW
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(split * rows_per_split, tl.minimum((split + 1) * rows_per_split, M), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        n, pixel = rows // (OH * OW), rows % (OH * OW)
        ih = (pixel // OW)[:, None] * STRIDE - PADDING + (kh * DILATION)[None, :]
        iw = (pixel % OW)[:, None] * STRIDE - PADDING + (kw * DILATION)[None, :]
        a_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(
            x_ptr + ((n[:, None] * H + ih) * W + iw) * C_IN + channel[None, :], mask=a_ok, other=0.0
        )
        if PROLOGUE:
            z = apply_activation(
                _batch_norm(a.to(tl.float32), mean, scale, shift), PROLOGUE_ACTIVATION
            )
            a = tl.where(a_ok, z, 0.0).to(x_ptr.dtype.element_ty)
        g_t = tl.load(
            grad_ptr + rows[None, :] * C_OUT + cols[:, None],
            mask=col_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(g_t, a, acc, input_precision=INPUT_PRECISION)
    # Relaxed: the sums need atomicity, not ordering (nothing reads grad_w in this launch).
    tl.atomic_add(
        grad_w_ptr + (cols * (KH * KW * cin_g))[:, None] + k[None, :],
        acc,
        mask=col_ok[:, None] & k_ok[None, :],
        sem="relaxed",
    )


# ---------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class ConvGeometry:
    """Sizes of one convolution (square kernels, strides, paddings and dilations, as in
    ResNets). Activations are channels_last; weights (C_out, C_in / groups, KH, KW)."""

    N: int
    H: int
    W: int
    C_IN: int
    OH: int
    OW: int
    C_OUT: int
    GROUPS: int
    KH: int
    KW: int
    STRIDE: int
    PADDING: int
    DILATION: int

    @classmethod
    def of(
        cls, x_shape, weight_shape, stride: int, padding: int, dilation: int, groups: int
    ) -> ConvGeometry:
        n, c_in, h, w = x_shape
        c_out, _, kh, kw = weight_shape
        oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
        ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
        check_int32_offsets("conv2d", "the input", (n, c_in, h, w))
        check_int32_offsets("conv2d", "the output", (n, c_out, oh, ow))
        return cls(n, h, w, c_in, oh, ow, c_out, groups, kh, kw, stride, padding, dilation)

    def args(self, rows: int) -> dict:
        """The kernels' size arguments, and the autotuning key's bucket of ``rows``."""
        return dict(self.__dict__, ROWS_BUCKET=triton.next_power_of_2(rows))

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: a plain GEMM over pixels, input pixel = output pixel."""
        return self.KH == self.KW == 1 and self.STRIDE == 1 and self.PADDING == 0


# Row tiles taken together across the column tiles (see _tile_of).
GROUP_M = 8


@dataclass
class TuningCost:
    """What autotuning one kernel has cost this process: the problem shapes (autotuning keys)
    it benchmarked configurations for and the seconds that took, and the shapes whose tuning
    Triton's on-disk autotuning cache (``TRITON_CACHE_AUTOTUNING=1``) supplied instead, which
    cost no benchmarking here (its time was paid by the process that wrote it)."""

    shapes: int = 0
    seconds: float = 0.0
    from_disk_cache: int = 0


_TUNING: dict[str, TuningCost] = {}


def tuning_report() -> dict[str, TuningCost]:
    """Autotuning's cost so far, per convolution kernel that has been tuned. The first call at
    each shape (see _TUNING_KEY) pays it; later calls at that shape pay nothing."""
    return {name: dataclasses.replace(c) for name, c in _TUNING.items()}


def _deterministic_config(kernel) -> triton.Config:
    """The configuration ``kernel`` runs in deterministic mode (see DETERMINISTIC_SHAPES)."""
    names = WEIGHT_GRAD_TILES if kernel is _conv_weight_grad_kernel else TILES
    return _config(names, DETERMINISTIC_SHAPES[kernel.base_fn.__name__])


def _candidates(kernel) -> list[triton.Config]:
    """The configurations a launch of ``kernel`` may run now."""
    if torch.are_deterministic_algorithms_enabled():
        return [_deterministic_config(kernel)]
    return kernel.configs


def _launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, adding to tuning_report() when the launch tuned.

    Under ``torch.use_deterministic_algorithms(True)`` the kernel runs its deterministic
    configuration instead, past the autotuner: neither a tile chosen by timing earlier in the
    process nor a benchmark (Triton's Autotuner times the configurations left after pruning
    even when one is left, in triton 3.6.0 as in 3.7.1)."""
    if torch.are_deterministic_algorithms_enabled():
        kernel.fn[grid](*args, **kwargs, **_deterministic_config(kernel).all_kwargs())
        return
    tuned_before = len(kernel.cache)
    # Triton sets bench_time when it benchmarks, and only then: not when its disk cache
    # supplies the tuning (triton 3.6.0 and 3.7.1), where the attribute is missing in a fresh
    # process and an earlier shape's time in one that benchmarked before.
    kernel.bench_time = None
    kernel[grid](*args, **kwargs)
    tuned = len(kernel.cache) - tuned_before
    if tuned:
        cost = _TUNING.setdefault(kernel.base_fn.__name__, TuningCost())
        if kernel.bench_time is None:
            cost.from_disk_cache += tuned
        else:
            cost.shapes += tuned
            cost.seconds += kernel.bench_time


def _weight_args(weight: Tensor) -> tuple[Tensor, dict]:
    """The weight as the kernels read it, channels_last (contiguous along (kh, kw, ci) for each
    output channel, so a tile of the reduction is a contiguous load; a copy only when the
    weight is not channels_last already, as a model in channels_last has it), and its strides."""
    w = weight.contiguous(memory_format=torch.channels_last)
    co, ci, kh, kw = w.stride()
    # torch gives a size-1 dimension any stride (a 1x1 weight has (C_in, 1, 1, 1)); the kernels
    # never step along it, but Triton specialises an argument equal to 1, and a weight stride
    # of 1 along kh or kw kept sm_90 from pipelining the weight loads of a 1x1 stride-2
    # convolution (tests/test_triton_compile.py checks it). Use channels_last's own strides.
    if w.shape[3] == 1:
        kw = w.shape[1] * ci
    if w.shape[2] == 1:
        kh = w.shape[3] * kw
    return w, dict(W_STRIDE_CO=co, W_STRIDE_CI=ci, W_STRIDE_KH=kh, W_STRIDE_KW=kw)


def _swizzled_grid(rows: int, columns: int, groups: int, launched: dict):
    """The grid of a (row tile x column tile, group) launch (see _tile_of; the input gradient's
    ``groups`` are (group, phase) pairs). Records in
    ``launched`` the tile height of the configuration launched: autotuning asks for the grid of
    every configuration it tries, and then of the one it chose, which is launched last."""

    def grid(meta: dict) -> tuple[int, int]:
        launched["BLOCK_M"] = meta["BLOCK_M"]
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(columns, meta["BLOCK_N"]), groups)

    return grid


def _tile_rows(
    count: int, rows: int, channels: int, kernel, device: torch.device, phases: int = 1
) -> Tensor:
    """``count`` float32 buffers, each with a row of ``channels`` values for every tile of
    ``rows`` (in each of ``phases``) at the smallest tile height ``kernel`` may choose. Left
    uninitialised: a launch writes every row its tiling has, and only those are read (see
    _rows_written)."""
    smallest = min(c.kwargs["BLOCK_M"] for c in _candidates(kernel))
    tiles = max(1, phases * triton.cdiv(rows, smallest))
    return torch.empty((count, tiles, channels), dtype=torch.float32, device=device)


def _rows_written(buffer: Tensor, rows: int, launched: dict, phases: int = 1) -> Tensor:
    """The rows of a _tile_rows buffer the launched configuration wrote (along dim -2)."""
    return buffer[..., : phases * triton.cdiv(rows, launched["BLOCK_M"]), :]


def _tap_step(stride: int, dilation: int) -> int:
    """How far apart the taps that reach one phase of the input gradient are along an axis:
    ``k * dilation = phase + padding (mod stride)`` has its solutions k every
    ``stride / gcd(stride, dilation)``."""
    return stride // math.gcd(stride, dilation)


def _axis_tap_range(
    phase: int, size: int, stride: int, padding: int, dilation: int
) -> tuple[int, int]:
    """(first, count) of the taps k < size along one axis that reach input positions ``phase``
    mod stride (``phase + padding - k * dilation`` a multiple of the stride); (0, 0) if none."""
    reaching = [k for k in range(size) if (phase + padding - k * dilation) % stride == 0]
    return (reaching[0], len(reaching)) if reaching else (0, 0)


@functools.cache
def _phase_tap_ranges(
    stride: int, padding: int, dilation: int, kh: int, kw: int, device: torch.device
) -> Tensor:
    """The input gradient's tap ranges: for each phase p along an axis, (first_h, count_h,
    first_w, count_w) of the taps that reach positions p mod stride along H and W, every
    _tap_step apart. int32, (stride, 4), on ``device``; kept, as it depends on these only."""
    rows = [
        [*_axis_tap_range(p, kh, stride, padding, dilation)]
        + [*_axis_tap_range(p, kw, stride, padding, dilation)]
        for p in range(stride)
    ]
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for float32 where torch lets cuDNN use it (the reference runs that way), else exact."""
    if dtype == torch.float32 and not INTERPRETING and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass
class Prologue:
    """The BatchNorm and activation applied to a convolution's input as it is loaded:
    per-channel mean and the scale and shift of ``(x - mean) * scale + shift`` ((C_in,)
    float32, any 1-D stride: made dense here, as the kernels read them), then ``activation``
    (one of fastres.activation.ACTIVATIONS)."""

    mean: Tensor
    scale: Tensor
    shift: Tensor
    activation: str

    def __post_init__(self) -> None:
        self.mean = dense_channels(self.mean)
        self.scale = dense_channels(self.scale)
        self.shift = dense_channels(self.shift)


def _scratch(device: torch.device) -> Tensor:
    """A stand-in for an output the kernel does not write. Never a caller's tensor: autotuning
    zeroes the statistics outputs (reset_to_zero) whether or not the kernel uses them."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _prologue_args(prologue: Prologue | None, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if prologue is None:
        return like, like, like  # not read
    return prologue.mean, prologue.scale, prologue.shift


def _prologue_flags(prologue: Prologue | None) -> dict:
    """The kernels' PROLOGUE and PROLOGUE_ACTIVATION (0 without a prologue: one compiled
    variant, whatever it would have been)."""
    if prologue is None:
        return dict(PROLOGUE=False, PROLOGUE_ACTIVATION=0)
    return dict(PROLOGUE=True, PROLOGUE_ACTIVATION=activation_code(prologue.activation))


def conv_forward(
    x: Tensor,
    weight: Tensor,
    geometry: ConvGeometry,
    prologue: Prologue | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str = "identity",
    stats: bool = False,
    residual_after_activation: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``epilogue(conv2d(prologue(x), weight))``, the epilogue ``activation(... + bias +
    residual)``, or ``activation(... + bias) + residual`` with ``residual_after_activation``;
    x, residual and the result channels_last.

    Returns ``(out, partials)``: partials is the (3, tiles, C_out) float32 per-tile count, mean
    and M2 of ``out`` when ``stats`` (see :func:`finalize_stats`), else None.
    """
    g = geometry
    out = torch.empty(
        (g.N, g.C_OUT, g.OH, g.OW),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )
    w, w_strides = _weight_args(weight)
    mean, scale, shift = _prologue_args(prologue, x)
    bias = dense_channels(bias)
    M = g.N * g.OH * g.OW
    partials = None
    if stats:
        # One row of statistics per tile of output rows (the tile height is autotuned).
        partials = _tile_rows(3, M, g.C_OUT, _conv_forward_kernel, x.device)
    if M == 0:
        return out, partials.zero_() if partials is not None else None
    launched: dict = {}
    _launch(
        _conv_forward_kernel,
        _swizzled_grid(M, g.C_OUT // g.GROUPS, g.GROUPS, launched),
        x,
        w,
        out,
        mean,
        scale,
        shift,
        bias if bias is not None else x,
        residual if residual is not None else x,
        *(partials.unbind(0) if partials is not None else [_scratch(x.device)] * 3),
        **g.args(M),
        **w_strides,
        POINTWISE=g.pointwise,
        **_prologue_flags(prologue),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        EPILOGUE_ACTIVATION=activation_code(activation),
        RESIDUAL_AFTER_ACTIVATION=residual_after_activation and residual is not None,
        STATS=stats,
        FLAT_K=g.C_IN // g.GROUPS < FLAT_K_BELOW,
        INPUT_PRECISION=_input_precision(x.dtype),
        GROUP_M=GROUP_M,
    )
    if partials is not None:
        partials = _rows_written(partials, M, launched)
    return out, partials


def finalize_stats(
    partials: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str = "relu",
) -> tuple[Tensor, Tensor, Prologue]:
    """Merges per-tile statistics into the batch mean and biased variance per channel, and the
    prologue that applies this BatchNorm (with ``weight``, ``bias``, ``eps``) and then
    ``activation``. partials: (3, rows, C) float32 (see :func:`conv_forward`); weight and bias
    (C,), any 1-D stride."""
    partials = dense_rows(partials)
    weight, bias = dense_channels(weight), dense_channels(bias)
    channels = partials.shape[2]
    mean, var, scale, shift = (
        torch.empty(channels, dtype=torch.float32, device=partials.device) for _ in range(4)
    )
    _stats_finalize_kernel[(triton.cdiv(channels, REDUCE_BLOCK_CHANNELS),)](
        partials[0],
        partials[1],
        partials[2],
        partials.shape[1],
        channels,
        weight,
        bias,
        eps,
        mean,
        var,
        scale,
        shift,
        TRAINING=True,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_S=REDUCE_BLOCK_SPLITS,
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return mean, var, Prologue(mean, scale, shift, activation)


def prologue_from_stats(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
) -> Prologue:
    """The prologue of a BatchNorm with known statistics (eval: the running ones) followed by
    ``activation``; every vector (C,), any 1-D stride."""
    var, weight, bias = dense_channels(var), dense_channels(weight), dense_channels(bias)
    channels = mean.shape[0]
    scale, shift = (
        torch.empty(channels, dtype=torch.float32, device=mean.device) for _ in range(2)
    )
    unused = torch.empty((1, channels), dtype=torch.float32, device=mean.device)
    _stats_finalize_kernel[(triton.cdiv(channels, REDUCE_BLOCK_CHANNELS),)](
        unused,
        unused,
        unused,
        1,
        channels,
        weight,
        bias,
        eps,
        mean,
        var,
        scale,
        shift,
        TRAINING=False,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_S=REDUCE_BLOCK_SPLITS,
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return Prologue(mean, scale, shift, activation)


def conv_input_grad(
    grad_out: Tensor,
    weight: Tensor,
    geometry: ConvGeometry,
    x: Tensor | None = None,
    prologue: Prologue | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradient with respect to the convolution's input, channels_last, and None. With a
    prologue (and the pre-BatchNorm x it was applied to): the gradient gm with respect to
    bn(x) (the input's gradient times the prologue activation's derivative at bn(x),
    recomputed), and the (2, tiles, C_in) float32 per-tile sums of gm and gm * (x - mean) for
    BatchNorm's backward (tiles a larger tiling leaves out are zero)."""
    g = geometry
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty(
        (g.N, g.C_IN, g.H, g.W),
        dtype=grad_out.dtype,
        device=grad_out.device,
        memory_format=torch.channels_last,
    )
    w, w_strides = _weight_args(weight)
    mean, scale, shift = _prologue_args(prologue, grad_out)
    # Rows by phase (ih mod stride, iw mod stride): phase_h x phase_w pixels an image in each.
    phases = g.STRIDE * g.STRIDE
    phase_h, phase_w = triton.cdiv(g.H, g.STRIDE), triton.cdiv(g.W, g.STRIDE)
    rows = g.N * phase_h * phase_w
    sums = None
    if prologue is not None:
        sums = _tile_rows(2, rows, g.C_IN, _conv_input_grad_kernel, grad_out.device, phases)
    if rows == 0:
        return grad_x, sums.zero_() if sums is not None else None
    tap_ranges = _phase_tap_ranges(g.STRIDE, g.PADDING, g.DILATION, g.KH, g.KW, grad_out.device)
    launched: dict = {}
    _launch(
        _conv_input_grad_kernel,
        _swizzled_grid(rows, g.C_IN // g.GROUPS, g.GROUPS * phases, launched),
        grad_out,
        w,
        grad_x,
        x if x is not None else grad_out,
        mean,
        scale,
        shift,
        *(sums.unbind(0) if sums is not None else [_scratch(grad_out.device)] * 2),
        tap_ranges,
        **g.args(g.N * g.H * g.W),
        TAP_STEP=_tap_step(g.STRIDE, g.DILATION),
        PHASE_H=phase_h,
        PHASE_W=phase_w,
        **w_strides,
        POINTWISE=g.pointwise,
        PHASED=g.STRIDE > 1,
        **_prologue_flags(prologue),
        FLAT_K=g.C_OUT // g.GROUPS < FLAT_K_BELOW,
        INPUT_PRECISION=_input_precision(grad_out.dtype),
        GROUP_M=GROUP_M,
    )
    if sums is not None:
        sums = _rows_written(sums, rows, launched, phases)
    return grad_x, sums


def _weight_grad_split(geometry: ConvGeometry, device: torch.device) -> int:
    """How many ways to split the sum over output pixels: enough programs to fill the GPU.

    One under ``torch.use_deterministic_algorithms(True)``: each weight-gradient element then
    gets a single atomic add onto zero, so the result does not depend on the order the programs
    run in (the split sums are added in whatever order they finish)."""
    if torch.are_deterministic_algorithms_enabled():
        return 1
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    g = geometry
    tiles = max(
        1,
        triton.cdiv(g.KH * g.KW * g.C_IN // g.GROUPS, 64)
        * triton.cdiv(g.C_OUT // g.GROUPS, 64)
        * g.GROUPS,
    )
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(g.N * g.OH * g.OW, 256)))


def conv_weight_grad(
    x: Tensor,
    grad_out: Tensor,
    geometry: ConvGeometry,
    weight: Tensor,
    prologue: Prologue | None = None,
) -> Tensor:
    """Gradient with respect to ``weight`` (C_out, C_in / groups, KH, KW), in its dtype and
    layout; with a prologue, x is the pre-BatchNorm input and activation(bn(x)) is recomputed
    on the fly."""
    g = geometry
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    cin_g, cout_g = g.C_IN // g.GROUPS, g.C_OUT // g.GROUPS
    # Accumulated in float32 as (C_out, KH, KW, C_in / groups): a channels_last weight's layout.
    grad_w = torch.zeros((g.C_OUT, g.KH, g.KW, cin_g), dtype=torch.float32, device=x.device)
    mean, scale, shift = _prologue_args(prologue, x)
    split = _weight_grad_split(g, x.device)
    M = g.N * g.OH * g.OW
    if M > 0:
        _launch(
            _conv_weight_grad_kernel,
            lambda meta: (
                triton.cdiv(g.KH * g.KW * cin_g, meta["BLOCK_K"]),
                triton.cdiv(cout_g, meta["BLOCK_N"]),
                g.GROUPS * split,
            ),
            x,
            grad_out,
            grad_w,
            mean,
            scale,
            shift,
            **g.args(M),
            SPLIT=split,
            **_prologue_flags(prologue),
            INPUT_PRECISION=_input_precision(x.dtype),
        )
    return _as_layout_of(weight, grad_w.permute(0, 3, 1, 2))


def _as_layout_of(weight: Tensor, grad: Tensor) -> Tensor:
    """``grad`` (weight's shape, float32, dense) in ``weight``'s dtype and strides (what the
    op's fake kernel promises): a view when the memory layouts are the same (a float32 weight
    in channels_last, or a 1x1 one, NCHW included), one conversion otherwise."""
    if grad.dtype == weight.dtype and _same_memory_layout(grad, weight):
        return grad.as_strided(weight.shape, weight.stride())
    return torch.empty_like(weight).copy_(grad)


def _same_memory_layout(a: Tensor, b: Tensor) -> bool:
    """Whether a and b (same shape) put each element at the same offset: their strides agree
    on every dimension of more than one element (the stride of a size-1 dimension is never
    used: torch gives a 1x1 weight (C_in, 1, 1, 1) in NCHW, (C_in, 1, C_in, C_in) here)."""
    return all(
        size <= 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
    )
