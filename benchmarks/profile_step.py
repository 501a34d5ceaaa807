"""Where a training step of one bottleneck spends its device time, kernel by kernel.

Usage: python benchmarks/profile_step.py --device cuda --csv OUT/profile.csv
       (a phase of the GPU check; on CPU it runs the same code at a toy size, interpreted)

A ``FastBottleneck`` of ResNet-50's first stage (256 -> 64 -> 256 channels, 56 x 56 at batch 256
on a GPU) on the ``triton`` backend, channels_last, under bf16 autocast on a GPU, runs a few
warm-up steps (autotuning, compilation), then ``--steps`` forward + backward steps under
``torch.profiler``. The table has each kernel's device time per step and its share of the
step, largest first; the rows named ``finalize`` are the statistics and gradient merges whose
cost the convolutions' per-tile partials decide. Times are the profiler's, for one step's shape:
a breakdown, not a benchmark (fastres.bench and layer_table.py time configurations against each
other).
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

import torch
from script_args import require_device, require_positive
from torch.profiler import ProfilerActivity, profile


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 2 on CPU")
    parser.add_argument("--side", type=int, help="input height and width (default: 56, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="kernels to print")
    parser.add_argument("--csv", required=True, help="where to write the table")
    args = parser.parse_args()
    on_gpu = require_device(parser, args.device)
    args.batch_size = args.batch_size or (256 if on_gpu else 2)
    args.side = args.side or (56 if on_gpu else 8)
    require_positive(parser, args, "batch_size", "side", "steps", "top")
    return args


def training_step(args):
    """One forward + backward of a first-stage bottleneck on the triton backend."""
    from fastres import FastBottleneck

    block = FastBottleneck(256, 64, backend="triton").to(args.device)
    block = block.to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch_size, 256, args.side, args.side, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    on_gpu = args.device == "cuda"

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=on_gpu):
            out = block(x)
        out.float().sum().backward()

    return step


def kernel_times(prof, device: str, steps: int) -> list[tuple[str, int, float]]:
    """(kernel, calls per step, microseconds per step), largest first: device kernels on a GPU,
    the operators' own time on CPU."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.key_averages():
        us = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
        if us <= 0 or (device == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        totals[event.key][0] += event.count
        totals[event.key][1] += us
    rows = [(name, round(calls / steps), us / steps) for name, (calls, us) in totals.items()]
    return sorted(rows, key=lambda row: -row[2])


def main() -> int:
    args = parse_args()
    step = training_step(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(3):  # autotuning, compilation, allocator
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    rows = kernel_times(prof, args.device, args.steps)
    total = sum(us for _, _, us in rows)
    finalize = sum(us for name, _, us in rows if "finalize" in name)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"FastBottleneck(256, 64) training step, triton backend, batch {args.batch_size}, "
        f"{args.side} px, on {device_name}: {total / 1e3:.3f} ms of "
        f"{'device' if args.device == 'cuda' else 'operator'} time per step; finalize kernels "
        f"{finalize / 1e3:.3f} ms ({100 * finalize / total if total else 0:.1f}%)"
    )
    print(f"{'kernel':<72}{'calls':>6}{'us/step':>12}{'share':>8}")
    for name, calls, us in rows[: args.top]:
        print(f"{name[:71]:<72}{calls:>6}{us:>12.1f}{100 * us / total:>7.1f}%")
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device", "batch_size", "side", "kernel", "calls", "us_per_step", "share"])
        for name, calls, us in rows:
            writer.writerow(
                [
                    device_name,
                    args.batch_size,
                    args.side,
                    name,
                    calls,
                    f"{us:.1f}",
                    f"{us / total:.4f}",
                ]
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
