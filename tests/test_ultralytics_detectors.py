"""Ultralytics' YOLO detectors converted: their Bottlenecks (inside C2f, C3k2, C3k) run as
FastYOLOBottleneck and every other Conv as FastYOLOConv, against Ultralytics' own model with
the same weights: training outputs,
input and parameter gradients, running statistics and parameters after two SGD steps, eval
outputs; in float64 tightly and in float32 by the tolerance rule."""

from __future__ import annotations

import copy

import pytest
import torch
from optional_libraries import HAS_ULTRALYTICS, needs_ultralytics

import fastres
from fastres.testing import (
    assert_close,
    assert_within_error_factor,
    backend_device_params,
    randomise_batch_norms,
)

pytestmark = needs_ultralytics

if HAS_ULTRALYTICS:
    from ultralytics.nn.modules.block import Bottleneck
    from ultralytics.nn.modules.conv import Conv, DWConv
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel

    from fastres.adapters.ultralytics import FastYOLOBottleneck, FastYOLOConv, FastYOLODWConv

# config -> Bottlenecks it holds (with and without add)
MODELS = {"yolov8n.yaml": 10, "yolo11n.yaml": 11, "yolo26n.yaml": 13, "yolo11n-seg.yaml": 11}
SIDE = 64


def _model(config: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    kind = SegmentationModel if "-seg" in config else DetectionModel
    model = kind(config, verbose=False).to(dtype)
    for module in model.modules():  # BatchNorms away from their identity initialisation
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _tensors(output: object) -> list[torch.Tensor]:
    """Every tensor of a model's output (tensors, dicts, lists and tuples of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for key in sorted(output) for t in _tensors(output[key])]
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    return []


def _train_two_steps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The first step's outputs, input gradient and parameter gradients; the model after two
    SGD steps."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    recorded: list[torch.Tensor] = []
    for step in range(2):
        optimizer.zero_grad()
        leaf = x.detach().clone().requires_grad_()
        outputs = _tensors(model(leaf))
        loss = sum(out.double().square().mean() for out in outputs)
        loss.backward()
        if step == 0:
            recorded = [o.detach() for o in outputs] + [leaf.grad]
            recorded += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        optimizer.step()
    return recorded


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach() for t in model.state_dict().values()]


def _eval(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model.eval()(x))


@pytest.mark.parametrize("config", MODELS)
def test_float64_matches_ultralytics(config):
    reference = _model(config, torch.float64)
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    converted = [type(fast.get_submodule(n)) for n in fastres.conversion_report(fast).converted]
    assert converted.count(FastYOLOBottleneck) == MODELS[config]
    assert set(converted) <= {FastYOLOBottleneck, FastYOLOConv, FastYOLODWConv}
    unconverted = [n for n, m in fast.named_modules() if type(m) in (Conv, DWConv, Bottleneck)]
    # Only the convolutions of converted Bottlenecks, which describe them as their stages.
    for name in unconverted:
        assert type(fast.get_submodule(name.rpartition(".")[0])) is FastYOLOBottleneck, name
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    for what, ours, theirs in (
        ("training", _train_two_steps(fast, x), _train_two_steps(reference, x)),
        ("after two steps", _state(fast), _state(reference)),
        ("eval", _eval(fast, x), _eval(reference, x)),
    ):
        assert len(ours) == len(theirs)
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_close(a, b, f"{config} {what} #{i}")


@pytest.mark.parametrize("config", ["yolo11n.yaml", "yolo26n.yaml"])
def test_float32_follows_the_rule(config):
    reference64 = _model(config, torch.float64)
    reference = _model(config, torch.float32)
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64)
    for what, run in (("training", _train_two_steps), ("eval", _eval)):
        ours, theirs = run(fast, x.float()), run(reference, x.float())
        exact = run(reference64, x)
        for i, (a, low, b) in enumerate(zip(ours, theirs, exact, strict=True)):
            assert_within_error_factor(a, low, b, f"{config} {what} #{i}", torch.float32)


def test_eval_folds_and_training_runs_the_fused_ops():
    fast = fastres.convert(_model("yolo11n.yaml", torch.float32), backend="cpu")
    x = torch.randn(1, 3, SIDE, SIDE)
    runs = fastres.explain(fast.train(), torch.randn(2, 3, SIDE, SIDE)).runs()
    assert runs["model.2.m.0"] == "fused ops (C++ kernels)"
    with torch.no_grad():
        fast.eval()(x)  # folds the weights: the explained call only runs them
        explanation = fastres.explain(fast, x)
    decision = next(d for d in explanation.decisions if d.name == "model.2.m.0")
    assert decision.runs == "folded eval (oneDNN)"
    # The add after the activation is the last convolution's post-op, not a pass of its own.
    assert decision.ops["fastres._onednn FoldedConvolution.conv_bias_act_add"] == 1
    assert "aten.add_" not in decision.ops and "aten.add" not in decision.ops


def test_training_ops_keep_no_activation_between_cv1_and_cv2():
    block = fastres.convert(torch.nn.Sequential(Bottleneck(16, 16)), backend="cpu")[0].train()
    from op_log import OpLog

    with OpLog() as log:
        block(torch.randn(2, 16, 8, 8))
    fused = [op for op in log.ops if op.startswith("fastres.")]
    assert fused == ["fastres.bn_act_conv2d", "fastres.bn_act_add_forward"], log.ops


@pytest.mark.parametrize("backend,device", backend_device_params("triton"))
def test_the_triton_chain_adds_after_the_last_activation(backend, device):
    """Training: each BatchNorm but the last in the next convolution's prologue, the last one
    and the add in one pass. Eval: two folded convolutions, the add in the second's
    epilogue."""
    block = fastres.convert(torch.nn.Sequential(Bottleneck(16, 16)), backend=backend)[0]
    block.to(device)
    x = torch.randn(2, 16, 8, 8, device=device)
    from op_log import OpLog

    with OpLog() as log:
        block.train()(x)
    fused = [op for op in log.ops if op.startswith("fastres.")]
    assert fused == ["fastres.bn_act_conv2d_stats_triton"] * 2 + [
        "fastres.bn_act_add_from_stats_triton"
    ], log.ops
    with torch.no_grad(), OpLog() as log:
        block.eval()(x)
    fused = [op for op in log.ops if op.startswith("fastres.")]
    assert fused == ["fastres.conv2d_bias_act_triton", "fastres.conv2d_bias_act_add_triton"]


def test_revert_gives_ultralytics_classes_and_checkpoints_load_unchanged():
    reference = _model("yolo11n.yaml", torch.float32)
    fast = fastres.convert(copy.deepcopy(reference))
    assert list(fast.state_dict()) == list(reference.state_dict())
    fast.load_state_dict(reference.state_dict())
    back = fastres.revert(fast)
    assert not any(isinstance(m, FastYOLOBottleneck | FastYOLOConv) for m in back.modules())
    assert sum(type(m) is Bottleneck for m in back.modules()) == MODELS["yolo11n.yaml"]
    assert [type(m) for m in back.modules()] == [type(m) for m in reference.modules()]


def test_a_fused_model_is_left_alone_with_the_reason():
    fused = _model("yolo11n.yaml", torch.float32).eval().fuse(verbose=False)
    fast = fastres.convert(fused)
    report = fastres.conversion_report(fast)
    assert not report.converted
    assert set(report.left_alone.values()) == {
        "Ultralytics Bottleneck fused by model.fuse() (BatchNorm folded into its conv)",
        "Ultralytics Conv fused by model.fuse()",
        "Ultralytics DWConv fused by model.fuse()",
    }


def test_bad_input_names_the_block_and_changes_what_ultralytics_changes():
    """A wrong channel count: an error naming the block, nothing touched. One value per channel
    in training: BatchNorm's own error, after the same partial update as Ultralytics' block
    (its num_batches_tracked counts the failed call, as nn.BatchNorm2d's does)."""
    torch.manual_seed(0)
    reference = Bottleneck(16, 16)
    fast = fastres.convert(torch.nn.Sequential(copy.deepcopy(reference)))[0]
    before = copy.deepcopy(fast.state_dict())
    with pytest.raises(ValueError, match="FastYOLOBottleneck: x must have 16 channels"):
        fast(torch.randn(2, 8, 8, 8))
    for name, value in fast.state_dict().items():
        assert torch.equal(value, before[name]), name
    for model in (reference, fast):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model.train()(torch.randn(1, 16, 1, 1))
    for (name, ours), theirs in zip(
        fast.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name


MODULES = {
    "bottleneck-add": lambda: Bottleneck(16, 16, shortcut=True),
    "bottleneck-no-add": lambda: Bottleneck(16, 16, shortcut=False),
    "conv-stride-2": lambda: Conv(16, 16, 3, 2),
    "dwconv": lambda: DWConv(16, 16, 3),
}


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", MODULES)
def test_one_module_on_every_backend(backend, device, kind):
    """Training output, every gradient and the running statistics against Ultralytics' module
    in float32, by the rule (float64 reference)."""
    torch.manual_seed(0)
    reference64 = MODULES[kind]().double().to(device)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64, device=device)
    results = []
    for model, dtype in (
        (
            fastres.convert(
                torch.nn.Sequential(copy.deepcopy(reference64).float()), backend=backend
            ),
            torch.float32,
        ),
        (copy.deepcopy(reference64).float(), torch.float32),
        (reference64, torch.float64),
    ):
        leaf = x.to(dtype).requires_grad_()
        out = model.train()(leaf)
        out.square().mean().backward()
        results.append(
            [out.detach(), leaf.grad] + [p.grad for p in model.parameters()] + list(model.buffers())
        )
    for i, (a, low, b) in enumerate(zip(*results, strict=True)):
        if a.is_floating_point():
            assert_within_error_factor(a, low, b, f"#{i}", torch.float32)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", MODULES)
def test_one_module_folded_eval_on_every_backend(backend, device, kind):
    """Eval output against Ultralytics' module by the rule, in float32 (and in bfloat16 under
    autocast on the cpu backend); the input, which the Bottleneck's add reads, left as it was.
    The input is a channel slice, as C2f hands its Bottlenecks."""
    torch.manual_seed(0)
    reference64 = MODULES[kind]().double().to(device).eval()
    randomise_batch_norms(reference64)
    whole = torch.randn(2, 32, 8, 8, dtype=torch.float64, device=device)
    x = whole.contiguous(memory_format=torch.channels_last)[:, 16:]
    fast = fastres.convert(torch.nn.Sequential(copy.deepcopy(reference64).float()), backend=backend)
    dtypes = [torch.float32] + ([torch.bfloat16] if backend == "cpu" else [])
    for low in dtypes:
        with torch.no_grad(), torch.autocast("cpu", dtype=low, enabled=low != torch.float32):
            inputs = x.float()
            before = inputs.clone()
            ours = fast.eval()(inputs)
            theirs = copy.deepcopy(reference64).float()(inputs)
            exact = reference64(x)
        assert torch.equal(inputs, before)
        assert_within_error_factor(ours.double(), theirs.double(), exact, f"{kind} {low}", low)
