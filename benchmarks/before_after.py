"""Two fastres source trees, timed against each other in interleaved rounds: is a change that
should not alter speed (a refactor of the dispatch, say) level within noise?

    python benchmarks/before_after.py --before /path/to/old/checkout [--after .] \\
        [--rounds 15] [--threads 2] [--out results.csv]

Each tree must have its extension built in place (``python setup.py build_ext --inplace``).
One worker process per tree imports fastres from that tree and builds the same models from the
same seed; each round runs every configuration once in each worker, in an order that alternates
between rounds, so both trees see the same machine state. Printed and written: per
configuration, each tree's median seconds and the median, 25th and 75th percentile of the
per-round ratio after / before.

Configurations (CPU, the ``cpu`` backend; ``--configs`` picks some): a ResNet-50 training step
(forward, backward, SGD) at batch 8 and 128 pixels; Hugging Face's ResNet-50 converted, in eval
under ``no_grad`` at batch 1 and 8 (224 pixels), where every block chooses its plan on every
call (torchvision's converted ResNet runs as one oneDNN program and chooses once); Ultralytics'
yolo11n converted, in eval under ``no_grad`` at batch 8 and 640 pixels, float32 and under
bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CONFIGS = (
    "resnet50 train step b8 128px",
    "hf resnet50 eval b1 224px",
    "hf resnet50 eval b8 224px",
    "yolo11n eval b8 640px",
    "yolo11n eval b8 640px bf16",
)
REPEATS = {"hf resnet50 eval b1 224px": 5}  # calls timed together where one call is short


def _resnet_calls() -> dict[str, Callable[[], None]]:
    import torch
    import torchvision
    from transformers import ResNetConfig, ResNetModel

    import fastres

    torch.manual_seed(0)
    train_model = fastres.convert(torchvision.models.resnet50(), backend="cpu").train()
    optimizer = torch.optim.SGD(train_model.parameters(), lr=0.01)
    train_x = torch.randn(8, 3, 128, 128)
    hf = fastres.convert(ResNetModel(ResNetConfig()), backend="cpu").eval()
    eval_x = {1: torch.randn(1, 3, 224, 224), 8: torch.randn(8, 3, 224, 224)}

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        train_model(train_x).sum().backward()
        optimizer.step()

    def infer(batch: int) -> None:
        with torch.no_grad():
            hf(eval_x[batch])

    return {
        CONFIGS[0]: train_step,
        CONFIGS[1]: lambda: infer(1),
        CONFIGS[2]: lambda: infer(8),
    }


def _yolo_calls() -> dict[str, Callable[[], None]]:
    import torch
    from ultralytics.nn.tasks import DetectionModel

    import fastres

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", verbose=False).to(memory_format=torch.channels_last)
    fast = fastres.convert(model, backend="cpu").eval()
    x = torch.randn(8, 3, 640, 640).contiguous(memory_format=torch.channels_last)

    def infer(bf16: bool) -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            fast(x)

    return {CONFIGS[3]: lambda: infer(False), CONFIGS[4]: lambda: infer(True)}


def _worker(threads: int, names: list[str]) -> None:
    """Builds the configurations ``names``, then times the one named on each stdin line."""
    import torch

    torch.set_num_threads(threads)
    calls = {}
    if set(names) & set(CONFIGS[:3]):
        calls.update(_resnet_calls())
    if set(names) & set(CONFIGS[3:]):
        calls.update(_yolo_calls())
    calls = {name: calls[name] for name in names}
    for call in calls.values():  # warm up: folded weights, oneDNN primitives, allocator
        call()
        call()
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        repeats = REPEATS.get(name, 1)
        start = time.perf_counter()
        for _ in range(repeats):
            calls[name]()
        print((time.perf_counter() - start) / repeats, flush=True)


def _start(tree: Path, threads: int, names: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OMP_NUM_THREADS=str(threads))
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--threads", str(threads), "--configs", *names],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tree,
    )
    assert worker.stdout is not None
    if worker.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the worker for {tree} did not start")
    return worker


def _time(worker: subprocess.Popen[str], name: str) -> float:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(name + "\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def _cpu() -> str:
    """The CPU's model name and the instruction sets that decide its kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return f"{model} ({' '.join(flag for flag in wanted if flag in flags)})"


def _commit(tree: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.threads, args.configs)
        return
    if args.before is None:
        parser.error("--before is required")
    workers = {
        "before": _start(args.before, args.threads, args.configs),
        "after": _start(args.after, args.threads, args.configs),
    }
    seconds: dict[tuple[str, str], list[float]] = {}
    for round_index in range(args.rounds):
        order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
        for name in args.configs:
            for tree in order:
                seconds.setdefault((name, tree), []).append(_time(workers[tree], name))
    for worker in workers.values():
        worker.terminate()

    rows = []
    for name in args.configs:
        before, after = seconds[(name, "before")], seconds[(name, "after")]
        ratio_q1, ratio, ratio_q3 = _quartiles([a / b for a, b in zip(after, before, strict=True)])
        rows.append(
            {
                "config": name,
                "before_median_s": f"{statistics.median(before):.5f}",
                "after_median_s": f"{statistics.median(after):.5f}",
                "after_over_before": f"{ratio:.3f}",
                "ratio_q1": f"{ratio_q1:.3f}",
                "ratio_q3": f"{ratio_q3:.3f}",
                "rounds": args.rounds,
                "threads": args.threads,
                "before_commit": _commit(args.before),
                "after_commit": _commit(args.after),
                "device": _cpu(),
            }
        )
        print(
            f"{name}: before {statistics.median(before) * 1e3:.1f} ms, after "
            f"{statistics.median(after) * 1e3:.1f} ms, after/before {ratio:.3f} "
            f"[{ratio_q1:.3f}-{ratio_q3:.3f}]"
        )
    if args.out:
        with args.out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
