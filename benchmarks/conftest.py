"""Shared settings of the microbenchmarks (pytest-benchmark).

Environment variables:
  FASTRES_BENCH_DEVICE  cpu or cuda (default: cuda when a GPU is present)
  FASTRES_BENCH_BATCH   batch size (default: 256 on a GPU, 8 on CPU)
  FASTRES_BENCH_DTYPE   float32, bfloat16 or float16 (default: bfloat16 on a GPU, float32 on CPU)
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import fastres  # noqa: F401  (registers torch.ops.fastres.*)

DEVICE = os.environ.get("FASTRES_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE == "cuda"
BATCH = int(os.environ.get("FASTRES_BENCH_BATCH", 256 if ON_GPU else 8))
DTYPE = getattr(torch, os.environ.get("FASTRES_BENCH_DTYPE", "bfloat16" if ON_GPU else "float32"))


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(fn):
    """What pytest-benchmark times: fn, then a device synchronisation so GPU work is counted."""

    def run():
        result = fn()
        synchronize()
        return result

    return run


@pytest.fixture
def describe(benchmark):
    """Stores the facts report.py needs beside each measurement."""

    def record(**facts):
        benchmark.extra_info.update(
            device=device_name(),
            device_type=DEVICE,
            batch=BATCH,
            dtype=str(DTYPE).replace("torch.", ""),
            torch=torch.__version__,
            **facts,
        )

    return record
