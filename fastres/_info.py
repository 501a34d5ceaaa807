"""``fastres.info()``: what was built, what can run here, and why anything is missing.

``python -m fastres`` prints it readably (fastres/__main__.py).
"""

from __future__ import annotations

import platform

import torch

from fastres import backends
from fastres.cpu_isa import bf16_inference_case, cpu_isa, cpu_kernel_isa
from fastres.plans.folded_convolution import folding_description


def info() -> dict:
    """Returns build and run-time facts about this fastres installation.

    Keys: ``"fastres"``, ``"torch"``, ``"cuda"`` (torch's CUDA version or None), ``"triton"``
    (version or None), ``"gpu"`` (device name or None), ``"cuda_archs"`` (what the CUDA kernels
    were compiled for), ``"built_against"`` (the torch and CUDA versions the extension was
    compiled with; it loads only next to that torch), ``"commit"`` (fastres's commit at build
    time), ``"triton_interpreter"`` (``"off"``, or ``"on"`` with how it runs
    run-time loop bounds: see fastres/triton/interpreter.py), ``"cpu_isa"`` (the instruction
    sets that decide reduced-precision speed: AMX, AVX512_BF16, AVX-512, AVX2), ``"cpu_bf16"``
    (which bfloat16 case applies to this CPU), ``"cpu_kernels"`` (the instruction set the C++
    CPU kernels run, ATen's choice for its own), ``"folded_cpu_path"`` (whether folded CPU
    inference calls oneDNN directly, fastres._onednn, or through ATen's ops) and ``"backends"``:
    ``{name: {"built": bool, "available": bool, "reason": str}}`` for cpu, cuda, triton, torch,
    and ``"folded_eval"``: for each available compiled backend, what eval runs with BatchNorm
    folded (fastres/plans/folded_convolution.py): the oneDNN kernel each dtype runs on CPU, and
    any path this torch version makes it take.
    """
    from fastres import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = backends.build_info()
    return {
        "fastres": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_archs": build["CUDA_ARCHS"] or None,
        "built_against": f"torch {build['TORCH_VERSION']} (CUDA {build['TORCH_CUDA']})",
        "commit": build["COMMIT"],
        "triton_interpreter": _triton_interpreter(triton_version),
        "cpu_isa": ", ".join(cpu_isa()) or "unknown",
        "cpu_bf16": bf16_inference_case(),
        "cpu_kernels": cpu_kernel_isa(),
        "backends": {name: status.as_dict() for name, status in backends.STATUS.items()},
        "folded_cpu_path": backends.onednn_status(),
        "folded_eval": {
            name: folding_description(name)
            for name in ("cpu", "cuda", "triton")
            if backends.STATUS[name].available
        },
    }


def _triton_interpreter(triton_version) -> str:
    if not backends.triton_interpreting() or triton_version is None:
        return "off"
    from fastres.triton.interpreter import loop_bounds_status

    if loop_bounds_status() == "native":
        return "on"
    return (
        f"on; run-time loop bounds repaired (triton {triton_version}'s interpreter cannot "
        "turn a one-element array into an int with this NumPy; squeezed as Triton 3.7 does)"
    )


def format_info(facts: dict) -> str:
    lines = [f"{key:>18}: {facts[key]}" for key in facts if key not in ("backends", "folded_eval")]
    lines.append("          backends:")
    for name, status in facts["backends"].items():
        state = "available" if status["available"] else ("built" if status["built"] else "missing")
        why = f"  ({status['reason']})" if status["reason"] else ""
        lines.append(f"{name:>18}: {state}{why}")
    lines.append("       folded eval:")
    for name, description in facts["folded_eval"].items():
        lines.append(f"{name:>18}: {description}")
    return "\n".join(lines)
