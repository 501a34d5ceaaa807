"""convert() on the ResNets of other libraries: timm, Hugging Face transformers, Ultralytics.

Each library's model, built from its own config with random weights (nothing is downloaded), is
converted and compared with the library's own forward, not with torchvision's: logits, every
parameter gradient and every buffer after two training steps, then eval logits with the running
statistics those steps left; float64 tightly, float32 by the error-factor rule. Blocks with
layers the fused ops do not reproduce are left alone, with the reason logged.
"""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from op_log import OpLog
from optional_libraries import HAS_ULTRALYTICS, needs_ultralytics
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

import fastres
from fastres.adapters.timm import FastTimmBasicBlock, FastTimmBottleneck
from fastres.adapters.transformers import FastResNetBasicLayer, FastResNetBottleNeckLayer
from fastres.testing import assert_within_error_factor, randomise_batch_norms

if HAS_ULTRALYTICS:
    from ultralytics.nn.tasks import ClassificationModel
    from ultralytics.utils.torch_utils import initialize_weights

    from fastres.adapters.ultralytics import FastResNetBlock
else:
    ClassificationModel = FastResNetBlock = initialize_weights = None


def _timm(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10)


def _hf(layer_type: str) -> nn.Module:
    if layer_type == "bottleneck":  # microsoft/resnet-50's configuration
        config = ResNetConfig(num_labels=10)
    else:
        config = ResNetConfig(
            layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=10
        )
    return ResNetForImageClassification(config)


def _ultralytics(yaml: str = "yolov8-cls-resnet50.yaml") -> nn.Module:
    """Ultralytics' classification model as ``YOLO(yaml)`` builds it (random weights), its
    BatchNorms set as Ultralytics' detection models set theirs (eps 1e-3, momentum 0.03)."""
    model = ClassificationModel(yaml, nc=10, verbose=False)
    initialize_weights(model)
    return model


MODELS = {
    "timm-resnet18": (lambda: _timm("resnet18"), FastTimmBasicBlock, 8),
    "timm-resnet50": (lambda: _timm("resnet50"), FastTimmBottleneck, 16),
    "timm-resnet50d": (lambda: _timm("resnet50d"), FastTimmBottleneck, 16),
    "hf-resnet-50": (lambda: _hf("bottleneck"), FastResNetBottleNeckLayer, 16),
    "hf-resnet-18": (lambda: _hf("basic"), FastResNetBasicLayer, 8),
    "ultralytics-yolov8-cls-resnet50": (_ultralytics, FastResNetBlock, 16),
}
ULTRALYTICS = ["ultralytics-yolov8-cls-resnet50"]
# Each model's test marks: Ultralytics' may skip on the GPU machine (see needs_ultralytics).
_MARKS = {"ultralytics-yolov8-cls-resnet50": [needs_ultralytics]}


def _params(names) -> list:
    return [pytest.param(name, marks=_MARKS.get(name, [])) for name in names]


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, tuple):  # Ultralytics' classifier in eval: (probabilities, logits)
        return out[1]
    return out.logits if hasattr(out, "logits") else out


def _pair(name: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module, int]:
    build, fast_class, blocks = MODELS[name]
    torch.manual_seed(0)
    reference = build().to(dtype)
    randomise_batch_norms(reference)
    fast = fastres.convert(reference, backend="cpu")
    converted = [m for m in fast.modules() if type(m) is fast_class]
    assert len(converted) == blocks, f"{name}: {len(converted)} blocks converted"
    return reference, fast, blocks


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """float64 agreement to 1e-8 of the tensor's magnitude: a 50-layer network at batch 4 and
    64 px (a few values per channel in its last stage) carries ~1e-10 relative rounding noise
    between two correct float64 computations, more than an absolute 1e-10 for its small
    elements."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-8 * scale, msg=what)


def _train(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, steps: int = 2) -> list:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    logits = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = _logits(model, x)
        F.cross_entropy(out, labels).backward()
        optimizer.step()
        logits.append(out.detach())
    return logits


@pytest.mark.parametrize("name", _params(MODELS))
def test_float64_training_and_eval_match_the_librarys_own_forward(name):
    reference, fast, _ = _pair(name, torch.float64)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,))
    with OpLog() as log:
        fast_logits = _train(fast, x, labels)
    assert any(op.startswith("fastres.bn_act") for op in log.ops), "no fastres op ran"
    ref_logits = _train(reference, x, labels)
    for step, (ours, theirs) in enumerate(zip(fast_logits, ref_logits, strict=True)):
        _close(ours, theirs, f"logits of step {step + 1}")
    for (key, p), q in zip(reference.named_parameters(), fast.parameters(), strict=True):
        _close(q.grad, p.grad, f"gradient of {key}")
        _close(q, p, key)
    for (key, b), c in zip(reference.named_buffers(), fast.buffers(), strict=True):
        _close(c, b, key)
    reference.eval(), fast.eval()
    with torch.no_grad():
        _close(_logits(fast, x), _logits(reference, x), "eval logits")


@pytest.mark.parametrize(
    "name", _params(["timm-resnet18", "hf-resnet-18", "ultralytics-yolov8-cls-resnet50"])
)
def test_float32_training_step_follows_the_error_factor_rule(name):
    reference64, _, _ = _pair(name, torch.float64)
    reference = copy.deepcopy(reference64).float()
    fast = fastres.convert(reference, backend="cpu")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    labels = torch.randint(0, 10, (2,))
    (logits64,) = _train(reference64, x, labels, steps=1)
    (ref_logits,) = _train(reference, x.float(), labels, steps=1)
    (fast_logits,) = _train(fast, x.float(), labels, steps=1)
    assert_within_error_factor(fast_logits, ref_logits, logits64, "logits", torch.float32)


def test_state_dict_keys_and_tensors_are_kept_and_revert_restores_the_classes():
    reference = _timm("resnet50")
    fast = fastres.convert(reference, inplace=False)
    assert list(fast.state_dict()) == list(reference.state_dict())
    for (key, a), b in zip(reference.state_dict().items(), fast.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    back = fastres.revert(fast)
    assert [type(m) for m in back.modules()] == [type(m) for m in reference.modules()]
    hf = _hf("bottleneck")
    assert [type(m) for m in fastres.revert(fastres.convert(hf)).modules()] == [
        type(m) for m in hf.modules()
    ]


def test_blocks_with_squeeze_excitation_are_left_alone_with_the_reason():
    with pytest.warns(UserWarning, match="no block to convert") as warned:
        fast = fastres.convert(_timm("seresnet18"))
    assert "squeeze-excitation / attention (se)" in str(warned[0].message)
    assert not [m for m in fast.modules() if isinstance(m, fastres.FastBlockMixin)]


def test_blocks_with_stochastic_depth_run_timms_forward_in_training_and_fuse_in_eval():
    """timm's drop_path_rate rises block by block from 0 (the first block has no DropPath).
    DropPath is an identity in eval: every block converts; those with one run timm's forward in
    training (same random draws: same results) and the fused ops in eval."""
    reference = timm.create_model("resnet18", pretrained=False, drop_path_rate=0.1).double()
    randomise_batch_norms(reference)
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    blocks = [m for m in fast.modules() if type(m) is FastTimmBasicBlock]
    assert len(blocks) == 8
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    plans = [block.plan_for(x).name for block in blocks]
    assert plans == ["fused ops"] + ["reference"] * 7, plans
    assert blocks[1].fusion_issue() == "drop_path (stochastic depth) in training"
    torch.manual_seed(3)
    ours = fast(x)
    torch.manual_seed(3)
    _close(ours, reference(x), "training logits")
    reference.eval(), fast.eval()
    assert all(block.fusion_issue() == "" for block in blocks)
    with torch.no_grad():
        _close(fast(x), reference(x), "eval logits")


def test_the_log_says_what_was_converted_and_what_was_left_alone(caplog):
    model = nn.Sequential(_timm("resnet18"), _timm("seresnet18"))
    with caplog.at_level(logging.INFO, logger="fastres"):
        fastres.convert(model)
    assert "converted 8 block(s)" in caplog.text and "left 8 alone" in caplog.text
    assert "1.layer1.0: timm BasicBlock with squeeze-excitation" in caplog.text


def test_a_converted_block_rejects_bad_input_clearly():
    fast = fastres.convert(_timm("resnet18"))
    block = fast.layer1[0]
    with pytest.raises(ValueError, match="must have 64 channels"):
        block(torch.randn(2, 32, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(2, 64, 8))


@pytest.mark.parametrize("name", _params(["timm-resnet18", "hf-resnet-18", *ULTRALYTICS]))
def test_wrong_channels_raise_what_runtime_error_and_value_error_both_catch(name):
    """The library's block raises RuntimeError (from conv2d) for an input with the wrong channel
    count; the fast block's clearer error is caught by ``except RuntimeError`` as that one is,
    and by ``except ValueError`` as before."""
    build, fast_class, _ = MODELS[name]
    fast = fastres.convert(build())
    block = next(m for m in fast.modules() if type(m) is fast_class)
    library = fastres.revert(block)
    channels = block._describe().stages[0].conv.in_channels
    x = torch.randn(2, channels // 2, 8, 8)
    with pytest.raises(RuntimeError):
        library(x)
    for caught in (RuntimeError, ValueError):
        with pytest.raises(
            caught, match=f"{fast_class.__name__}: x must have {channels} chan"
        ) as error:
            block(x)
        assert error.type is fastres.BlockInputError


def test_sync_bn_conversion_retypes_the_libraries_batch_norms_too():
    """convert(sync_bn=True) makes every BatchNorm of a timm model a SyncBatchNorm2d on the same
    tensors; eval needs no process group and gives the library's output."""
    reference = _timm("resnet18").double().eval()
    fast = fastres.convert(reference, sync_bn=True)
    norms = [m for m in fast.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is fastres.SyncBatchNorm2d for m in norms)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        _close(fast(x), reference(x), "eval logits")


@needs_ultralytics
def test_ultralytics_blocks_run_silu_in_the_fused_ops_and_keep_their_state():
    """cv1 and cv2 end in SiLU: bn_act_conv2d with activation="silu"; state_dict, classes after
    revert() and a model fused by Ultralytics (left alone: its BatchNorms are folded away)."""
    reference = _ultralytics()
    fast = fastres.convert(reference, inplace=False, backend="cpu")
    assert list(fast.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with OpLog() as log:
        _logits(fast.train(), x).sum().backward()
    assert "fastres.bn_act_conv2d" in log.ops, sorted(set(log.ops))
    back = fastres.revert(fast)
    assert [type(m) for m in back.modules()] == [type(m) for m in reference.modules()]
    fused = _ultralytics().eval().fuse()
    with pytest.warns(UserWarning, match="no block to convert") as warned:
        fastres.convert(fused)
    assert "fused by model.fuse()" in str(warned[0].message)


def test_timm_blocks_with_silu_are_converted():
    """timm's act_layer="silu": the fused ops apply SiLU (no block left alone)."""
    reference = timm.create_model("resnet18", pretrained=False, act_layer="silu").double()
    randomise_batch_norms(reference)
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    assert len([m for m in fast.modules() if type(m) is FastTimmBasicBlock]) == 8
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    _close(fast(x), reference(x), "training logits")
    reference.eval(), fast.eval()
    with torch.no_grad():
        _close(fast(x), reference(x), "eval logits")


@pytest.mark.parametrize("name", _params(["hf-resnet-50", "ultralytics-yolov8-cls-resnet50"]))
def test_stems_fold_in_eval_and_run_the_librarys_modules_in_training(name):
    """The stem (transformers' ResNetEmbeddings, Ultralytics' first ResNetLayer: 7x7/2
    convolution, BatchNorm, activation, max-pool) runs as one folded convolution in eval,
    never calling its BatchNorm module, and as the library's modules in training."""
    reference, fast, _ = _pair(name, torch.float32)
    (stem,) = [m for m in fast.modules() if isinstance(m, fastres.FastStemMixin)]
    stage, _ = stem._stem_with(stem)
    calls = []
    stage.norm.register_forward_hook(lambda *_: calls.append(stage.norm.training))
    exact = copy.deepcopy(reference).double().eval()
    reference.eval(), fast.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, expected, truth = _logits(fast, x), _logits(reference, x), _logits(exact, x.double())
    assert calls == [], "the stem's BatchNorm ran in eval: the stem was not folded"
    assert_within_error_factor(got, expected, truth, "eval logits", torch.float32)
    _logits(fast.train(), x)
    assert calls == [True]
