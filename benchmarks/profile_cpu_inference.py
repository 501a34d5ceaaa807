"""Where bfloat16 CPU inference of ResNet-50 spends its time: fastres against OpenVINO.

Usage: python benchmarks/profile_cpu_inference.py --batch-size 1 --threads 1

A breakdown, not a benchmark (``python -m fastres.bench.cpu_inference`` compares them, in
interleaved rounds). For one input, in one process:

* OpenVINO at its default precision: the layers' own times from its performance counters
  (``PERF_COUNT``), summed by layer type and kernel;
* fastres with the model cast to bfloat16, block by block through ATen's oneDNN ops: the
  kernels' execution times from oneDNN's verbose log, the time torch's profiler gives each ATen
  op (the kernels plus ATen's per-call work); what wall time has beyond the ATen ops is Python;
* the median wall time over ``--calls`` calls of that, of the whole-network oneDNN program
  (fastres/plans/folded_program.py; its kernels' times: ONEDNN_VERBOSE=1), and of OpenVINO.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torchvision
from script_args import require_positive

import fastres
from fastres.backends import onednn_program_class
from fastres.bench.peers import export_onnx
from fastres.plans import folded_program
from fastres.plans.folded_convolution import onednn_verbose_log


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10, help="calls profiled and timed")
    args = parser.parse_args()
    require_positive(parser, args, "batch_size", "threads", "calls")
    return args


def median_ms(step: Callable[[], object], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def openvino_layers(path: str, feed, threads: int, calls: int) -> tuple[dict, Callable]:
    """ms per call by (layer type, kernel), and the inference step."""
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": "YES"}
    request = ov.Core().compile_model(path, "CPU", config).create_infer_request()
    for _ in range(3):
        request.infer({0: feed})
    layers: dict[tuple[str, str], float] = defaultdict(float)
    for _ in range(calls):
        request.infer({0: feed})
        for layer in request.get_profiling_info():
            key = (layer.node_type, layer.exec_type)
            layers[key] += layer.real_time.total_seconds() * 1e3 / calls
    return layers, lambda: request.infer({0: feed})


def onednn_kernels(step: Callable[[], object], calls: int) -> dict[str, float]:
    """ms per call by oneDNN kernel, from torch's oneDNN's verbose log."""

    def steps() -> None:
        for _ in range(calls):
            step()

    kernels: dict[str, float] = defaultdict(float)
    for line in onednn_verbose_log(steps):
        fields = line.strip().split(",")
        if len(fields) > 7 and fields[2] == "primitive" and fields[3] == "exec":
            kernels[f"{fields[5]} {fields[6]}"] += float(fields[-1]) / calls
    return kernels


def aten_ops(step: Callable[[], object], calls: int) -> dict[str, float]:
    """ms per call of each op's own CPU time, from torch's profiler."""
    with torch.profiler.profile() as profiler:
        for _ in range(calls):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / calls for e in profiler.key_averages()}


def print_top(title: str, times: dict, top: int = 8) -> None:
    print(f"{title}: {sum(times.values()):.2f} ms per call")
    for name, ms in sorted(times.items(), key=lambda item: -item[1])[:top]:
        print(f"  {ms:8.2f}  {name}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    fast = fastres.convert(copy.deepcopy(reference)).eval().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)

    def program_step() -> object:
        with torch.no_grad():
            return fast(xb)

    def per_block_step() -> object:
        with torch.no_grad(), per_block_path():
            return fast(xb)

    for _ in range(3):
        program_step(), per_block_step()
    with tempfile.TemporaryDirectory(prefix="fastres-profile-") as folder:
        path, _ = export_onnx(reference, x, folder)
        layers, openvino_step = openvino_layers(path, x.numpy(), args.threads, args.calls)
    print(f"ResNet-50, batch {args.batch_size}, {args.threads} threads, bfloat16")
    print_top("OpenVINO layers (performance counters)", layers)
    print("fastres block by block (ATen's oneDNN ops):")
    print_top("  oneDNN kernels (verbose log)", onednn_kernels(per_block_step, args.calls))
    ops = aten_ops(per_block_step, args.calls)
    print_top("  ATen ops (profiler, own time)", ops)
    per_block_ms = median_ms(per_block_step, args.calls)
    program = "the whole-network oneDNN program"
    if onednn_program_class() is None:
        program += " (not built: the block-by-block path again)"
    print(
        f"wall, median of {args.calls}: fastres block by block {per_block_ms:.2f} ms (outside "
        f"ATen ops: {per_block_ms - sum(ops.values()):.2f} ms), {program} "
        f"{median_ms(program_step, args.calls):.2f} ms, OpenVINO "
        f"{median_ms(openvino_step, args.calls):.2f} ms"
    )
    print("(the program's own oneDNN kernels: run with ONEDNN_VERBOSE=1 and sum exec times)")


@contextlib.contextmanager
def per_block_path() -> Iterator[None]:
    """FastResNet's blocks one by one through ATen's ops: the program switched off."""
    saved = folded_program.onednn_program_class
    folded_program.onednn_program_class = lambda: None
    try:
        yield
    finally:
        folded_program.onednn_program_class = saved


if __name__ == "__main__":
    main()
