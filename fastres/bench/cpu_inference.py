"""``python -m fastres.bench.cpu_inference``: CPU inference in float32 and bfloat16 against the
runtimes people deploy, each as its users run it.

One run, one batch, interleaved rounds (fastres.bench.interleaved), inference only:

* the library's model (torchvision's by default) in float32, under
  ``torch.autocast("cpu", torch.bfloat16)``, cast with ``.to(torch.bfloat16)``, and (``--compile``)
  ``torch.compile`` with Inductor's freezing under bfloat16 autocast;
* fastres (``convert``, backend ``cpu``: BatchNorm folded, oneDNN) in the same three precisions;
* the model exported to ONNX on ONNX Runtime (float32: its CPU default) and on OpenVINO at its
  default precision (bfloat16 on a CPU with AMX or AVX512_BF16; the run records what OpenVINO
  chose) and with float32 forced, as an extra row.

Each row's error is the relative max error of its logits against the float64 model on the same
images. The CSV records the CPU's instruction sets, the oneDNN kernels the folded path runs,
threads, batch and versions. The target: fastres in bfloat16 at least as fast as OpenVINO at its
default precision, with an error at most twice OpenVINO's.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from fastres.bench import peers
from fastres.bench.interleaved import paired_speedups, spread_of, time_interleaved
from fastres.bench.models import MODELS, build_fast, build_reference, reference_library
from fastres.bench.report import device_name, fastres_commit, speedup_text, write_csv
from fastres.cpu_isa import bf16_inference_case, cpu_isa
from fastres.plans.folded_convolution import onednn_kernels
from fastres.plans.folded_eval import onednn_dtypes

TARGET_PEER = "openvino"  # at its default precision
ERROR_FACTOR_VS_PEER = 2.0


@dataclass
class Row:
    """One configuration: its name, the precision it computes in, and its inference step."""

    name: str
    precision: str
    infer: Callable[[], object]
    family: str  # "reference", "fastres" or "peer"
    error: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastres.bench.cpu_inference",
        description="CPU inference, float32 and bfloat16, against ONNX Runtime and OpenVINO.",
    )
    parser.add_argument("--model", choices=MODELS, default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure torch.compile with freezing in bfloat16 (about two minutes to "
        "compile ResNet-50 on a 2-core CPU)",
    )
    parser.add_argument("--out", default="benchmarks/results/local")
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "image_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    missing = peers.missing_packages()
    if missing:
        parser.error(f"needs {', '.join(missing)}: pip install -r requirements-peers.txt")
    return args


def _no_grad(model: nn.Module, x: torch.Tensor, bf16_autocast: bool) -> Callable[[], object]:
    def infer() -> object:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16_autocast):
            return model(x)

    return infer


def _torch_rows(
    reference: nn.Module, x: torch.Tensor, name: str, family: str, compile_: bool
) -> list[Row]:
    """float32, bfloat16 autocast and ``.to(torch.bfloat16)`` of the library's model or of
    fastres's (``family``), plus (``compile_``) the compiled library model with freezing."""
    fp32 = copy.deepcopy(reference) if family == "reference" else build_fast(reference, "cpu")
    fp32.eval()
    rows = [Row(name, "fp32", _no_grad(fp32, x, False), family)]
    if family == "fastres" and torch.bfloat16 not in onednn_dtypes():
        print(f"{name}: no bfloat16 rows (this CPU has no bfloat16 convolutions in oneDNN)")
        return rows
    cast_model = copy.deepcopy(fp32).to(torch.bfloat16)
    rows += [
        Row(name, "bf16 autocast", _no_grad(fp32, x, True), family),
        Row(name, "bf16 cast", _no_grad(cast_model, x.to(torch.bfloat16), False), family),
    ]
    if compile_ and family == "reference":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants, BatchNorm folded by Inductor
        compiled = cast(nn.Module, torch.compile(copy.deepcopy(reference).eval()))
        rows.append(
            Row(f"{name}+compile(freezing)", "bf16 autocast", _no_grad(compiled, x, True), family)
        )
    return rows


def _peer_rows(reference: nn.Module, x: torch.Tensor) -> tuple[list[Row], str]:
    """ONNX Runtime (float32), OpenVINO at its default precision and with float32 forced; and
    the precision OpenVINO chose by default."""
    openvino = {TARGET_PEER: "default", "openvino-f32": "f32"}
    built, _ = peers.build_peers(reference, x, openvino=openvino)
    rows = []
    chosen = "?"
    for peer in built:
        precision = peer.precision
        if peer.name == TARGET_PEER:
            chosen = precision
            precision = f"{precision} (default)"
        rows.append(Row(peer.name, precision, peer.infer, "peer"))
    return rows, chosen


def _errors(rows: list[Row], reference: nn.Module, x: torch.Tensor) -> None:
    """Each row's relative max error against the float64 model on the same images."""
    with torch.no_grad():
        exact = copy.deepcopy(reference).double().eval()(x.double())
    scale = exact.abs().max().item()
    for row in rows:
        got = torch.as_tensor(row.infer()).double()  # a peer's is a NumPy array
        row.error = (got - exact).abs().max().item() / scale


def _measure(rows: list[Row], rounds: int) -> dict[str, list[float]]:
    steps = {f"{row.name} {row.precision}": row.infer for row in rows}
    return time_interleaved(steps, rounds, lambda: None, warmup=1)


def _rows_of(rows: list[Row], seconds: dict[str, list[float]], meta: dict) -> list[dict]:
    base = seconds[f"{rows[0].name} {rows[0].precision}"]
    target_row = next(r for r in rows if r.name == TARGET_PEER)
    target = seconds[f"{target_row.name} {target_row.precision}"]
    out = []
    for row in rows:
        mine = seconds[f"{row.name} {row.precision}"]
        rate = spread_of(mine).scaled(meta["batch_size"])
        vs_base = spread_of(paired_speedups(base, mine))
        vs_peer = spread_of(paired_speedups(target, mine))
        assert row.error is not None and target_row.error is not None
        record = {
            **meta,
            "config": row.name,
            "precision": row.precision,
            "infer_img_s": rate.median,
            "infer_img_s_low": rate.low,
            "infer_img_s_high": rate.high,
            "x_reference_fp32": vs_base.median,
            "x_reference_fp32_low": vs_base.low,
            "x_reference_fp32_high": vs_base.high,
            "x_openvino_default": vs_peer.median,
            "x_openvino_default_low": vs_peer.low,
            "x_openvino_default_high": vs_peer.high,
            "error_vs_fp64": row.error,
            "error_vs_openvino_default": row.error / target_row.error,
        }
        if row.family == "fastres" and row.precision.startswith("bf16"):
            record["target_met"] = (
                vs_peer.median >= 1.0
                and record["error_vs_openvino_default"] <= ERROR_FACTOR_VS_PEER
            )
        out.append(record)
    return out


def ratio_text(row: dict, key: str) -> str:
    """A row's speed-up column ``key`` as '1.29 [1.21-1.33]' (read back from the CSV too);
    '1.00' for the configuration the column compares with."""
    median, low, high = (float(row[f"{key}{part}"]) for part in ("", "_low", "_high"))
    if low == high == 1.0:
        return "1.00"
    return speedup_text(median, low, high, significant=not low <= 1.0 <= high)


def _print(rows: list[dict]) -> None:
    meta = rows[0]
    print(
        f"\n{meta['model']} inference on {meta['device']}, batch {meta['batch_size']}, "
        f"{meta['threads']} threads, {meta['rounds']} interleaved rounds; ISA {meta['cpu_isa']}"
        f"\nfolded oneDNN kernels: {meta['onednn_kernels']}; OpenVINO's default precision: "
        f"{meta['openvino_default_precision']}"
    )
    print(
        f"{'configuration':<34}{'precision':<20}{'img/s':>9}  {'x fp32 reference':<22}"
        f"{'x openvino default':<22}{'error vs fp64':>14}  target"
    )
    for r in rows:
        ratio = {key: ratio_text(r, key) for key in ("x_reference_fp32", "x_openvino_default")}
        met = r.get("target_met")
        verdict = "" if met is None else ("met" if met else "NOT met")
        print(
            f"{r['config']:<34}{r['precision']:<20}{r['infer_img_s']:>9.2f}  "
            f"{ratio['x_reference_fp32']:<22}{ratio['x_openvino_default']:<22}"
            f"{r['error_vs_fp64']:>14.2e}  {verdict}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reference = build_reference(args.model, "cpu").eval()
    generator = torch.Generator().manual_seed(0)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.randn(size, generator=generator).contiguous(memory_format=torch.channels_last)
    library = reference_library(args.model)
    rows = _torch_rows(reference, x, library, "reference", args.compile)
    rows += _torch_rows(reference, x, "fastres[cpu]", "fastres", False)
    peer_rows, chosen = _peer_rows(reference, x)
    rows += peer_rows
    _errors(rows, reference, x)  # also each configuration's first call (folding, compiling)
    seconds = _measure(rows, args.rounds)
    meta = {
        "model": args.model,
        "reference": library,
        "device": device_name("cpu"),
        "cpu_isa": " ".join(cpu_isa()),
        "cpu_bf16": bf16_inference_case(),
        "onednn_kernels": "; ".join(f"{k}: {v}" for k, v in onednn_kernels().items()),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "rounds": args.rounds,
        "openvino_default_precision": chosen,
        "torch": torch.__version__,
        **peers.versions(),
        "fastres_commit": fastres_commit(),
    }
    table = _rows_of(rows, seconds, meta)
    _print(table)
    stem = args.model.replace(":", "-")
    threads = "thread" if meta["threads"] == 1 else "threads"
    path = os.path.join(
        args.out, f"{stem}_cpu_inference_batch{args.batch_size}_{meta['threads']}{threads}.csv"
    )
    os.makedirs(args.out, exist_ok=True)
    write_csv(table, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
