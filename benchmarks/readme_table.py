"""Regenerates the README's performance table from the committed fastres.bench results.

Usage: python benchmarks/readme_table.py   (from the repository root)

Reads every benchmarks/results/<device>/<model>_<device>_<dtype>.csv written by
``python -m fastres.bench --out benchmarks/results/<device>`` and replaces the lines between the
README's perf-table markers; the runs against ONNX Runtime and OpenVINO
(``make bench-peers``: ``*_peers_*.csv``) fill the peers-table markers, and the float32 and
bfloat16 runs of ``python -m fastres.bench.cpu_inference`` (``make bench-cpu-inference``:
``*_cpu_inference_*.csv``) the cpu-inference-table markers, and the CPU runs of
``python -m fastres.bench.bn_act_shapes`` (``make bench-bn-act``: ``bn_act_cpu_*.csv``) the
cpu-bn-act-table markers. The tables are never
typed by hand. Speed-ups are medians of per-round ratios from interleaved rounds, with their
interquartile range.
"""

from __future__ import annotations

import csv
import glob
import os

from fastres.bench import MODELS, row_speedup_text, speedup_text
from fastres.bench.cpu_inference import ratio_text

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
PEERS_START, PEERS_END = "<!-- peers-table:start -->", "<!-- peers-table:end -->"
CPU_START, CPU_END = "<!-- cpu-inference-table:start -->", "<!-- cpu-inference-table:end -->"
BN_ACT_START, BN_ACT_END = "<!-- cpu-bn-act-table:start -->", "<!-- cpu-bn-act-table:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fmt(value: str, spec: str) -> str:
    return format(float(value), spec) if value not in ("", None) else "-"


def table_lines() -> list[str]:
    lines = [
        "| device | model | dtype | batch | rounds | configuration | train img/s "
        "| x library's model [IQR] | infer img/s | x library's model [IQR] "
        "| activation bytes x library's model | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    paths = []
    for model in MODELS:  # files written by fastres.bench: <model>_<device>_<dtype>.csv
        stem = model.replace(":", "-")  # as fastres.bench names the file ("timm:resnet50")
        paths += glob.glob(os.path.join(ROOT, "benchmarks", "results", "*", f"{stem}_*_*.csv"))
    # results/local/ is every run's scratch folder (not committed); the table is what is.
    # Runs under non-default glibc malloc settings (*_glibc_*.csv) are cited in the text only.
    paths = [
        p
        for p in _committed(paths)
        if not any(tag in os.path.basename(p) for tag in ("_peers_", "_cpu_inference_", "_glibc_"))
    ]
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


def _committed(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.basename(os.path.dirname(p)) != "local"]


def _peer_ratio(row: dict, peer: str) -> str:
    median = row.get(f"infer_vs_{peer}")
    if median in (None, ""):
        return "-"
    low, high = float(row[f"infer_vs_{peer}_low"]), float(row[f"infer_vs_{peer}_high"])
    return speedup_text(float(median), low, high, significant=not low <= 1.0 <= high)


def peers_table_lines() -> list[str]:
    """Inference of every configuration of the ``--peers`` runs, and fastres's speed-up over
    each peer, paired round by round."""
    lines = [
        "| device | model | dtype | threads | batch | rounds | configuration | infer img/s "
        "| x library's model [IQR] | x onnxruntime [IQR] | x openvino [IQR] "
        "| x library's model+compile [IQR] | error vs float64 | first call s | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pattern = os.path.join(ROOT, "benchmarks", "results", "*", "*_peers_*.csv")
    for path in sorted(_committed(glob.glob(pattern))):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if "config" in r]
        # the reference's own float32 error, recorded on the rows compared with it
        own = next(
            (
                r["torchvision_error_inference_output"]
                for r in rows
                if r.get("torchvision_error_inference_output")
            ),
            "",
        )
        for r in rows:
            baseline = r["config"] == r.get("reference", "torchvision")
            error = r.get("parity_inference_output") or (own if baseline else "")
            lines.append(
                f"| {r['device']} | {r['model']} | {r['dtype']} | {r['threads']} "
                f"| {r['batch_size']} | {r['rounds']} "
                f"| {_peer_config(r)} | {_fmt(r['infer_img_s'], '.2f')} "
                f"| {row_speedup_text(r, 'infer')} | {_peer_ratio(r, 'onnxruntime')} "
                f"| {_peer_ratio(r, 'openvino')} | {_peer_ratio(r, 'compiled')} "
                f"| {_fmt(error, '.2e')} "
                f"| {_fmt(r['first_call_s'], '.2f')} | {r['fastres_commit']} |"
            )
    return lines


def _peer_config(row: dict) -> str:
    """The configuration's name; OpenVINO's with the precision it computed in (runs from
    before that was recorded forced float32)."""
    if row["config"] != "openvino":
        return row["config"]
    precision = row.get("openvino_precision") or "f32"
    return f"openvino ({precision}{', its default' if row['dtype'] == 'bf16' else ''})"


def cpu_inference_folders() -> list[str]:
    """The committed results folders (one per CPU) holding ``fastres.bench.cpu_inference``
    runs."""
    pattern = os.path.join(ROOT, "benchmarks", "results", "*", "*_cpu_inference_*.csv")
    return sorted({os.path.dirname(p) for p in _committed(glob.glob(pattern))})


def cpu_inference_sections() -> list[str]:
    """Per CPU: its setting line, then its table."""
    lines: list[str] = []
    for folder in cpu_inference_folders():
        if lines:
            lines.append("")
        lines += [cpu_inference_setting(folder), "", *cpu_inference_table_lines(folder)]
    return lines or ["No committed run."]


def cpu_inference_table_lines(folder: str) -> list[str]:
    """Every row of the ``fastres.bench.cpu_inference`` runs in ``folder``
    (``*_cpu_inference_*.csv``): float32 and bfloat16 against ONNX Runtime and OpenVINO at its
    default precision."""
    lines = [
        "| threads | batch | rounds | configuration | precision | img/s | x fp32 reference [IQR] "
        "| x OpenVINO default [IQR] | error vs float64 | target | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pattern = os.path.join(folder, "*_cpu_inference_*.csv")
    for path in sorted(glob.glob(pattern), key=_batch_then_threads):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            target = {"True": "met", "False": "not met"}.get(r.get("target_met", ""), "")
            lines.append(
                f"| {r['threads']} | {r['batch_size']} | {r['rounds']} | {r['config']} "
                f"| {r['precision']} | {_fmt(r['infer_img_s'], '.2f')} "
                f"| {ratio_text(r, 'x_reference_fp32')} | {ratio_text(r, 'x_openvino_default')} "
                f"| {_fmt(r['error_vs_fp64'], '.2e')} | {target} | {r['fastres_commit']} |"
            )
    return lines


def cpu_inference_setting(folder: str) -> str:
    """The CPU, its instruction sets and the oneDNN kernels, from the folder's first run."""
    for path in sorted(glob.glob(os.path.join(folder, "*_cpu_inference_*.csv"))):
        with open(path) as f:
            r = next(csv.DictReader(f))
        return (
            f"**{r['device'].split(' (')[0]}** (`{os.path.basename(folder)}`): instruction "
            f"sets {r['cpu_isa']}; folded oneDNN kernels {r['onednn_kernels']}; OpenVINO "
            f"{r['openvino']} (default precision "
            f"{r['openvino_default_precision']}), ONNX Runtime {r['onnxruntime']}, torch "
            f"{r['torch']}."
        )
    return "No committed run."


def bn_act_folders() -> list[str]:
    """The committed results folders (one per CPU) holding CPU runs of
    ``fastres.bench.bn_act_shapes``."""
    pattern = os.path.join(ROOT, "benchmarks", "results", "*", "bn_act_cpu_*.csv")
    return sorted({os.path.dirname(p) for p in _committed(glob.glob(pattern))})


def bn_act_sections() -> list[str]:
    """Per CPU: its setting line, then fastres's rows of every dtype's run."""
    lines: list[str] = []
    for folder in bn_act_folders():
        paths = sorted(glob.glob(os.path.join(folder, "bn_act_cpu_*.csv")))
        runs = []
        for path in paths:
            with open(path) as f:
                runs.append(list(csv.DictReader(f)))
        first = runs[0][0]
        if lines:
            lines.append("")
        lines += [
            f"**{first['device'].split(' (')[0]}** (`{os.path.basename(folder)}`): instruction "
            f"sets {first['cpu_isa']}; C++ kernels {first['cpu_kernels']}; batch "
            f"{first['batch_size']}, channels_last, training, {first['threads']} threads, "
            f"{first['rounds']} interleaved rounds per shape; torch {first['torch']}.",
            "",
            *bn_act_table_lines(runs),
        ]
    return lines or ["No committed run."]


def bn_act_table_lines(runs: list[list[dict]]) -> list[str]:
    """fastres's rows of ``bn_act_shapes`` runs: speed-ups over ATen's composition (forward;
    forward + backward), over its in-place form and torch.compile of it (forward + backward),
    and the bfloat16 target's verdict."""
    lines = [
        "| dtype | shape | forward x ATen [IQR] | forward + backward x ATen [IQR] "
        "| x ATen in place [IQR] | x torch.compile [IQR] | GB/s | target | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rows in runs:
        fastres_rows = [r for r in rows if r["implementation"] == "fastres"]
        for forward, both in zip(fastres_rows[::2], fastres_rows[1::2], strict=True):
            target = {"True": "met", "False": "not met"}.get(both.get("target_met", ""), "")
            shape = both["shape"] + (" + residual" if both["residual"] == "True" else "")
            in_place, compiled = (
                ratio_text(both, key) if key in both else "-"
                for key in ("x_aten_inplace", "x_compile")
            )
            lines.append(
                f"| {both['dtype']} | {shape} | {ratio_text(forward, 'x_aten')} "
                f"| {ratio_text(both, 'x_aten')} | {in_place} | {compiled} "
                f"| {_fmt(both['gb_s'], '.1f')} | {target} | {both['fastres_commit']} |"
            )
    return lines


def _batch_then_threads(path: str) -> tuple[int, int]:
    with open(path) as f:
        r = next(csv.DictReader(f))
    return int(r["batch_size"]), -int(r["threads"])


def _replace_between(text: str, start: str, end: str, lines: list[str]) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = "\n".join(lines)
    return f"{head}{start}\n{body}\n{end}{tail}"


def updated(text: str) -> str:
    """The README's text with every generated table replaced by what the results give."""
    text = _replace_between(text, START, END, table_lines())
    text = _replace_between(text, PEERS_START, PEERS_END, peers_table_lines())
    text = _replace_between(text, CPU_START, CPU_END, cpu_inference_sections())
    return _replace_between(text, BN_ACT_START, BN_ACT_END, bn_act_sections())


def main() -> None:
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = updated(f.read())
    with open(readme, "w") as f:
        f.write(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
