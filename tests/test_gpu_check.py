"""benchmarks/gpu_check.sh --dry-run: the GPU check's plan and its no-GPU phases, so that the
script cannot break unseen between the rare sessions that have a GPU."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    return result, out


def test_dry_run_prints_the_plan_and_every_phase_passes(dry_run):
    result, out = dry_run
    log = (out / "gpu_check.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert "1 build" in result.stdout and "6 profile" in result.stdout
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run")
    for phase in ("build", "tests", "sanitizer", "headline cpu", "layers", "profile"):
        assert f"| {phase} | ok |" in summary, summary


def test_dry_run_writes_what_the_gpu_run_writes_within_the_limits(dry_run):
    _, out = dry_run
    files = sorted(os.listdir(out))
    assert files == [
        "gpu_check.log",
        "layers.csv",
        "profile.csv",
        "resnet50_cuda_bf16_dry-run.csv",
        "summary.md",
        "tests.xml",
    ]
    assert all(
        (out / name).is_file() and (out / name).stat().st_size < 16 * 2**20 for name in files
    )
    summary = (out / "summary.md").read_text()
    assert "skipped." in summary  # the GPU tests were collected (and skipped without a GPU)
    assert "| fastres[cpu] | ok |" in summary
    assert "| bn_act " in summary and "| conv " in summary
    assert (
        "| fastres::bn_act_conv2d_stats_backward_triton |" in summary
    )  # the profiled step's table
