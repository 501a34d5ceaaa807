"""Regenerates the README's performance table from the committed fastres.bench results.

Usage: python benchmarks/readme_table.py   (from the repository root)

Reads every benchmarks/results/<device>/<model>_<device>_<dtype>.csv written by
``python -m fastres.bench --out benchmarks/results/<device>`` and replaces the lines between the
README's perf-table markers. The table is never typed by hand. Speed-ups are medians of
per-round ratios from interleaved rounds, with their interquartile range.
"""

from __future__ import annotations

import csv
import glob
import os

from fastres.bench import MODELS, row_speedup_text

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fmt(value: str, spec: str) -> str:
    return format(float(value), spec) if value not in ("", None) else "-"


def table_lines() -> list[str]:
    lines = [
        "| device | model | dtype | batch | rounds | configuration | train img/s "
        "| x torchvision [IQR] | infer img/s | x torchvision [IQR] "
        "| activation bytes x torchvision | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    paths = []
    for model in MODELS:  # files written by fastres.bench: <model>_<device>_<dtype>.csv
        paths += glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", f"{model}_*_*.csv"))
    # results/local/ is every run's scratch folder (not committed); the table is what is.
    paths = [p for p in paths if os.path.basename(os.path.dirname(p)) != "local"]
    for path in sorted(paths):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if "config" in r]
        for r in rows:
            if r["parity_ok"] != "True":
                lines.append(
                    f"| {r['device']} | {r['model']} | {r['dtype']} | {r['batch_size']} "
                    f"| | {r['config']} | parity failed | | | | | "
                    f"{r['fastres_commit']} |"
                )
                continue
            lines.append(
                f"| {r['device']} | {r['model']} | {r['dtype']} | {r['batch_size']} "
                f"| {r['rounds']} | {r['config']} "
                f"| {_fmt(r['train_img_s'], '.2f')} | {row_speedup_text(r, 'train')} "
                f"| {_fmt(r['infer_img_s'], '.2f')} | {row_speedup_text(r, 'infer')} "
                f"| {_fmt(r.get('saved_vs_torchvision'), '.3f')} | {r['fastres_commit']} |"
            )
    return lines


def main() -> None:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = "\n".join(table_lines())
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{body}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
