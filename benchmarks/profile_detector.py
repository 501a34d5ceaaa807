"""Where an Ultralytics detector's CPU time goes: fastres against Ultralytics' own model.

Usage: python benchmarks/profile_detector.py [--model yolo11n] [--batch-size 8]
       [--image-size 640] [--threads 2] [--dtype fp32|bf16] [--calls 3]

A breakdown, not a benchmark (``python -m fastres.bench --model ultralytics:yolo11n`` compares
them in interleaved rounds). torch's profiler, self CPU time per op summed over ``--calls``
calls after two warm-up calls, for:

* inference without autograd: Ultralytics' ``model.fuse()``d model (BatchNorm folded into each
  convolution, SiLU its own pass) and fastres's converted model (folded convolutions with SiLU,
  and the Bottleneck's add, as oneDNN post-ops);
* a training step (forward, backward of the sum of the outputs): Ultralytics' model and
  fastres's.

Last, the cost of one module call itself: an Ultralytics ``Conv`` (16 channels, 3x3) on a
1x16x4x4 input, ``fuse()``d against fastres's, interleaved.

Each table lists the ops above 1% of its total, then the total. For inference, also the wall,
user and system seconds and the minor page faults per call (``getrusage`` over ``--calls``
calls): at batch 8 and 640 pixels many activations are above glibc's 32 MiB mmap threshold, so
each call page-faults fresh memory, in the kernel's time rather than any op's. Run with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` to keep glibc from returning that
memory, and the page faults go (the header names the settings).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import time

import torch
from script_args import require_positive
from torch.profiler import ProfilerActivity, profile
from ultralytics.utils.torch_utils import fuse_conv_and_bn

import fastres
from fastres.bench.models import build_reference


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["yolo11n", "yolov8n", "yolo26n"], default="yolo11n")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    require_positive(parser, args, "batch_size", "image_size", "threads", "calls")
    return args


def _self_times(step, calls: int) -> dict[str, float]:
    """Milliseconds of self CPU time per op over ``calls`` calls of ``step``."""
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def _os_costs(step, calls: int) -> str:
    """Wall, user and system seconds and minor page faults per call of ``step`` (warm)."""
    step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        step()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return (
        f"per call: {1e3 * wall / calls:.0f} ms wall, "
        f"{1e3 * (after.ru_utime - before.ru_utime) / calls:.0f} ms user, "
        f"{1e3 * (after.ru_stime - before.ru_stime) / calls:.0f} ms system, "
        f"{(after.ru_minflt - before.ru_minflt) / calls:.0f} minor page faults"
    )


def _module_call_costs(rounds: int = 30, calls: int = 100) -> str:
    """Median microseconds per call of one Ultralytics Conv, fuse()d and fastres's, on a tiny
    input where the arithmetic is negligible: the per-module dispatch."""
    from ultralytics.nn.modules.conv import Conv

    torch.manual_seed(0)
    conv = Conv(16, 16, 3).eval()
    fast = fastres.convert(torch.nn.Sequential(copy.deepcopy(conv)), backend="cpu").eval()
    fused = copy.deepcopy(conv)
    fused.conv, fused.forward = fuse_conv_and_bn(fused.conv, fused.bn), fused.forward_fuse
    del fused.bn
    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    seconds: dict[str, list[float]] = {"fuse()d": [], "fastres": []}
    with torch.no_grad():
        for _ in range(rounds):
            for name, module in (("fuse()d", fused), ("fastres", fast)):
                start = time.perf_counter()
                for _ in range(calls):
                    module(x)
                seconds[name].append((time.perf_counter() - start) / calls)
    return ", ".join(f"{n} {1e6 * statistics.median(s):.0f} us" for n, s in seconds.items())


def _print(title: str, times: dict[str, float]) -> None:
    total = sum(times.values())
    print(f"\n{title}: {total:.0f} ms self CPU time")
    for name, ms in sorted(times.items(), key=lambda item: -item[1]):
        if ms >= 0.01 * total:
            print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {name}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    reference = build_reference(f"ultralytics:{args.model}", "cpu")  # with its detection loss
    fast = fastres.convert(reference, backend="cpu")
    fused = copy.deepcopy(reference.model).eval().fuse(verbose=False)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=args.dtype == "bf16")
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size} px, {args.dtype}, "
        f"{args.threads} threads, {args.calls} calls; {fastres.info()['cpu_isa']}; "
        f"glibc malloc settings: {malloc or 'defaults'}"
    )

    inference = (("inference, Ultralytics fuse()d", fused), ("inference, fastres", fast))
    for title, model in inference:
        model.eval()

        def infer(model=model) -> None:
            with torch.no_grad(), autocast:
                model(x)

        _print(title, _self_times(infer, args.calls))
        print("  " + _os_costs(infer, args.calls))

    print(f"\none Conv call on a 1x16x4x4 input: {_module_call_costs()}")

    training = (("training step, Ultralytics", reference), ("training step, fastres", fast))
    for title, model in training:
        model.train()

        def train_step(model=model) -> None:
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = model(x)
            loss.backward()

        _print(title, _self_times(train_step, args.calls))


if __name__ == "__main__":
    main()
