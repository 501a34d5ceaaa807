"""bn_act_conv2d microbenchmarks: conv2d(relu(batch_norm(y))) at every ResNet-50 layer where a
BatchNorm + ReLU feeds a convolution, against eager PyTorch and torch.compile of the same
composition, reporting TFLOP/s against a matrix multiplication measured in the same run.

FLOPs model: the convolution's multiply-adds (2 per MAC) — forward once, forward+backward three
times (input and weight gradients); the BatchNorm + ReLU work is not counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH, DEVICE, DTYPE, timed

from fastres.backends import resolve_backend
from fastres.ops import bn_act_conv2d
from fastres.testing import RESNET50_BN_CONV

MODES = ["forward-train", "forward_backward-train"]


def _ids():
    return [f"bn{c}x{s}-conv{k}x{k}s{st}-{o}" for c, s, o, k, st in RESNET50_BN_CONV]


def _conv_flops(channels, side, out_channels, kernel, stride) -> int:
    out_side = (side + 2 * (kernel // 2) - kernel) // stride + 1
    return 2 * BATCH * out_channels * out_side * out_side * channels * kernel * kernel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastres", "eager", "compile"])
@pytest.mark.parametrize("channels,side,out_channels,kernel,stride", RESNET50_BN_CONV, ids=_ids())
def test_bn_act_conv2d(
    benchmark, describe, channels, side, out_channels, kernel, stride, impl, mode
):
    backward = mode.startswith("forward_backward")
    make = dict(device=DEVICE, dtype=DTYPE)
    y = (
        torch.randn(BATCH, channels, side, side, **make)
        .contiguous(memory_format=torch.channels_last)
        .requires_grad_(backward)
    )
    weight = torch.rand(channels, device=DEVICE).add_(0.5).requires_grad_(backward)
    bias = torch.randn(channels, device=DEVICE).requires_grad_(backward)
    conv_weight = (
        (torch.randn(out_channels, channels, kernel, kernel, **make) * 0.05)
        .contiguous(memory_format=torch.channels_last)
        .requires_grad_(backward)
    )
    padding = kernel // 2
    backend = resolve_backend("auto", y.device)

    def composed(y, weight, bias, conv_weight):
        z = F.relu(F.batch_norm(y, None, None, weight, bias, True, 0.1, 1e-5))
        return F.conv2d(z, conv_weight, None, stride, padding)

    def fused(y, weight, bias, conv_weight):
        return bn_act_conv2d(
            y,
            weight,
            bias,
            None,
            None,
            conv_weight,
            [stride] * 2,
            [padding] * 2,
            [1, 1],
            1,
            True,
            1e-5,
            backend,
        )[0]

    if impl == "compile":
        torch._dynamo.reset()
        fn = torch.compile(composed, fullgraph=True)
    else:
        fn = fused if impl == "fastres" else composed
    args = (y, weight, bias, conv_weight)
    grad = None

    def step():
        nonlocal grad
        if not backward:
            with torch.no_grad():
                return fn(*args)
        for leaf in args:
            leaf.grad = None
        out = fn(*args)
        grad = torch.ones_like(out) if grad is None else grad
        out.backward(grad)
        return out

    for _ in range(3):  # warm-up: compilation, algorithm selection, allocator
        timed(step)()
    flops = _conv_flops(channels, side, out_channels, kernel, stride) * (3 if backward else 1)
    describe(
        op="bn_act_conv2d",
        shape=[BATCH, channels, side, side, out_channels, kernel, stride],
        residual=False,
        impl=impl,
        mode=mode,
        flops=flops,
        bytes=0,
    )
    benchmark(timed(step))


def test_matmul_peak(benchmark, describe):
    """Achievable matrix-multiplication throughput in this dtype, measured in the same run."""
    n = 8192 if DEVICE == "cuda" else 2048
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    timed(lambda: a @ b)()
    describe(op="matmul", shape=[n, n, n], impl="torch", mode="matmul", flops=2 * n**3, bytes=0)
    benchmark(timed(lambda: a @ b))
