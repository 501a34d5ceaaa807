"""bn_act microbenchmarks: fastres against eager PyTorch and torch.compile of the same composition.

Every ResNet-50 BatchNorm shape, forward and forward+backward, training and eval. Run with
``make bench`` (which also prints the report against the targets), or
``pytest benchmarks --benchmark-only``.

Bytes model (for GB/s, the same for every implementation, so GB/s ratios are speed ratios):
the traffic of the fused computation at its minimum, each tensor read or written once —
forward: x, residual, out and the 1-bit ReLU mask; backward: grad_out, x, the mask, grad_x and
grad_residual.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BATCH, DEVICE, DTYPE, ON_GPU, timed

from fastres.backends import STATUS
from fastres.ops import bn_act
from fastres.ops.bn_act import bn_act_reference
from fastres.testing import RESNET50_BN_SHAPES

MODES = ["forward-train", "forward-eval", "forward_backward-train", "forward_backward-eval"]


def _implementations():
    impls = ["fastres", "eager", "compile"]
    if ON_GPU and STATUS["triton"].available:
        impls.insert(1, "fastres-triton")
    return impls


def _inputs(channels: int, side: int, residual: bool, needs_grad: bool):
    shape = (BATCH, channels, side, side)
    make = dict(device=DEVICE, dtype=DTYPE)
    x = torch.randn(shape, **make).contiguous(memory_format=torch.channels_last)
    return dict(
        x=x.requires_grad_(needs_grad),
        weight=torch.rand(channels, device=DEVICE).add_(0.5).requires_grad_(needs_grad),
        bias=torch.randn(channels, device=DEVICE).requires_grad_(needs_grad),
        running_mean=torch.zeros(channels, device=DEVICE),
        running_var=torch.ones(channels, device=DEVICE),
        residual=torch.randn_like(x).requires_grad_(needs_grad) if residual else None,
        grad=torch.randn_like(x),
    )


def _model_bytes(t: dict, backward: bool) -> int:
    act = t["x"].numel() * t["x"].element_size()
    mask = t["x"].numel() // 8
    has_residual = t["residual"] is not None
    forward = act * (2 + has_residual) + mask
    if not backward:
        return forward
    return forward + act * (3 + has_residual) + mask


def _function(impl: str, training: bool):
    def composed(x, weight, bias, running_mean, running_var, residual):
        return bn_act_reference(
            x, weight, bias, running_mean, running_var, residual=residual, training=training
        )

    if impl == "eager":
        return composed
    if impl == "compile":
        # A fresh cache for every shape and mode: each is compiled for its static shape, and
        # the recompilation limit of one code object is never reached.
        torch._dynamo.reset()
        return torch.compile(composed, fullgraph=True)
    backend = "triton" if impl == "fastres-triton" else "auto"

    def fused(x, weight, bias, running_mean, running_var, residual):
        return bn_act(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            residual=residual,
            training=training,
            backend=backend,
        )

    return fused


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", _implementations())
@pytest.mark.parametrize(
    "channels,side,residual",
    RESNET50_BN_SHAPES,
    ids=[f"{c}x{s}x{s}{'+res' if r else ''}" for c, s, r in RESNET50_BN_SHAPES],
)
def test_bn_act(benchmark, describe, channels, side, residual, impl, mode):
    backward = mode.startswith("forward_backward")
    training = mode.endswith("train")
    t = _inputs(channels, side, residual, backward)
    fn = _function(impl, training)
    args = (t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], t["residual"])
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def step():
        if not backward:
            with torch.no_grad():
                return fn(*args)
        for leaf in leaves:  # no accumulation into .grad: measure the op, not the += after it
            leaf.grad = None
        out = fn(*args)
        out.backward(t["grad"])
        return out

    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        timed(step)()
    describe(
        op="bn_act",
        shape=[BATCH, channels, side, side],
        residual=residual,
        impl=impl,
        mode=mode,
        bytes=_model_bytes(t, backward),
    )
    benchmark(timed(step))


def test_copy_bandwidth(benchmark, describe):
    """The device's copy bandwidth, measured in the same run, at the largest activation."""
    src = torch.randn(BATCH, 64, 112, 112, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    timed(lambda: dst.copy_(src))()
    describe(
        op="copy",
        shape=list(src.shape),
        impl="torch",
        mode="copy",
        bytes=2 * src.numel() * src.element_size(),
    )
    benchmark(timed(lambda: dst.copy_(src)))
