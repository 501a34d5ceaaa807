"""The CUDA kernels, checked without a GPU: what ptxas decides for sm_90, and the host-testable
parts of their indexing.

Each ``csrc/cuda/*.cu`` (no torch headers: seconds to compile) is compiled for sm_90 with
``-Xptxas -v``; no kernel may keep a stack frame or spill registers. A stack frame in these
memory-bound kernels means per-element arrays in local memory (the elementwise passes had 16 to
64 bytes of them, from a tail loop indexing an array by a run-time bound).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))


def _ptxas_report(source: Path, tmp_path: Path) -> list[tuple[str, int, int]]:
    """(mangled kernel, stack frame bytes, spill store bytes) of every entry function."""
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is not on PATH (CI compiles the CUDA sources in every run)"
    result = subprocess.run(
        [nvcc, "-O3", "-std=c++17", "-arch=sm_90", f"-I{CSRC}", f"-I{CSRC / 'cuda'}"]
        + ["-Xptxas", "-v", "-c", str(source), "-o", str(tmp_path / "probe.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    entries = re.findall(
        r"Compiling entry function '([^']+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores",
        result.stderr,
        re.S,
    )
    return [(name, int(stack), int(spills)) for name, stack, spills in entries]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_keep_no_stack_frame_and_no_spills(source, tmp_path):
    report = _ptxas_report(source, tmp_path)
    assert report, "ptxas reported no entry functions"
    offending = [(name, stack, spills) for name, stack, spills in report if stack or spills]
    assert not offending


def test_nchw_reduction_steps_read_every_element_once(tmp_path):
    """csrc/cuda/nchw_steps.h, the NCHW reduction's walk over a channel (whole small planes a
    step), compiled for the host and run over plane counts and sizes from 1 to 112 x 112."""
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler, "no C++ compiler on PATH (the extension's build needs one)"
    binary = tmp_path / "nchw_steps_test"
    source = CSRC.parent / "tests" / "cpp" / "nchw_steps_test.cpp"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", f"-I{CSRC}", str(source), "-o", str(binary)], check=True
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout
