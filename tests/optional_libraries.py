"""Test dependencies the GPU machine cannot install: Ultralytics, ONNX Runtime / OpenVINO
(with onnx and onnxscript, for ``fastres.bench --peers``), and oneDNN's packages, without which
fastres._onednn is not built.

Only there may their tests skip: elsewhere a missing one is an import error, as for the other
test dependencies (requirements-dev.txt).
"""

import importlib.util

import pytest
import torch

from fastres.backends import onednn_program_class
from fastres.bench.peers import missing_packages


def _installed_or_on_the_gpu_machine(installed: bool, what: str) -> bool:
    if not installed and not torch.cuda.is_available():
        raise ImportError(f"{what} is a test dependency (requirements-dev.txt): install it")
    return installed


HAS_ULTRALYTICS = _installed_or_on_the_gpu_machine(
    importlib.util.find_spec("ultralytics") is not None, "ultralytics"
)
HAS_PEERS = _installed_or_on_the_gpu_machine(
    not missing_packages(), ", ".join(missing_packages()) or "onnxruntime"
)

needs_ultralytics = pytest.mark.skipif(
    not HAS_ULTRALYTICS, reason="ultralytics is not installed on this GPU machine"
)
needs_peers = pytest.mark.skipif(
    not HAS_PEERS, reason="onnxruntime / openvino are not installed on this GPU machine"
)
HAS_ONEDNN = _installed_or_on_the_gpu_machine(
    onednn_program_class() is not None, "fastres._onednn (onednn-cpu-gomp, onednn-devel-cpu-gomp)"
)
needs_onednn = pytest.mark.skipif(
    not HAS_ONEDNN, reason="fastres._onednn is not built on this GPU machine (no oneDNN package)"
)
