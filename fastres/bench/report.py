"""fastres.bench's output: the table, the CSV and the chart, and the shared speed-up wording."""

from __future__ import annotations

import csv
import platform

import torch

from fastres import backends
from fastres.bench.interleaved import paired_speedups, spread_of
from fastres.bench.models import Result, is_detector
from fastres.testing import ERROR_FACTOR, FLOOR_ULPS

# Targets: activation bytes kept for backward in training, as a fraction of torchvision's; and
# eval throughput (BatchNorm folded) against torchvision eager, by device.
ACTIVATION_BYTES_TARGET = 0.86


INFERENCE_TARGET = {"cpu": 1.5, "cuda": 1.3}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def fastres_commit() -> str:
    """fastres's commit, as recorded when the extension was built (no git call at run time)."""
    return backends.build_info()["COMMIT"]


def _timing_columns(result: Result, base: Result, batch_size: int) -> dict:
    """Images per second (median, interquartile range) of training and inference, and the
    speed-up over torchvision eager from steps paired round by round."""
    row: dict = {"rounds": len(result.infer_seconds) or len(result.train_seconds) or None}
    for mode in ("train", "infer"):
        seconds, base_seconds = getattr(result, f"{mode}_seconds"), getattr(base, f"{mode}_seconds")
        if not seconds:
            row[f"{mode}_img_s"] = None
            continue
        rate = spread_of(seconds).scaled(batch_size)
        row.update(
            {
                f"{mode}_img_s": rate.median,
                f"{mode}_img_s_low": rate.low,
                f"{mode}_img_s_high": rate.high,
            }
        )
        if base_seconds:
            ratio = spread_of(paired_speedups(base_seconds, seconds))
            row.update(
                {
                    f"{mode}_vs_torchvision": ratio.median,
                    f"{mode}_vs_torchvision_low": ratio.low,
                    f"{mode}_vs_torchvision_high": ratio.high,
                    f"{mode}_significant": result is base or ratio.significant,
                }
            )
    return row


def _peer_columns(result: Result, peers: list[Result], compiled: Result | None) -> dict:
    """For a fastres configuration beside ONNX Runtime / OpenVINO: its inference speed-up over
    each (paired round by round), its eval error against each's, and the CPU inference
    targets: at least as fast as ONNX Runtime, faster than OpenVINO and than the compiled
    reference (when measured), an error no larger than ONNX Runtime's."""
    row: dict = {}
    if compiled is not None and result.infer_seconds and compiled.infer_seconds:
        ratio = spread_of(paired_speedups(compiled.infer_seconds, result.infer_seconds))
        row["infer_vs_compiled"] = ratio.median
        row["infer_vs_compiled_low"] = ratio.low
        row["infer_vs_compiled_high"] = ratio.high
    error = result.parity.get("inference output", (None, None))[0]
    for peer in peers:
        name = peer.config.name
        if result.infer_seconds and peer.infer_seconds:
            ratio = spread_of(paired_speedups(peer.infer_seconds, result.infer_seconds))
            row[f"infer_vs_{name}"] = ratio.median
            row[f"infer_vs_{name}_low"] = ratio.low
            row[f"infer_vs_{name}_high"] = ratio.high
        peer_error = peer.parity.get("inference output", (None, None))[0]
        if error is not None and peer_error is not None:
            row[f"eval_error_vs_{name}"] = error / peer_error if peer_error else None
    if "infer_vs_onnxruntime" in row and "infer_vs_openvino" in row:
        row["peers_target_met"] = (
            row["infer_vs_onnxruntime"] >= 1.0
            and row["infer_vs_openvino"] > 1.0
            and (row.get("eval_error_vs_onnxruntime") or 0.0) <= 1.0
            and row.get("infer_vs_compiled", 2.0) > 1.0
        )
    return row


def _fused_columns(result: Result, fused: Result) -> dict:
    """A fastres configuration's inference speed-up over the detector's fuse()d model (issue
    26's target), paired round by round."""
    if not (result.infer_seconds and fused.infer_seconds):
        return {}
    ratio = spread_of(paired_speedups(fused.infer_seconds, result.infer_seconds))
    return {
        "infer_vs_fused": ratio.median,
        "infer_vs_fused_low": ratio.low,
        "infer_vs_fused_high": ratio.high,
    }


def rows_of(results: list[Result], meta: dict) -> list[dict]:
    base = next(r for r in results if r.config.family == "reference" and not r.config.compile)
    peers = [r for r in results if r.config.family == "peer"]
    compiled = next(
        (r for r in results if r.config.family == "reference" and r.config.compile), None
    )
    fused = next((r for r in results if r.config.family == "fused reference"), None)
    rows = []
    for r in results:
        row = {
            **meta,
            "config": r.config.name,
            "parity_ok": r.parity_ok,
            **_timing_columns(r, base, meta["batch_size"]),
            "first_call_s": r.first_call_s,
            "peak_mem_mib": r.peak_mem_mib,
            "saved_mib": r.saved_mib,
            **{f"parity_{k.replace(' ', '_')}": ours for k, (ours, _) in r.parity.items()},
            **{
                f"torchvision_error_{k.replace(' ', '_')}": theirs
                for k, (_, theirs) in r.parity.items()
            },
        }
        if r.config.family == "fastres" and not r.config.compile and peers:
            row.update(_peer_columns(r, peers, compiled))
        if r.config.family == "fastres" and fused is not None:
            row.update(_fused_columns(r, fused))
        if r.saved_mib is not None and base.saved_mib:
            row["saved_vs_torchvision"] = r.saved_mib / base.saved_mib
        # The ResNets' targets only: a detector is judged against its fuse()d model, whose row
        # gives that ratio.
        resnet = not is_detector(meta["model"])
        if resnet and r.config.family == "fastres" and "saved_vs_torchvision" in row:
            row["saved_target_met"] = row["saved_vs_torchvision"] <= ACTIVATION_BYTES_TARGET
            if not r.config.compile and "infer_vs_torchvision" in row:
                target = INFERENCE_TARGET[meta["device_type"]]
                row["infer_target_met"] = row["infer_vs_torchvision"] >= target
        rows.append(row)
    return rows


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def speedup_text(median: float, low: float, high: float, significant: bool) -> str:
    """'1.29 [1.21-1.33]': a median speed-up and its interquartile range, with ' n.s.' when the
    range contains 1.0 (not significant)."""
    return f"{median:.2f} [{low:.2f}-{high:.2f}]" + ("" if significant else " n.s.")


def row_speedup_text(row: dict, mode: str) -> str:
    """speedup_text of ``mode`` ("train" or "infer") for a row of the table, as built here or as
    read back from the CSV (strings); '-' where it was not measured."""
    median = row.get(f"{mode}_vs_torchvision")
    if median in (None, ""):
        return "-"
    significant = row[f"{mode}_significant"]
    return speedup_text(
        float(median),
        float(row[f"{mode}_vs_torchvision_low"]),
        float(row[f"{mode}_vs_torchvision_high"]),
        significant in (True, "True"),
    )


def print_table(rows: list[dict], meta: dict) -> None:
    print(
        f"\n{meta['model']} on {meta['device']} ({meta['dtype']}, batch {meta['batch_size']}, "
        f"torch.compile mode {meta.get('compile_mode', 'default')}"
        f"{' with freezing' if meta.get('inductor_freezing') else ''}, "
        f"{meta['image_size']}px), torch {meta['torch']}, fastres {meta['fastres_commit']}"
    )
    reference = meta.get("reference", "torchvision")
    print(
        f"{rows[0]['rounds'] or 0} interleaved rounds; img/s is the median round, x tv the "
        f"median of per-round speed-ups over {reference} (the reference, its own model; 'tv' "
        "and the CSV's *_vs_torchvision columns name it) [interquartile range]; n.s.: not "
        "significant (the range contains 1.0)"
    )
    header = (
        f"{'configuration':<26}{'parity':>8}{'train img/s':>13}  {'x tv':<22}"
        f"{'infer img/s':>13}  {'x tv':<22}{'1st call s':>11}{'saved MiB':>10}{'x tv':>7}"
        f"{'peak MiB':>10}  target"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        parity = "ok" if row["parity_ok"] else "FAILED"
        targets = []
        if "saved_target_met" in row:
            verdict = "met" if row["saved_target_met"] else "NOT met"
            targets.append(f"saved <= {ACTIVATION_BYTES_TARGET} x tv: {verdict}")
        if "infer_target_met" in row:
            verdict = "met" if row["infer_target_met"] else "NOT met"
            targets.append(f"infer >= {INFERENCE_TARGET[meta['device_type']]} x tv: {verdict}")
        if "infer_vs_fused" in row:
            low, high = row["infer_vs_fused_low"], row["infer_vs_fused_high"]
            ratio = speedup_text(row["infer_vs_fused"], low, high, not low <= 1.0 <= high)
            targets.append(f"infer x {reference}+fuse {ratio}")
        target = "; ".join(targets)
        print(
            f"{row['config']:<26}{parity:>8}{_fmt(row['train_img_s'], '.2f'):>13}  "
            f"{row_speedup_text(row, 'train'):<22}{_fmt(row['infer_img_s'], '.2f'):>13}  "
            f"{row_speedup_text(row, 'infer'):<22}{_fmt(row['first_call_s'], '.2f'):>11}"
            f"{_fmt(row['saved_mib'], '.0f'):>10}"
            f"{_fmt(row.get('saved_vs_torchvision'), '.3f'):>7}"
            f"{_fmt(row['peak_mem_mib'], '.0f'):>10}  {target}"
        )
    _print_peer_lines(rows, meta)
    print(
        f"\nparity, relative error against {reference} in float64 ({reference}'s own error "
        f"in brackets; rule: at most {ERROR_FACTOR:g}x it plus {FLOOR_ULPS} ulp):"
    )
    for row in rows:
        if "parity_train_output" in row:
            parts = [
                f"{name} {row['parity_' + key]:.2e} ({row['torchvision_error_' + key]:.2e})"
                for name, key in (
                    ("train output", "train_output"),
                    ("eval output", "eval_output"),
                    ("gradients", "gradients"),
                )
            ]
            print(f"  {row['config']}: " + ", ".join(parts))


def _print_peer_lines(rows: list[dict], meta: dict) -> None:
    """The fastres rows against ONNX Runtime and OpenVINO, when they ran."""
    peer_rows = [r for r in rows if "peers_target_met" in r]
    if not peer_rows:
        return
    print(
        f"\nagainst the peers (ONNX exported in {meta['onnx_export_s']:.1f} s; onnxruntime "
        f"{meta.get('onnxruntime')}, openvino {meta.get('openvino')}; {meta['threads']} "
        "threads), inference speed-up [interquartile range], eval error / the peer's:"
    )
    for row in peer_rows:
        parts = []
        others = ["onnxruntime", "openvino"] + (["compiled"] if "infer_vs_compiled" in row else [])
        for peer in others:
            ratio = speedup_text(
                row[f"infer_vs_{peer}"],
                row[f"infer_vs_{peer}_low"],
                row[f"infer_vs_{peer}_high"],
                not (row[f"infer_vs_{peer}_low"] <= 1.0 <= row[f"infer_vs_{peer}_high"]),
            )
            if peer == "compiled":
                parts.append(f"x {meta.get('reference', 'torchvision')}+compile {ratio}")
                continue
            parts.append(f"x {peer} {ratio}, error {_fmt(row.get(f'eval_error_vs_{peer}'), '.2f')}")
        verdict = "met" if row["peers_target_met"] else "NOT met"
        print(f"  {row['config']}: " + "; ".join(parts) + f"  (target: {verdict})")
    errors = [
        f"{r['config']} {r['parity_inference_output']:.2e}"
        for r in rows
        if r.get("parity_inference_output") is not None
    ]
    own = next(r["torchvision_error_inference_output"] for r in peer_rows)
    print(
        f"  inference output, relative error against {meta.get('reference', 'torchvision')} "
        f"in float64 (the model as converted, eval): {meta.get('reference')} {own:.2e}, "
        + ", ".join(errors)
    )


def write_csv(rows: list[dict], path: str) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_chart(rows: list[dict], meta: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written")
        return False
    measured = [r for r in rows if r["train_img_s"] or r["infer_img_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(measured) + 2))
    for ax, key, title in (
        (axes[0], "train_img_s", "training img/s"),
        (axes[1], "infer_img_s", "inference img/s"),
    ):
        rows_with = [r for r in measured if r[key]]  # peers: inference only
        names = [r["config"] for r in rows_with]
        medians = [r[key] for r in rows_with]
        errors = [
            [m - r[key + "_low"] for m, r in zip(medians, rows_with, strict=True)],
            [r[key + "_high"] - m for m, r in zip(medians, rows_with, strict=True)],
        ]
        ax.barh(names, medians, xerr=errors, color="tab:blue", capsize=3)
        ax.set_title(title)
        ax.invert_yaxis()
    fig.suptitle(
        f"{meta['model']}, {meta['device']}, {meta['dtype']}, batch {meta['batch_size']} "
        "(median and interquartile range of interleaved rounds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
