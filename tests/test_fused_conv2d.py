"""Triton implicit-GEMM convolutions with BatchNorm in their prologue and epilogue.

Without a GPU these run under the Triton interpreter at small shapes (tests/conftest.py turns it
on); with one, the same tests run on CUDA tensors, plus ResNet-50's real shapes in bfloat16 and
float16 (marked ``cuda``). Low precision follows the rule in fastres/testing.py.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from op_log import OpLog
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

import fastres
from fastres.ops.fused_conv2d import (
    bn_act_conv2d_stats_backward_triton,
    bn_act_conv2d_stats_triton,
    conv2d_bias_act_add_triton,
    conv2d_bias_act_triton,
)
from fastres.testing import RESNET50_CONVOLUTIONS, assert_within_error_factor, conv_id

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): every kind of convolution in
# ResNet-50 and ResNeXt-50, at small sizes, plus odd channel counts and a dilated 3x3.
CONVOLUTIONS = {
    "1x1": (2, 8, 7, 7, 16, 1, 1, 0, 1, 1),
    "1x1-stride2": (2, 8, 7, 7, 16, 1, 2, 0, 1, 1),
    "3x3": (2, 8, 6, 6, 12, 3, 1, 1, 1, 1),
    "3x3-stride2": (2, 8, 9, 9, 12, 3, 2, 1, 1, 1),
    "3x3-grouped": (2, 16, 6, 6, 16, 3, 1, 1, 1, 4),
    "7x7-stride2-stem": (1, 3, 15, 15, 8, 7, 2, 3, 1, 1),
    "3x3-dilated-odd": (1, 5, 7, 5, 7, 3, 1, 2, 2, 1),
    "3x3-stride2-dilated": (1, 6, 9, 8, 5, 3, 2, 2, 2, 1),
    # taps every stride / gcd(stride, dilation) along an axis (see _tap_step): 2 at stride 4
    "5x5-stride4-dilated": (1, 4, 13, 11, 17, 5, 4, 3, 2, 1),
    # 16+ channels per group: the kernels' channel-block reduction (fewer: one flat index)
    "3x3-wide": (2, 24, 6, 6, 32, 3, 1, 1, 1, 1),
    "1x1-stride2-wide": (2, 32, 7, 7, 16, 1, 2, 0, 1, 1),
    "3x3-stride2-wide-odd": (1, 17, 9, 7, 19, 3, 2, 1, 1, 1),
    # several row and column tiles (the swizzled tile order) and channel blocks per tap (the one
    # flattened (tap, channel block) loop), at the interpreter's 32 x 64 x 64 tile
    "1x1-many-tiles": (2, 80, 9, 9, 130, 1, 1, 0, 1, 1),
    "3x3-two-channel-blocks": (1, 80, 5, 5, 70, 3, 1, 1, 1, 1),
}
LOW = [torch.float32, torch.float16]
# PyTorch's own activations, the reference for the kernels' activation codes.
TORCH_ACTIVATIONS = {"identity": lambda y: y, "relu": F.relu, "silu": F.silu}


def _inputs(spec, dtype, seed=0):
    n, c, h, w, c_out, k, stride, padding, dilation, groups = spec
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=gen) * 2 + 0.5).to(DEVICE)
    weight = (torch.randn(c_out, c // groups, k, k, generator=gen) / (c * k * k) ** 0.5).to(DEVICE)
    bn = dict(
        mean=torch.randn(c, generator=gen).to(DEVICE) * 0.3 + 0.5,
        var=torch.rand(c, generator=gen).to(DEVICE) + 0.5,
        weight=torch.rand(c, generator=gen).to(DEVICE) + 0.5,
        bias=torch.randn(c, generator=gen).to(DEVICE) * 0.5,
    )
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    return x, weight.to(dtype), bn, (stride, padding, dilation, groups)


def _unfused(x, weight, bn, conv_args, prologue: str | None):
    """PyTorch's composition in x's dtype: conv2d(prologue(batch_norm(x))), prologue the name
    of an activation; conv2d(x) when None."""
    stride, padding, dilation, groups = conv_args
    if prologue is not None:
        x = TORCH_ACTIVATIONS[prologue](
            F.batch_norm(
                x,
                bn["mean"].to(x.dtype),
                bn["var"].to(x.dtype),
                bn["weight"].to(x.dtype),
                bn["bias"].to(x.dtype),
                False,
                0.0,
                1e-5,
            )
        )
    return F.conv2d(x, weight, None, stride, padding, dilation, groups)


def _results(fn, x, weight, bn, grad):
    """(out, grad_x, grad_weight, grad_bn_weight, grad_bn_bias) of fn in its inputs' dtype."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bn = {k: v.detach().clone().requires_grad_(k in ("weight", "bias")) for k, v in bn.items()}
    out = fn(x, weight, bn)
    out.backward(grad.to(out.dtype))
    return [out.detach(), x.grad, weight.grad, bn["weight"].grad, bn["bias"].grad]


def _check_against_torch(fn, spec, dtype, prologue):
    x, weight, bn, conv_args = _inputs(spec, dtype)
    ref_fn = lambda x_, w_, bn_: _unfused(x_, w_, bn_, conv_args, prologue)  # noqa: E731
    grad = torch.randn_like(_unfused(x.double(), weight.double(), bn, conv_args, prologue))
    ours = _results(fn, x, weight, bn, grad)
    theirs = _results(ref_fn, x, weight, bn, grad)
    bn64 = {k: v.double() for k, v in bn.items()}
    reference = _results(ref_fn, x.double(), weight.double(), bn64, grad)
    names = ["output", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"]
    for name, a, t, r in zip(names, ours, theirs, reference, strict=True):
        if r is None:
            assert a is None, name
            continue
        assert_within_error_factor(
            a.float().cpu(),
            t.float().cpu(),
            r.cpu(),
            name,
            dtype,
            term_magnitude=r.abs().max().item(),
        )


def _fused(spec, prologue: str | None):
    """bn_act_conv2d_stats_triton with a BatchNorm + ``prologue`` activation (None: without)."""

    def fused(x, weight, bn):
        bn_args = (
            (bn["mean"], bn["var"], bn["weight"], bn["bias"])
            if prologue is not None
            else (None, None, None, None)
        )
        activation = prologue if prologue is not None else "identity"
        out, _, _ = bn_act_conv2d_stats_triton(
            x, weight, *bn_args, False, 1e-5, activation, *spec[6:], False
        )
        return out

    return fused


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("prologue", [None, "relu"], ids=["plain", "bn-relu-prologue"])
@pytest.mark.parametrize("kind", list(CONVOLUTIONS))
def test_convolution_forward_and_gradients_match_torch(kind, prologue, dtype):
    spec = CONVOLUTIONS[kind]
    _check_against_torch(_fused(spec, prologue), spec, dtype, prologue)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("kind", ["3x3-stride2", "3x3-wide"])
def test_prologue_activation_forward_and_gradients_match_torch(kind, activation, dtype):
    """The other prologue activations, through the output, the input gradient (the activation's
    derivative at the recomputed BatchNorm), the weight gradient and the BatchNorm's parameter
    gradients. Two kinds (the interpreter is slow) that between them take both reductions
    (flat and per channel block) and both input gradients (by phase at stride 2, and not)."""
    spec = CONVOLUTIONS[kind]
    _check_against_torch(_fused(spec, activation), spec, dtype, activation)


@pytest.mark.parametrize("kind", ["3x3-stride2", "3x3-grouped", "1x1"])
def test_statistics_epilogue_gives_the_batch_mean_and_variance(kind):
    """Far from zero mean, where E[y^2] - E[y]^2 would cancel: the per-tile M2 must not."""
    x, weight, _, conv_args = _inputs(CONVOLUTIONS[kind], torch.float32)
    x = x + 100.0
    out, mean, var = bn_act_conv2d_stats_triton(
        x, weight, None, None, None, None, False, 1e-5, "identity", *conv_args, True
    )
    var64, mean64 = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_ops_launch_on_their_tensors_device_not_the_current_one():
    spec = CONVOLUTIONS["3x3-grouped"]
    x, weight, bn, conv_args = _inputs(spec, torch.float32)
    x1, weight1 = x.to("cuda:1").requires_grad_(), weight.to("cuda:1").requires_grad_()
    with torch.cuda.device(0):  # cuda:0 current, tensors on cuda:1
        out, mean, var = bn_act_conv2d_stats_triton(
            x1, weight1, None, None, None, None, False, 1e-5, "identity", *conv_args, True
        )
        grad_x, grad_w = torch.autograd.grad(out.sum(), (x1, weight1))
    expected = F.conv2d(x1, weight1, None, *conv_args)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        grad_w, torch.autograd.grad(expected.sum(), weight1)[0], rtol=1e-3, atol=1e-3
    )


def test_deterministic_mode_gives_each_weight_gradient_element_one_atomic_add():
    from fastres.triton.conv import ConvGeometry, _weight_grad_split

    geometry = ConvGeometry.of((2, 16, 6, 6), (16, 16, 3, 3), 1, 1, 1, 1)
    assert _weight_grad_split(geometry, torch.device("cpu")) == 2
    torch.use_deterministic_algorithms(True)
    try:
        assert _weight_grad_split(geometry, torch.device("cpu")) == 1
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.cuda
def test_gradients_are_bitwise_reproducible_in_deterministic_mode():
    """grad_w (split sums added atomically, one split in this mode), grad_x and the BatchNorm
    gradients (per-tile sums merged by the finalize) are the same bits run after run."""
    x, weight, bn, conv_args = _inputs(CONVOLUTIONS["3x3-stride2"], torch.float32)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    bn_weight, bn_bias = bn["weight"].requires_grad_(), bn["bias"].requires_grad_()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        bn_args = (bn["mean"], bn["var"], bn_weight, bn_bias)
        for _ in range(2):
            out, _, _ = bn_act_conv2d_stats_triton(
                x, weight, *bn_args, False, 1e-5, "relu", *conv_args, False
            )
            runs.append(torch.autograd.grad(out.sum(), (x, weight, bn_weight, bn_bias)))
    finally:
        torch.use_deterministic_algorithms(False)
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    "stride, padding, dilation, k",
    [(2, 1, 1, 3), (2, 0, 1, 1), (2, 3, 1, 7), (3, 2, 2, 3), (2, 2, 2, 3), (4, 1, 2, 7)],
)
def test_input_gradient_visits_each_tap_once_per_phase_that_it_reaches(
    stride, padding, dilation, k
):
    """The stride-s input gradient loops, in each phase (ih mod s, iw mod s), over the taps that
    reach it: k * k tap visits over all s * s phases, not s * s * k * k (3/4 of them masked off
    at stride 2), and every one reaches (the divisions by the stride are exact). The kernel
    computes them as ``first + j * step`` (j < count) along each axis, from the tap ranges."""
    from fastres.triton.conv import _phase_tap_ranges, _tap_step

    ranges = _phase_tap_ranges(stride, padding, dilation, k, k, torch.device("cpu")).tolist()
    step = _tap_step(stride, dilation)
    visits = 0
    for phase_h in range(stride):
        for phase_w in range(stride):
            first_h, count_h = ranges[phase_h][:2]
            first_w, count_w = ranges[phase_w][2:]
            taps_h = [first_h + j * step for j in range(count_h)]
            taps_w = [first_w + j * step for j in range(count_w)]
            for phase, taps in ((phase_h, taps_h), (phase_w, taps_w)):
                reaching = [t for t in range(k) if (phase + padding - t * dilation) % stride == 0]
                assert taps == reaching
            visits += len(taps_h) * len(taps_w)
    assert visits == k * k


def test_more_elements_than_int32_offsets_reach_is_a_clear_error():
    """The stem at batch 2,700 and 224 px (meta tensors: nothing is allocated; the fake kernel
    runs the same geometry check, so torch.compile sees the error too)."""
    x = torch.empty(2700, 64, 224, 224, device="meta")
    weight = torch.empty(64, 64, 3, 3, device="meta")
    with pytest.raises(ValueError, match="conv2d: the triton backend addresses the input"):
        bn_act_conv2d_stats_triton(
            x, weight, None, None, None, None, False, 1e-5, "identity", 1, 1, 1, 1, False
        )


def test_statistics_rows_with_no_elements_are_ignored_whatever_they_hold():
    """Autotuning leaves rows written by a configuration with shorter tiles than the winner's;
    the finalize must merge only rows whose count is positive (stale M2 inflated the variance)."""
    from fastres.triton.conv import finalize_stats

    torch.manual_seed(0)
    channels = 5
    values = torch.randn(3, 8, channels, device=DEVICE) * 3 + 7  # 3 rows of 8 elements
    rows = torch.stack(
        [values.new_full((3, channels), 8.0), values.mean(1), values.var(1, correction=0) * 8]
    )
    stale = torch.stack(
        [
            torch.zeros(2, channels, device=DEVICE),  # no elements, stale values
            torch.full((2, channels), 123.0, device=DEVICE),
            torch.full((2, channels), 4567.0, device=DEVICE),
        ],
        0,
    )
    partials = torch.cat([rows[:, :1], stale, rows[:, 1:]], 1).contiguous()
    mean, var, _ = finalize_stats(partials, None, None, 1e-5)
    var64, mean64 = torch.var_mean(values.double().reshape(-1, channels), dim=0, correction=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-6)


def test_statistics_finalize_merges_many_rows_block_by_block():
    """More rows than the finalize merges per step (REDUCE_BLOCK_SPLITS), of unequal counts,
    some empty with stale values, far from zero mean: the batch mean and variance exactly."""
    from fastres.triton.bn_act import REDUCE_BLOCK_SPLITS
    from fastres.triton.conv import finalize_stats

    gen = torch.Generator().manual_seed(0)
    channels, tiles = 3, 2 * REDUCE_BLOCK_SPLITS + 7
    counts = torch.randint(1, 9, (tiles,), generator=gen)
    counts[::5] = 0  # empty rows
    groups = [torch.randn(int(c), channels, generator=gen) * 2 + 50 for c in counts]
    rows = torch.zeros(3, tiles, channels)
    for i, values in enumerate(groups):
        if len(values):
            rows[0, i], rows[1, i] = len(values), values.mean(0)
            rows[2, i] = values.var(0, correction=0) * len(values)
        else:
            rows[1, i], rows[2, i] = 99.0, 1e4  # stale, must not count
    mean, var, _ = finalize_stats(rows.to(DEVICE), None, None, 1e-5)
    var64, mean64 = torch.var_mean(torch.cat(groups).double(), dim=0, correction=0)
    torch.testing.assert_close(mean.double().cpu(), mean64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double().cpu(), var64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["3x3-wide", "1x1-many-tiles"])
def test_weight_layout_changes_neither_results_nor_the_gradient_layout(kind):
    """An NCHW weight and a channels_last one give the same bits; each gets its gradient in its
    own layout (what the fake kernel promises torch.compile)."""
    x, weight, bn, conv_args = _inputs(CONVOLUTIONS[kind], torch.float32)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        w = weight.clone(memory_format=layout).requires_grad_()
        xi = x.detach().clone().requires_grad_()
        bn_args = (bn["mean"], bn["var"], bn["weight"], bn["bias"])
        out, _, _ = bn_act_conv2d_stats_triton(
            xi, w, *bn_args, False, 1e-5, "relu", *conv_args, False
        )
        out.backward(torch.ones_like(out))
        assert w.grad.stride() == w.stride()
        results.append((out, xi.grad, w.grad))
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "shape, layout, dtype, copies",
    [
        ((6, 4, 1, 1), torch.contiguous_format, torch.float32, False),  # NCHW strides, same memory
        ((6, 4, 1, 1), torch.channels_last, torch.float32, False),
        ((6, 4, 3, 3), torch.channels_last, torch.float32, False),
        ((6, 4, 3, 3), torch.contiguous_format, torch.float32, True),  # another memory layout
        ((6, 4, 1, 1), torch.contiguous_format, torch.float16, True),  # another dtype
    ],
    ids=["1x1-nchw", "1x1-channels-last", "3x3-channels-last", "3x3-nchw", "1x1-float16"],
)
def test_weight_gradient_is_copied_only_when_the_weights_memory_layout_differs(
    shape, layout, dtype, copies
):
    """The weight gradient, accumulated in float32 as (C_out, KH, KW, C_in) and seen as
    (C_out, C_in, KH, KW), comes back with the weight's strides: a view when the memory layout
    is the same (strides of size-1 dims do not matter: a 1x1 NCHW weight is laid out as a
    channels_last one), one copy otherwise."""
    from fastres.triton.conv import _as_layout_of

    weight = torch.zeros(shape, dtype=dtype).contiguous(memory_format=layout)
    c_out, c_in, kh, kw = shape
    grad = torch.randn(c_out, kh, kw, c_in).permute(0, 3, 1, 2)
    with OpLog() as log:
        result = _as_layout_of(weight, grad)
    assert result.stride() == weight.stride() and result.dtype == dtype
    assert torch.equal(result, grad.to(dtype))
    assert ("aten.copy_" in log.ops) == copies, log.ops
    assert (result.data_ptr() == grad.data_ptr()) != copies


def test_another_batch_size_in_the_same_power_of_two_reuses_the_tuned_tiles(monkeypatch):
    """Autotuning is keyed on the row count rounded up to a power of two, not on N: a last
    partial batch does not tune (and compile) again; tuning_report() counts what was tuned.
    Two configurations under the interpreter, with a stub benchmark."""
    import triton

    from fastres.triton import conv as triton_conv

    kernel = triton_conv._conv_forward_kernel
    (only,) = kernel.configs
    twin = triton.Config(dict(only.kwargs), num_warps=2 * only.num_warps)
    benchmarked = []

    def stub_bench(*args, config, **kwargs):
        benchmarked.append(config)
        return [1.0 if config is only else 2.0]

    monkeypatch.setattr(kernel, "configs", [only, twin])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", stub_bench)
    monkeypatch.setattr(triton_conv, "_TUNING", {})
    spec = CONVOLUTIONS["3x3"]
    for batch, tunings in [(3, 1), (2, 1), (4, 2)]:  # 108, 72 and 144 output pixels
        x, weight, _, conv_args = _inputs((batch, *spec[1:]), torch.float32)
        out, _, _ = bn_act_conv2d_stats_triton(
            x, weight, None, None, None, None, False, 1e-5, "identity", *conv_args, False
        )
        torch.testing.assert_close(out, F.conv2d(x, weight, None, *conv_args))
        assert len(benchmarked) == 2 * tunings
        assert triton_conv.tuning_report()["_conv_forward_kernel"].shapes == tunings


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("kind", ["1x1-stride2", "3x3-grouped"])
def test_inference_epilogue_adds_bias_and_residual_then_the_activation(kind, activation):
    x, weight, _, conv_args = _inputs(CONVOLUTIONS[kind], torch.float32)
    bias = torch.randn(weight.shape[0], device=DEVICE)
    expected = F.conv2d(x, weight, bias, *conv_args)
    residual = torch.randn_like(expected).contiguous(memory_format=torch.channels_last)
    expected = TORCH_ACTIVATIONS[activation](expected + residual)
    out = conv2d_bias_act_triton(x, weight, bias, residual, activation, *conv_args)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
@pytest.mark.parametrize("kind", ["1x1-stride2", "3x3-grouped"])
def test_inference_epilogue_adds_the_residual_after_the_activation(kind, activation):
    x, weight, _, conv_args = _inputs(CONVOLUTIONS[kind], torch.float32)
    bias = torch.randn(weight.shape[0], device=DEVICE)
    expected = TORCH_ACTIVATIONS[activation](F.conv2d(x, weight, bias, *conv_args))
    residual = torch.randn_like(expected).contiguous(memory_format=torch.channels_last)
    before = residual.clone()
    out = conv2d_bias_act_add_triton(x, weight, bias, residual, activation, *conv_args)
    torch.testing.assert_close(out, expected + residual, rtol=1e-5, atol=1e-5)
    assert torch.equal(residual, before)


@pytest.mark.parametrize("device", ["meta", DEVICE])
def test_conv_ops_reject_an_unknown_activation(device):
    """In the ops and in their fake kernels (meta tensors: what torch.compile runs)."""
    x = torch.zeros(1, 4, 3, 3, device=device)
    weight = torch.zeros(4, 4, 1, 1, device=device)
    unknown = "activation must be one of 'identity', 'relu', 'silu', got 'gelu'"
    with pytest.raises(ValueError, match=f"conv2d_bias_act_triton: {unknown}"):
        conv2d_bias_act_triton(x, weight, None, None, "gelu", 1, 0, 1, 1)
    with pytest.raises(ValueError, match=f"conv2d_bias_act_add_triton: {unknown}"):
        conv2d_bias_act_add_triton(x, weight, None, x, "gelu", 1, 0, 1, 1)
    if device != "meta":
        with pytest.raises(ValueError, match="residual must have the output's shape"):
            conv2d_bias_act_add_triton(x, weight, None, x[:, :, :1], "relu", 1, 0, 1, 1)
    with pytest.raises(ValueError, match=f"bn_act_conv2d_stats_triton: {unknown}"):
        bn_act_conv2d_stats_triton(
            x, weight, None, None, None, None, False, 1e-5, "gelu", 1, 0, 1, 1, True
        )


def test_conv_ops_pass_opcheck():
    x, weight, bn, conv_args = _inputs(CONVOLUTIONS["3x3-stride2"], torch.float32)
    bn_args = (bn["mean"], bn["var"], bn["weight"].requires_grad_(), bn["bias"])
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        bn_act_conv2d_stats_triton,
        (x.requires_grad_(), weight, *bn_args, True, 1e-5, "silu", *conv_args, True),
        test_utils=tests,
    )
    torch.library.opcheck(
        conv2d_bias_act_triton,
        (x.detach(), weight, None, None, "relu", *conv_args),
        test_utils=tests,
    )
    out = conv2d_bias_act_triton(x.detach(), weight, None, None, "relu", *conv_args)
    torch.library.opcheck(
        conv2d_bias_act_add_triton,
        (x.detach(), weight, None, torch.randn_like(out), "silu", *conv_args),
        test_utils=tests,
    )


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "bn-relu-prologue"])
def test_conv_backward_op_passes_opcheck(prologue):
    x, weight, bn, conv_args = _inputs(CONVOLUTIONS["3x3-grouped"], torch.float32)
    bn_args = (
        (bn["mean"], bn["var"], bn["weight"], bn["bias"]) if prologue else (None, None, None, None)
    )
    grad = torch.randn(2, 16, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(
        bn_act_conv2d_stats_backward_triton,
        (grad, x, weight, *bn_args, True, 1e-5, "relu", *conv_args, True, True),
        test_utils=("test_schema", "test_faketensor"),
    )


# ---------------------------------------------------------------------------------------------
# Blocks with backend="triton"


def _randomise(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _with_silu(block: nn.Module) -> nn.Module:
    block.relu = nn.SiLU()
    return block


BLOCKS = {
    "bottleneck": lambda: Bottleneck(16, 4),
    "bottleneck-stride2-downsample": lambda: Bottleneck(
        16, 8, 2, nn.Sequential(conv1x1(16, 32, 2), nn.BatchNorm2d(32))
    ),
    "resnext-bottleneck": lambda: Bottleneck(16, 4, groups=4, base_width=64),
    "basic": lambda: BasicBlock(16, 16),
    # torchvision's one activation module serves all three of the block's activations.
    "bottleneck-silu": lambda: _with_silu(Bottleneck(16, 4)),
}


def _block_step(model, x, grad):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad.to(out.dtype))
    return (
        [out.detach(), x.grad]
        + [p.grad for p in model.parameters()]
        + [b.detach().clone() for b in model.buffers()]
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_block_on_triton_matches_torchvision(block, training):
    torch.manual_seed(0)
    reference = _randomise(BLOCKS[block]()).to(DEVICE).train(training)
    fast = fastres.convert(copy.deepcopy(reference), backend="triton")
    reference64 = copy.deepcopy(reference).double()
    x = torch.randn(2, 16, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(reference(x))
    ours = _block_step(fast, x, grad)
    theirs = _block_step(reference, x, grad)
    expected = _block_step(reference64, x.double(), grad)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for i, (a, t, r) in enumerate(zip(ours, theirs, expected, strict=True)):
        if not r.dtype.is_floating_point:
            assert torch.equal(a, r), f"tensor {i}"  # num_batches_tracked
            continue
        assert_within_error_factor(
            a.cpu(),
            t.cpu(),
            r.cpu(),
            f"tensor {i}",
            torch.float32,
            term_magnitude=r.abs().max().item(),
        )


def test_block_on_triton_raises_like_torchvision_on_one_value_per_channel():
    torch.manual_seed(0)
    reference = _randomise(BLOCKS["bottleneck-stride2-downsample"]()).to(DEVICE).train()
    fast = fastres.convert(copy.deepcopy(reference), backend="triton")
    x = torch.randn(1, 16, 2, 2, device=DEVICE)  # stride 2: one value per channel after conv2
    for model in (reference, fast):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model(x)
    for a, b in zip(fast.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)  # the same partial update as torchvision's


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_bottleneck_training_forward_has_no_standalone_batch_norm_before_the_last(activation):
    """conv1(+stats) -> [BN1+act]conv2(+stats) -> [BN2+act]conv3(+stats) -> BN3 + add + act."""
    if activation == "relu":
        block = fastres.FastBottleneck(16, 4, backend="triton")
    else:
        block = fastres.convert(_with_silu(Bottleneck(16, 4)), backend="triton")
    block = block.to(DEVICE).train()
    x = torch.randn(2, 16, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with OpLog() as log:
        block(x)
    kernels = [op for op in log.ops if op.startswith("fastres.")]
    assert kernels == ["fastres.bn_act_conv2d_stats_triton"] * 3 + [
        "fastres.bn_act_from_stats_triton"
    ], log.ops
    unfused = ("batch_norm", "relu", "silu", "convolution")
    assert not [op for op in log.ops if any(name in op for name in unfused)]


def test_bottleneck_on_triton_under_torch_compile_fullgraph():
    """Forward and backward traced whole: every kernel launch is inside a custom op."""
    torch._dynamo.reset()
    block = fastres.FastBottleneck(16, 4, backend="triton").to(DEVICE).train()
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 16, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    results = []
    for model in (eager, compiled):
        inp = x.clone().requires_grad_()
        out = model(inp)
        out.sum().backward()
        results.append([out.detach(), inp.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ResNet-50's real shapes, on a GPU

# The stem, layer1's 1x1 and 3x3, layer2's strided 3x3 and downsample, layer3's expanding 1x1,
# layer4's 3x3 and ResNeXt's grouped 3x3, as (N, C_in, H, W, C_out, kernel, stride, padding,
# dilation, groups) at batch 32.
RESNET50_ON_GPU = {
    conv_id(spec): (32, spec[0], spec[1], spec[1], spec[2], spec[3], spec[4], spec[3] // 2, 1)
    + (spec[5],)
    for spec in (RESNET50_CONVOLUTIONS[i] for i in (0, 1, 2, 6, 8, 13, 22, 23))
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", list(RESNET50_ON_GPU))
def test_resnet50_convolutions_on_gpu(kind, dtype):
    spec = RESNET50_ON_GPU[kind]
    # Every convolution but the stem's follows a BatchNorm + ReLU.
    prologue = "relu" if spec[1] != 3 else None
    _check_against_torch(_fused(spec, prologue), spec, dtype, prologue)
