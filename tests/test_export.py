"""Tracing, exporting and scripting a converted model.

While ``torch.jit.trace``, ``torch.export.export`` or ``torch.onnx.export`` (TorchScript or
dynamo) runs, every fast block and stem runs the library's own forward: the traced or exported
model holds only ATen ops (no fastres op, no oneDNN prepacked convolution), and gives the
library's results (ONNX models checked in ONNX Runtime, by the error-factor rule of
fastres/testing.py). ``torch.jit.script`` is refused with an error naming fastres and
``fastres.revert()``, and leaves the model as it was.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torchvision
from optional_libraries import needs_peers
from torch import nn
from transformers import ResNetConfig, ResNetModel

import fastres
from fastres.testing import assert_within_error_factor, randomise_batch_norms

# What torch says of its TorchScript tracer and compiler on every call, nothing of fastres.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)


def _resnet18_pair(training: bool) -> tuple[nn.Module, nn.Module]:
    """(torchvision's resnet18, the same converted) in the given mode."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    randomise_batch_norms(reference)
    reference.train(training)
    return reference, fastres.convert(reference, backend="cpu")


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _fastres_or_mkldnn(names: list[str]) -> list[str]:
    return sorted({n for n in names if "fastres" in n or "mkldnn" in n})


MODES = [pytest.param(False, id="eval"), pytest.param(True, id="train")]


@pytest.mark.parametrize("training", MODES)
def test_jit_trace_records_the_librarys_forward(training):
    reference, fast = _resnet18_pair(training)
    x = _images()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(fast, x)
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "fastres" in w.filename]
    assert not ours, ours  # e.g. a TracerWarning for every block
    nodes = [node.kind() for node in traced.inlined_graph.nodes()]
    assert not _fastres_or_mkldnn(nodes), _fastres_or_mkldnn(nodes)
    other = _images(3)  # the trace holds the computation, not the first input's values
    with torch.no_grad():
        torch.testing.assert_close(traced(other), reference(other), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("training", MODES)
def test_torch_export_holds_the_librarys_ops(training, strict):
    reference, fast = _resnet18_pair(training)
    x = _images()
    program = torch.export.export(fast, (x,), strict=strict)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not _fastres_or_mkldnn(targets), _fastres_or_mkldnn(targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), reference(x), rtol=0, atol=0)


def _onnx_bytes(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notices
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            assert program is not None
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False)
        return buffer.getvalue()


@needs_peers
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnx_runtime_as_the_library(dynamo):
    import onnxruntime

    reference, fast = _resnet18_pair(training=False)
    x = _images()
    session = onnxruntime.InferenceSession(
        _onnx_bytes(fast, x, dynamo), providers=["CPUExecutionProvider"]
    )
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected, truth = reference(x), reference.double()(x.double())
    assert_within_error_factor(
        torch.from_numpy(got), expected, truth, "ONNX Runtime logits", torch.float32
    )


def test_jit_script_is_refused_naming_fastres_and_revert_and_leaves_the_model_alone():
    reference, fast = _resnet18_pair(training=False)
    before = [(name, type(m), id(m)) for name, m in fast.named_modules()]
    with pytest.raises(RuntimeError, match=r"fastres.*fastres\.revert\(\)"):
        torch.jit.script(fast)
    assert [(name, type(m), id(m)) for name, m in fast.named_modules()] == before
    # The advice works: the reverted model is torchvision's, which scripts.
    scripted = torch.jit.script(fastres.revert(fast))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference(x), rtol=0, atol=0)


def test_jit_script_is_refused_for_a_fast_block_nested_in_a_model():
    _, fast = _resnet18_pair(training=False)
    nested = nn.Sequential(nn.Identity(), fast.layer1)
    with pytest.raises(RuntimeError, match=r"FastBasicBlock.*fastres\.revert\(\)"):
        torch.jit.script(nested)
    assert type(nested[1][0]) is fastres.FastBasicBlock


def test_a_transformers_model_traces_and_exports_with_its_stem_and_blocks():
    """transformers' ResNet: the converted stem (ResNetEmbeddings, folded in eval) and blocks
    trace and export as the library's modules."""
    config = ResNetConfig(
        layer_type="basic", depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16
    )
    torch.manual_seed(0)
    reference = ResNetModel(config).eval()
    randomise_batch_norms(reference)
    fast = fastres.convert(reference, backend="cpu")
    assert isinstance(fast.embedder, fastres.FastStemMixin)
    x = _images()
    with torch.no_grad():
        expected = reference(x).last_hidden_state
        traced = torch.jit.trace(fast, x, strict=False)
        torch.testing.assert_close(traced(x)["last_hidden_state"], expected, rtol=0, atol=0)
    program = torch.export.export(fast, (x,), strict=False)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not _fastres_or_mkldnn(targets), _fastres_or_mkldnn(targets)
    with torch.no_grad():
        got = program.module()(x).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_torch_compile_keeps_the_fused_ops():
    """torch.compile is no export: the compiled block runs fastres's ops, not the library's
    forward. (torch 2.11's torch.compile folds torch.compiler.is_exporting() to True.)"""
    from fastres.plans.exporting import tracing_or_exporting

    torch._dynamo.reset()
    decide = torch.compile(
        lambda x: x + 1 if tracing_or_exporting() else x - 1, fullgraph=True, backend="eager"
    )
    assert decide(torch.zeros(1)).item() == -1.0

    block = fastres.convert(torchvision.models.resnet.BasicBlock(8, 8)).train()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(block, fullgraph=True, backend=record)(torch.randn(2, 8, 4, 4))
    targets = {str(node.target) for g in graphs for node in g.graph.nodes}
    assert any("fastres" in t for t in targets), sorted(targets)
