"""Every Triton kernel of fastres compiles for an H100 (sm_90), here, without a GPU.

The CPU tests run the kernels under the Triton interpreter, which never compiles them; this
module compiles every launch the Triton ops make, for the GPU the performance targets are set on,
with Triton's own compiler and ptxas (tests/triton_compile_harness.py, run in two subprocesses
with the interpreter off), and checks what compilation decides: that each kernel, case, precision
and tile configuration compiles, fits in the block's shared memory, that the convolutions'
products run on Hopper's warpgroup tensor-core instructions, that the configurations that run
(deterministic mode's, float32's with TF32 off) do not spill registers, and that the strided
convolutions' K loops are pipelined as deeply as the others'. On a GPU the CUDA-marked tests run
the same kernels for real; this one still checks the H100 target then.

Cold, it takes about 2.5 minutes on 2 cores; Triton's on-disk cache makes reruns quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from triton_compile_harness import CONFIG_SWEEP, EXACT_WEIGHT_GRAD, PRECISIONS, jobs

from fastres.triton import bn_act as triton_bn_act
from fastres.triton import conv as triton_conv

ARCH = 90
SHARED_MEMORY_PER_BLOCK = 232448  # bytes a block may opt into on sm_90 (227 KiB)
HARNESS = Path(__file__).with_name("triton_compile_harness.py")
SHARDS = 2  # the machines CI runs on have 2 cores


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                str(HARNESS),
                str(out / f"{i}.json"),
                "--arch",
                str(ARCH),
                "--shard",
                f"{i}/{SHARDS}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=HARNESS.parent,
        )
        for i in range(SHARDS)
    ]
    logs = [p.communicate(timeout=1800)[0] for p in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, f"compiling for sm_{ARCH} failed:\n{log[-6000:]}"
    shards = [json.loads((out / f"{i}.json").read_text()) for i in range(SHARDS)]
    return {
        "records": [r for shard in shards for r in shard["records"]],
        "autotune_configs": shards[0]["autotune_configs"],
        "deterministic_configs": shards[0]["deterministic_configs"],
    }


def _kernels_of(module) -> set[str]:
    """The module's launchable Triton kernels: by this project's naming, the ``..._kernel``
    ones (``@triton.jit`` helpers they call are compiled into them)."""
    return {
        name
        for name, value in vars(module).items()
        if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.KernelInterface)
    }


def test_every_kernel_compiles(compiled):
    kernels = _kernels_of(triton_bn_act) | _kernels_of(triton_conv)
    assert len(kernels) >= 9
    assert kernels <= {r["kernel"] for r in compiled["records"]}


def test_every_case_compiles(compiled):
    planned = {(dtype, precision, case, det) for _, dtype, precision, case, _, det in jobs()}
    done = {
        (r["dtype"], r["precision"], r["case"], r["deterministic"]) for r in compiled["records"]
    }
    assert planned == done


@pytest.mark.parametrize(
    "kernel", ["_conv_forward_kernel", "_conv_input_grad_kernel", "_conv_weight_grad_kernel"]
)
def test_every_tile_configuration_compiles(compiled, kernel):
    configs = compiled["autotune_configs"][kernel]
    assert len(configs) > 1  # the GPU's list, not the interpreter's single configuration
    swept = [
        r["config"]
        for r in compiled["records"]
        if r["kernel"] == kernel and r["case"] in CONFIG_SWEEP and r["dtype"] == "bfloat16"
    ]
    missing = [c for c in configs if c not in swept]
    assert not missing, f"{kernel}: configurations never compiled: {missing}"


def test_shared_memory_fits_a_block(compiled):
    too_big = [
        (r["kernel"], r["dtype"], r["config"], r["shared"])
        for r in compiled["records"]
        if r["shared"] > SHARED_MEMORY_PER_BLOCK
    ]
    assert not too_big


def test_convolutions_use_warpgroup_tensor_cores(compiled):
    """The largest tile (the first configuration: 128 x 128, 8 warps) must multiply with wgmma
    in every precision that has tensor cores (not float32 with exact products: TF32 off)."""
    first = {kernel: configs[0] for kernel, configs in compiled["autotune_configs"].items()}
    checked = [
        r
        for r in compiled["records"]
        if r["kernel"] in first and r["config"] == first[r["kernel"]] and r["precision"] != "ieee"
    ]
    assert {r["dtype"] for r in checked} == {"float32", "float16", "bfloat16"}
    assert not [(r["kernel"], r["dtype"], r["case"]) for r in checked if not r["wgmma"]]


def test_resnet50_convolutions_do_not_spill_registers_in_bfloat16(compiled):
    """No register spills (local-memory stack frames) in bf16 for ResNet-50's convolutions (the
    grouped ResNeXt ones at the 128 x 128 tile do spill a few bytes; autotuning weighs that)."""
    spilling = [
        (r["kernel"], r["case"], r["config"], r["spill_bytes"])
        for r in compiled["records"]
        if r["dtype"] == "bfloat16"
        and r["kernel"].startswith("_conv")
        and not r["case"].startswith("grouped")
        and r["spill_bytes"] > 0
    ]
    assert not spilling


def test_weight_gradient_atomics_are_relaxed(compiled):
    """The weight gradient's split sums need atomic adds, not memory ordering: acq_rel atomics
    fence every add (Triton's default)."""
    weight_grad = [r for r in compiled["records"] if r["kernel"] == "_conv_weight_grad_kernel"]
    assert weight_grad and all(r["atomics"] > 0 for r in weight_grad)
    assert not [(r["dtype"], r["case"]) for r in weight_grad if r["ordered_atomics"]]


def test_deterministic_mode_runs_one_configuration_per_kernel_without_spills(compiled):
    """Under torch.use_deterministic_algorithms(True) each convolution kernel runs its one
    pinned configuration (fastres.triton.conv.DETERMINISTIC_SHAPES), in every dtype and
    precision, and it spills no registers in any."""
    pinned = compiled["deterministic_configs"]
    records = [r for r in compiled["records"] if r["deterministic"] and r["kernel"] in pinned]
    ran = {(r["kernel"], r["dtype"], r["precision"]) for r in records}
    assert ran == {(k, dtype, precision) for k in pinned for dtype, precision in PRECISIONS}
    assert not [(r["kernel"], r["config"]) for r in records if r["config"] != pinned[r["kernel"]]]
    assert not [
        (r["kernel"], r["dtype"], r["precision"], r["spill_bytes"])
        for r in records
        if r["spill_bytes"] > 0
    ]


def test_float32_weight_gradient_with_tf32_off_times_no_spilling_configuration(compiled):
    """With exact float32 products (TF32 off) the weight gradient's products run on FMA units;
    every configuration it may time then (all of them compiled for the 3x3 stride-2 case)
    compiles without register spills."""
    candidates = [
        r
        for r in compiled["records"]
        if r["kernel"] == "_conv_weight_grad_kernel"
        and r["case"] in EXACT_WEIGHT_GRAD
        and (r["dtype"], r["precision"]) == ("float32", "ieee")
        and not r["deterministic"]
    ]
    assert len(candidates) > 1
    assert not [(r["config"], r["spill_bytes"]) for r in candidates if r["spill_bytes"] > 0]


def _pipeline(compiled, kernel: str, case: str) -> tuple:
    """(buffers, async_waits) of ``kernel`` in bfloat16 ``case`` at the first configuration."""
    first = compiled["autotune_configs"][kernel][0]
    found = {
        (tuple(r["buffers"]), tuple(r["async_waits"]))
        for r in compiled["records"]
        if r["kernel"] == kernel
        and r["case"] == case
        and r["dtype"] == "bfloat16"
        and not r["deterministic"]
        and r["config"] == first
    }
    assert len(found) == 1, (kernel, case, found)
    return found.pop()


@pytest.mark.parametrize(
    "kernel, case, reference",
    [
        # The input gradient by phase (stride 2) computes its taps in the K loop, and loads
        # none there: as deep a pipeline as stride 1 (a tap table read in the loop left 2
        # buffers and no copy in flight across iterations: async_wait num = 0).
        (
            "_conv_input_grad_kernel",
            "3x3/2 bn-relu prologue backward",
            "1x1 bn-relu prologue backward",
        ),
        (
            "_conv_input_grad_kernel",
            "1x1/2 bn-relu prologue backward",
            "1x1 bn-relu prologue backward",
        ),
        # A 1x1 weight's kh / kw strides (1, as torch gives size-1 dimensions) are not passed
        # as such: Triton specialises them, and the weight loads of the strided 1x1 (forward
        # and input gradient) then went unpipelined.
        (
            "_conv_forward_kernel",
            "1x1/2 bn-relu prologue + stats",
            "3x3/2 bn-relu prologue + stats",
        ),
    ],
    ids=["input-grad-3x3-stride2", "input-grad-1x1-stride2", "forward-1x1-stride2"],
)
def test_strided_convolutions_are_pipelined_as_deeply_as_the_others(
    compiled, kernel, case, reference
):
    ours, theirs = _pipeline(compiled, kernel, case), _pipeline(compiled, kernel, reference)
    assert ours == theirs, f"{case}: buffers, async_wait depths {ours}; {reference}: {theirs}"
    buffers, waits = ours
    assert max(buffers) >= 3 and max(waits) >= 1  # a pipeline at all (3 stages at this tile)
