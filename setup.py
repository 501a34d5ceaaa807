"""Builds fastres and its extension ``fastres._C``.

Environment variables:
  FASTRES_CUDA        auto (default): build the CUDA kernels when a CUDA-enabled torch and nvcc
                      are found, whether or not a GPU is present; 1: the same, but fail loudly
                      when they cannot be built; 0: CPU kernels only.
  FASTRES_CUDA_ARCHS  compute capabilities to build for, e.g. "9.0" or "8.0;9.0"
                      (default: DEFAULT_CUDA_ARCHS below).
  FASTRES_ONEDNN      auto (default): build fastres._onednn (folded CPU inference through
                      oneDNN directly) when onednn-cpu-gomp and onednn-devel-cpu-gomp are
                      installed in this environment; 1: insist; 0: skip
  CUDA_HOME           the CUDA toolkit root; otherwise derived from the nvcc on PATH.
  MAX_JOBS            parallel compile jobs (read by torch's ninja build).

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already
has torch, so that the extension is built against that torch.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Ampere (A100, RTX 30), Ada (L4, RTX 40), Hopper (H100/H200), Blackwell (B200, RTX 50), and PTX
# of the last, which the driver compiles for GPUs newer than any listed.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _is_toolkit_root(path: str | None) -> bool:
    if not path:
        return False
    return bool(glob.glob(os.path.join(path, "lib64", "libcudart.so*"))) or bool(
        glob.glob(os.path.join(path, "targets", "*", "lib", "libcudart.so*"))
    )


def _toolkit_root_from_nvcc(nvcc: str) -> str | None:
    """Asks nvcc where it lives: a wrapper script on PATH would give the wrong root."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        open(source, "w").close()
        try:
            result = subprocess.run(
                [nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (result.stdout + result.stderr).splitlines():
        # nvcc --dryrun prints its environment, e.g. "#$ _HERE_=/usr/local/cuda-13.0/bin".
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return None


def find_cuda_home() -> tuple[str | None, str]:
    """Returns (toolkit root or None, why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.environ[var], ""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc was not found on PATH and CUDA_HOME is not set"
    root = _toolkit_root_from_nvcc(nvcc)
    if _is_toolkit_root(root):
        return root, ""
    return None, f"could not find the CUDA toolkit root (with libcudart) for {nvcc}; set CUDA_HOME"


def pip_cuda_include_dirs() -> list[str]:
    """CUDA library headers (cuBLAS, cuSPARSE, cuDNN) shipped in the nvidia-* pip packages.

    torch's CUDA headers include them; a toolkit without those libraries (or a pip-installed
    CUDA) only has them here.
    """
    try:
        import nvidia  # the namespace package of the nvidia-* wheels that come with CUDA torch
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        for sub in (
            "cu13/include",
            "cu12/include",
            "cudnn/include",
            "cublas/include",
            "cusparse/include",
        ):
            path = os.path.join(base, sub)
            if os.path.isdir(path):
                dirs.append(path)
    return dirs


def cuda_build_decision(torch_module) -> tuple[bool, str]:
    """Decides whether to build the CUDA kernels; returns (build, reason when not)."""
    mode = os.environ.get("FASTRES_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"FASTRES_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False, "disabled with FASTRES_CUDA=0 at build time"
    reason = ""
    if torch_module.version.cuda is None:
        reason = (
            f"torch {torch_module.__version__} is a CPU-only build (torch.version.cuda is None)"
        )
    else:
        root, reason = find_cuda_home()
        if root is not None:
            os.environ["CUDA_HOME"] = root  # read by torch.utils.cpp_extension on import
            return True, ""
    if mode == "1":
        sys.exit(f"FASTRES_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return False, reason


def _git_commit() -> str:
    """The checkout's commit, recorded at build time (fastres.bench reports it; no git at run
    time). "unknown" outside a git checkout, e.g. when building from a source distribution."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def build_info_module() -> str:
    """The build-information module of this interpreter, e.g. ``_build_info_cpython_311``: one
    per Python version, like the extension (``_C.cpython-311-*.so``), so that builds for two
    Pythons can share a checkout (the Makefile's pinned and compat venvs do)."""
    return "_build_info_" + sys.implementation.cache_tag.replace("-", "_")


def write_build_info(
    torch_module, with_cuda: bool, archs: str, reason: str, onednn_reason: str
) -> None:
    """fastres/<build_info_module()>.py: what was built, against which torch (checked at
    import)."""
    facts = {
        "CUDA_BUILT": with_cuda,
        "CUDA_ARCHS": archs,
        "CUDA_NOT_BUILT_REASON": reason,
        "ONEDNN_BUILT": not onednn_reason,
        "ONEDNN_NOT_BUILT_REASON": onednn_reason,
        "TORCH_VERSION": torch_module.__version__,
        "TORCH_CUDA": torch_module.version.cuda,
        "COMMIT": _git_commit(),
    }
    with open(os.path.join(HERE, "fastres", build_info_module() + ".py"), "w") as f:
        f.write("# Written by setup.py at build time; not tracked by git.\n")
        f.writelines(f"{name} = {value!r}\n" for name, value in facts.items())


# Commands that compile the extension. The others (sdist, egg_info, dist_info) need no torch,
# and leave the build information alone.
_COMPILING_COMMANDS = {
    "build",
    "build_ext",
    "bdist_wheel",
    "bdist_egg",
    "develop",
    "install",
    "editable_wheel",
}


def _compiling() -> bool:
    return bool(_COMPILING_COMMANDS.intersection(sys.argv[1:]))


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(NO_TORCH_MESSAGE)


NO_TORCH_MESSAGE = """\
fastres: torch is not importable in this build environment.

fastres's extension is compiled against the torch you run it with, so it must be built in an
environment that already has that torch (2.11 or newer), without build isolation:

    pip install --no-build-isolation .            (or a fastres-*.tar.gz, or -e . for a checkout)
    pip wheel --no-build-isolation --no-deps .    (a wheel, e.g. for another machine)

With build isolation, pip would compile against whatever torch the package index serves that
day, and the result could fail to import next to yours with undefined symbols.
"""


def extensions():
    import torch

    build_cuda, reason = cuda_build_decision(torch)
    # Imported only now: it reads CUDA_HOME at import time.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP in torch's Linux builds and lives in headers: without
        # -fopenmp the kernels would silently run on one thread. The soname (libgomp.so.1) is
        # the one torch already loaded, so the process keeps a single OpenMP runtime.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    archs = ""
    if build_cuda:
        archs = os.environ.get("FASTRES_CUDA_ARCHS", "").strip() or DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "fastres._C",
            sources,
            include_dirs=pip_cuda_include_dirs(),
            define_macros=[("FASTRES_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-std=c++17"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "fastres._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    exts = [ext]
    onednn_prefix, onednn_reason = onednn_build_decision()
    if onednn_prefix is not None:
        exts.append(onednn_extension(CppExtension, onednn_prefix, cxx_flags, link_flags))
    write_build_info(torch, build_cuda, archs, reason, onednn_reason)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def onednn_build_decision() -> tuple[str | None, str]:
    """Where oneDNN's headers and library are (an installation prefix), or None with the reason
    fastres._onednn is not built. FASTRES_ONEDNN: auto (default: build when the
    onednn-devel-cpu-gomp and onednn-cpu-gomp packages are installed in this environment),
    1 (insist) or 0 (skip)."""
    mode = os.environ.get("FASTRES_ONEDNN", "auto").lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"FASTRES_ONEDNN must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return None, "disabled with FASTRES_ONEDNN=0 at build time"
    prefix = sys.prefix
    found = os.path.exists(os.path.join(prefix, "include", "dnnl.hpp")) and glob.glob(
        os.path.join(prefix, "lib", "libdnnl.so*")
    )
    if found:
        return prefix, ""
    reason = (
        "oneDNN's headers and library were not found in this environment at build time "
        "(pip install onednn-cpu-gomp onednn-devel-cpu-gomp, then rebuild)"
    )
    if mode == "1":
        sys.exit(f"FASTRES_ONEDNN=1 but fastres._onednn cannot be built: {reason}")
    return None, reason


def onednn_extension(CppExtension, prefix: str, cxx_flags: list, link_flags: list):
    """fastres._onednn: folded inference through oneDNN directly (csrc/onednn/), linked to the
    environment's libdnnl.so (found again at run time through the rpath)."""
    lib = os.path.join(prefix, "lib")
    return CppExtension(
        "fastres._onednn",
        sorted(glob.glob("csrc/onednn/*.cpp")),
        include_dirs=[os.path.join(prefix, "include")],
        library_dirs=[lib],
        libraries=["dnnl"],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=[*link_flags, f"-Wl,-rpath,{lib}"],
    )


# Metadata lives in pyproject.toml; this file only describes the extension.
if _compiling():
    _require_torch()
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
else:  # a source distribution or metadata only: no torch needed, nothing compiled
    setup()
