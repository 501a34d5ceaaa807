"""Writes OUT/summary.md for benchmarks/gpu_check.sh from what its phases left in OUT.

Usage: python benchmarks/gpu_check_summary.py OUT [--dry-run]

Reads OUT/.phases (name|status|seconds per phase), tests.xml (JUnit), the compute-sanitizer
summaries in gpu_check.log, every resnet50_*.csv (fastres.bench), layers.csv, profile.csv and
OUT/.finalize.csv (benchmarks/finalize_share.py). A file a phase did not get to write is reported
as missing, never invented.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import xml.etree.ElementTree as ElementTree

from finalize_share import ESTIMATE, TILE_ROWS

from fastres.bench import row_speedup_text, speedup_text


def phase_lines(out: str) -> list[str]:
    lines = ["| phase | status | seconds |", "|---|---|---|"]
    try:
        with open(os.path.join(out, ".phases")) as f:
            for record in f:
                name, status, seconds = record.rstrip("\n").split("|")
                lines.append(f"| {name} | {status} | {seconds} |")
    except FileNotFoundError:
        lines.append("| (no phase record) | | |")
    return lines


def test_lines(out: str) -> list[str]:
    path = os.path.join(out, "tests.xml")
    if not os.path.exists(path):
        return ["tests.xml missing: the tests phase wrote no JUnit file."]
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return [f"tests.xml unreadable ({error})."]
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {
        key: sum(int(s.get(key, 0)) for s in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    lines = [
        f"{passed} passed, {totals['failures']} failed, {totals['errors']} errors, "
        f"{totals['skipped']} skipped."
    ]
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"- FAILED `{case.get('classname')}::{case.get('name')}`")
    return lines


def sanitizer_lines(out: str) -> list[str]:
    try:
        with open(os.path.join(out, "gpu_check.log"), errors="replace") as f:
            log = f.read()
    except FileNotFoundError:
        return ["gpu_check.log missing."]
    found = re.findall(r"^== (sanitizer \w+) \(.*?\n(.*?)^== \1: (.*?)$", log, re.M | re.S)
    if not found:
        return ["No compute-sanitizer run in the log."]
    lines = []
    for name, body, status in found:
        summary = re.findall(r"ERROR SUMMARY: .*", body)
        lines.append(f"- {name}: {status}; {summary[-1] if summary else 'no ERROR SUMMARY line'}")
    return lines


def _number(value: str, spec: str) -> str:
    return format(float(value), spec) if value else "-"


def headline_lines(out: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(out, "resnet50_*.csv")))
    if not paths:
        return ["No fastres.bench CSV: the headline phase wrote nothing."]
    lines = [
        "| run | configuration | parity | train img/s | x torchvision | infer img/s "
        "| x torchvision | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                lines.append(
                    f"| {os.path.basename(path)} | {row['config']} | "
                    f"{'ok' if row['parity_ok'] == 'True' else 'FAILED'} | "
                    f"{_number(row.get('train_img_s', ''), '.0f')} | "
                    f"{row_speedup_text(row, 'train')} | "
                    f"{_number(row.get('infer_img_s', ''), '.0f')} | "
                    f"{row_speedup_text(row, 'infer')} | "
                    f"{_number(row.get('peak_mem_mib', ''), '.0f')} |"
                )
    first = paths[0]
    with open(first) as f:
        meta = next(csv.DictReader(f), {})
    lines.append(
        f"\n{meta.get('device', '?')}, {meta.get('dtype', '?')}, batch "
        f"{meta.get('batch_size', '?')}, torch {meta.get('torch', '?')}, triton "
        f"{meta.get('triton', '?')} (autotune {meta.get('triton_autotune', '?')}), "
        f"{meta.get('rounds', '?')} interleaved rounds; ratios are medians of per-round "
        "speed-ups [interquartile range]. Triton autotuning, paid in the warm-up: "
        f"{meta.get('triton_tuning', 'not recorded')}."
    )
    return lines


def layer_lines(out: str) -> list[str]:
    path = os.path.join(out, "layers.csv")
    if not os.path.exists(path):
        return ["layers.csv missing: the layers phase wrote nothing."]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["layers.csv is empty."]
    lines = [
        f"Copy bandwidth in the same run: {float(rows[0]['copy_gb_s']):.0f} GB/s.",
        "",
        "| layer | implementation | us per call | rate | speed-up over |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        rate = (
            f"{float(row['tflop_s']):.1f} TFLOP/s"
            if row.get("tflop_s")
            else f"{float(row['gb_s']):.0f} GB/s ({float(row['of_copy_bandwidth']):.2f} of copy)"
        )
        speedup = speedup_text(
            float(row["speedup"]),
            float(row["speedup_low"]),
            float(row["speedup_high"]),
            row["significant"] == "True",
        )
        lines.append(
            f"| {row['layer']} | {row['impl']} | {float(row['median_us']):.1f} | {rate} "
            f"| {row['vs']} {speedup} |"
        )
    return lines


def profile_lines(out: str, top: int = 10) -> list[str]:
    path = os.path.join(out, "profile.csv")
    if not os.path.exists(path):
        return ["profile.csv missing: the profile phase wrote nothing."]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return ["profile.csv is empty."]
    total = sum(float(row["us_per_step"]) for row in rows)
    finalize = sum(float(row["us_per_step"]) for row in rows if "finalize" in row["kernel"])
    lines = [
        f"FastBottleneck(256, 64), triton backend, batch {rows[0]['batch_size']}, "
        f"{rows[0]['side']} px, on {rows[0]['device']}: {total / 1e3:.3f} ms per training step; "
        f"finalize kernels {finalize / 1e3:.3f} ms ({100 * finalize / total:.1f}%).",
        "",
        "| kernel | calls | us per step | share |",
        "|---|---|---|---|",
    ]
    for row in rows[:top]:
        lines.append(
            f"| {row['kernel'][:80]} | {row['calls']} | {float(row['us_per_step']):.1f} "
            f"| {100 * float(row['share']):.1f}% |"
        )
    return lines


def _triton_step_us(out: str, batch_size: int) -> tuple[float, str] | None:
    """Microseconds per fastres[triton] training step at ``batch_size`` in the headline
    phase's CSVs, and the run's file name; None when no such row was measured."""
    for path in sorted(glob.glob(os.path.join(out, "resnet50_*.csv"))):
        with open(path) as f:
            for row in csv.DictReader(f):
                if (
                    "triton" in row.get("config", "")
                    and row.get("train_img_s")
                    and int(row.get("batch_size") or 0) == batch_size
                ):
                    return 1e6 * batch_size / float(row["train_img_s"]), os.path.basename(path)
    return None


def finalize_lines(out: str) -> list[str]:
    """The BatchNorm finalize kernels' time per ResNet-50 training step, measured alone
    (finalize_share.py), as a share of the triton training step the headline phase measured,
    beside the arithmetic estimate that the measurement confirms or refutes."""
    path = os.path.join(out, ".finalize.csv")
    if not os.path.exists(path):
        return [
            ".finalize.csv missing: the finalize phase wrote nothing.",
            f"Estimate: {ESTIMATE}.",
        ]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return [".finalize.csv is empty.", f"Estimate: {ESTIMATE}."]
    batch = int(rows[0]["batch_size"])
    totals = {
        tile: sum(float(r["us_per_step"]) for r in rows if int(r["tile_rows"]) == tile)
        for tile in TILE_ROWS
    }
    scale = int(rows[0]["scale"])
    sizes = "ResNet-50's sizes" if scale == 1 else f"ResNet-50's sizes / {scale}"
    lines = [
        f"Stats and gradient finalize kernels alone, {sizes}, batch {batch}, on "
        f"{rows[0]['device']}: "
        + ", ".join(
            f"{totals[tile]:.0f} us per training step with {tile}-row tiles" for tile in TILE_ROWS
        )
        + ".",
    ]
    step = _triton_step_us(out, batch)
    if step is None:
        lines.append(
            f"No fastres[triton] training step at batch {batch} in the headline CSVs: no share."
        )
    else:
        step_us, source = step
        shares = " to ".join(f"{100 * totals[tile] / step_us:.1f}%" for tile in TILE_ROWS)
        lines.append(
            f"Share of the fastres[triton] training step ({step_us / 1e3:.1f} ms, {source}): "
            f"{shares} (tiles of {' to '.join(map(str, TILE_ROWS))} rows)."
        )
    lines.append(f"Estimate: {ESTIMATE}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    title = "# GPU check" + (
        " (dry run: no GPU, nothing here is a measurement)" if args.dry_run else ""
    )
    sections = [
        [title],
        ["## Phases", *phase_lines(args.out)],
        ["## Tests", *test_lines(args.out)],
        ["## compute-sanitizer", *sanitizer_lines(args.out)],
        ["## ResNet-50 headline", *headline_lines(args.out)],
        ["## Layers", *layer_lines(args.out)],
        ["## Profiled training step", *profile_lines(args.out)],
        ["## BatchNorm finalize kernels (Triton chain)", *finalize_lines(args.out)],
    ]
    text = "\n\n".join("\n".join(section) for section in sections) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
