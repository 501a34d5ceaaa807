"""A FastResNet's folded eval as one oneDNN program (fastres/plans/folded_program.py,
csrc/onednn/folded_program.cpp): same results as the library's model by the error-factor rule,
in float32 and bfloat16, rebuilt when a tensor changes, and the per-block path wherever the
program does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from op_log import OpLog
from optional_libraries import needs_onednn
from serving_threads import assert_threads_match_one_thread
from torch import nn

import fastres
from fastres.plans import folded_eval, folded_program
from fastres.plans.folded_program import PROGRAMS
from fastres.testing import assert_within_error_factor, randomise_batch_norms

pytestmark = needs_onednn

MODES = ["float32", "bfloat16 autocast", "bfloat16 cast"]


def _models(builder: str = "resnet18") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, builder)(num_classes=10).eval()
    randomise_batch_norms(reference)
    return reference, fastres.convert(reference, backend="cpu").eval()


def _run(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        if mode == "bfloat16 autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)
        if mode == "bfloat16 cast":
            return model(x.to(torch.bfloat16))
        return model(x)


def _in_mode(model: nn.Module, mode: str) -> nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16) if mode == "bfloat16 cast" else model


def _low(mode: str) -> torch.dtype:
    return torch.float32 if mode == "float32" else torch.bfloat16


def _programs(model: nn.Module) -> int:
    """How many programs the model keeps (decisions that no program applies not counted)."""
    cached = PROGRAMS[model].by_input.values() if model in PROGRAMS else []
    return sum(c.program is not None for c in cached)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "builder, batch, side",
    [("resnet18", 2, 32), ("resnet50", 1, 67), ("resnext50_32x4d", 3, 33)],
)
def test_the_program_follows_the_error_factor_rule_and_launches_no_aten_convolution(
    builder, batch, side, mode
):
    reference, fast = _models(builder)
    truth_model = copy.deepcopy(reference).double()
    reference, fast = _in_mode(reference, mode), _in_mode(fast, mode)
    x = torch.randn(batch, 3, side, side)
    with torch.no_grad():
        truth = truth_model(x.double())
    _run(fast, x, mode)  # builds the program
    with OpLog() as log:
        got = _run(fast, x, mode)
    expected = _run(reference, x, mode)
    assert _programs(fast) == 1
    assert not [op for op in log.ops if "convolution" in op or "pool" in op], log.ops
    assert got.dtype == expected.dtype
    assert_within_error_factor(got, expected, truth, f"{builder} {mode}", _low(mode))


@pytest.mark.parametrize("head", ["linear", "sequential"])
def test_the_bfloat16_program_runs_torchvisions_head_and_leaves_any_other(head):
    """avgpool + an exact nn.Linear run inside the bfloat16 program (its output is the
    logits); another head (a fine-tuning Sequential) runs after it, as does float32's."""
    reference, fast = _models()
    if head == "sequential":
        for model in (reference, fast):
            torch.manual_seed(1)
            model.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 10)).eval()
    truth_model = copy.deepcopy(reference).double()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        truth = truth_model(x.double())
    for mode, dtype in (("bfloat16 autocast", torch.bfloat16), ("float32", torch.float32)):
        got = _run(fast, x, mode)
        cached = PROGRAMS[fast].by_input[(tuple(x.shape), torch.float32, dtype, False)]
        assert cached.program.includes_head == (head == "linear" and dtype == torch.bfloat16)
        assert_within_error_factor(got, _run(reference, x, mode), truth, head, _low(mode))


def test_every_change_to_a_tensor_rebuilds_the_program():
    """An in-place edit of a running statistic, an optimizer step and load_state_dict: each is
    seen on the next call, as on the per-block path."""
    reference, fast = _models()
    x = torch.randn(2, 3, 32, 32)
    truth = copy.deepcopy(reference).double()
    with torch.no_grad():
        fast(x)
        for model in (reference, fast, truth):
            model.layer2[1].bn2.running_var.mul_(3.0)
        assert_within_error_factor(fast(x), reference(x), truth(x.double()), "edit", torch.float32)
    for model in (reference, fast, truth):  # one SGD step with the same gradients
        torch.manual_seed(3)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        torch.optim.SGD(model.parameters(), lr=0.01).step()
    with torch.no_grad():
        got = fast(x)
        assert_within_error_factor(got, reference(x), truth(x.double()), "step", torch.float32)
        fast.load_state_dict(torchvision.models.resnet18(num_classes=10).state_dict())
        assert not torch.equal(fast(x), got)


def _replace_a_weight(model: nn.Module) -> None:
    conv = model.layer2[0].conv1
    conv.weight = nn.Parameter(conv.weight.detach() * 1.5)


def _change_a_stride(model: nn.Module) -> None:
    model.layer3[0].conv1.stride = (1, 1)  # the block's convolutions keep fitting
    model.layer3[0].conv2.stride = (2, 2)


def _replace_a_block(model: nn.Module) -> None:
    block = copy.deepcopy(model.layer4[1])
    with torch.no_grad():
        block.bn2.weight.mul_(0.5)
    model.layer4[1] = block


@pytest.mark.parametrize("change", [_replace_a_weight, _change_a_stride, _replace_a_block])
def test_a_change_after_the_program_was_built_is_seen_on_the_next_call(change):
    """Settings, parameters and children changed by assignment (no tensor version moves):
    the next call decides again and matches the library's model with the same change."""
    reference, fast = _models()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast(x)
    assert _programs(fast) == 1
    change(reference)
    change(fast)
    truth = copy.deepcopy(reference).double()
    with torch.no_grad():
        got, expected = fast(x), reference(x)
    assert_within_error_factor(got, expected, truth(x.double()), change.__name__, torch.float32)


def test_a_hook_or_gradients_asked_for_after_the_program_was_built_leave_it():
    """A forward hook registered later sees the layer's output; with autograd on and a
    parameter made trainable again, the output carries gradients (the per-block path)."""
    reference, fast = _models()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        fast(x)
    seen = []
    handle = fast.layer3.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    handle.remove()
    assert len(seen) == 1
    fast.requires_grad_(False)
    fast(x)  # autograd on, nothing trainable: folded
    fast.layer4[0].conv1.weight.requires_grad_(True)
    out = fast(x)
    assert out.requires_grad
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_models_the_program_does_not_cover_run_the_per_block_path(monkeypatch):
    """A forward hook, a block given another backend, a non-Sequential layer, and a build
    without fastres._onednn: no program, the same results as before."""
    reference, fast = _models()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    seen = []
    handle = fast.layer3.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    handle.remove()
    assert seen and _programs(fast) == 0
    fast.layer1[0].backend = "torch"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    assert _programs(fast) == 0
    fast.layer1[0].backend = "cpu"
    monkeypatch.setattr(folded_program, "onednn_program_class", lambda: None)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    assert _programs(fast) == 0


def test_outputs_are_new_tensors_and_the_input_is_left_alone():
    _, fast = _models()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    original = x.clone()
    with torch.no_grad():
        first = fast(x)
        kept = first.clone()
        fast(torch.randn(2, 3, 32, 32))
    assert torch.equal(first, kept), "a later call overwrote an earlier output"
    assert torch.equal(x, original)


def test_a_program_is_kept_per_input_shape_and_freed_by_train():
    _, fast = _models()
    with torch.no_grad():
        for batch in (1, 2, 1, 3):
            fast(torch.randn(batch, 3, 32, 32))
    assert _programs(fast) == 3
    fast.train()
    assert _programs(fast) == 0


def test_concurrent_threads_get_the_results_of_a_single_thread():
    _, fast = _models()
    fast = fast.to(torch.bfloat16)
    inputs = [torch.randn(n, 3, 32, 32).to(torch.bfloat16) for n in (1, 2, 3)]
    assert_threads_match_one_thread(fast, inputs, rounds=3)
    assert _programs(fast) == 3


def test_the_program_checks_what_it_is_given():
    """The program class itself (what the plan builds) refuses what it was not built for."""
    _, fast = _models()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fast(x)
    program = next(iter(PROGRAMS[fast].by_input.values())).program.program
    wrong = [
        torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last),
        torch.randn(1, 3, 32, 32),  # NCHW
        torch.randn(1, 3, 32, 32).to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
    ]
    for bad in wrong:
        with pytest.raises(RuntimeError, match="shape the program was built for"):
            program.run(bad)
    with pytest.raises(RuntimeError, match="dtype must be"):
        torch.classes.fastres.FoldedProgram("float16")
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.classes.fastres.FoldedProgram("float32").add_convolution(
            0, 1, False, torch.zeros(4, 3, 1, 1), torch.zeros(4), [1, 3, 4, 4], [1, 4, 4, 4],
            [1, 1], [0, 0], 1, "gelu",
        )  # fmt: skip


def test_info_says_which_path_folded_cpu_inference_takes():
    assert "oneDNN" in fastres.info()["folded_cpu_path"]
    assert "directly" in fastres.info()["folded_cpu_path"]
    assert folded_eval.onednn_dtypes()[0] == torch.float32


def test_a_model_whose_layers_do_not_fit_gets_the_block_by_block_error():
    """No program, and the error a user gets without one, naming the channels."""
    reference, fast = _models()
    x = torch.randn(1, 3, 2, 2)  # every stage down to 1x1 pixel: still a program
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-4, atol=1e-4)
    assert _programs(fast) == 1
    fast.layer2[0].conv1 = nn.Conv2d(32, 128, 3, 2, 1, bias=False)  # layer1 gives 64 channels
    with torch.no_grad(), pytest.raises(fastres.BlockInputError, match="64"):
        fast(torch.randn(1, 3, 32, 32))
    assert _programs(fast) == 1  # only the one built before
