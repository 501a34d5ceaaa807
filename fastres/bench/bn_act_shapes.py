"""``python -m fastres.bench.bn_act_shapes``: the fused BatchNorm + residual + ReLU op at every
ResNet-50 BatchNorm shape, against ATen's composition and ``torch.compile`` of it.

For each shape (batch 16 by default, channels_last, training mode), one run of interleaved rounds
(fastres.bench.interleaved) times, each as a forward (under ``no_grad``) and as a forward and
backward: fastres's ``bn_act``; ATen's ``batch_norm`` + add + ``relu`` (the ``torch`` backend, as
PyTorch runs the composition eagerly); the same in torchvision's in-place form (``out +=
identity``, ``relu(inplace=True)``, fewer buffers); and ``torch.compile`` of the composition.
Ratios are paired round by round. GB/s counts the fused computation's minimum traffic (each
tensor read or written once), the same bytes for every implementation, so GB/s ratios are speed
ratios.

The CSV records the device, the CPU's instruction sets and the build the C++ kernels run. The
target (CPU, bfloat16): forward and backward at least 1.5x ATen's composition at every shape.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastres.bench.interleaved import paired_speedups, spread_of, time_interleaved
from fastres.bench.report import device_name, fastres_commit, speedup_text, write_csv
from fastres.cpu_isa import cpu_isa, cpu_kernel_isa
from fastres.ops import bn_act
from fastres.ops.bn_act import bn_act_reference
from fastres.testing import RESNET50_BN_SHAPES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLEMENTATIONS = ("fastres", "aten", "aten_inplace", "compile")
MODES = ("forward", "forward_backward")
TARGET = {"mode": "forward_backward", "dtype": "bf16", "x_aten": 1.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastres.bench.bn_act_shapes",
        description="bn_act at every ResNet-50 BatchNorm shape against ATen and torch.compile.",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile of ATen's composition (compiles twice per shape)",
    )
    parser.add_argument("--out", default="benchmarks/results/local")
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    return args


def _inputs(shape: tuple[int, int, int, int], residual: bool, dtype: torch.dtype, device: str):
    """x, the affine parameters, running statistics, residual and the output gradient; the
    activations channels_last, the parameters float32 (as a model under autocast has them)."""
    channels = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return dict(
        x=x.requires_grad_(),
        weight=torch.rand(channels, device=device).add_(0.5).requires_grad_(),
        bias=torch.randn(channels, device=device).requires_grad_(),
        running_mean=torch.zeros(channels, device=device),
        running_var=torch.ones(channels, device=device),
        residual=torch.randn_like(x).requires_grad_() if residual else None,
        grad=torch.randn_like(x),
    )


def _traffic_bytes(t: dict, backward: bool) -> int:
    """Forward: x, residual and out, and the 1-bit ReLU mask; backward: grad_out, x, the mask,
    grad_x and grad_residual."""
    activation = t["x"].numel() * t["x"].element_size()
    mask = t["x"].numel() // 8
    has_residual = t["residual"] is not None
    forward = activation * (2 + has_residual) + mask
    return forward + (activation * (3 + has_residual) + mask if backward else 0)


def _function(implementation: str) -> Callable:
    def composed(x, weight, bias, running_mean, running_var, residual):
        return bn_act_reference(
            x, weight, bias, running_mean, running_var, residual=residual, training=True
        )

    def in_place(x, weight, bias, running_mean, running_var, residual):
        # torchvision's block: out += identity; relu(inplace=True)
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        if residual is not None:
            y += residual
        return F.relu_(y)

    def fused(x, weight, bias, running_mean, running_var, residual):
        return bn_act(x, weight, bias, running_mean, running_var, residual=residual, training=True)

    if implementation == "fastres":
        return fused
    if implementation == "aten_inplace":
        return in_place
    if implementation == "compile":
        return torch.compile(composed, fullgraph=True, dynamic=False)
    return composed


def _step(fn: Callable, t: dict, mode: str) -> Callable[[], object]:
    args = (t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], t["residual"])
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def forward() -> object:
        with torch.no_grad():
            return fn(*args)

    def forward_backward() -> object:
        for leaf in leaves:  # the op's own work, not the accumulation into .grad after it
            leaf.grad = None
        out = fn(*args)
        out.backward(t["grad"])
        return out

    return forward if mode == "forward" else forward_backward


def measure_shape(
    shape: tuple[int, int, int, int], residual: bool, args: argparse.Namespace
) -> list[dict]:
    """One interleaved run of every implementation and mode at one shape; a row for each."""
    t = _inputs(shape, residual, DTYPES[args.dtype], args.device)
    implementations = [name for name in IMPLEMENTATIONS if args.compile or name != "compile"]
    torch._dynamo.reset()  # one compiled function per shape, never near the recompile limit
    functions = {name: _function(name) for name in implementations}
    steps = {
        f"{name} {mode}": _step(functions[name], t, mode)
        for mode in MODES
        for name in implementations
    }
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    seconds = time_interleaved(steps, args.rounds, sync=sync, warmup=2)
    rows = []
    for mode in MODES:
        traffic = _traffic_bytes(t, mode == "forward_backward")
        for name in implementations:
            mine = seconds[f"{name} {mode}"]
            row = {
                "shape": "x".join(map(str, shape)),
                "residual": residual,
                "mode": mode,
                "implementation": name,
                **_spread_columns("ms", spread_of(mine), 1e3),
                "gb_s": traffic / spread_of(mine).median / 1e9,
            }
            for other in implementations[1:]:
                ratio = spread_of(paired_speedups(seconds[f"{other} {mode}"], mine))
                row.update(_spread_columns(f"x_{other}", ratio, 1.0))
            rows.append(row)
    return rows


def _spread_columns(name: str, spread, factor: float) -> dict:
    return {
        name: spread.median * factor,
        f"{name}_low": spread.low * factor,
        f"{name}_high": spread.high * factor,
    }


def _target_met(row: dict, dtype: str) -> bool | None:
    applies = row["implementation"] == "fastres" and row["mode"] == TARGET["mode"]
    if not applies or dtype != TARGET["dtype"]:
        return None
    return row["x_aten"] >= TARGET["x_aten"]


def _print(rows: list[dict]) -> None:
    meta = rows[0]
    print(
        f"\nbn_act, {meta['dtype']}, batch {meta['batch_size']}, channels_last, training, on "
        f"{meta['device']}; ISA {meta['cpu_isa']}, C++ kernels {meta['cpu_kernels']}; "
        f"{meta['rounds']} interleaved rounds per shape"
    )
    print(f"{'shape':<18}{'mode':<18}{'impl':<9}{'ms':>8}{'GB/s':>7}  {'x aten':<22}target")
    for r in rows:
        ratio = speedup_text(r["x_aten"], r["x_aten_low"], r["x_aten_high"], True)
        if r["implementation"] == "aten":
            ratio = "1.00"
        verdict = {None: "", True: "met", False: "NOT met"}[r.get("target_met")]
        shape = r["shape"] + ("+res" if r["residual"] else "")
        print(
            f"{shape:<18}{r['mode']:<18}{r['implementation']:<9}{r['ms']:>8.3f}"
            f"{r['gb_s']:>7.1f}  {ratio:<22}{verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = {
        "device": device_name(args.device),
        "cpu_isa": " ".join(cpu_isa()),
        "cpu_kernels": cpu_kernel_isa(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "fastres_commit": fastres_commit(),
    }
    table = []
    for channels, side, residual in RESNET50_BN_SHAPES:
        shape = (args.batch_size, channels, side, side)
        for row in measure_shape(shape, residual, args):
            row = {**meta, **row}
            row["target_met"] = _target_met(row, args.dtype)
            table.append(row)
    _print(table)
    threads = "thread" if meta["threads"] == 1 else "threads"
    path = os.path.join(
        args.out,
        f"bn_act_{args.device}_{args.dtype}_batch{args.batch_size}_{meta['threads']}{threads}.csv",
    )
    os.makedirs(args.out, exist_ok=True)
    write_csv(table, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
