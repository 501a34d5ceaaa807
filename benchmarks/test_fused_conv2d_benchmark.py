"""Triton implicit-GEMM convolutions (fastres/triton/conv.py): per layer against cuDNN, and a
bottleneck's training step on them against torchvision eager and torch.compile(max-autotune).

GPU only: under the Triton interpreter a timing says nothing about the kernels, so on CPU these
are skipped (the interpreter checks correctness, in tests/test_fused_conv2d.py). Targets (on an
H100 in bfloat16): each convolution at least 0.8x cuDNN's throughput; a block's training
step faster than both eager and torch.compile. benchmarks/report.py prints them.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH, DTYPE, ON_GPU, timed
from torch import nn
from torchvision.models.resnet import Bottleneck, conv1x1

import fastres
from fastres.ops.fused_conv2d import bn_act_conv2d_stats_triton
from fastres.testing import RESNET50_CONVOLUTIONS, conv_id

pytestmark = pytest.mark.skipif(not ON_GPU, reason="Triton convolutions are timed on a GPU only")

# (inplanes, planes, stride, side): the first block of each ResNet-50 stage and a repeated one.
BLOCKS = [
    (64, 64, 1, 56),
    (256, 64, 1, 56),
    (256, 128, 2, 56),
    (512, 256, 2, 28),
    (1024, 512, 2, 14),
    (2048, 512, 1, 7),
]


@pytest.mark.parametrize("impl", ["triton", "cudnn"])
@pytest.mark.parametrize(
    "spec", RESNET50_CONVOLUTIONS, ids=[conv_id(s) for s in RESNET50_CONVOLUTIONS]
)
def test_convolution(benchmark, describe, spec, impl):
    channels, side, out_channels, kernel, stride, groups = spec
    padding = kernel // 2
    x = torch.randn(BATCH, channels, side, side, device="cuda", dtype=DTYPE).contiguous(
        memory_format=torch.channels_last
    )
    weight = (
        torch.randn(out_channels, channels // groups, kernel, kernel, device="cuda", dtype=DTYPE)
        * 0.05
    ).contiguous(memory_format=torch.channels_last)
    if impl == "triton":

        def run():
            return bn_act_conv2d_stats_triton(
                x,
                weight,
                None,
                None,
                None,
                None,
                False,
                1e-5,
                "identity",
                stride,
                padding,
                1,
                groups,
                False,
            )[0]
    else:

        def run():
            return F.conv2d(x, weight, None, stride, padding, 1, groups)

    with torch.no_grad():
        for _ in range(3):  # warm-up: autotuning, cuDNN's algorithm choice
            timed(run)()
        out_side = (side + 2 * padding - kernel) // stride + 1
        flops = 2 * BATCH * out_channels * out_side**2 * (channels // groups) * kernel**2
        describe(
            op="conv_layer",
            shape=list(spec),
            impl=impl,
            mode="forward",
            flops=flops,
            bytes=0,
            residual=False,
        )
        benchmark(timed(run))


def _bottleneck(inplanes, planes, stride) -> nn.Module:
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * 4, stride), nn.BatchNorm2d(planes * 4)
        )
    return Bottleneck(inplanes, planes, stride, downsample)


@pytest.mark.parametrize("impl", ["fastres-triton", "eager", "compile-max-autotune"])
@pytest.mark.parametrize(
    "inplanes,planes,stride,side", BLOCKS, ids=[f"{i}-{p}-s{s}-{d}" for i, p, s, d in BLOCKS]
)
def test_bottleneck_training_step(benchmark, describe, inplanes, planes, stride, side, impl):
    torch.manual_seed(0)
    block = _bottleneck(inplanes, planes, stride).cuda().to(memory_format=torch.channels_last)
    if impl == "fastres-triton":
        block = fastres.convert(copy.deepcopy(block), backend="triton")
    elif impl == "compile-max-autotune":
        torch._dynamo.reset()
        block = torch.compile(block, mode="max-autotune")
    x = (
        torch.randn(BATCH, inplanes, side, side, device="cuda")
        .contiguous(memory_format=torch.channels_last)
        .requires_grad_()
    )
    grad = None

    def step():
        nonlocal grad
        x.grad = None
        for p in block.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=DTYPE, enabled=DTYPE != torch.float32):
            out = block(x)
        grad = torch.ones_like(out) if grad is None else grad
        out.backward(grad)

    for _ in range(3):  # warm-up: compilation and autotuning
        timed(step)()
    describe(
        op="block_train_step",
        shape=[BATCH, inplanes, planes, stride, side],
        impl=impl,
        mode="forward_backward-train",
        bytes=0,
        residual=False,
    )
    benchmark(timed(step))
