"""The BatchNorm finalize kernels of the Triton chain, timed alone at ResNet-50's shapes.

Usage: python benchmarks/finalize_share.py --device cuda --csv OUT/.finalize.csv
       (a phase of the GPU check; on CPU it runs the same code at a toy size, interpreted)

On the triton backend (fastres/plans/triton_chain.py) each bottleneck's three BatchNorms get
their batch statistics from the epilogue of the convolution before them: one row of (count,
mean, M2) per tile of output rows. The first two also get their backward reductions from the
input-gradient epilogue of the convolution after them: one row of sums per tile (and phase).
bn_act's finalize kernels merge those rows with ceil(C / 32) programs of 4 warps, each looping
over every row: thousands of them at ResNet-50's first stages at batch 256. An estimate by
arithmetic puts this at 1.5-4% of a ResNet-50 bf16 training step on an H100-class GPU; this
measures it.

This times both kernels through their launchers (fastres.triton.conv.finalize_stats, and the
gradient finalize bn_backward_from_partials runs) for every such BatchNorm of ResNet-50, at the
largest and the smallest tile height autotuning picks from (128 and 32 rows: the fewest and the
most rows to merge), each shape in interleaved rounds of ``--repeat`` calls. One CSV row per
(kernel, shape, tile height): median us per call and per training step (times the BatchNorms of
that shape). benchmarks/gpu_check_summary.py sets the total beside the step time that the GPU
check's headline phase measured, and beside the estimate.
"""

from __future__ import annotations

import argparse
import csv

import torch
from script_args import require_device, require_positive

# ResNet-50's stages: (bottleneck width, blocks, output side at 224 px); the first block of every
# stage but the first has its stride (2) on the 3x3 (ResNet v1.5).
STAGES = [(64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)]
TILE_ROWS = (128, 32)  # the largest and smallest BLOCK_M of the convolutions' configurations
ESTIMATE = "1.5-4% of a ResNet-50 bf16 training step on an H100-class GPU (by arithmetic)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 2 on CPU")
    parser.add_argument(
        "--scale",
        type=int,
        help="divide every side and width by this (default: 1 on a GPU, 16 on CPU: toy sizes)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument(
        "--repeat", type=int, help="calls per timed step (default: 20 on a GPU, 1 on CPU)"
    )
    parser.add_argument("--csv", required=True, help="where to write the table")
    args = parser.parse_args()
    on_gpu = require_device(parser, args.device)
    args.batch_size = args.batch_size or (256 if on_gpu else 2)
    args.scale = args.scale or (1 if on_gpu else 16)
    args.repeat = args.repeat or (20 if on_gpu else 1)
    require_positive(parser, args, "batch_size", "scale", "rounds", "repeat")
    return args


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def finalize_launches(batch: int, tile_rows: int, scale: int = 1) -> dict[tuple, int]:
    """(kernel, channels, rows) -> launches per training step of ResNet-50 on the triton chain,
    at ``batch`` images of 224 / ``scale`` px, widths / ``scale``, and convolution tiles of
    ``tile_rows`` rows.

    Forward ("stats"): bn1 (width, at the block's input side), bn2 (width) and bn3 (4 x width)
    of every bottleneck, a row per tile of the convolution before. Backward ("gradient"): bn1
    and bn2, a row per tile of the next convolution's input gradient, per phase at stride 2."""
    launches: dict[tuple, int] = {}

    def add(kernel: str, channels: int, rows: int) -> None:
        key = (kernel, channels, rows)
        launches[key] = launches.get(key, 0) + 1

    side_in = max(1, 56 // scale)
    for width, blocks, side in STAGES:
        width, side = max(1, width // scale), max(1, side // scale)
        for block in range(blocks):
            stride = 2 if block == 0 and side < side_in else 1
            block_in = side_in if block == 0 else side
            add("stats", width, _cdiv(batch * block_in**2, tile_rows))
            add("stats", width, _cdiv(batch * side**2, tile_rows))
            add("stats", 4 * width, _cdiv(batch * side**2, tile_rows))
            per_phase = batch * _cdiv(block_in, stride) ** 2
            add("gradient", width, stride * stride * _cdiv(per_phase, tile_rows))
            add("gradient", width, _cdiv(batch * side**2, tile_rows))
        side_in = side
    return launches


def _finalize_call(kernel: str, channels: int, rows: int, device: str):
    """One launch of the finalize ``kernel`` ("stats" or "gradient") over ``rows`` partial rows
    of ``channels`` channels, through the launcher the ops use."""
    from fastres.triton.bn_act import _Dense, _grad_coefficients
    from fastres.triton.conv import finalize_stats

    weight = torch.rand(channels, device=device) + 0.5
    if kernel == "stats":
        partials = torch.rand(3, rows, channels, device=device) + 1.0  # counts, means, M2s
        return lambda: finalize_stats(partials, weight, torch.zeros_like(weight), 1e-5)
    sums = torch.randn(2, rows, channels, device=device)
    dense = _Dense(torch.empty(1, channels, 1, 1, device=device))  # the launch's C and device
    var, grad_weight, grad_bias = (torch.ones_like(weight) for _ in range(3))
    return lambda: _grad_coefficients(
        dense, sums, rows, var, weight, 1e-5, True, grad_weight, grad_bias
    )


def measure(args) -> list[dict]:
    from fastres.bench.interleaved import spread_of, time_interleaved

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    launches = {tile: finalize_launches(args.batch_size, tile, args.scale) for tile in TILE_ROWS}
    steps = {}
    for tile, shapes in launches.items():
        for kernel, channels, rows in shapes:
            call = _finalize_call(kernel, channels, rows, args.device)
            steps[(tile, kernel, channels, rows)] = lambda call=call: [
                call() for _ in range(args.repeat)
            ]
    times = time_interleaved(steps, args.rounds, sync, warmup=2)
    out = []
    for (tile, kernel, channels, rows), seconds in times.items():
        per_call = spread_of([s / args.repeat for s in seconds]).median
        count = launches[tile][(kernel, channels, rows)]
        out.append(
            {
                "tile_rows": tile,
                "kernel": kernel,
                "channels": channels,
                "rows": rows,
                "per_step": count,
                "us_per_call": per_call * 1e6,
                "us_per_step": per_call * count * 1e6,
            }
        )
    return out


def main() -> None:
    args = parse_args()
    import fastres  # noqa: F401  (after the interpreter choice: it imports triton)
    from fastres.bench import device_name

    rows = measure(args)
    meta = {
        "device": device_name(args.device),
        "batch_size": args.batch_size,
        "scale": args.scale,
        "rounds": args.rounds,
        "repeat": args.repeat,
    }
    rows = [{**meta, **row} for row in rows]
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{meta['device']}, batch {args.batch_size}, sizes / {args.scale}; estimate: {ESTIMATE}")
    for tile in TILE_ROWS:
        total = sum(r["us_per_step"] for r in rows if r["tile_rows"] == tile)
        print(f"tiles of {tile} rows: finalize kernels {total:.1f} us per training step")
        for r in rows:
            if r["tile_rows"] == tile:
                print(
                    f"  {r['kernel']:<9}C={r['channels']:<5}rows={r['rows']:<7}"
                    f"x{r['per_step']:<3}{r['us_per_call']:>9.1f} us/call{r['us_per_step']:>10.1f}"
                    " us/step"
                )
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
