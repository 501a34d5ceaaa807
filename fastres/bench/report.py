"""fastres.bench's output: the table, the CSV and the chart, and the shared speed-up wording."""

from __future__ import annotations

import csv
import platform

import torch

from fastres import backends
from fastres.bench.models import Result
from fastres.interleaved import paired_speedups, spread_of
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
    return backends._build_info()["COMMIT"]


def _timing_columns(result: Result, base: Result, batch_size: int) -> dict:
    """Images per second (median, interquartile range) of training and inference, and the
    speed-up over torchvision eager from steps paired round by round."""
    row: dict = {"rounds": len(result.train_seconds) or None}
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


def rows_of(results: list[Result], meta: dict) -> list[dict]:
    base = next(r for r in results if r.config.family == "reference" and not r.config.compile)
    rows = []
    for r in results:
        row = {
            **meta,
            "config": r.config.name,
            "parity_ok": r.parity_ok,
            **_timing_columns(r, base, meta["batch_size"]),
            "peak_mem_mib": r.peak_mem_mib,
            "saved_mib": r.saved_mib,
            **{f"parity_{k.replace(' ', '_')}": ours for k, (ours, _) in r.parity.items()},
            **{
                f"torchvision_error_{k.replace(' ', '_')}": theirs
                for k, (_, theirs) in r.parity.items()
            },
        }
        if r.saved_mib is not None and base.saved_mib:
            row["saved_vs_torchvision"] = r.saved_mib / base.saved_mib
        if r.config.family == "fastres" and "saved_vs_torchvision" in row:
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
        f"torch.compile mode {meta.get('compile_mode', 'default')}, "
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
        f"{'infer img/s':>13}  {'x tv':<22}{'saved MiB':>10}{'x tv':>7}{'peak MiB':>10}  "
        "target"
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
        target = "; ".join(targets)
        print(
            f"{row['config']:<26}{parity:>8}{_fmt(row['train_img_s'], '.2f'):>13}  "
            f"{row_speedup_text(row, 'train'):<22}{_fmt(row['infer_img_s'], '.2f'):>13}  "
            f"{row_speedup_text(row, 'infer'):<22}{_fmt(row['saved_mib'], '.0f'):>10}"
            f"{_fmt(row.get('saved_vs_torchvision'), '.3f'):>7}"
            f"{_fmt(row['peak_mem_mib'], '.0f'):>10}  {target}"
        )
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
    measured = [r for r in rows if r["train_img_s"]]
    names = [r["config"] for r in measured]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(names) + 2))
    for ax, key, title in (
        (axes[0], "train_img_s", "training img/s"),
        (axes[1], "infer_img_s", "inference img/s"),
    ):
        medians = [r[key] for r in measured]
        errors = [
            [m - r[key + "_low"] for m, r in zip(medians, measured, strict=True)],
            [r[key + "_high"] - m for m, r in zip(medians, measured, strict=True)],
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
