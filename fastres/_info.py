"""``fastres.info()``: what was built, what can run here, and why anything is missing.

``python -m fastres.info`` prints it readably (fastres/info.py).
"""

from __future__ import annotations

import platform

import torch

from fastres import backends


def info() -> dict:
    """Returns build and run-time facts about this fastres installation.

    Keys: ``"fastres"``, ``"torch"``, ``"cuda"`` (torch's CUDA version or None), ``"triton"``
    (version or None), ``"gpu"`` (device name or None), ``"cuda_archs"`` (what the CUDA kernels
    were compiled for), ``"triton_interpreter"`` and ``"backends"``:
    ``{name: {"built": bool, "available": bool, "reason": str}}`` for cpu, cuda, triton, torch.
    """
    from fastres import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    build = backends._build_info()
    return {
        "fastres": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda_archs": build["CUDA_ARCHS"] or None,
        "triton_interpreter": backends.triton_interpreting(),
        "backends": {name: status.as_dict() for name, status in backends.STATUS.items()},
    }


def format_info(facts: dict) -> str:
    lines = [f"{key:>18}: {facts[key]}" for key in facts if key != "backends"]
    lines.append("          backends:")
    for name, status in facts["backends"].items():
        state = "available" if status["available"] else ("built" if status["built"] else "missing")
        why = f"  ({status['reason']})" if status["reason"] else ""
        lines.append(f"{name:>18}: {state}{why}")
    return "\n".join(lines)
