"""Folded inference in bfloat16 on CPU: under ``torch.autocast("cpu", torch.bfloat16)`` around a
float32 model, and for a model cast with ``.to(torch.bfloat16)``.

Every converted ResNet (torchvision's, timm's, Hugging Face's, Ultralytics') is compared with its
library's own model in the same precision, both against the float64 model: the numerical
contract's error-factor rule. The convolutions must run folded, in bfloat16, on oneDNN.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from optional_libraries import HAS_ONEDNN
from serving_threads import assert_threads_match_one_thread
from test_adapters import MODELS, _logits, _params
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.plans import folded_eval, folded_program
from fastres.plans.folded_eval import FOLDED
from fastres.plans.folded_program import PROGRAMS
from fastres.testing import assert_within_error_factor, randomise_batch_norms

ONEDNN_CONVOLUTIONS = ("mkldnn._convolution_pointwise", "mkldnn._convolution_pointwise_")


class ConvolutionDtypes(TorchDispatchMode):
    """Within ``with ConvolutionDtypes() as log:``, ``log.dtypes`` maps each convolution op that
    ran to the input dtypes it ran with."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "convolution" in name:
            tensor = next(a for a in args if isinstance(a, torch.Tensor))
            self.dtypes.setdefault(name, set()).add(tensor.dtype)
        return func(*args, **(kwargs or {}))


def _torchvision_resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


LIBRARY_MODELS = {
    "torchvision-resnet18": _torchvision_resnet18,  # FastResNet: the oneDNN program
    "torchvision-resnet18-per-block": _torchvision_resnet18,  # ATen's ops, block by block
} | {
    name: MODELS[name][0]
    for name in (
        "timm-resnet18",
        "timm-resnet50d",
        "hf-resnet-18",
        "ultralytics-yolov8-cls-resnet50",
    )
}


def _models(name: str) -> tuple[nn.Module, nn.Module]:
    """The library's model in eval (random weights, realistic BatchNorms) and its conversion."""
    torch.manual_seed(0)
    reference = LIBRARY_MODELS[name]().eval()
    randomise_batch_norms(reference)
    return reference, fastres.convert(reference, backend="cpu").eval()


def _run(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Eval logits in ``mode``: "autocast" (the float32 model under bfloat16 autocast) or "cast"
    (``model`` is already in bfloat16; x is cast to it)."""
    with torch.no_grad():
        if mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _logits(model, x)
        return _logits(model, x.to(torch.bfloat16))


@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("name", _params(LIBRARY_MODELS))
def test_bfloat16_eval_follows_the_error_factor_rule_against_float64(name, mode, monkeypatch):
    per_block = not name.startswith("torchvision") or name.endswith("per-block") or not HAS_ONEDNN
    if per_block:
        monkeypatch.setattr(folded_program, "onednn_program_class", lambda: None)
    reference, fast = _models(name)
    truth_model = copy.deepcopy(reference).double()
    if mode == "cast":
        reference, fast = reference.to(torch.bfloat16), fast.to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        truth = _logits(truth_model, x.double())
    with ConvolutionDtypes() as log:
        got = _run(fast, x, mode)
    expected = _run(reference, x, mode)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_within_error_factor(got, expected, truth, f"{name} {mode} logits", torch.bfloat16)
    if per_block:
        folded = {op: dtypes for op, dtypes in log.dtypes.items() if op in ONEDNN_CONVOLUTIONS}
        assert folded and all(dtypes == {torch.bfloat16} for dtypes in folded.values()), log.dtypes
    else:  # a torchvision ResNet: the whole network in one oneDNN call, no ATen convolution
        assert not log.dtypes and fast in PROGRAMS


@pytest.mark.parametrize("probe", [True, False], ids=["binary-op-at-1x1", "torch-2.11-path"])
@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_a_one_by_one_last_stage_block_by_block(mode, probe, monkeypatch):
    """32 px images leave layer4 at 1x1, where torch 2.11's prepacked oneDNN add cannot run
    (folded_convolution.onednn_binary_takes_packed_weight_at_1x1) and its NCHW fallback has no
    bfloat16 add_relu: both ways, on whichever torch runs the test."""
    from fastres.plans import folded_convolution

    monkeypatch.setattr(folded_program, "onednn_program_class", lambda: None)
    monkeypatch.setattr(
        folded_convolution, "onednn_binary_takes_packed_weight_at_1x1", lambda: probe
    )
    reference, fast = _models("torchvision-resnet18")
    truth_model = copy.deepcopy(reference).double()
    if mode == "cast":
        reference, fast = reference.to(torch.bfloat16), fast.to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        truth = truth_model(x.double())
    got, expected = _run(fast, x, mode), _run(reference, x, mode)
    assert_within_error_factor(got, expected, truth, f"1x1 {mode}", torch.bfloat16)


def test_every_convolution_of_resnet50_runs_folded_in_bfloat16_channels_last():
    """No plain convolution, BatchNorm or activation left, and no reorder between layers: each
    folded convolution's output is channels_last bfloat16, the stem's and pooling's included."""
    model = fastres.resnet50(num_classes=10, backend="cpu").eval()
    randomise_batch_norms(model)
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.randn(1, 3, 64, 64)
    outputs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        with ConvolutionDtypes() as log:
            model(x)
    assert set(log.dtypes) <= set(ONEDNN_CONVOLUTIONS), log.dtypes
    model.layer4.register_forward_hook(lambda m, i, out: outputs.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert outputs[0].dtype == torch.bfloat16
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    folded = [FOLDED[m] for m in model.modules() if m in FOLDED]
    stages = [s for f in folded for s in (*f._stages, f._downsample) if s is not None]
    assert len(stages) == convolutions
    assert all(dtype == torch.bfloat16 for stage in stages for (_, dtype) in stage.packed), (
        "a weight was packed for another dtype"
    )


def test_cache_follows_the_dtype_float32_autocast_cast_and_back():
    """The same model in float32, under autocast, cast to bfloat16 and back to float32: each
    call folds for the weights it has now and runs in the dtype it is asked for."""
    reference, fast = _models("torchvision-resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        truth = copy.deepcopy(reference).double()(x.double())
        before = fast(x)
        torch.testing.assert_close(before, reference(x), rtol=0, atol=1e-4 * truth.abs().max())
        under_autocast = _run(fast, x, "autocast")
        expected = _run(reference, x, "autocast")
        assert_within_error_factor(under_autocast, expected, truth, "autocast", torch.bfloat16)
        cast = _run(fast.to(torch.bfloat16), x, "cast")
        expected = _run(copy.deepcopy(reference).to(torch.bfloat16), x, "cast")
        assert_within_error_factor(cast, expected, truth, "cast", torch.bfloat16)
        after = fast.float()(x)
    assert after.dtype == torch.float32
    # Back in float32, the weights are refolded from float32 tensors (.float() rounded them
    # through bfloat16 once: compare with the library's model rounded the same way).
    rounded = copy.deepcopy(reference).to(torch.bfloat16).float()
    with torch.no_grad():
        torch.testing.assert_close(after, rounded(x), rtol=0, atol=1e-4 * truth.abs().max())


def test_concurrent_serving_threads_get_the_results_of_a_single_thread(monkeypatch):
    """Several threads serve one bfloat16 model at once block by block, each at its own batch
    sizes (more shapes than a folded convolution keeps packed weights for): every result equals
    the one a single thread gets. (The whole-network program: tests/test_folded_program.py.)"""
    from fastres.plans.folded_convolution import PACKED_SHAPES

    monkeypatch.setattr(folded_program, "onednn_program_class", lambda: None)
    _, fast = _models("torchvision-resnet18")
    fast = fast.to(torch.bfloat16)
    torch.manual_seed(1)
    inputs = [torch.randn(n, 3, 32, 32).to(torch.bfloat16) for n in range(1, PACKED_SHAPES + 4)]
    assert_threads_match_one_thread(fast, inputs)


def test_a_bfloat16_model_fed_float32_says_to_cast_the_input():
    _, fast = _models("torchvision-resnet18")
    fast = fast.to(torch.bfloat16)
    state = {k: v.clone() for k, v in fast.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.raises(TypeError, match=r"x\.to\(torch\.bfloat16\)"):
        fast(x)
    with torch.no_grad(), pytest.raises(TypeError, match=r"input is torch\.float32"):
        fast.layer1(torch.randn(1, 64, 8, 8))
    assert all(torch.equal(v, state[k]) for k, v in fast.state_dict().items())
    with torch.no_grad():
        assert fast(x.to(torch.bfloat16)).dtype == torch.bfloat16  # the advice works


def test_float16_where_onednn_has_none_says_to_use_bfloat16(monkeypatch):
    monkeypatch.setattr(folded_eval, "onednn_dtypes", lambda: (torch.float32, torch.bfloat16))
    _, fast = _models("torchvision-resnet18")
    x = torch.randn(1, 3, 32, 32)
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.float16),
        pytest.raises(TypeError, match=r"AVX512_FP16.*bfloat16"),
    ):
        fast(x)
