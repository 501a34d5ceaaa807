"""fastres.explain: per fast module, what ran for an input, why each earlier plan did not, and
the ops it launched; the model's state as it was."""

from __future__ import annotations

import pytest
import torch
import torchvision
from optional_libraries import needs_onednn

import fastres


def _model(backend: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return fastres.convert(torchvision.models.resnet18(num_classes=10), backend=backend)


def test_training_blocks_run_the_fused_ops_and_say_why_not_the_others():
    model = _model().train()
    x = torch.randn(2, 3, 32, 32)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    explanation = fastres.explain(model, x)
    runs = explanation.runs()
    assert runs[""] == "ResNet's own forward"
    assert runs["layer1.0"] == runs["layer4.1"] == "fused ops (C++ kernels)"
    block = next(d for d in explanation.decisions if d.name == "layer2.0")
    assert block.passed_over == {
        "folded eval": ["FastBasicBlock is in training mode"],
        "triton convolution chain": ["the backend is 'cpu', not triton"],
    }
    assert any(op.startswith("fastres.") for op in block.ops), block.ops
    for name, b in model.named_buffers():  # running statistics put back
        torch.testing.assert_close(b, buffers[name], rtol=0, atol=0)
    text = str(explanation)
    assert "layer2.0 (FastBasicBlock): fused ops (C++ kernels)" in text
    assert "passed over folded eval: FastBasicBlock is in training mode" in text


def test_eval_with_autograd_says_why_nothing_folds():
    model = _model().eval()
    explanation = fastres.explain(model, torch.randn(1, 3, 32, 32))
    block = next(d for d in explanation.decisions if d.name == "layer1.0")
    assert block.runs == "fused ops (C++ kernels)"
    assert block.passed_over["folded eval"] == [
        "autograd is on and the input or a parameter requires grad"
    ]
    assert "eval, autograd on" in str(explanation)


@needs_onednn
def test_folded_inference_runs_as_one_program():
    model = _model().eval()
    with torch.no_grad():
        explanation = fastres.explain(model, torch.randn(1, 3, 32, 32))
    (decision,) = explanation.decisions  # no block runs on its own
    assert decision.runs == "whole-network oneDNN program"
    assert decision.ops["fastres._onednn FoldedProgram.run"] == 1
    with torch.no_grad():
        handle = model.layer3.register_forward_hook(lambda *args: None)
        explanation = fastres.explain(model, torch.randn(1, 3, 32, 32))
        handle.remove()
    runs = explanation.runs()
    assert runs[""] == "folded stem, then block by block"
    assert runs["layer3.1"] == "folded eval (oneDNN)"
    assert explanation.decisions[0].passed_over == {
        "whole-network oneDNN program": ["a forward hook could see the activations"]
    }


def test_a_library_stem_runs_by_the_stem_plans_and_says_why():
    """Hugging Face's stem (a module of its own): folded in eval without autograd, the
    library's own forward in training, with the folded stem's reason."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = fastres.convert(ResNetModel(ResNetConfig(depths=[1, 1, 1, 1])), backend="cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = next(d for d in fastres.explain(model.eval(), x).decisions if "embedder" in d.name)
    assert (stem.runs, stem.passed_over) == ("folded stem (oneDNN)", {})
    stem = next(d for d in fastres.explain(model.train(), x).decisions if "embedder" in d.name)
    assert stem.runs == "the library's own forward"
    assert stem.passed_over == {"folded stem": ["FastResNetEmbeddings is in training mode"]}


def test_the_torch_backend_runs_the_library_blocks():
    explanation = fastres.explain(_model("torch").train(), torch.randn(2, 3, 32, 32))
    block = next(d for d in explanation.decisions if d.name == "layer1.0")
    assert block.runs == "reference"
    assert block.passed_over["fused ops"] == ["the backend is 'torch', not cpu, cuda, triton"]


def test_a_model_without_fast_modules_and_bad_arguments():
    plain = torchvision.models.resnet18().eval()
    explanation = fastres.explain(plain, torch.randn(1, 3, 32, 32))
    assert not explanation.decisions and "no fast module ran" in str(explanation)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastres.explain("resnet", torch.randn(1))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        fastres.explain(_model(), [1, 2])
