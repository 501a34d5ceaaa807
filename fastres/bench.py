"""``python -m fastres.bench``: verify, then benchmark, a ResNet against torchvision's.

It builds torchvision's model and the fastres one from the same weights, checks parity first
(largest output and gradient differences; a configuration whose parity check fails is reported
as failed, its speed is not measured, and the command exits non-zero), then measures side by
side in one run: training-step and inference throughput, peak memory on CUDA, and the activation
bytes kept for backward, for torchvision eager, torchvision + torch.compile, fastres eager on each
available backend, and fastres + torch.compile. Steps are timed in interleaved rounds (one step
of every configuration per round, in a rotating order; fastres.interleaved), so that a machine
that slows down or speeds up mid-run moves every configuration alike. It prints medians with
their interquartile ranges, speed-ups over torchvision eager paired round by round (marked
"n.s." when not significant) and the targets, and writes a CSV and a PNG chart under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastres
from fastres import backends
from fastres.backends import STATUS
from fastres.interleaved import paired_speedups, spread_of, time_interleaved
from fastres.memory import saved_tensor_bytes

MODELS = ("resnet50", "resnet18", "resnext50_32x4d")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Targets: activation bytes kept for backward in training, as a fraction of torchvision's; and
# eval throughput (BatchNorm folded) against torchvision eager, by device.
ACTIVATION_BYTES_TARGET = 0.86
INFERENCE_TARGET = {"cpu": 1.5, "cuda": 1.3}
# Parity rule (as in tests/tolerances.py): against a float64 run of torchvision's model on the
# same batch, fastres's error may be at most ERROR_FACTOR times torchvision's own error in the
# same precision, plus a floor of a few units in the last place. Errors are relative: max |a - b|
# / max |b| for outputs, ||a - b|| / ||b|| over all parameter gradients (float32 gradients of a
# random deep network differ from float64 by a few percent in PyTorch itself).
ERROR_FACTOR = 2.0
FLOOR_ULPS = 4


@dataclass
class Config:
    name: str  # e.g. "torchvision", "fastres[cpu]+compile"
    family: str  # "torchvision" or "fastres"
    backend: str | None
    compile: bool


@dataclass
class Result:
    config: Config
    parity: dict = field(default_factory=dict)
    parity_ok: bool = True
    train_seconds: list[float] = field(default_factory=list)  # one per round
    infer_seconds: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None
    saved_mib: float | None = None


@dataclass
class Prepared:
    """One configuration ready to time: its model (compiled or not) and its two steps."""

    result: Result
    model: nn.Module
    runner: nn.Module
    batch: torch.Tensor
    train_step: Callable[[], object]
    infer_step: Callable[[], object]


# ---------------------------------------------------------------------------------------------
# Models and steps


def build_reference(model: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, model)()
    return net.to(device).to(memory_format=torch.channels_last)


def build_fast(reference: nn.Module, backend: str) -> nn.Module:
    """fastres's model with exactly the reference's weights and buffers."""
    return fastres.convert(reference, backend=backend)


def _autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_train_step(model: nn.Module, x, labels, device, dtype) -> Callable[[], torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


# ---------------------------------------------------------------------------------------------
# Parity


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _relative_norm(a: list, b: list) -> float:
    diff = torch.cat([(x.float() - y.float()).flatten() for x, y in zip(a, b, strict=True)])
    return (diff.norm() / torch.cat([y.float().flatten() for y in b]).norm()).item()


def _train_and_eval(model: nn.Module, x, labels, device, dtype, autocast=True):
    """Training logits and parameter gradients of one forward/backward, then eval logits."""
    model.train()
    with _autocast(device, dtype if autocast else torch.float32):
        logits = model(x)
    # The loss in float32, or in float64 for the float64 reference.
    F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels).backward()
    model.eval()
    with torch.no_grad(), _autocast(device, dtype if autocast else torch.float32):
        eval_logits = model(x)
    return {
        "train output": logits.detach(),
        "gradients": [p.grad for p in model.parameters()],
        "eval output": eval_logits,
    }


def _error(values, exact) -> float:
    if isinstance(exact, list):
        return _relative_norm(values, exact)
    return _relative(values, exact)


def check_parity(reference: nn.Module, candidate: nn.Module, x, labels, device, dtype) -> dict:
    """Errors against a float64 run of the reference, for a copy of the reference and for the
    candidate itself (compiled or not, as it will be measured), on the same batch.

    Returns {quantity: (candidate error, torchvision error)}.
    """
    exact = _train_and_eval(
        copy.deepcopy(reference).double(), x.double(), labels, device, dtype, autocast=False
    )
    theirs = _train_and_eval(copy.deepcopy(reference), x, labels, device, dtype)
    ours = _train_and_eval(candidate, x, labels, device, dtype)
    return {
        name: (_error(ours[name], exact[name]), _error(theirs[name], exact[name])) for name in exact
    }


def parity_passes(parity: dict, dtype: torch.dtype) -> bool:
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    return all(ours <= ERROR_FACTOR * theirs + floor for ours, theirs in parity.values())


# ---------------------------------------------------------------------------------------------
# Running the configurations


def configurations(device: str, backends: list[str], compile_: bool) -> list[Config]:
    configs = [Config("torchvision", "torchvision", None, False)]
    if compile_:
        configs.append(Config("torchvision+compile", "torchvision", None, True))
    for backend in backends:
        configs.append(Config(f"fastres[{backend}]", "fastres", backend, False))
        if compile_:
            configs.append(Config(f"fastres[{backend}]+compile", "fastres", backend, True))
    return configs


def available_backends(device: str, requested: str) -> list[str]:
    if requested != "all":
        return [requested]
    names = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return [name for name in names if STATUS[name].available] or ["torch"]


def prepare(
    config: Config, reference: nn.Module, args, device: str, dtype: torch.dtype
) -> Prepared:
    """Builds the configuration's model from the reference's weights (a copy of its own, so the
    configurations' optimizer steps never touch each other), checks its parity, and returns its
    training and inference steps on one fixed channels_last batch."""
    result = Result(config)
    model = copy.deepcopy(reference)  # channels_last, like the reference and the input
    if config.family == "fastres":
        assert config.backend is not None  # every fastres configuration names its backend
        model = build_fast(model, config.backend)
    runner = (
        cast(nn.Module, torch.compile(model, mode=args.compile_mode)) if config.compile else model
    )
    images = args.batch_size
    x = torch.randn(images, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    labels = torch.randint(0, 1000, (images,), device=device)
    if config.name != "torchvision":  # the baseline is the reference itself
        parity_images = max(2, min(images, 4))
        result.parity = check_parity(
            reference, runner, x[:parity_images], labels[:parity_images], device, dtype
        )
        result.parity_ok = parity_passes(result.parity, dtype)
    train_step = make_train_step(runner, x, labels, device, dtype)

    def infer_step():
        with torch.no_grad(), _autocast(device, dtype):
            return runner(x)

    return Prepared(result, model, runner, x, train_step, infer_step)


def measure_memory(prepared: Prepared, device: str, dtype: torch.dtype) -> None:
    """Activation bytes kept for backward, and on CUDA the training step's peak memory above
    what was allocated before it (so the other configurations' weights do not count)."""
    model, result = prepared.model, prepared.result
    model.train()

    def forward():
        with _autocast(device, dtype):
            return model(prepared.batch)

    result.saved_mib = saved_tensor_bytes(forward, exclude=model.parameters()) / 2**20
    if device == "cuda":
        prepared.runner.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prepared.train_step()
        torch.cuda.synchronize()
        result.peak_mem_mib = (torch.cuda.max_memory_allocated() - resident) / 2**20


def measure_all(prepared: list[Prepared], args, device: str, dtype: torch.dtype) -> None:
    """Times every configuration whose parity passed, in interleaved rounds: training steps
    first, then inference steps in eval mode."""
    timed = [p for p in prepared if p.result.parity_ok]
    warmup = 3 if device == "cuda" else 1
    for p in timed:
        p.runner.train()
    train = time_interleaved(
        {p.result.config.name: p.train_step for p in timed},
        args.rounds,
        lambda: _sync(device),
        warmup,
    )
    for p in timed:
        p.result.train_seconds = train[p.result.config.name]
        measure_memory(p, device, dtype)
        p.runner.eval()
    infer = time_interleaved(
        {p.result.config.name: p.infer_step for p in timed},
        args.rounds,
        lambda: _sync(device),
        warmup,
    )
    for p in timed:
        p.result.infer_seconds = infer[p.result.config.name]


# ---------------------------------------------------------------------------------------------
# Output


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
    base = next(r for r in results if r.config.name == "torchvision")
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
    print(
        f"{rows[0]['rounds'] or 0} interleaved rounds; img/s is the median round, x tv the "
        "median of per-round speed-ups over torchvision [interquartile range]; n.s.: not "
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
        f"\nparity, relative error against torchvision in float64 (torchvision's own error in "
        f"brackets; rule: at most {ERROR_FACTOR:g}x it plus {FLOOR_ULPS} ulp):"
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


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastres.bench", description=__doc__.split("\n\n")[0]
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
    for name in ("batch_size", "rounds", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
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
    return "; ".join(
        f"{name.strip('_').removesuffix('_kernel')}: {c.shapes} shapes in {c.seconds:.1f} s"
        for name, c in report.items()
    )


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="fastres.bench", unit="config", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    reference = build_reference(args.model, args.device)
    configs = configurations(
        args.device, available_backends(args.device, args.backend), args.compile
    )
    prepared = [
        prepare(config, reference, args, args.device, dtype) for config in _progress(configs)
    ]
    measure_all(prepared, args, args.device, dtype)
    results = [p.result for p in prepared]
    print(f"Triton autotuning: {_triton_tuning()}")
    meta = {
        "model": args.model,
        "device": device_name(args.device),
        "device_type": args.device,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "compile_mode": args.compile_mode,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": fastres.info()["triton"],
        "triton_autotune": _triton_autotune(),
        "triton_tuning": _triton_tuning(),
        "fastres_commit": fastres_commit(),
    }
    rows = rows_of(results, meta)
    print_table(rows, meta)
    if not args.compile:
        print("torch.compile not measured (--no-compile)")
    csv_path = args.csv or os.path.join(args.out, f"{args.model}_{args.device}_{args.dtype}.csv")
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


if __name__ == "__main__":
    sys.exit(main())
