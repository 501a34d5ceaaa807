"""ONNX Runtime and OpenVINO as rows of fastres.bench's table (``--peers``): the same model,
exported to ONNX inside the benchmark, run by each runtime on CPU, inference only.

They are optional dependencies (``pip install fastres[peers]``, pinned in
requirements-peers.txt). Each gets the threads torch has (``--threads``), its own graph
optimisations (ONNX Runtime: all levels; OpenVINO: the latency hint, float32 precision forced
for ``fastres.bench --peers``'s float32 comparison; ``fastres.bench.cpu_inference`` adds OpenVINO
at its default precision, bfloat16 on CPUs with AMX),
and the same batch as the other configurations, as a contiguous NCHW float32 array (ONNX's
layout), converted once before timing.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # numpy comes with the peers; fastres.bench runs without it
    import numpy as np

PEERS = ("onnxruntime", "openvino")

# The packages each peer needs: the runtime, and onnx + onnxscript for torch.onnx.export.
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
_EXPORT_PACKAGES = ("onnx", "onnxscript")


def missing_packages() -> list[str]:
    """The peer packages that are not installed (empty when ``--peers`` can run)."""
    needed = [*_PACKAGES.values(), *_EXPORT_PACKAGES]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def versions() -> dict[str, str]:
    """The peers' package versions, recorded with the figures."""
    from importlib.metadata import version

    return {name: version(name) for name in PEERS}


@dataclass
class Peer:
    """One runtime, ready to run: its inference step on the prepared array, and what getting
    there cost (session creation or compilation, plus the first inference)."""

    name: str
    infer: Callable[[], np.ndarray]
    first_call_s: float
    precision: str = "f32"  # what the runtime computes in


def export_onnx(reference: nn.Module, batch: torch.Tensor, folder: str) -> tuple[str, float]:
    """The reference model in eval exported to ONNX (``torch.onnx.export``, the dynamo
    exporter) for ``batch``'s shape; returns the file's path and the seconds the export took.
    A copy is exported, in NCHW (ONNX's layout): the reference itself is left as it is."""
    model = copy.deepcopy(reference).eval()
    # Module.to takes memory_format at run time; its type stubs do not say so.
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    path = os.path.join(folder, "model.onnx")
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, (batch.contiguous(),), path, dynamo=True, verbose=False)
    return path, time.perf_counter() - start


def _onnxruntime(path: str, threads: int, feed: np.ndarray) -> Peer:
    import onnxruntime as ort

    start = time.perf_counter()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs = {session.get_inputs()[0].name: feed}

    def infer() -> np.ndarray:
        return session.run(None, inputs)[0]

    infer()
    return Peer("onnxruntime", infer, time.perf_counter() - start)


def _openvino(path: str, threads: int, feed: np.ndarray, name: str, precision: str) -> Peer:
    """OpenVINO's CPU plugin with the latency hint, as the row ``name``; ``precision``
    "default" leaves the inference precision to OpenVINO (bfloat16 on a CPU with AMX or
    AVX512_BF16), anything else ("f32") is forced. The peer records the precision it ran."""
    import openvino as ov

    start = time.perf_counter()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(path, "CPU", config)
    chosen = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    request = compiled.create_infer_request()

    def infer() -> np.ndarray:
        return request.infer({0: feed})[0]

    infer()
    return Peer(name, infer, time.perf_counter() - start, _precision_name(chosen))


def _precision_name(openvino_type: str) -> str:
    """'bf16' for OpenVINO's "<Type: 'bfloat16'>" (or "bf16"), 'f32' for float32, ..."""
    text = openvino_type.lower()
    for long, short in (("bfloat16", "bf16"), ("float32", "f32"), ("float16", "f16")):
        if long in text or short in text:
            return short
    return openvino_type


def build_peers(
    reference: nn.Module, batch: torch.Tensor, openvino: dict[str, str] | None = None
) -> tuple[list[Peer], float]:
    """Every peer running the reference on ``batch`` (CPU, float32 input), and the export's
    seconds: ONNX Runtime, then OpenVINO once per entry of ``openvino``, row name -> precision
    ("default" for the one OpenVINO picks itself, or one to force). The default,
    ``{"openvino": "f32"}``, is ``fastres.bench --peers``'s float32 comparison. The ONNX file
    lives in a temporary folder, removed once the runtimes have loaded it."""
    missing = missing_packages()
    if missing:
        raise RuntimeError(
            f"--peers needs {', '.join(missing)}: pip install -r requirements-peers.txt "
            "(or pip install 'fastres[peers]')"
        )
    feed = batch.detach().cpu().float().contiguous().numpy()  # NCHW, ONNX's layout
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="fastres-peers-") as folder:
        path, export_s = export_onnx(reference, batch, folder)
        peers = [_onnxruntime(path, threads, feed)]
        runs = (openvino or {"openvino": "f32"}).items()
        peers += [_openvino(path, threads, feed, name, p) for name, p in runs]
    return peers, export_s
