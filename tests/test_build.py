"""The package, its build and fastres.info()."""

import subprocess
import sys

import pytest
import torch

import fastres
from fastres.backends import BACKENDS, resolve_backend


def test_info_reports_every_backend():
    facts = fastres.info()
    assert facts["torch"] == torch.__version__
    assert facts["cuda"] == torch.version.cuda
    assert set(facts["backends"]) == set(BACKENDS)
    for name, status in facts["backends"].items():
        assert set(status) == {"built", "available", "reason"}
        assert status["available"] == (status["reason"] == ""), name
    assert facts["backends"]["torch"]["available"]
    assert facts["backends"]["cpu"]["available"], facts["backends"]["cpu"]["reason"]


def test_info_command_prints_backends():
    result = subprocess.run(
        [sys.executable, "-m", "fastres"], capture_output=True, text=True, check=True
    )
    for name in BACKENDS:
        assert name in result.stdout
    assert "Warning" not in result.stderr


def test_info_stays_a_function_whatever_submodules_are_imported():
    """A submodule named ``info`` would replace the function once imported (it did)."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(fastres.__path__, "fastres."):
        if not module.name.endswith("__main__"):  # running them runs the command
            importlib.import_module(module.name)
    assert callable(fastres.info) and fastres.info()["backends"]["torch"]["available"]


def test_an_extension_built_against_another_torch_is_refused_with_both_versions():
    from fastres.backends import torch_mismatch

    assert (
        torch_mismatch({"TORCH_VERSION": torch.__version__, "TORCH_CUDA": torch.version.cuda}) == ""
    )
    assert torch_mismatch({"TORCH_VERSION": None, "TORCH_CUDA": None}) == ""  # no build info
    message = torch_mismatch({"TORCH_VERSION": "2.9.0+cu126", "TORCH_CUDA": "12.6"})
    assert "built against torch 2.9.0+cu126 (CUDA 12.6)" in message
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda}) is loaded" in message
    assert "--no-build-isolation" in message
    assert (
        fastres.info()["built_against"] == f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    )


def test_cuda_sources_were_compiled():
    """The set-up installs the CUDA build of torch and CI has nvcc: the CUDA kernels are built
    in every run, GPU or not (a missing toolkit is a set-up defect, not a reason to skip)."""
    cuda = fastres.info()["backends"]["cuda"]
    assert cuda["built"], cuda["reason"]
    assert fastres.info()["cuda_archs"]


def test_auto_picks_the_compiled_cpu_kernels_for_cpu_tensors():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.cuda
def test_auto_picks_cuda_kernels_for_cuda_tensors():
    assert resolve_backend("auto", torch.device("cuda")) == "cuda"


def test_import_without_the_extension_falls_back_loudly(tmp_path):
    """With fastres._C missing, import still works, warns, and auto means the torch backend."""
    script = (
        "import sys, warnings\n"
        "sys.modules['fastres._C'] = None  # makes `import fastres._C` fail\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastres, torch\n"
        "assert any('could not be imported' in str(w.message) for w in caught), caught\n"
        "from fastres.backends import resolve_backend\n"
        "assert resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
        "info = fastres.info()['backends']\n"
        "assert not info['cpu']['available'] and 'could not be imported' in info['cpu']['reason']\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "out = fastres.ops.bn_act(x, None, None, None, None, training=True)\n"
        "assert out.shape == x.shape\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
