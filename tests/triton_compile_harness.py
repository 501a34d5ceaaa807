"""Compiles fastres's Triton kernels for a real GPU target, on a machine without a GPU.

The Triton interpreter (what the CPU tests run) executes a kernel's Python body with NumPy: it
never lowers the kernel through Triton's compiler, so it cannot see what only compilation
checks: types and layouts of ``tl.dot`` operands, constexpr-dependent control flow, the shared
memory each autotuning configuration needs, the tensor-core instructions chosen. This
script runs the Triton ops of fastres (``fastres/ops/bn_act.py``, ``bn_act_add.py``,
``bn_act_pieces.py``, ``fused_conv2d.py``) on CPU tensors with Triton's launch replaced by a
compile-only one: every kernel launch those ops make is compiled to a cubin for the target
architecture (ptxas included) and never run. The tensors' values are meaningless; nothing reads
them.

Run in a fresh interpreter with ``TRITON_INTERPRET`` unset (it must not be chosen before triton is
imported, and the interpreter would skip compilation)::

    python tests/triton_compile_harness.py OUT.json [--arch 90] [--shard i/n]

What compiles in which precision and configuration is ``PLAN`` below. OUT.json gets one record
per launch: kernel, dtype, case, configuration, shared memory bytes, registers per thread and
spilled bytes (cuobjdump), whether Hopper's warpgroup MMA (wgmma) was chosen for its
``tl.dot``, and how deep the software pipeline is (the buffers of multi-buffered shared-memory
allocations, the depths of the async waits); and every convolution kernel's autotuning
configurations and the one it runs in deterministic mode.
tests/test_triton_compile.py runs it (two shards at once) and checks them.

It hooks Triton's launch path (``JITFunction.run``, ``Autotuner.run`` and the active driver), as
of triton 3.7.1 (what torch 2.13.0 installs); another Triton version may need it adjusted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CompileOnlyDriver:
    """The few driver calls a Triton launch makes before it would touch a GPU, answered for a
    fixed target: the launch compiles for it, and the compile-only patches below stop there."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int = 0) -> int:
        return 0


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and spill bytes (the stack frame) of a cubin, as cuobjdump (shipped
    with Triton) reports them."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(usage.group(1)), "spill_bytes": int(usage.group(2))}


def _config_of(kwargs: dict) -> dict:
    """The tile sizes, warps and pipeline stages among a launch's keyword arguments."""
    return {
        k: v
        for k, v in sorted(kwargs.items())
        if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")
    }


def _pipelining(ttgir: str) -> dict:
    """The software pipeline Triton built (TritonGPU IR): ``buffers``, for each shared-memory
    allocation a loop fills (``ttg.local_alloc`` with no initial value), its number of
    buffers (the leading size of a 3-D one, the pipeline's stages; 1 for a 2-D one), and
    ``async_waits``, the ``num`` of each ``ttg.async_wait`` (how many asynchronous copies may
    stay in flight; 0 in a K loop means that none does across an iteration)."""
    shapes = re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<((?:\d+x)+)", ttgir)
    dims = [shape.rstrip("x").split("x") for shape in shapes]
    return {
        "buffers": [int(d[0]) if len(d) == 3 else 1 for d in dims],
        "async_waits": [int(n) for n in re.findall(r"ttg\.async_wait\b[^\n]*\{num = (\d+)", ttgir)],
    }


def _atomics(ptx: str) -> dict:
    """How many atomic instructions (atom / red) the PTX holds, and how many of them order
    memory (acquire, release, acq_rel) where a relaxed one would do."""
    atomics = re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.[\w.]+", ptx, re.M)
    ordered = [a for a in atomics if re.search(r"\.(acq_rel|acquire|release)\b", a)]
    return {"atomics": len(atomics), "ordered_atomics": len(ordered)}


@contextmanager
def compile_only(arch: int, all_configs: Callable[[], bool], records: list) -> Iterator[None]:
    """Within the block, launching a ``@triton.jit`` kernel compiles it for ``sm_<arch>`` and
    appends a record; an autotuned kernel compiles every configuration it would time for the
    launch (its early_config_prune applied) when ``all_configs()``, else the first of them."""
    run, autotuned_run = JITFunction.run, Autotuner.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        started = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if callable(grid):
            grid(kwargs)  # as a launch would: launchers read what their grid recorded
        records.append(
            {
                "kernel": self.fn.__name__,
                "config": _config_of(kwargs),
                "shared": kernel.metadata.shared,
                "wgmma": "warp_group_dot" in kernel.asm["ttgir"],
                **_pipelining(kernel.asm["ttgir"]),
                **_atomics(kernel.asm["ptx"]),
                **_resource_usage(kernel.asm["cubin"]),
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        return kernel

    def compile_configs(self, *args, grid, warmup, **kwargs):
        # What prune_configs reads, as Autotuner.run sets it (the rest come as keywords).
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        for config in configs if all_configs() else configs[:1]:
            self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())

    active = driver._active  # no public getter that does not create the default driver
    driver.set_active(CompileOnlyDriver(arch))
    JITFunction.run, Autotuner.run = compile_instead, compile_configs
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = run, autotuned_run
        driver._active = active


# ---------------------------------------------------------------------------------------------
# What the Triton ops launch: bn_act (every flag that selects another kernel body) and the
# convolutions of a ResNet-50 / ResNeXt-50 bottleneck, training and inference.


def _channel(c: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((c,), value, dtype=torch.float32)


def _bn_act_forward_triton(x, weight, bias, residual, mean, var, training, eps, activation):
    """``fastres::bn_act_forward_triton`` with a momentum of 0.1 (in training it updates the
    running statistics it is given)."""
    return torch.ops.fastres.bn_act_forward_triton(
        x, weight, bias, residual, mean, var, training, 0.1, eps, activation
    )


def bn_act_cases(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    ops = torch.ops.fastres
    cases = {}
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.zeros(2, 64, 4, 4, dtype=dtype).contiguous(memory_format=fmt)
        c = x.shape[1]
        mask = torch.zeros(x.numel() // 8, dtype=torch.uint8)
        for activation in ("relu", "silu"):
            cases[f"bn_act train residual {activation} {layout}"] = (
                lambda x=x, c=c, activation=activation: _bn_act_forward_triton(
                    x,
                    _channel(c, 1),
                    _channel(c),
                    torch.zeros_like(x),
                    _channel(c),
                    _channel(c, 1),
                    True,
                    1e-5,
                    activation,
                )
            )
        cases[f"bn_act_add train silu {layout}"] = lambda x=x, c=c: ops.bn_act_add_forward_triton(
            x,
            _channel(c, 1),
            _channel(c),
            torch.zeros_like(x),
            _channel(c),
            _channel(c, 1),
            True,
            0.1,
            1e-5,
            "silu",
        )
        cases[f"bn_act eval plain {layout}"] = lambda x=x, c=c: _bn_act_forward_triton(
            x, None, None, None, _channel(c), _channel(c, 1), False, 1e-5, "identity"
        )
        cases[f"bn_act backward train {layout}"] = lambda x=x, c=c, mask=mask: (
            ops.bn_act_backward_triton(
                x, x, _channel(c, 1), _channel(c), _channel(c, 1), mask, True, 1e-5, True, True
            )
        )
        cases[f"bn_act backward eval {layout}"] = lambda x=x, c=c, mask=mask: (
            ops.bn_act_backward_triton(
                x, x, None, _channel(c), _channel(c, 1), mask, False, 1e-5, False, False
            )
        )
        cases[f"bn_stats {layout}"] = lambda x=x: ops.bn_stats_triton(x)
        cases[f"bn_act backward reduce {layout}"] = lambda x=x, c=c, mask=mask: (
            ops.bn_act_backward_reduce_triton(x, x, _channel(c), mask, True)
        )
        cases[f"bn_act backward apply {layout}"] = lambda x=x, c=c, mask=mask: (
            ops.bn_act_backward_apply_triton(
                x,
                x,
                _channel(c, 1),
                _channel(c),
                _channel(c, 1),
                mask,
                _channel(c),
                _channel(c),
                x.numel() // c,
                1e-5,
                True,
                True,
            )
        )
    return cases


# (name, C_in, C_out, kernel, stride, padding, groups, input size)
CONVOLUTIONS = [
    ("stem 7x7/2", 3, 64, 7, 2, 3, 1, 16),
    ("1x1", 64, 64, 1, 1, 0, 1, 8),
    ("3x3/2", 64, 64, 3, 2, 1, 1, 8),
    ("1x1/2", 64, 128, 1, 2, 0, 1, 8),  # the projection shortcut of a stage's first block
    ("grouped 3x3 (32 groups)", 128, 128, 3, 1, 1, 32, 8),
]


def conv_cases(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    from fastres.triton.conv import ConvGeometry

    ops = torch.ops.fastres
    cases = {}
    for name, c_in, c_out, k, stride, padding, groups, size in CONVOLUTIONS:
        x = torch.zeros(2, c_in, size, size, dtype=dtype).contiguous(
            memory_format=torch.channels_last
        )
        w = torch.zeros(c_out, c_in // groups, k, k, dtype=dtype)
        geometry = (stride, padding, 1, groups)
        g = ConvGeometry.of(x.shape, w.shape, stride, padding, 1, groups)
        out = torch.zeros(g.N, g.C_OUT, g.OH, g.OW, dtype=dtype).contiguous(
            memory_format=torch.channels_last
        )
        # The stem's input is the image: no BatchNorm before it, no input gradient.
        bn = (
            [None] * 4
            if c_in == 3
            else [_channel(c_in), _channel(c_in, 1), _channel(c_in, 1), _channel(c_in)]
        )
        kind = "plain" if c_in == 3 else "bn-relu prologue"
        activation = "identity" if c_in == 3 else "relu"
        cases |= _training_cases(f"{name} {kind}", x, w, bn, activation, geometry, out, c_in != 3)
        if name == "1x1/2":
            continue  # only its training path: ResNets run the shortcut's BatchNorm after it
        if name == "3x3/2":
            # With a SiLU prologue too: a sigmoid per element loaded, SiLU's derivative in the
            # input gradient's epilogue.
            cases |= _training_cases(
                f"{name} bn-silu prologue", x, w, bn, "silu", geometry, out, True
            )
            # The weight gradient alone (its candidates for float32 with TF32 off).
            cases[f"{name} bn-relu prologue weight gradient"] = (
                lambda x=x, w=w, bn=bn, g=geometry, out=out: (
                    ops.bn_act_conv2d_stats_backward_triton(
                        torch.zeros_like(out), x, w, *bn, True, 1e-5, "relu", *g, False, True
                    )
                )
            )
        cases[f"{name} bias + residual + relu"] = lambda x=x, w=w, geometry=geometry, out=out: (
            ops.conv2d_bias_act_triton(
                x,
                w,
                torch.zeros(out.shape[1], dtype=dtype),
                torch.zeros_like(out),
                "relu",
                *geometry,
            )
        )
        if name == "3x3/2":
            # YOLO's Bottleneck: SiLU, then the residual.
            cases[f"{name} bias + silu + residual"] = lambda x=x, w=w, g=geometry, out=out: (
                ops.conv2d_bias_act_add_triton(
                    x, w, torch.zeros(out.shape[1], dtype=dtype), torch.zeros_like(out), "silu", *g
                )
            )
    # conv1 of a bottleneck: no BatchNorm before it, statistics after; its input gradient.
    x = torch.zeros(2, 64, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(64, 64, 1, 1, dtype=dtype)
    cases |= _training_cases("1x1 plain", x, w, [None] * 4, "identity", (1, 0, 1, 1), x, True)
    return cases


def _training_cases(
    name: str,
    x: torch.Tensor,
    w: torch.Tensor,
    bn: list,
    activation: str,
    geometry: tuple,
    out: torch.Tensor,
    input_grad: bool,
) -> dict[str, Callable[[], object]]:
    """A convolution with statistics (training's forward), and its backward: ``bn`` (mean, var,
    weight, bias) is its BatchNorm prologue (all None: none) with ``activation``; ``out`` is
    like its output."""
    ops = torch.ops.fastres
    return {
        f"{name} + stats": lambda: ops.bn_act_conv2d_stats_triton(
            x, w, *bn, True, 1e-5, activation, *geometry, True
        ),
        f"{name} backward": lambda: ops.bn_act_conv2d_stats_backward_triton(
            torch.zeros_like(out), x, w, *bn, True, 1e-5, activation, *geometry, input_grad, True
        ),
    }


# (family, dtype, precision, case names or None for all, every autotuning config, under
# torch.use_deterministic_algorithms(True)): every case in bfloat16 (the dtype of the targets);
# the most involved convolution (3x3 stride 2 with a BatchNorm prologue, forward and backward)
# in the other precisions, and in every precision in deterministic mode (each kernel's one
# configuration then); a 1x1 one with a prologue in every tile configuration (the 3x3's
# forward takes 15 s a configuration); and the 3x3's weight gradient in every configuration it
# times in float32 with TF32 off. All of it in every precision and configuration would take 20
# minutes on 2 cores.
INVOLVED = ["3x3/2 bn-relu prologue + stats", "3x3/2 bn-relu prologue backward"]
CONFIG_SWEEP = ["1x1 bn-relu prologue + stats", "1x1 bn-relu prologue backward"]
EXACT_WEIGHT_GRAD = ["3x3/2 bn-relu prologue weight gradient"]
PRECISIONS = [("bfloat16", ""), ("float16", ""), ("float32", "tf32"), ("float32", "ieee")]
PLAN = (
    [("bn_act", dtype, "", None, False, False) for dtype in DTYPES]
    + [
        ("conv", "bfloat16", "", None, False, False),
        ("conv", "float32", "tf32", INVOLVED, False, False),
        ("conv", "float32", "ieee", INVOLVED, False, False),
        ("conv", "float16", "", INVOLVED, False, False),
        ("conv", "bfloat16", "", CONFIG_SWEEP, True, False),
        ("conv", "float32", "ieee", EXACT_WEIGHT_GRAD, True, False),
    ]
    + [("conv", dtype, precision, INVOLVED, False, True) for dtype, precision in PRECISIONS]
)


def jobs() -> list[tuple[str, str, str, str, bool, bool]]:
    """(family, dtype, precision, case, every config, deterministic), in a fixed order."""
    out = []
    for family, dtype, precision, names, all_configs, deterministic in PLAN:
        cases = (bn_act_cases if family == "bn_act" else conv_cases)(DTYPES[dtype])
        out += [
            (family, dtype, precision, case, all_configs, deterministic)
            for case in (names if names is not None else cases)
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSON file for the records")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="i/n: compile every n-th job from the i-th (to run n at once)",
    )
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(
            "triton_compile_harness: run with TRITON_INTERPRET unset (the interpreter never "
            "compiles)"
        )
    shard, shards = map(int, args.shard.split("/"))

    import fastres  # noqa: F401  (registers the ops)
    from fastres.triton import conv

    kernels = (
        conv._conv_forward_kernel,
        conv._conv_input_grad_kernel,
        conv._conv_weight_grad_kernel,
    )

    records: list = []
    every_config = {"now": False}
    with compile_only(args.arch, lambda: every_config["now"], records):
        for family, dtype, precision, case, all_configs, deterministic in jobs()[shard::shards]:
            # float32 convolutions use TF32 where torch lets cuDNN do so, exact products else.
            torch.backends.cudnn.allow_tf32 = precision != "ieee"
            every_config["now"] = all_configs
            cases = (bn_act_cases if family == "bn_act" else conv_cases)(DTYPES[dtype])
            first = len(records)
            torch.use_deterministic_algorithms(deterministic)
            try:
                cases[case]()
            finally:
                torch.use_deterministic_algorithms(False)
            for record in records[first:]:
                record.update(
                    dtype=dtype, precision=precision, case=case, deterministic=deterministic
                )
            mode = " (deterministic)" if deterministic else ""
            print(
                f"{dtype} {precision} {case}{mode}: {len(records) - first} launches compiled",
                flush=True,
            )
    with open(args.out, "w") as f:
        json.dump(
            {
                "arch": args.arch,
                "triton": triton.__version__,
                "records": records,
                "autotune_configs": {
                    kernel.base_fn.__name__: [_config_of(c.all_kwargs()) for c in kernel.configs]
                    for kernel in kernels
                },
                "deterministic_configs": {
                    kernel.base_fn.__name__: _config_of(
                        conv._deterministic_config(kernel).all_kwargs()
                    )
                    for kernel in kernels
                },
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
