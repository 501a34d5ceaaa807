"""The CPU's instruction sets that decide how fast reduced-precision inference runs on it.

oneDNN (through ATen) picks its convolution kernels by instruction set: AMX tiles for bfloat16
(and AMX_FP16 or AVX512_FP16 for float16) where the CPU has them, AVX512_BF16 dot products
without AMX, and on older AVX-512 or AVX2 CPUs bfloat16 converted to float32 inside the kernels
(correct, and no faster than float32). Benchmarks record these with their figures.
"""

from __future__ import annotations

import functools

__all__ = ["ISA_FLAGS", "bf16_inference_case", "cpu_isa", "cpu_kernel_isa"]

# /proc/cpuinfo flag -> the name benchmarks print, fastest first.
ISA_FLAGS = {
    "amx_bf16": "AMX_BF16",
    "amx_fp16": "AMX_FP16",
    "amx_tile": "AMX_TILE",
    "avx512_bf16": "AVX512_BF16",
    "avx512_fp16": "AVX512_FP16",
    "avx512f": "AVX-512",
    "avx2": "AVX2",
}


@functools.cache
def cpu_isa() -> tuple[str, ...]:
    """The instruction sets of :data:`ISA_FLAGS` this CPU has (Linux's /proc/cpuinfo; empty
    where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return ()
    return tuple(name for flag, name in ISA_FLAGS.items() if flag in flags)


def bf16_inference_case() -> str:
    """Which bfloat16 case applies to this CPU, in words, for ``python -m fastres``."""
    isa = cpu_isa()
    if "AMX_BF16" in isa:
        return "AMX: bfloat16 convolutions run on AMX tiles (the fastest case)"
    if "AVX512_BF16" in isa:
        return "AVX512_BF16: bfloat16 dot products in AVX-512, no AMX"
    if "AVX-512" in isa or "AVX2" in isa:
        return (
            "no bfloat16 instructions: oneDNN converts bfloat16 to float32 in its kernels "
            "(correct, no faster than float32)"
        )
    return "unknown (the CPU's flags could not be read)"


def cpu_kernel_isa() -> str:
    """The instruction set fastres's C++ CPU kernels (bn_act) run: ``"AVX512"``, ``"AVX2"`` or
    ``"DEFAULT"`` (the baseline build), following the level ATen picks for its own CPU kernels
    (``ATEN_CPU_CAPABILITY`` lowers both); ``"not built"`` without the extension."""
    from fastres import backends

    if backends.EXTENSION is None:
        return "not built"
    return str(backends.EXTENSION.cpu_kernel_isa())  # type: ignore[attr-defined]
