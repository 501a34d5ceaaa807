"""Multi-process runs of synchronized BatchNorm, compared with one process on the whole batch.

``run_group`` starts ``world_size`` processes (torch.multiprocessing, spawn) that join one
torch.distributed group (gloo for CPU, NCCL for CUDA) and run every named scenario. Each process
holds a slice of the same global batch, of unequal sizes (zero included), trains a fastres model
with ``sync_bn=True`` under DistributedDataParallel, and compares, on its own slice and with its
own buffers, against torchvision's model trained in one process on the whole batch: outputs,
input gradients, every parameter gradient after DDP's all-reduce, parameters after an SGD step,
and every buffer (running statistics, num_batches_tracked). The parent gets, per scenario and
rank, "ok" or the failure's traceback. Scenarios cover default BatchNorms and ("variants")
momentum=None, affine=False with another eps, and another momentum.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.resnet import Bottleneck, conv1x1

import fastres
from fastres import FastBottleneck, SyncBatchNorm2d
from fastres.testing import ERROR_FACTOR, FLOOR_ULPS, assert_within_error_factor

# Per-process batch sizes: unequal, one process with a single sample (one value per channel at
# the smallest feature maps), one with none.
BATCHES = {2: [4, 1], 3: [2, 0, 3]}
STEPS = 2

# name -> (model, backend, dtype)
SCENARIOS = {
    "blocks-cpu-float64": ("blocks", "cpu", torch.float64),
    "resnet-cpu-float64": ("resnet", "cpu", torch.float64),
    "resnet-cpu-float32": ("resnet", "cpu", torch.float32),
    "blocks-torch-float64": ("blocks", "torch", torch.float64),
    "variants-cpu-float64": ("variants", "cpu", torch.float64),
    "resnet-torch-float64": ("resnet", "torch", torch.float64),
    "blocks-triton-float32": ("blocks", "triton", torch.float32),
    "blocks-cuda-float32": ("blocks", "cuda", torch.float32),
    "resnet-cuda-float32": ("resnet", "cuda", torch.float32),
}


# ---------------------------------------------------------------------------------------------
# Models and data


def _randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, so that every term is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.uniform_(-0.5, 0.5, generator=generator)
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


# BatchNorm settings of the two blocks and the downsample branch: the defaults, or ("variants")
# momentum=None (a cumulative average), affine=False with another eps, and another momentum.
NORMS = {
    "blocks": (nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d),
    "variants": (
        partial(nn.BatchNorm2d, momentum=None),
        partial(nn.BatchNorm2d, affine=False, eps=1e-3),
        partial(nn.BatchNorm2d, momentum=0.3),
    ),
}


def _stack(kind: str, block=Bottleneck, **options) -> nn.Module:
    """Two Bottlenecks, the second with stride 2 and a downsample branch."""
    first, second, branch = NORMS[kind]
    downsample = nn.Sequential(conv1x1(16, 32, stride=2), branch(32))
    return nn.Sequential(
        block(16, 4, norm_layer=first, **options),
        block(16, 8, stride=2, downsample=downsample, norm_layer=second, **options),
    )


def _fast_blocks(kind: str, reference: nn.Module, backend: str) -> nn.Module:
    """The same stack built from FastBottleneck(sync_bn=True), loaded from the reference."""
    fast = _stack(kind, FastBottleneck, backend=backend, sync_bn=True)
    fast.load_state_dict(reference.state_dict())
    return fast


def _models(kind: str, backend: str, dtype: torch.dtype, device: torch.device):
    """(fast model, float64 reference, reference in ``dtype``), all with the same weights."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind in NORMS:
        reference = _stack(kind)
    else:
        reference = torchvision.models.resnet18(num_classes=5)
    _randomise_batch_norms(reference, generator)
    reference = reference.to(device=device, memory_format=torch.channels_last)
    if kind in NORMS:
        fast = _fast_blocks(kind, reference, backend)
    else:
        fast = fastres.convert(reference, backend=backend, sync_bn=True)
    assert all(type(m) is not nn.BatchNorm2d for m in fast.modules()), "a BatchNorm is not synced"
    assert any(isinstance(m, SyncBatchNorm2d) for m in fast.modules())
    fast = fast.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return (fast, copy.deepcopy(reference).to(torch.float64), copy.deepcopy(reference).to(dtype))


def _batches(kind: str, device: torch.device):
    """STEPS global batches of inputs and output weights (the loss is sum(out * weights))."""
    generator = torch.Generator().manual_seed(1)
    total = 5
    shape = (total, 16, 8, 8) if kind in NORMS else (total, 3, 32, 32)
    out_shape = (total, 32, 4, 4) if kind in NORMS else (total, 5)
    xs = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(STEPS)]
    ws = [torch.randn(out_shape, generator=generator, dtype=torch.float64) for _ in range(STEPS)]
    return (
        [x.to(device).contiguous(memory_format=torch.channels_last) for x in xs],
        [w.to(device) for w in ws],
    )


# ---------------------------------------------------------------------------------------------
# Comparison


class _Checker:
    """float64: tight against the float64 reference; other dtypes: the error-factor rule of
    fastres/testing.py against the float64 reference and torchvision in the same dtype."""

    def __init__(self, dtype: torch.dtype, scenario: str, rank: int):
        self.dtype, self.where = dtype, f"{scenario} rank {rank}"

    def __call__(self, actual, reference64, reference_low, what: str, grad: bool = False):
        what = f"{self.where}: {what}"
        assert actual.shape == reference64.shape, f"{what}: shape {actual.shape}"
        if not reference64.dtype.is_floating_point:
            assert torch.equal(actual.cpu(), reference64.cpu()), (
                f"{what}: {actual} != {reference64}"
            )
        elif self.dtype == torch.float64:
            rtol = 1e-8 if grad else 1e-10
            torch.testing.assert_close(
                actual, reference64, rtol=rtol, atol=1e-10, msg=lambda m: f"{what}: {m}"
            )
        else:
            magnitude = reference64.abs().max().item() if reference64.numel() else 0.0
            assert_within_error_factor(
                actual.cpu(),
                reference_low.cpu(),
                reference64.cpu(),
                what,
                self.dtype,
                term_magnitude=magnitude,
            )


def _relative_error(values, reference) -> float:
    diff = torch.cat(
        [(v.double() - r.double()).flatten().cpu() for v, r in zip(values, reference, strict=True)]
    )
    norm = torch.cat([r.double().flatten().cpu() for r in reference]).norm()
    return (diff.norm() / norm).item()


def _check_model_wide(
    check: _Checker, actual, reference64, reference_low, what: str, grad: bool = False
) -> None:
    """After a parameter update, low-precision values of a deep random network are chaotic per
    tensor (PyTorch's own float32 gradients are off by tens of percent in places), so they are
    judged by the error-factor rule on the norm over all of them; float64 stays per tensor.
    Integer tensors (num_batches_tracked) must be equal."""
    floating = []
    for (name, a), r64, r_low in zip(actual, reference64, reference_low, strict=True):
        if check.dtype == torch.float64 or not r64.dtype.is_floating_point:
            check(a, r64, r_low, f"{what}: {name}", grad=grad)
        else:
            floating.append((a, r64, r_low))
    if not floating:
        return
    actual, reference64, reference_low = (list(t) for t in zip(*floating, strict=True))
    ours = _relative_error(actual, reference64)
    theirs = _relative_error(reference_low, reference64)
    floor = FLOOR_ULPS * torch.finfo(check.dtype).eps
    assert ours <= ERROR_FACTOR * theirs + floor, (
        f"{check.where}: {what}: relative error {ours:.3g} over all tensors exceeds "
        f"{ERROR_FACTOR} x PyTorch's {theirs:.3g} + {floor:.3g}"
    )


def _run_training(model, x, weights, scale=1.0):
    """Forward and backward of ``scale * sum(out * weights)``; returns the output and the
    gradient of the unscaled loss with respect to x."""
    x = x.clone().requires_grad_()
    out = model(x)
    (out * weights.to(out.dtype)).sum().mul(scale).backward()
    return out.detach(), x.grad / scale


def _ddp_without_buffer_sync(model: nn.Module) -> DistributedDataParallel:
    """DDP that leaves buffers alone in forward: each process's running statistics must be
    right on their own (the option was renamed in newer torch)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def run_scenario(name: str, rank: int, world_size: int, device: torch.device) -> None:
    kind, backend, dtype = SCENARIOS[name]
    fast, reference64, reference_low = _models(kind, backend, dtype, device)
    check = _Checker(dtype, name, rank)
    sizes = BATCHES[world_size]
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    ddp = _ddp_without_buffer_sync(fast)
    models = (ddp, reference64, reference_low)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    xs, ws = _batches(kind, device)
    for step, (x, w) in enumerate(zip(xs, ws, strict=True)):
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=False)
        # DDP averages gradients over processes; the loss scale makes that the global sum.
        out, grad_x = _run_training(ddp, x[mine].to(dtype), w[mine], scale=world_size)
        out64, grad_x64 = _run_training(reference64, x, w)
        out_low, grad_x_low = _run_training(reference_low, x.to(dtype), w)
        check(out, out64[mine], out_low[mine], f"step {step} output")
        check(grad_x, grad_x64[mine], grad_x_low[mine], f"step {step} input gradient", grad=True)
        grads = [(name, p.grad) for name, p in fast.named_parameters()]
        grads64 = [p.grad for p in reference64.parameters()]
        grads_low = [p.grad for p in reference_low.parameters()]
        # Every parameter gradient by the rule on the norm over all of them (float64: each
        # tensor on its own, tightly). Even at step 0 one float32 tensor alone judges rounding
        # luck: a BatchNorm bias gradient sums hundreds of terms, and PyTorch's own error on
        # one of them (blocks, 0.bn2.bias: 4.5e-6) can be a quarter of its error on the others
        # (1.6e-5 to 1.8e-5), where the fused path's is 1.2e-5 to 1.4e-5 on all of them in one
        # process and, split over two, a few ulp more on the tensor PyTorch got lucky on.
        _check_model_wide(check, grads, grads64, grads_low, f"step {step} grads", grad=True)
        for optimizer in optimizers:
            optimizer.step()
    _check_model_wide(
        check,
        list(fast.named_buffers()),
        list(reference64.buffers()),
        list(reference_low.buffers()),
        f"buffers after {STEPS} steps",
    )
    _check_model_wide(
        check,
        list(fast.named_parameters()),
        list(reference64.parameters()),
        list(reference_low.parameters()),
        f"parameters after {STEPS} steps",
    )
    # Eval communicates nothing and uses the (synchronised) running statistics.
    for m in models:
        m.eval()
    with torch.no_grad():
        check(
            ddp(xs[0][mine].to(dtype)),
            reference64(xs[0])[mine],
            reference_low(xs[0].to(dtype))[mine],
            "eval output",
        )


# ---------------------------------------------------------------------------------------------
# Processes


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    result_dir: str,
    device_type: str,
    scenarios: list[str],
) -> None:
    torch.set_num_threads(1)  # several processes share this machine's cores
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    results = {}
    for name in scenarios:
        try:
            run_scenario(name, rank, world_size, device)
            results[name] = "ok"
        except Exception:  # recorded for the parent, which fails the scenario's test
            results[name] = traceback.format_exc()
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(results))
        if results[name] != "ok":
            # The other processes may be waiting in a collective: leaving now makes theirs fail
            # at once (connection closed) instead of after the group's timeout.
            os._exit(1)
    dist.destroy_process_group()


def run_group(
    world_size: int, scenarios: list[str], device_type: str, workdir: Path, timeout_s: float = 900
) -> dict[str, dict[int, str]]:
    """Runs the scenarios in ``world_size`` processes; returns {scenario: {rank: result}}."""
    init_file = workdir / "init"
    context = mp.start_processes(
        _worker,
        nprocs=world_size,
        join=False,
        start_method="spawn",
        args=(world_size, str(init_file), str(workdir), device_type, scenarios),
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} processes did not finish in {timeout_s} s")
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        pass  # a failed scenario: the result files say which, and why
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results: dict[str, dict[int, str]] = {name: {} for name in scenarios}
    for rank in range(world_size):
        path = workdir / f"rank{rank}.json"
        per_rank = json.loads(path.read_text()) if path.exists() else {}
        for name in scenarios:
            results[name][rank] = per_rank.get(name, "no result (the process ended early)")
    return results
