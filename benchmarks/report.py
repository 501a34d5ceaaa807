"""Turns a pytest-benchmark JSON file into tables against the targets, and CSV files.

Usage: python benchmarks/report.py RESULTS.json [--out DIR]

Ratios compare implementations measured side by side in the same run (median times). Targets:
bn_act (on CPU, forward+backward in training at least 1.5x eager; on a GPU, at least 85% of the
copy bandwidth measured in the same run, and no slower than torch.compile); ResNet-50 training
(activation bytes kept for backward at most 0.86 of torchvision's); Triton convolutions (at
least 0.8x cuDNN's throughput per layer; a bottleneck's training step faster than eager and
torch.compile(max-autotune)). bn_act_conv2d is reported in TFLOP/s against a matrix
multiplication measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections import defaultdict

CPU_SPEEDUP_TARGET = 1.5
GPU_BANDWIDTH_TARGET = 0.85
ACTIVATION_BYTES_TARGET = 0.86
TRITON_CONV_TARGET = 0.8


def load(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        median = bench["stats"]["median"]
        rows.append({**info, "median_s": median, "gb_per_s": info.get("bytes", 0) / median / 1e9})
    return rows, data.get("commit_info", {})


def _by_case(rows: list[dict], op: str, case) -> dict[tuple, dict[str, dict]]:
    """The rows of ``op`` grouped by ``case(row)``, then by implementation: the side-by-side
    measurements a ratio is taken between."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["op"] == op:
            groups[case(r)][r["impl"]] = r
    return groups


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def summarise(rows: list[dict]) -> tuple[list[dict], float | None]:
    copy = [r for r in rows if r["op"] == "copy"]
    copy_gbs = copy[0]["gb_per_s"] if copy else None
    groups = _by_case(rows, "bn_act", lambda r: (tuple(r["shape"]), r["residual"], r["mode"]))
    table = []
    for (shape, residual, mode), impls in groups.items():
        ours = impls.get("fastres")
        eager, compiled = impls.get("eager"), impls.get("compile")
        if ours is None or eager is None:
            continue
        row = {
            "device": ours["device"],
            "dtype": ours["dtype"],
            "shape": "x".join(map(str, shape)),
            "residual": residual,
            "mode": mode,
            "fastres_ms": ours["median_s"] * 1e3,
            "eager_ms": eager["median_s"] * 1e3,
            "compile_ms": compiled["median_s"] * 1e3 if compiled else None,
            "speedup_vs_eager": eager["median_s"] / ours["median_s"],
            "speedup_vs_compile": compiled["median_s"] / ours["median_s"] if compiled else None,
            "fastres_gb_per_s": ours["gb_per_s"],
            "fraction_of_copy_bw": ours["gb_per_s"] / copy_gbs if copy_gbs else None,
        }
        if "fastres-triton" in impls:
            row["triton_ms"] = impls["fastres-triton"]["median_s"] * 1e3
        if ours["device_type"] == "cpu":
            if mode == "forward_backward-train":
                row["target"] = f">= {CPU_SPEEDUP_TARGET}x eager"
                row["target_met"] = row["speedup_vs_eager"] >= CPU_SPEEDUP_TARGET
        else:
            row["target"] = f">= {GPU_BANDWIDTH_TARGET:.0%} copy BW, <= compile time"
            row["target_met"] = (row["fraction_of_copy_bw"] or 0) >= GPU_BANDWIDTH_TARGET and (
                row["speedup_vs_compile"] is None or row["speedup_vs_compile"] >= 1.0
            )
        table.append(row)
    table.sort(key=lambda r: (r["mode"], r["shape"]))
    return table, copy_gbs


def print_table(table: list[dict], copy_gbs: float | None) -> None:
    if not table:
        print("no bn_act results")
        return
    print(
        f"device: {table[0]['device']}   dtype: {table[0]['dtype']}   "
        f"copy bandwidth: {copy_gbs:.1f} GB/s"
        if copy_gbs
        else ""
    )
    header = (
        f"{'mode':<24}{'shape':<20}{'fastres ms':>11}{'eager ms':>10}{'compile ms':>11}"
        f"{'x eager':>9}{'x compile':>10}{'GB/s':>8}{'of copy':>8}  target"
    )
    print(header)
    print("-" * len(header))
    for r in table:
        compile_ms = f"{r['compile_ms']:.3f}" if r["compile_ms"] is not None else "-"
        vs_compile = f"{r['speedup_vs_compile']:.2f}" if r["speedup_vs_compile"] else "-"
        of_copy = f"{r['fraction_of_copy_bw']:.0%}" if r["fraction_of_copy_bw"] else "-"
        target = f"{r['target']}: {_verdict(r['target_met'])}" if "target" in r else ""
        shape = r["shape"] + ("+res" if r["residual"] else "")
        print(
            f"{r['mode']:<24}{shape:<20}{r['fastres_ms']:>11.3f}{r['eager_ms']:>10.3f}"
            f"{compile_ms:>11}{r['speedup_vs_eager']:>9.2f}{vs_compile:>10}"
            f"{r['fastres_gb_per_s']:>8.1f}{of_copy:>8}  {target}"
        )
    judged = [r for r in table if "target" in r]
    met = sum(r["target_met"] for r in judged)
    print(f"\ntargets met: {met} of {len(judged)}")


def summarise_conv(rows: list[dict]) -> list[dict]:
    """bn_act_conv2d rows with TFLOP/s against the matmul measured in the same run."""
    peak = next((r["flops"] / r["median_s"] for r in rows if r["op"] == "matmul"), None)
    groups = _by_case(rows, "bn_act_conv2d", lambda r: (tuple(r["shape"]), r["mode"]))
    table = []
    for (shape, mode), impls in groups.items():
        ours, eager, compiled = impls.get("fastres"), impls.get("eager"), impls.get("compile")
        if ours is None or eager is None:
            continue
        tflops = ours["flops"] / ours["median_s"] / 1e12
        table.append(
            {
                "device": ours["device"],
                "dtype": ours["dtype"],
                "mode": mode,
                "shape": "bn{1}x{3}x{3}->conv{5}x{5}/s{6}->{4} (N={0})".format(*shape),
                "fastres_ms": ours["median_s"] * 1e3,
                "eager_ms": eager["median_s"] * 1e3,
                "compile_ms": compiled["median_s"] * 1e3 if compiled else None,
                "speedup_vs_eager": eager["median_s"] / ours["median_s"],
                "speedup_vs_compile": compiled["median_s"] / ours["median_s"] if compiled else None,
                "fastres_tflops": tflops,
                "fraction_of_matmul_peak": tflops * 1e12 / peak if peak else None,
            }
        )
    table.sort(key=lambda r: (r["mode"], r["shape"]))
    return table


def print_conv(table: list[dict]) -> None:
    print("\nbn_act_conv2d (TFLOP/s of the convolution, against a matmul measured in the same run)")
    header = (
        f"{'mode':<24}{'shape':<42}{'fastres ms':>11}{'eager ms':>10}{'compile ms':>11}"
        f"{'x eager':>9}{'x compile':>10}{'TFLOP/s':>9}{'of mm':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in table:
        compile_ms = f"{r['compile_ms']:.3f}" if r["compile_ms"] is not None else "-"
        vs_compile = f"{r['speedup_vs_compile']:.2f}" if r["speedup_vs_compile"] else "-"
        of_peak = f"{r['fraction_of_matmul_peak']:.0%}" if r["fraction_of_matmul_peak"] else "-"
        print(
            f"{r['mode']:<24}{r['shape']:<42}{r['fastres_ms']:>11.3f}{r['eager_ms']:>10.3f}"
            f"{compile_ms:>11}{r['speedup_vs_eager']:>9.2f}{vs_compile:>10}"
            f"{r['fastres_tflops']:>9.3f}{of_peak:>7}"
        )


def summarise_triton_conv(rows: list[dict]) -> list[dict]:
    """Triton convolution layers against cuDNN (target: at least 0.8x its throughput)."""
    layers = _by_case(rows, "conv_layer", lambda r: tuple(r["shape"]))
    table = []
    for shape, impls in layers.items():
        ours, cudnn = impls.get("triton"), impls.get("cudnn")
        if ours is None or cudnn is None:
            continue
        ratio = cudnn["median_s"] / ours["median_s"]
        table.append(
            {
                "device": ours["device"],
                "dtype": ours["dtype"],
                "layer": "{0}x{1}x{1} {3}x{3}/s{4} g{5} -> {2}".format(*shape),
                "triton_tflops": ours["flops"] / ours["median_s"] / 1e12,
                "cudnn_tflops": cudnn["flops"] / cudnn["median_s"] / 1e12,
                "of_cudnn": ratio,
                "target": f">= {TRITON_CONV_TARGET}x cuDNN",
                "target_met": ratio >= TRITON_CONV_TARGET,
            }
        )
    return table


def summarise_block_steps(rows: list[dict]) -> list[dict]:
    """Bottleneck training steps on the Triton convolutions against eager and max-autotune."""
    blocks = _by_case(rows, "block_train_step", lambda r: tuple(r["shape"]))
    table = []
    for shape, impls in blocks.items():
        ours, eager = impls.get("fastres-triton"), impls.get("eager")
        compiled = impls.get("compile-max-autotune")
        if ours is None or eager is None or compiled is None:
            continue
        vs_eager = eager["median_s"] / ours["median_s"]
        vs_compile = compiled["median_s"] / ours["median_s"]
        table.append(
            {
                "device": ours["device"],
                "dtype": ours["dtype"],
                "block": "N={0} in={1} planes={2} s{3} {4}x{4}".format(*shape),
                "fastres_ms": ours["median_s"] * 1e3,
                "eager_ms": eager["median_s"] * 1e3,
                "compile_ms": compiled["median_s"] * 1e3,
                "speedup_vs_eager": vs_eager,
                "speedup_vs_compile": vs_compile,
                "target": "faster than eager and compile",
                "target_met": vs_eager > 1.0 and vs_compile > 1.0,
            }
        )
    return table


def print_targets(title: str, columns: list[str]):
    def printer(table: list[dict]) -> None:
        print(f"\n{title} ({table[0]['device']}, {table[0]['dtype']})")
        print("  ".join(columns) + "  target")
        for r in table:
            cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns]
            print("  ".join(cells) + f"  {r['target']}: {_verdict(r['target_met'])}")
        print(f"targets met: {sum(r['target_met'] for r in table)} of {len(table)}")

    return printer


def summarise_resnet50(rows: list[dict]) -> list[dict]:
    steps = {r["impl"]: r for r in rows if r["op"] == "resnet50_train_step"}
    if "torchvision" not in steps or "fastres" not in steps:
        return []
    tv, ours = steps["torchvision"], steps["fastres"]
    bytes_ratio = ours["saved_bytes"] / tv["saved_bytes"]
    return [
        {
            "device": ours["device"],
            "dtype": ours["dtype"],
            "batch": ours["images"],
            "torchvision_img_per_s": tv["images"] / tv["median_s"],
            "fastres_img_per_s": ours["images"] / ours["median_s"],
            "speedup_vs_torchvision": tv["median_s"] / ours["median_s"],
            "torchvision_saved_mib": tv["saved_bytes"] / 2**20,
            "fastres_saved_mib": ours["saved_bytes"] / 2**20,
            "saved_bytes_ratio": bytes_ratio,
            "target": f"saved bytes <= {ACTIVATION_BYTES_TARGET} of torchvision",
            "target_met": bytes_ratio <= ACTIVATION_BYTES_TARGET,
        }
    ]


def print_resnet50(table: list[dict]) -> None:
    for r in table:
        print(f"\nResNet-50 training step, batch {r['batch']}, {r['dtype']}, {r['device']}:")
        print(
            f"  torchvision {r['torchvision_img_per_s']:.2f} img/s, fastres "
            f"{r['fastres_img_per_s']:.2f} img/s ({r['speedup_vs_torchvision']:.2f}x)"
        )
        print(
            f"  kept for backward: torchvision {r['torchvision_saved_mib']:.0f} MiB, fastres "
            f"{r['fastres_saved_mib']:.0f} MiB ({r['saved_bytes_ratio']:.3f}); "
            f"{r['target']}: {_verdict(r['target_met'])}"
        )


def write_csv(table: list[dict], commit: dict, path: str) -> None:
    fields = sorted({k for r in table for k in r}) + ["fastres_commit"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in table:
            writer.writerow({**r, "fastres_commit": commit.get("id", "")})


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON file")
    parser.add_argument("--out", help="folder for bn_act.csv (default: beside the JSON file)")
    args = parser.parse_args()
    rows, commit = load(args.results)
    table, copy_gbs = summarise(rows)
    conv = summarise_conv(rows)
    resnet50 = summarise_resnet50(rows)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    triton_conv, block_steps = summarise_triton_conv(rows), summarise_block_steps(rows)
    printers = {
        "bn_act": lambda t: print_table(t, copy_gbs),
        "bn_act_conv2d": print_conv,
        "resnet50_train": print_resnet50,
        "triton_conv": print_targets(
            "Triton convolution vs cuDNN", ["layer", "triton_tflops", "cudnn_tflops", "of_cudnn"]
        ),
        "block_train_step": print_targets(
            "Bottleneck training step on Triton convolutions",
            [
                "block",
                "fastres_ms",
                "eager_ms",
                "compile_ms",
                "speedup_vs_eager",
                "speedup_vs_compile",
            ],
        ),
    }
    for name, rows_out in (
        ("bn_act", table),
        ("bn_act_conv2d", conv),
        ("resnet50_train", resnet50),
        ("triton_conv", triton_conv),
        ("block_train_step", block_steps),
    ):
        if not rows_out:
            continue
        printers[name](rows_out)
        path = os.path.join(out, f"{name}.csv")
        write_csv(rows_out, commit, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
