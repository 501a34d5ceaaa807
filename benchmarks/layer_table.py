"""A short per-layer table: Triton convolution vs cuDNN, and bn_act vs eager PyTorch.

Usage: python benchmarks/layer_table.py --device cuda --csv OUT/layers.csv
       (the GPU check's last phase; on CPU it runs the same code at toy sizes, interpreted)

For a few ResNet-50 layers, every implementation of the layer is timed in interleaved rounds
(fastres.bench.interleaved; a step is ``--repeat`` calls, then a device synchronisation):

* convolution forward, channels_last: ``bn_act_conv2d_stats_triton`` (no prologue, no
  statistics) against ``F.conv2d`` (cuDNN on a GPU), in TFLOP/s;
* bn_act forward in training (statistics, normalise, residual add, ReLU, the 1-bit mask): the
  compiled backend and Triton against the eager composition ``F.batch_norm`` + add + ``relu``, in
  GB/s of the fused op's minimum traffic (x, residual and out once, the mask), and as a fraction
  of the copy bandwidth measured in the same run.

Each row has the median time per call with its interquartile range, and the speed-up over the
reference implementation (cuDNN, eager) paired round by round, "n.s." when not significant.
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch
import torch.nn.functional as F
from script_args import require_device, require_positive

from fastres.testing import RESNET50_BN_SHAPES, RESNET50_CONVOLUTIONS, conv_id

# A 1x1 and a 3x3 of the first stage, a strided 3x3, a wide 1x1 of the third stage.
CONVOLUTIONS = [RESNET50_CONVOLUTIONS[i] for i in (3, 2, 6, 15)]
BN_SHAPES = [RESNET50_BN_SHAPES[i] for i in (1, 3, 9)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 2 on CPU")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: bf16 on a GPU, fp32 on CPU"
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="divide every layer's height and width by this (toy runs on CPU)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument(
        "--repeat", type=int, help="calls per timed step (default: 20 on a GPU, 1 on CPU)"
    )
    parser.add_argument("--csv", required=True, help="where to write the table")
    args = parser.parse_args()
    on_gpu = require_device(parser, args.device)
    args.batch_size = args.batch_size or (256 if on_gpu else 2)
    args.dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    args.repeat = args.repeat or (20 if on_gpu else 1)
    require_positive(parser, args, "batch_size", "scale", "rounds", "repeat")
    return args


def _channels_last(*shape, args) -> torch.Tensor:
    return torch.randn(*shape, device=args.device, dtype=args.dtype).contiguous(
        memory_format=torch.channels_last
    )


def convolution_layers(args):
    """(layer name, reference name, {implementation: call}, FLOP per call, bytes per call)."""
    from fastres.ops.fused_conv2d import bn_act_conv2d_stats_triton

    for spec in CONVOLUTIONS:
        c_in, side, c_out, kernel, stride, groups = spec
        side = max(1, side // args.scale)
        x = _channels_last(args.batch_size, c_in, side, side, args=args)
        weight = _channels_last(c_out, c_in // groups, kernel, kernel, args=args) * 0.05
        padding = kernel // 2
        out_side = (side + 2 * padding - kernel) // stride + 1
        flop = 2 * args.batch_size * out_side**2 * c_out * (c_in // groups) * kernel**2
        reference = "cudnn" if args.device == "cuda" else "torch"
        calls = {
            "triton": lambda x=x, w=weight, s=stride, p=padding, g=groups: (
                bn_act_conv2d_stats_triton(
                    x, w, None, None, None, None, False, 1e-5, "identity", s, p, 1, g, False
                )
            ),
            reference: lambda x=x, w=weight, s=stride, p=padding, g=groups: F.conv2d(
                x, w, None, s, p, 1, g
            ),
        }
        yield f"conv {conv_id(spec)}", reference, calls, flop, None


def bn_act_layers(args):
    from fastres.backends import STATUS
    from fastres.ops import bn_act

    compiled = "cuda" if args.device == "cuda" else "cpu"
    for channels, side, has_residual in BN_SHAPES:
        side = max(1, side // args.scale)
        x = _channels_last(args.batch_size, channels, side, side, args=args)
        residual = torch.randn_like(x) if has_residual else None
        weight = torch.rand(channels, device=args.device) + 0.5
        bias = torch.randn(channels, device=args.device)
        stats = (
            torch.zeros(channels, device=args.device),
            torch.ones(channels, device=args.device),
        )
        element = x.element_size()
        bytes_moved = x.numel() * element * (2 + has_residual) + x.numel() // 8

        def eager(x=x, residual=residual, weight=weight, bias=bias, stats=stats):
            y = F.batch_norm(x, *stats, weight, bias, training=True)
            return torch.relu(y if residual is None else y + residual)

        calls = {"eager": eager}
        for backend in (compiled, "triton"):
            if STATUS[backend].available:
                calls[backend] = lambda b=backend, x=x, r=residual, w=weight, bi=bias, st=stats: (
                    bn_act(x, w, bi, *st, residual=r, training=True, backend=b)
                )
        name = f"bn_act {channels}x{side}x{side}" + ("+residual" if has_residual else "")
        yield name, "eager", calls, None, bytes_moved


def copy_bandwidth(args, sync) -> float:
    """Bytes per second of a large device copy (read + write), timed like the layers."""
    from fastres.bench.interleaved import spread_of, time_interleaved

    numel = (256 if args.device == "cuda" else 16) * 2**20 // 4
    source = torch.randn(numel, device=args.device)
    target = torch.empty_like(source)
    seconds = time_interleaved({"copy": lambda: target.copy_(source)}, args.rounds, sync)
    return 2 * source.numel() * source.element_size() / spread_of(seconds["copy"]).median


def measure(args) -> tuple[list[dict], float]:
    from fastres.bench.interleaved import paired_speedups, spread_of, time_interleaved

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    copy_bytes_per_s = copy_bandwidth(args, sync)
    rows = []
    for layers in (convolution_layers(args), bn_act_layers(args)):
        for layer, reference, calls, flop, bytes_moved in layers:
            steps = {
                impl: (lambda call=call: [call() for _ in range(args.repeat)])
                for impl, call in calls.items()
            }
            times = time_interleaved(steps, args.rounds, sync, warmup=2)
            for impl, seconds in times.items():
                per_call = spread_of([s / args.repeat for s in seconds])
                speedup = spread_of(paired_speedups(times[reference], seconds))
                row = {
                    "layer": layer,
                    "impl": impl,
                    "median_us": per_call.median * 1e6,
                    "low_us": per_call.low * 1e6,
                    "high_us": per_call.high * 1e6,
                    "vs": reference,
                    "speedup": speedup.median,
                    "speedup_low": speedup.low,
                    "speedup_high": speedup.high,
                    "significant": impl == reference or speedup.significant,
                }
                if flop:
                    row["tflop_s"] = flop / per_call.median / 1e12
                if bytes_moved:
                    row["gb_s"] = bytes_moved / per_call.median / 1e9
                    row["of_copy_bandwidth"] = bytes_moved / per_call.median / copy_bytes_per_s
                rows.append(row)
    return rows, copy_bytes_per_s


def main() -> None:
    args = parse_args()
    import fastres  # noqa: F401  (after the interpreter choice: it imports triton)
    from fastres.bench import device_name, speedup_text

    torch.manual_seed(0)
    rows, copy_bytes_per_s = measure(args)
    meta = {
        "device": device_name(args.device),
        "dtype": str(args.dtype).replace("torch.", ""),
        "batch": args.batch_size,
        "scale": args.scale,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "copy_gb_s": copy_bytes_per_s / 1e9,
        "torch": torch.__version__,
    }
    rows = [{**meta, **row} for row in rows]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"{meta['device']}, {meta['dtype']}, batch {args.batch_size}, copy "
        f"{meta['copy_gb_s']:.0f} GB/s, {args.rounds} interleaved rounds of {args.repeat} calls"
    )
    for row in rows:
        rate = (
            f"{row['tflop_s']:.1f} TFLOP/s"
            if "tflop_s" in row
            else f"{row['gb_s']:.0f} GB/s ({row['of_copy_bandwidth']:.2f} of copy)"
        )
        speedup = speedup_text(
            row["speedup"], row["speedup_low"], row["speedup_high"], row["significant"]
        )
        print(
            f"{row['layer']:<36}{row['impl']:<8}{row['median_us']:>10.1f} us  {rate:<24}"
            f"vs {row['vs']} {speedup}"
        )
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    sys.exit(main())
