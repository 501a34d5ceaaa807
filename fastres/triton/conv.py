"""Triton implicit-GEMM 2-D convolution (NHWC) with BatchNorm fused around it.

Every convolution of ResNet-50 and ResNeXt-50 (7x7 stride 2 stem, 1x1 stride 1 and 2, 3x3 stride
1 and 2 with padding, grouped 3x3), as three GEMMs over channels_last tensors, none of which
materialises an im2col matrix:

* forward ``out[m, co] = sum_k A[m, k] W[k, co]``: m runs over output pixels (n, oh, ow), k over
  (kh, kw, ci); A is gathered from x on the fly. A *prologue* may apply the previous BatchNorm
  (per-channel ``scale * (x - mean) + shift``) and ReLU to x as it is loaded: the normalised
  activation never exists in memory, and padding stays zero as in the unfused computation. An
  *epilogue* may add a bias and a residual, apply ReLU, and write each tile's per-channel count,
  mean and M2 of the output for the next BatchNorm's statistics. The tiles' statistics are merged
  by bn_act's finalize kernel (Chan et al.'s pairwise formula): each tile's M2 is computed around
  its own mean, so nothing cancels however large the mean is against the spread (the naive
  ``E[y^2] - E[y]^2`` from sums of squares would lose all digits then).
* input gradient ``dx[m', ci] = sum dy[m, co] W[co, ci, kh, kw]`` over the (kh, kw, co) that reach
  input pixel m' (a stride-s convolution reaches it only where ``ih + pad - kh * dil`` is a
  multiple of s). With a prologue, the epilogue recomputes ``z = relu(scale * (x - mean) +
  shift)`` at m' and keeps the gradient only where z > 0 (ReLU's backward without a saved
  mask), and sums that gradient and its product with ``x - mean`` per channel: BatchNorm's
  backward reductions, so that only BatchNorm's elementwise pass is left.
* weight gradient ``dW[k, co] = sum_m A[m, k] dy[m, co]``, A gathered as in forward, prologue
  included (recomputed, not loaded), the sum over m split across programs and added atomically.

Accumulation is float32; inputs float32 (TF32 on GPUs where torch allows it for cuDNN), float16
or bfloat16. Tile sizes are autotuned per problem shape on GPUs; the interpreter (CPU tests) runs
one small configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres.triton.bn_act import REDUCE_BLOCK_CHANNELS, _stats_finalize_kernel, check_int32_offsets

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Which tile configurations to autotune over on a GPU: "full" (the default, for speed) or "quick"
# (two of them, a large and a small tile, for runs that only check correctness: the GPU check's
# tests and sanitizer phases, where compiling all eight per kernel would not fit).
AUTOTUNE = os.environ.get("FASTRES_TRITON_AUTOTUNE", "full")
if AUTOTUNE not in ("full", "quick"):
    raise ValueError(f"FASTRES_TRITON_AUTOTUNE must be 'full' or 'quick', got {AUTOTUNE!r}")
# Reduce over one flat (kh, kw, channel) index when a group has fewer channels than this (the
# stem's 3, ResNeXt's 4 per group), over channel blocks per (kh, kw) otherwise.
FLAT_K_BELOW = 16


def _configs(names: tuple[str, str, str]) -> list[triton.Config]:
    """Tile configurations (rows x columns x reduction block) to autotune over."""
    if INTERPRETING:
        # The interpreter's cost is per operation, not per FLOP: large tiles, few iterations.
        shapes = [(32, 64, 64, 4, 1)]
    else:
        shapes = [
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 4, 4),
            (128, 32, 32, 4, 4),
            (32, 64, 32, 4, 4),
            (64, 32, 16, 2, 4),
            (32, 32, 16, 2, 4),
        ]
        if AUTOTUNE == "quick":
            shapes = [shapes[0], shapes[3]]
    return [
        triton.Config(
            {names[0]: bm, names[1]: bn, names[2]: bk}, num_warps=warps, num_stages=stages
        )
        for bm, bn, bk, warps, stages in shapes
    ]


_SHAPE_KEY = [
    "N",
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


@triton.jit
def _bn_relu(x, mean, scale, shift):
    """The previous BatchNorm + ReLU of x, in float32: exactly what bn_act's elementwise pass
    computes, so that recomputing it anywhere gives the same bits."""
    y = (x - mean) * scale + shift
    return tl.where(y < 0.0, 0.0, y)


@triton.jit
def _apply_prologue(a, a_ok, channel, channel_ok, mean_ptr, scale_ptr, shift_ptr):
    """relu(bn(a)) for a tile of x whose columns are ``channel``; zero where a_ok is not (the
    padding stays zero, as when the normalised activation is padded), in a's dtype."""
    z = _bn_relu(
        a.to(tl.float32),
        tl.load(mean_ptr + channel, mask=channel_ok, other=0.0)[None, :],
        tl.load(scale_ptr + channel, mask=channel_ok, other=0.0)[None, :],
        tl.load(shift_ptr + channel, mask=channel_ok, other=0.0)[None, :],
    )
    return tl.where(a_ok, z, 0.0).to(a.dtype)


# ---------------------------------------------------------------------------------------------
# Forward


# Every statistics row is zeroed before each configuration runs while autotuning: a tile height
# writes only its own rows, and rows left by a configuration tried earlier must not count.
@triton.autotune(
    configs=_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    key=_SHAPE_KEY,
    reset_to_zero=["stat_count_ptr", "stat_mean_ptr", "stat_m2_ptr"],
)
@triton.jit
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
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    M = N * OH * OW
    row_ok = rows < M
    n, pixel = rows // (OH * OW), rows % (OH * OW)
    ih0, iw0 = (pixel // OW) * STRIDE - PADDING, (pixel % OW) * STRIDE - PADDING
    cols = group * cout_g + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) < cout_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        # Few channels per group (the stem's 3, ResNeXt's 4): one reduction index over
        # (kh, kw, ci) fills the tile, where a channel block per (kh, kw) would be mostly masked.
        for k0 in range(0, KH * KW * cin_g, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # = (kh * KW + kw) * cin_g + ci, w_ptr's row
            k_ok = k < KH * KW * cin_g
            ci, kpos = k % cin_g, k // cin_g
            ih = ih0[:, None] + ((kpos // KW) * DILATION)[None, :]
            iw = iw0[:, None] + ((kpos % KW) * DILATION)[None, :]
            a_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            channel = group * cin_g + ci
            a = tl.load(
                x_ptr + ((n[:, None] * H + ih) * W + iw) * C_IN + channel[None, :],
                mask=a_ok,
                other=0.0,
            )
            if PROLOGUE:
                a = _apply_prologue(a, a_ok, channel, k_ok, mean_ptr, scale_ptr, shift_ptr)
            b = tl.load(
                w_ptr + k[:, None] * C_OUT + cols[None, :],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih, iw = ih0 + kh * DILATION, iw0 + kw * DILATION
                pixel_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                row_base = ((n * H + ih) * W + iw) * C_IN + group * cin_g
                for ci0 in range(0, cin_g, BLOCK_K):
                    ci = ci0 + tl.arange(0, BLOCK_K)
                    ci_ok = ci < cin_g
                    a_ok = pixel_ok[:, None] & ci_ok[None, :]
                    a = tl.load(x_ptr + row_base[:, None] + ci[None, :], mask=a_ok, other=0.0)
                    if PROLOGUE:
                        a = _apply_prologue(
                            a, a_ok, group * cin_g + ci, ci_ok, mean_ptr, scale_ptr, shift_ptr
                        )
                    k = (kh * KW + kw) * cin_g + ci
                    b = tl.load(
                        w_ptr + k[:, None] * C_OUT + cols[None, :],
                        mask=ci_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(
            residual_ptr + rows[:, None] * C_OUT + cols[None, :], mask=out_ok, other=0.0
        ).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
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


@triton.autotune(
    configs=_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    key=_SHAPE_KEY,
    reset_to_zero=["sum_grad_ptr", "sum_grad_centred_ptr"],
)
@triton.jit
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
    N,
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
    PROLOGUE: tl.constexpr,
    FLAT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows: input pixels (n, ih, iw); columns: input channels of one group; reduction: the
    (kh, kw, co) that reach each input pixel (one flat index when a group has few output
    channels, as in forward). w_ptr is the weight as (KH, KW, C_OUT, C_IN/g).
    With a prologue, the epilogue also writes this tile's per-channel sums of the masked
    gradient gm and of gm * (x - mean): BatchNorm's backward reductions, fused here."""
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * H * W
    n, pixel = rows // (H * W), rows % (H * W)
    ih, iw = pixel // W, pixel % W
    cols = group * cin_g + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) < cin_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        for k0 in range(0, KH * KW * cout_g, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # = (kh * KW + kw) * cout_g + co
            k_ok = k < KH * KW * cout_g
            co, kpos = k % cout_g, k // cout_g
            oh_s = ih[:, None] + PADDING - ((kpos // KW) * DILATION)[None, :]
            ow_s = iw[:, None] + PADDING - ((kpos % KW) * DILATION)[None, :]
            oh, ow = oh_s // STRIDE, ow_s // STRIDE
            reach = (
                row_ok[:, None]
                & k_ok[None, :]
                & (oh_s >= 0)
                & (ow_s >= 0)
                & (oh_s % STRIDE == 0)
                & (ow_s % STRIDE == 0)
                & (oh < OH)
                & (ow < OW)
            )
            a = tl.load(
                grad_ptr
                + ((n[:, None] * OH + oh) * OW + ow) * C_OUT
                + (group * cout_g + co)[None, :],
                mask=reach,
                other=0.0,
            )
            w_row = kpos * C_OUT + group * cout_g + co
            b = tl.load(
                w_ptr + w_row[:, None] * cin_g + (cols - group * cin_g)[None, :],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                oh_s, ow_s = ih + PADDING - kh * DILATION, iw + PADDING - kw * DILATION
                oh, ow = oh_s // STRIDE, ow_s // STRIDE
                reach = (
                    row_ok
                    & (oh_s >= 0)
                    & (ow_s >= 0)
                    & (oh_s % STRIDE == 0)
                    & (ow_s % STRIDE == 0)
                    & (oh < OH)
                    & (ow < OW)
                )
                row_base = ((n * OH + oh) * OW + ow) * C_OUT + group * cout_g
                for co0 in range(0, cout_g, BLOCK_K):
                    co = co0 + tl.arange(0, BLOCK_K)
                    co_ok = co < cout_g
                    a = tl.load(
                        grad_ptr + row_base[:, None] + co[None, :],
                        mask=reach[:, None] & co_ok[None, :],
                        other=0.0,
                    )
                    k = (kh * KW + kw) * C_OUT + group * cout_g + co
                    b = tl.load(
                        w_ptr + k[:, None] * cin_g + (cols - group * cin_g)[None, :],
                        mask=co_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * C_IN + cols[None, :]
    if PROLOGUE:
        # The forward's input was relu(bn(x)): recompute it here and keep the gradient only
        # where it was positive (ReLU's backward, as torch's, on the stored value).
        x = tl.load(x_ptr + offsets, mask=out_ok, other=0.0).to(tl.float32)
        z = _bn_relu(
            x,
            tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :],
            tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :],
            tl.load(shift_ptr + cols, mask=col_ok, other=0.0)[None, :],
        )
        acc = tl.where(z.to(x_ptr.dtype.element_ty).to(tl.float32) > 0.0, acc, 0.0)
    stored = acc.to(grad_x_ptr.dtype.element_ty)
    tl.store(grad_x_ptr + offsets, stored, mask=out_ok)
    if PROLOGUE:
        # Of the values as stored, which BatchNorm's elementwise backward pass reads.
        gm = tl.where(out_ok, stored.to(tl.float32), 0.0)
        centred = x - tl.load(mean_ptr + cols, mask=col_ok, other=0.0)[None, :]
        slot = pid_m * C_IN + cols
        tl.store(sum_grad_ptr + slot, tl.sum(gm, axis=0), mask=col_ok)
        tl.store(sum_grad_centred_ptr + slot, tl.sum(gm * centred, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Weight gradient


@triton.autotune(
    configs=_configs(("BLOCK_K", "BLOCK_N", "BLOCK_M")),
    key=_SHAPE_KEY + ["SPLIT"],
    reset_to_zero=["grad_w_ptr"],
)
@triton.jit
def _conv_weight_grad_kernel(
    x_ptr,
    grad_ptr,
    grad_w_ptr,
    mean_ptr,
    scale_ptr,
    shift_ptr,
    N,
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
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows: k = (kh, kw, ci) of one group; columns: output channels of the group; reduction:
    output pixels, split SPLIT ways and added atomically into the float32 grad_w (K, C_OUT)."""
    pid_k, pid_n, pid_gs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    group, split = pid_gs // SPLIT, pid_gs % SPLIT
    cin_g, cout_g = C_IN // GROUPS, C_OUT // GROUPS
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < KH * KW * cin_g
    ci, kpos = k % cin_g, k // cin_g
    kh, kw = kpos // KW, kpos % KW
    channel = group * cin_g + ci
    if PROLOGUE:
        mean = tl.load(mean_ptr + channel, mask=k_ok, other=0.0)[:, None]
        scale = tl.load(scale_ptr + channel, mask=k_ok, other=0.0)[:, None]
        shift = tl.load(shift_ptr + channel, mask=k_ok, other=0.0)[:, None]
    cols = group * cout_g + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) < cout_g
    M = N * OH * OW
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(split * rows_per_split, tl.minimum((split + 1) * rows_per_split, M), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        n, pixel = rows // (OH * OW), rows % (OH * OW)
        ih = (pixel // OW)[None, :] * STRIDE - PADDING + (kh * DILATION)[:, None]
        iw = (pixel % OW)[None, :] * STRIDE - PADDING + (kw * DILATION)[:, None]
        a_ok = k_ok[:, None] & row_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(
            x_ptr + ((n[None, :] * H + ih) * W + iw) * C_IN + channel[:, None], mask=a_ok, other=0.0
        )
        if PROLOGUE:
            a = tl.where(a_ok, _bn_relu(a.to(tl.float32), mean, scale, shift), 0.0)
            a = a.to(x_ptr.dtype.element_ty)
        g = tl.load(
            grad_ptr + rows[:, None] * C_OUT + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, g, acc, input_precision=INPUT_PRECISION)
    # Relaxed: the sums need atomicity, not ordering (nothing reads grad_w in this launch).
    tl.atomic_add(
        grad_w_ptr
        + (group * KH * KW * cin_g + k)[:, None] * cout_g
        + (cols - group * cout_g)[None, :],
        acc,
        mask=k_ok[:, None] & col_ok[None, :],
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

    def args(self) -> dict:
        return dict(self.__dict__)


def _input_precision(dtype: torch.dtype) -> str:
    """TF32 for float32 where torch lets cuDNN use it (the reference runs that way), else exact."""
    if dtype == torch.float32 and not INTERPRETING and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass
class Prologue:
    """The BatchNorm + ReLU applied to a convolution's input as it is loaded: per-channel mean
    and the scale and shift of ``(x - mean) * scale + shift`` (float32)."""

    mean: Tensor
    scale: Tensor
    shift: Tensor


def _scratch(device: torch.device) -> Tensor:
    """A stand-in for an output the kernel does not write. Never a caller's tensor: autotuning
    zeroes the statistics outputs (reset_to_zero) whether or not the kernel uses them."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _prologue_args(prologue: Prologue | None, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if prologue is None:
        return like, like, like  # not read
    return prologue.mean, prologue.scale, prologue.shift


def conv_forward(
    x: Tensor,
    weight: Tensor,
    geometry: ConvGeometry,
    prologue: Prologue | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    relu: bool = False,
    stats: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``epilogue(conv2d(prologue(x), weight))``; x, residual and the result channels_last.

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
    # (KH, KW, C_in / groups, C_out): the reduction index k = (kh, kw, ci) is the row.
    w_k = weight.permute(2, 3, 1, 0).contiguous()
    mean, scale, shift = _prologue_args(prologue, x)
    M = g.N * g.OH * g.OW
    partials = None
    if stats:
        # One row of statistics per tile of output rows. The tile height is autotuned, so there
        # are rows for the smallest; rows a larger tiling leaves out keep count 0, which the
        # merge ignores (autotuning resets the counts after trying configurations).
        smallest = min(c.kwargs["BLOCK_M"] for c in _conv_forward_kernel.configs)
        partials = torch.zeros(
            (3, max(1, triton.cdiv(M, smallest)), g.C_OUT), dtype=torch.float32, device=x.device
        )
    if M > 0:
        _conv_forward_kernel[
            lambda meta: (
                triton.cdiv(M, meta["BLOCK_M"]),
                triton.cdiv(g.C_OUT // g.GROUPS, meta["BLOCK_N"]),
                g.GROUPS,
            )
        ](
            x,
            w_k,
            out,
            mean,
            scale,
            shift,
            bias if bias is not None else x,
            residual if residual is not None else x,
            *(partials.unbind(0) if partials is not None else [_scratch(x.device)] * 3),
            **g.args(),
            PROLOGUE=prologue is not None,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            RELU=relu,
            STATS=stats,
            FLAT_K=g.C_IN // g.GROUPS < FLAT_K_BELOW,
            INPUT_PRECISION=_input_precision(x.dtype),
        )
    return out, partials


def finalize_stats(
    partials: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Prologue]:
    """Merges per-tile statistics into the batch mean and biased variance per channel, and the
    prologue that applies this BatchNorm (with ``weight``, ``bias``, ``eps``) + ReLU."""
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
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return mean, var, Prologue(mean, scale, shift)


def prologue_from_stats(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Prologue:
    """The prologue of a BatchNorm with known statistics (eval: the running ones)."""
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
        BLOCK_C=REDUCE_BLOCK_CHANNELS,
    )
    return Prologue(mean, scale, shift)


def conv_input_grad(
    grad_out: Tensor,
    weight: Tensor,
    geometry: ConvGeometry,
    x: Tensor | None = None,
    prologue: Prologue | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gradient with respect to the convolution's input, channels_last, and None. With a
    prologue (and the pre-BatchNorm x it was applied to): the gradient gm with respect to
    bn(x) (relu(bn(x))'s gradient masked where that was positive), and the (2, tiles, C_in)
    float32 per-tile sums of gm and gm * (x - mean) for BatchNorm's backward (tiles a larger
    tiling leaves out are zero)."""
    g = geometry
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    grad_x = torch.empty(
        (g.N, g.C_IN, g.H, g.W),
        dtype=grad_out.dtype,
        device=grad_out.device,
        memory_format=torch.channels_last,
    )
    w_t = weight.permute(2, 3, 0, 1).contiguous()  # (KH, KW, C_out, C_in / groups)
    mean, scale, shift = _prologue_args(prologue, grad_out)
    rows = g.N * g.H * g.W
    sums = None
    if prologue is not None:
        smallest = min(c.kwargs["BLOCK_M"] for c in _conv_input_grad_kernel.configs)
        sums = torch.zeros(
            (2, max(1, triton.cdiv(rows, smallest)), g.C_IN),
            dtype=torch.float32,
            device=grad_out.device,
        )
    if rows > 0:
        _conv_input_grad_kernel[
            lambda meta: (
                triton.cdiv(rows, meta["BLOCK_M"]),
                triton.cdiv(g.C_IN // g.GROUPS, meta["BLOCK_N"]),
                g.GROUPS,
            )
        ](
            grad_out,
            w_t,
            grad_x,
            x if x is not None else grad_out,
            mean,
            scale,
            shift,
            *(sums if sums is not None else [_scratch(grad_out.device)] * 2),
            **g.args(),
            PROLOGUE=prologue is not None,
            FLAT_K=g.C_OUT // g.GROUPS < FLAT_K_BELOW,
            INPUT_PRECISION=_input_precision(grad_out.dtype),
        )
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
    weight_dtype,
    prologue: Prologue | None = None,
) -> Tensor:
    """Gradient with respect to the weight, (C_out, C_in / groups, KH, KW) in ``weight_dtype``;
    with a prologue, x is the pre-BatchNorm input and relu(bn(x)) is recomputed on the fly."""
    g = geometry
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    cin_g, cout_g = g.C_IN // g.GROUPS, g.C_OUT // g.GROUPS
    # (groups, KH, KW, C_in / groups, C_out / groups), accumulated in float32.
    grad_w = torch.zeros(
        (g.GROUPS, g.KH, g.KW, cin_g, cout_g), dtype=torch.float32, device=x.device
    )
    mean, scale, shift = _prologue_args(prologue, x)
    split = _weight_grad_split(g, x.device)
    if g.N * g.OH * g.OW > 0:
        _conv_weight_grad_kernel[
            lambda meta: (
                triton.cdiv(g.KH * g.KW * cin_g, meta["BLOCK_K"]),
                triton.cdiv(cout_g, meta["BLOCK_N"]),
                g.GROUPS * split,
            )
        ](
            x,
            grad_out,
            grad_w,
            mean,
            scale,
            shift,
            **g.args(),
            SPLIT=split,
            PROLOGUE=prologue is not None,
            INPUT_PRECISION=_input_precision(x.dtype),
        )
    # -> (C_out, C_in / groups, KH, KW)
    return grad_w.permute(0, 4, 3, 1, 2).reshape(g.C_OUT, cin_g, g.KH, g.KW).to(weight_dtype)
