"""The GPU check's finalize phase (benchmarks/finalize_share.py) and its summary section: the
BatchNorm finalize kernels timed alone at ResNet-50's shapes, as a share of the triton training
step, beside the estimate by arithmetic. Here in the dry run's form (CPU, interpreted, toy
sizes), as benchmarks/gpu_check.sh --dry-run runs it; the numbers mean nothing on CPU."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)  # as when the script runs: its sibling modules import
_SPEC = importlib.util.spec_from_file_location(
    "finalize_share", os.path.join(BENCHMARKS, "finalize_share.py")
)
assert _SPEC is not None and _SPEC.loader is not None
finalize_share = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(finalize_share)
ESTIMATE, TILE_ROWS = finalize_share.ESTIMATE, finalize_share.TILE_ROWS
finalize_launches = finalize_share.finalize_launches


def test_finalize_launches_of_a_resnet50_training_step():
    """48 statistics finalizes (3 BatchNorms in each of 16 bottlenecks) and 32 gradient ones (the
    two in a convolution's prologue), over a row per tile: 256 x 56 x 56 / 128 = 6,272 rows for
    the first stage at batch 256, four phases' worth for the stride-2 3x3s."""
    launches = finalize_launches(256, 128)
    count = {
        kernel: sum(n for (k, _, _), n in launches.items() if k == kernel)
        for kernel in ("stats", "gradient")
    }
    assert count == {"stats": 48, "gradient": 32}
    assert launches[("stats", 64, 6272)] == 6  # bn1 and bn2 of the first stage's 3 blocks
    assert launches[("stats", 256, 6272)] == 3  # bn3 of the first stage
    assert launches[("gradient", 128, 4 * 1568)] == 1  # bn1 of stage 2's first block, stride 2
    assert sum(n * rows for (_, _, rows), n in finalize_launches(256, 32).items()) == 4 * sum(
        n * rows for (_, _, rows), n in launches.items()
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The phase as the dry run runs it, and a headline CSV with a triton training step."""
    out = tmp_path_factory.mktemp("gpu_check_finalize")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "finalize_share.py"), "--device", "cpu"]
        + ["--rounds", "1", "--csv", str(out / ".finalize.csv")],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
    )
    fields = ["config", "parity_ok", "batch_size", "train_img_s", "infer_img_s", "peak_mem_mib"]
    with open(out / "resnet50_cuda_bf16_triton.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for config, img_s in (("torchvision", 1.0), ("fastres[triton]", 0.5)):
            writer.writerow(dict(config=config, parity_ok=True, batch_size=2, train_img_s=img_s))
    return out


def test_finalize_phase_writes_every_shape_at_both_tile_heights(dry_run):
    with open(dry_run / ".finalize.csv") as f:
        rows = list(csv.DictReader(f))
    for tile in TILE_ROWS:
        expected = finalize_launches(2, tile, 16)
        got = {
            (r["kernel"], int(r["channels"]), int(r["rows"])): int(r["per_step"])
            for r in rows
            if int(r["tile_rows"]) == tile
        }
        assert got == expected
    assert all(float(r["us_per_call"]) > 0 for r in rows)


def test_summary_sets_the_finalize_time_beside_the_step_and_the_estimate(dry_run):
    subprocess.run(
        [
            sys.executable,
            os.path.join(BENCHMARKS, "gpu_check_summary.py"),
            str(dry_run),
            "--dry-run",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    summary = (dry_run / "summary.md").read_text()
    section = summary.split("## BatchNorm finalize kernels (Triton chain)")[1]
    with open(dry_run / ".finalize.csv") as f:
        rows = list(csv.DictReader(f))
    step_us = 1e6 * 2 / 0.5  # the fastres[triton] row, not torchvision's
    for tile in TILE_ROWS:
        total = sum(float(r["us_per_step"]) for r in rows if int(r["tile_rows"]) == tile)
        assert f"{total:.0f} us per training step with {tile}-row tiles" in section
        assert f"{100 * total / step_us:.1f}%" in section
    assert "(4000.0 ms, resnet50_cuda_bf16_triton.csv)" in section
    assert f"Estimate: {ESTIMATE}." in section


def test_summary_says_what_is_missing(tmp_path):
    subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "gpu_check_summary.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    summary = (tmp_path / "summary.md").read_text()
    assert ".finalize.csv missing: the finalize phase wrote nothing." in summary
    assert f"Estimate: {ESTIMATE}." in summary
