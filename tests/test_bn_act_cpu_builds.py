"""The C++ CPU kernels are compiled once per instruction set (generic, AVX2, AVX-512) and the
build ATen picks for its own kernels runs. The rest of the suite runs that build; here each
lower one runs the odd shapes, every dtype, both memory formats and every activation, in a
process whose ATen is held to that level with ATEN_CPU_CAPABILITY."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastres.cpu_isa import cpu_kernel_isa

TESTS = Path(__file__).parent

CASES_AT_ONE_LEVEL = """
import itertools, sys, torch
from bn_act_harness import MEMORY_FORMATS, ODD_SHAPES, Case, check_case
from fastres.activation import ACTIVATIONS
from fastres.cpu_isa import cpu_kernel_isa

expected = sys.argv[1]
assert cpu_kernel_isa() == expected, f"kernels run {cpu_kernel_isa()}, expected {expected}"
dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# A shape with whole vectors in every row and plane as well as the odd ones.
for shape, dtype, fmt in itertools.product(ODD_SHAPES + [(2, 64, 6, 6)], dtypes, MEMORY_FORMATS):
    check_case("cpu", "cpu", Case(shape, dtype, fmt))
for activation, dtype, residual, training in itertools.product(
    ACTIVATIONS, dtypes, [True, False], [True, False]
):
    check_case("cpu", "cpu", Case((3, 40, 5, 7), dtype, torch.channels_last, residual=residual,
                                  activation=activation, training=training))
# bn_act_add's forward (the residual after the activation) against the float64 composition.
from fastres.ops import bn_act_add
for activation, dtype, training in itertools.product(ACTIVATIONS, dtypes, [True, False]):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 40, 5, 7, generator=g).to(dtype) for _ in range(2))
    param = torch.float64 if dtype == torch.float64 else torch.float32
    outs = []
    for backend, t, p in (("cpu", dtype, param), ("torch", torch.float64, torch.float64)):
        stats = (torch.zeros(40, dtype=p), torch.ones(40, dtype=p))
        outs.append(bn_act_add(x.to(t), None, None, *stats, residual=r.to(t), training=training,
                               activation=activation, backend=backend))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 5e-2)
    torch.testing.assert_close(outs[0].double(), outs[1], rtol=tol, atol=tol)
print("ok")
"""


def test_the_kernels_run_the_level_aten_runs():
    aten = torch.backends.cpu.get_cpu_capability()
    if aten in ("AVX512", "AVX2"):
        assert cpu_kernel_isa() == aten
    else:
        assert cpu_kernel_isa() == "DEFAULT"


# ATEN_CPU_CAPABILITY's spelling of each level below AVX-512 this processor runs.
LOWER_LEVELS = {"DEFAULT": "default"}
if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
    LOWER_LEVELS["AVX2"] = "avx2"


@pytest.mark.parametrize("level", LOWER_LEVELS)
def test_a_lower_build_matches_the_reference(level):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": LOWER_LEVELS[level]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", CASES_AT_ONE_LEVEL, level],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")


def test_no_vector_instructions_outside_the_instruction_set_builds():
    """Inline code the builds share (the standard library's, c10's, at::parallel_for's) is the
    baseline's copy: the linker keeps one, and an AVX-512 copy would fault on an AVX2-only CPU.
    Every function with an AVX or AVX-512 register is in the avx2 or avx512 build's namespace
    (or instantiated for it)."""
    from fastres import backends

    assert backends.EXTENSION is not None, "fastres._C is not built"
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", backends.EXTENSION.__file__],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    offenders, avx512_functions, function = set(), set(), ""
    for line in disassembly.splitlines():
        if line.endswith(">:"):
            function = line.split("<", 1)[1][:-2]
        elif "%ymm" in line or "%zmm" in line:
            if "avx512" in function:
                avx512_functions.add(function)
            elif "avx2" not in function:
                offenders.add(function)
    assert avx512_functions, "no AVX-512 kernel found in the disassembly: is it read right?"
    assert not offenders, sorted(offenders)[:10]
