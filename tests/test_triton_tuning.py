"""How the Triton convolutions choose their tiles: Triton's autotuning, its on-disk cache, what
tuning_report() says it cost, and the fixed configurations of deterministic mode.

Under the interpreter each kernel has one configuration and Triton never autotunes; these tests
give the real kernels' autotuners two configurations and replace their benchmark by a stub that
ranks them, so that the launch path (fastres.triton.conv._launch and triton's Autotuner.run) runs
as on a GPU, at small shapes.
"""

import time

import pytest
import torch
import triton

from fastres.ops.fused_conv2d import (
    bn_act_conv2d_stats_backward_triton,
    bn_act_conv2d_stats_triton,
)
from fastres.triton import conv as triton_conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [
    triton_conv._conv_forward_kernel,
    triton_conv._conv_input_grad_kernel,
    triton_conv._conv_weight_grad_kernel,
]


def _two_configs(kernel) -> tuple[triton.Config, triton.Config]:
    """The kernel's first configuration and one with other tiles (every BLOCK_* changed: the
    order of every sum the tiles decide changes)."""
    first = kernel.configs[0]
    other = {name: 64 if size <= 32 else 16 for name, size in first.kwargs.items()}
    return first, triton.Config(other, num_warps=first.num_warps, num_stages=first.num_stages)


class _RankedBench:
    """A stand-in for Autotuner._bench: ranks configurations by ``order`` (fastest first)
    without running them, and records what it was asked to time."""

    def __init__(self):
        self.order: list[triton.Config] = []
        self.timed: list[triton.Config] = []

    def __call__(self, *args, config, **kwargs):
        self.timed.append(config)
        time.sleep(0.01)  # a benchmark takes time: tuning_report() must see it
        return [float(self.order.index(config) + 1)] * 3


@pytest.fixture
def two_configs(monkeypatch):
    """Every convolution kernel autotunes over two configurations, with a fresh cache, a stub
    benchmark, a fresh tuning_report() and no benchmark time left from earlier tests."""
    bench = _RankedBench()
    pairs = {}
    for kernel in KERNELS:
        pairs[kernel.base_fn.__name__] = _two_configs(kernel)
        monkeypatch.setattr(kernel, "configs", list(pairs[kernel.base_fn.__name__]))
        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setattr(kernel, "_bench", bench)
        monkeypatch.delattr(kernel, "bench_time", raising=False)
    monkeypatch.setattr(triton_conv, "_TUNING", {})
    return bench, pairs


def _convolution(n=2):
    """x (n, 24, 6, 6) channels_last, a 3x3 weight (32, 24, 3, 3), a BatchNorm for the prologue,
    float32: 24 input channels take the per-channel-block reduction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 24, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 24, 3, 3, generator=gen) / 15
    bn = [torch.randn(24, generator=gen), torch.rand(24, generator=gen) + 0.5]
    bn += [torch.rand(24, generator=gen) + 0.5, torch.randn(24, generator=gen)]
    grad = torch.randn(n, 32, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
    return [t.to(DEVICE) for t in (x, weight, grad, *bn)]


def _forward(x, weight, bn):
    return bn_act_conv2d_stats_triton(x, weight, *bn, True, 1e-5, "relu", 1, 1, 1, 1, True)


def _step(x, weight, grad, *bn):
    """The three kernels: forward with statistics, input gradient (with BatchNorm's backward
    sums), weight gradient: (out, mean, var, grad_x, grad_w, grad_bn_weight, grad_bn_bias)."""
    out, mean, var = _forward(x, weight, bn)
    grads = bn_act_conv2d_stats_backward_triton(
        grad, x, weight, *bn, True, 1e-5, "relu", 1, 1, 1, 1, True, True
    )
    return (out, mean, var, *grads)


# ---------------------------------------------------------------------------------------------
# Triton's autotuning disk cache (TRITON_CACHE_AUTOTUNING=1)


def _disk_cache(kernel, disk: dict):
    """A stand-in for Autotuner.check_disk_cache (triton 3.6.0 and 3.7.1 alike): a tuning found
    on ``disk`` sets the kernel's cache and returns True without benchmarking (so without
    setting bench_time); else it benchmarks, stores the choice and returns False."""

    def check_disk_cache(tuning_key, configs, bench_fn):
        if tuning_key in disk:
            kernel.cache[tuning_key] = disk[tuning_key]
            kernel.configs_timings = {disk[tuning_key]: [1.0] * 3}
            return True
        bench_fn()
        disk[tuning_key] = kernel.cache[tuning_key]
        return False

    return check_disk_cache


def _from_disk(monkeypatch, kernel, disk: dict) -> None:
    monkeypatch.setattr(kernel, "cache_results", True)
    monkeypatch.setattr(kernel, "check_disk_cache", _disk_cache(kernel, disk))


def test_a_tuning_loaded_from_the_disk_cache_is_reported_without_a_time(two_configs, monkeypatch):
    """A process whose every tuning is on disk never benchmarks: the launch must neither crash
    (Triton sets bench_time only when it benchmarks) nor invent a time."""
    bench, pairs = two_configs
    kernel = triton_conv._conv_forward_kernel
    bench.order = list(pairs[kernel.base_fn.__name__])
    disk: dict = {}
    _from_disk(monkeypatch, kernel, disk)
    x, weight, _, *bn = _convolution()
    _forward(x, weight, bn)  # tunes, as the process that filled the disk cache did
    monkeypatch.setattr(kernel, "cache", {})  # a new process: only the disk cache is left
    monkeypatch.delattr(kernel, "bench_time")
    monkeypatch.setattr(triton_conv, "_TUNING", {})
    bench.timed.clear()
    _forward(x, weight, bn)
    assert not bench.timed
    cost = triton_conv.tuning_report()["_conv_forward_kernel"]
    assert (cost.shapes, cost.seconds, cost.from_disk_cache) == (0, 0.0, 1)


def test_a_tuning_from_disk_after_a_benchmarked_one_adds_no_stale_time(two_configs, monkeypatch):
    """In a process that benchmarked one shape, a tuning then found on disk for another must
    not add the earlier benchmark's time again."""
    bench, pairs = two_configs
    kernel = triton_conv._conv_forward_kernel
    bench.order = list(pairs[kernel.base_fn.__name__])
    x, weight, _, *bn = _convolution(n=2)
    x4 = torch.cat([x, x]).contiguous(memory_format=torch.channels_last)  # another bucket
    disk: dict = {}
    _from_disk(monkeypatch, kernel, disk)
    _forward(x4, weight, bn)  # fills the disk cache for the second shape
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(triton_conv, "_TUNING", {})
    _forward(x, weight, bn)  # benchmarks
    benchmarked = triton_conv.tuning_report()["_conv_forward_kernel"]
    assert benchmarked.shapes == 1 and benchmarked.seconds >= 0.02  # 2 configurations, 10 ms
    _forward(x4, weight, bn)  # from disk
    cost = triton_conv.tuning_report()["_conv_forward_kernel"]
    assert (cost.seconds, cost.shapes) == (benchmarked.seconds, 1)
    assert (benchmarked.from_disk_cache, cost.from_disk_cache) == (0, 1)


# ---------------------------------------------------------------------------------------------
# Deterministic mode


def _tuned_then_deterministic(bench, pairs, ranking: int):
    """With fresh caches, the step autotuned with the configurations ranked ``ranking`` (0: in
    order, 1: reversed), then the same step again in deterministic mode (the shapes now
    tuned), and the configurations deterministic mode benchmarked."""
    for kernel in KERNELS:
        kernel.cache = {}
    bench.order = [
        c for name in pairs for c in (pairs[name] if ranking == 0 else pairs[name][::-1])
    ]
    inputs = _convolution()
    timed = _step(*inputs)
    bench.timed.clear()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = _step(*inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    return timed, deterministic, list(bench.timed)


def test_deterministic_mode_gives_the_same_bits_whatever_the_timings(two_configs):
    """Two processes whose benchmarks rank the tiles differently: autotuned, the three kernels'
    results differ in their bits (the tiles fix the order of the sums); in deterministic mode
    each kernel runs its one pinned configuration, even at a shape tuned before, and the bits
    are the same."""
    bench, pairs = two_configs
    timed_0, deterministic_0, benchmarked_0 = _tuned_then_deterministic(bench, pairs, 0)
    timed_1, deterministic_1, benchmarked_1 = _tuned_then_deterministic(bench, pairs, 1)
    names = ["out", "mean", "var", "grad_x", "grad_w", "grad_bn_weight", "grad_bn_bias"]
    differ = {n for n, a, b in zip(names, timed_0, timed_1, strict=True) if not torch.equal(a, b)}
    # One output of each kernel: the forward, the input gradient, the weight gradient.
    assert {"out", "grad_x", "grad_w"} <= differ, differ
    for name, a, b in zip(names, deterministic_0, deterministic_1, strict=True):
        assert torch.equal(a, b), name
    assert not benchmarked_0 and not benchmarked_1, "deterministic mode benchmarked"
