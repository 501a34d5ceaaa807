"""fastres.bench's command line: arguments, then prepare, measure and report."""

from __future__ import annotations

import argparse
import os
import sys

import torch

import fastres
from fastres.bench import peers
from fastres.bench.measure import make_batch, measure_all, prepare, prepare_peers
from fastres.bench.models import (
    DTYPES,
    MODELS,
    available_backends,
    build_reference,
    configurations,
    reference_library,
)
from fastres.bench.report import (
    device_name,
    fastres_commit,
    print_table,
    rows_of,
    write_chart,
    write_csv,
)

# --peers: OpenVINO's precision for each --dtype. fp32 compares like with like (OpenVINO forced to
# float32: its default on a CPU with AMX or AVX512_BF16 is bfloat16); bf16 compares with the
# precision OpenVINO picks by itself, as its users run it. ONNX Runtime runs at its default.
PEER_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "default"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastres.bench",
        description="Verify, then benchmark, a ResNet against its library's own model.",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", choices=MODELS, default="resnet50")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="default: 16 on CPU, 256 on a GPU (the inference targets' settings)",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--rounds",
        type=int,
        help="interleaved timing rounds, each one step of every configuration "
        "(default: 5 on CPU, 20 on a GPU)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="fp32, or bf16/fp16 autocast"
    )
    parser.add_argument(
        "--backend",
        default="all",
        choices=["all", "cpu", "cuda", "triton", "torch"],
        help="fastres backends to measure (default: every available one)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure torch.compile of both models (default: on; compiling "
        "ResNet-50 takes about two minutes on a 2-core CPU)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="torch.compile mode for the compiled configurations (the GPU "
        "inference target compares with max-autotune)",
    )
    parser.add_argument(
        "--freezing",
        action="store_true",
        help="compile inference with Inductor's freezing (weights as constants, BatchNorm "
        "folded by the compiler): the strongest torch.compile CPU inference setting",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run the model exported to ONNX on ONNX Runtime and OpenVINO (CPU, "
        "inference only; OpenVINO forced to float32 with --dtype fp32, at its default precision "
        "with --dtype bf16; pip install -r requirements-peers.txt)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch and the peers (default: torch's, one per core)",
    )
    parser.add_argument("--out", default="benchmarks/results/local", help="folder for CSV and PNG")
    parser.add_argument("--csv", help="the CSV's path (default: OUT/<model>_<device>_<dtype>.csv)")
    parser.add_argument(
        "--chart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write a PNG chart beside the CSV (default: on)",
    )
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    on_gpu = args.device == "cuda"
    if args.batch_size is None:
        args.batch_size = 256 if on_gpu else 16
    if args.rounds is None:
        args.rounds = 20 if on_gpu else 5
    for name in ("batch_size", "rounds", "image_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.freezing and not args.compile:
        parser.error("--freezing applies to the compiled configurations: drop --no-compile")
    if args.peers:
        if args.device != "cpu" or args.dtype not in PEER_OPENVINO_PRECISION:
            parser.error(
                "--peers runs on --device cpu with --dtype fp32 or bf16 (the runtimes' CPU cases)"
            )
        missing = peers.missing_packages()
        if missing:
            parser.error(
                f"--peers needs {', '.join(missing)}: pip install -r requirements-peers.txt"
            )
    return args


def _triton_autotune() -> str:
    """The Triton convolutions' autotuning set (FASTRES_TRITON_AUTOTUNE), recorded with the
    figures: a quick set can pick a slower tile than the full one."""
    return os.environ.get("FASTRES_TRITON_AUTOTUNE", "full")


def _triton_tuning() -> str:
    """What the Triton convolutions' autotuning cost this run: paid at the first call at each
    shape, in the warm-up before the timed rounds, so no figure includes it."""
    conv = sys.modules.get("fastres.triton.conv")
    report = conv.tuning_report() if conv is not None else {}
    if not report:
        return "none"

    def cost(c) -> str:
        text = f"{c.shapes} shapes in {c.seconds:.1f} s"
        if c.from_disk_cache:
            text += f", {c.from_disk_cache} from Triton's disk cache"
        return text

    return "; ".join(
        f"{name.strip('_').removesuffix('_kernel')}: {cost(c)}" for name, c in report.items()
    )


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="fastres.bench", unit="config", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # applies to graphs compiled without autograd
    dtype = DTYPES[args.dtype]
    reference = build_reference(args.model, args.device)
    batch = make_batch(args, args.device)
    configs = configurations(
        args.model, available_backends(args.device, args.backend), args.compile
    )
    prepared = [
        prepare(config, reference, batch, args, args.device, dtype) for config in _progress(configs)
    ]
    export_s = None
    if args.peers:
        peer_runs, export_s, openvino_precision = prepare_peers(
            reference, batch, PEER_OPENVINO_PRECISION[args.dtype]
        )
        prepared += peer_runs
    measure_all(prepared, batch, args, args.device, dtype)
    results = [p.result for p in prepared]
    print(f"Triton autotuning: {_triton_tuning()}")
    meta = {
        "model": args.model,
        "reference": reference_library(args.model),
        "device": device_name(args.device),
        "device_type": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "compile_mode": args.compile_mode,
        "inductor_freezing": args.freezing,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": fastres.info()["triton"],
        "triton_autotune": _triton_autotune(),
        "triton_tuning": _triton_tuning(),
        "fastres_commit": fastres_commit(),
        "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "onnx_export_s": export_s,
        **(peers.versions() if args.peers else {}),
        **({"openvino_precision": openvino_precision} if args.peers else {}),
    }
    rows = rows_of(results, meta)
    print_table(rows, meta)
    if not args.compile:
        print("torch.compile not measured (--no-compile)")
    stem = args.model.replace(":", "-")  # timm:resnet50 -> timm-resnet50_cpu_fp32.csv
    csv_path = args.csv or os.path.join(args.out, f"{stem}_{args.device}_{args.dtype}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    write_csv(rows, csv_path)
    chart_path = os.path.splitext(csv_path)[0] + ".png"
    wrote_chart = args.chart and write_chart(rows, meta, chart_path)
    print(f"wrote {csv_path}" + (f" and {chart_path}" if wrote_chart else ""))
    failed = [r.config.name for r in results if not r.parity_ok]
    if failed:
        print(f"parity check FAILED for {', '.join(failed)}: no speed reported for them")
        return 1
    return 0
