"""Which kernel backends were built, which can run here, and how ``backend=`` is resolved.

Backends:

``cpu``
    C++ kernels in ``fastres._C`` (CPU tensors).
``cuda``
    CUDA C++ kernels in ``fastres._C`` (CUDA tensors); built whenever a CUDA torch and nvcc were
    found at build time, runnable when a GPU is present.
``triton``
    Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests).
``torch``
    The plain PyTorch composition, also the numerical reference. Always available.

``auto`` picks the fastest available backend for the tensor's device and dtype: ``cpu`` for CPU
tensors, ``cuda`` then ``triton`` for CUDA tensors, and ``torch`` for float64 CUDA tensors, which
neither GPU backend takes (they compute in float32). When the preferred compiled backend is
missing, importing fastres warns once and says why; nothing falls back silently at call time.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

BACKENDS = ("cpu", "cuda", "triton", "torch")
# The activation dtypes of the GPU kernels; cpu and torch also take float64.
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_CHOICES = ("auto",) + BACKENDS


@dataclass(frozen=True)
class BackendStatus:
    built: bool
    available: bool
    reason: str  # empty when available

    def as_dict(self) -> dict[str, Any]:
        return {"built": self.built, "available": self.available, "reason": self.reason}


REBUILD_HINT = (
    "rebuild fastres against it: `make build` in a checkout, or `pip install "
    "--no-build-isolation --no-deps --force-reinstall` of the fastres source"
)


def build_info() -> dict[str, Any]:
    """The build information setup.py wrote for this Python (fastres/_build_info_<tag>.py):
    what was built, against which torch."""
    facts: dict[str, Any] = {
        "CUDA_BUILT": False,
        "CUDA_ARCHS": "",
        "CUDA_NOT_BUILT_REASON": "no build information",
        "ONEDNN_BUILT": False,
        "ONEDNN_NOT_BUILT_REASON": "no build information",
        "TORCH_VERSION": None,
        "TORCH_CUDA": None,
        "COMMIT": "unknown",
    }
    try:
        tag = sys.implementation.cache_tag.replace("-", "_")
        info = importlib.import_module(f"fastres._build_info_{tag}")
    except ImportError:
        return facts
    return {name: getattr(info, name, default) for name, default in facts.items()}


def torch_mismatch(build: dict[str, Any]) -> str:
    """Why the extension cannot be loaded next to the running torch ("" when it can).

    A C++ extension is bound to the exact torch (and CUDA major version) it was compiled
    against; loaded next to another one it fails with undefined symbols, or worse."""
    built, built_cuda = build["TORCH_VERSION"], build["TORCH_CUDA"]
    if built is None:  # no build information: the import itself will tell
        return ""
    cuda_major = (built_cuda or "").split(".")[0], (torch.version.cuda or "").split(".")[0]
    if built == torch.__version__ and cuda_major[0] == cuda_major[1]:
        return ""
    return (
        f"fastres._C was built against torch {built} (CUDA {built_cuda}), but torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}) is loaded; {REBUILD_HINT}"
    )


def _load_extension() -> tuple[ModuleType | None, str]:
    """Imports fastres._C (which registers torch.ops.fastres.*) unless it was built against
    another torch; returns (module or None, why not)."""
    mismatch = torch_mismatch(build_info())
    if mismatch:
        return None, mismatch
    try:
        return importlib.import_module("fastres._C"), ""
    except ImportError as error:  # not built, or built against another torch
        return None, f"fastres._C could not be imported ({error}); {REBUILD_HINT}"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> tuple[object, dict[str, BackendStatus]]:
    extension, why_no_extension = _load_extension()
    build = build_info()
    gpu = torch.cuda.is_available()
    status: dict[str, BackendStatus] = {}

    status["cpu"] = BackendStatus(extension is not None, extension is not None, why_no_extension)

    cuda_built = extension is not None and bool(getattr(extension, "with_cuda", 0))
    if not cuda_built:
        reason = why_no_extension or f"not built: {build['CUDA_NOT_BUILT_REASON']}"
    elif not gpu:
        reason = "built, but no CUDA GPU is visible to torch"
    else:
        reason = ""
    status["cuda"] = BackendStatus(cuda_built, cuda_built and gpu, reason)

    has_triton = importlib.util.find_spec("triton") is not None
    if not has_triton:
        reason = "the triton package is not installed"
    elif not gpu and not triton_interpreting():
        reason = (
            "installed, but it needs a CUDA GPU (or TRITON_INTERPRET=1 to run on CPU for tests)"
        )
    else:
        reason = ""
    status["triton"] = BackendStatus(
        has_triton, has_triton and (gpu or triton_interpreting()), reason
    )

    status["torch"] = BackendStatus(True, True, "")
    return extension, status


EXTENSION, STATUS = _probe()

if not STATUS["cpu"].available:
    warnings.warn(
        f"fastres: {STATUS['cpu'].reason}. backend='auto' will run the plain PyTorch composition "
        "('torch' backend) on CPU tensors.",
        RuntimeWarning,
        stacklevel=2,
    )


def _load_onednn() -> tuple[Any | None, str, str]:
    """fastres._onednn's program class (``torch.classes.fastres.FoldedProgram``), the oneDNN
    version it was built with, and why it is missing ("" when it is not): folded CPU inference
    then runs through ATen's oneDNN ops, per block."""
    build = build_info()
    if not build["ONEDNN_BUILT"]:
        return None, "", f"not built: {build['ONEDNN_NOT_BUILT_REASON']}"
    if EXTENSION is None:
        return None, "", STATUS["cpu"].reason
    try:
        module = importlib.import_module("fastres._onednn")
        program = torch.classes.fastres.FoldedProgram
        torch.classes.fastres.FoldedConvolution  # noqa: B018  (an extension built from these sources)
    except (ImportError, RuntimeError) as error:
        return None, "", f"fastres._onednn could not be loaded ({error}); {REBUILD_HINT}"
    return program, module.onednn_version, ""


def onednn_program_class() -> Any | None:
    """The class that runs a whole ResNet's folded eval in one oneDNN call, or None where
    fastres._onednn was not built (see :func:`onednn_status`)."""
    return _ONEDNN[0]


def onednn_convolution_class() -> Any | None:
    """The class that runs one folded convolution with its residual added after its activation
    (``torch.classes.fastres.FoldedConvolution``), or None where fastres._onednn was not built."""
    return None if _ONEDNN[0] is None else torch.classes.fastres.FoldedConvolution


def onednn_status() -> str:
    """What folded CPU inference runs through, for ``fastres.info()``."""
    program, version, reason = _ONEDNN
    if program is None:
        return f"ATen's oneDNN ops, block by block (direct oneDNN path {reason})"
    return f"oneDNN {version} directly (fastres._onednn), the whole network per call"


_ONEDNN = _load_onednn()


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return True


def _takes(backend: str, dtype: torch.dtype | None) -> bool:
    return dtype is None or backend not in ("cuda", "triton") or dtype in _GPU_DTYPES


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Returns the concrete backend to run for a tensor on ``device`` (of ``dtype``, if given:
    ``auto`` then skips backends that do not take it).

    Raises ValueError for an unknown name, RuntimeError when the backend is not available here
    (with the reason), and ValueError when it cannot run tensors on ``device``.
    """
    if backend == "auto":
        preferred = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
        for name in preferred:
            if STATUS[name].available and _takes(name, dtype):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if not STATUS[backend].available:
        raise RuntimeError(
            f"fastres backend {backend!r} is not available: {STATUS[backend].reason}"
        )
    if not _runs_on(backend, device):
        raise ValueError(f"fastres backend {backend!r} cannot run tensors on {device.type}")
    return backend


def check_backend_name(backend: str) -> str:
    """``backend`` itself when it is a backend name or ``"auto"`` (what modules store and resolve
    at each forward), else ValueError naming the choices."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend
