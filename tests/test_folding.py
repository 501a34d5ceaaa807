"""Inference with BatchNorm folded into the convolutions, block by block: fold_bn, eval outputs,
the cache."""

import copy

import pytest
import torch
import torchvision
from op_log import OpLog
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import fastres
from fastres import fold_bn
from fastres.plans import folded_program
from fastres.plans.folded_eval import FOLDED
from fastres.testing import assert_within_error_factor, backend_params


@pytest.fixture(autouse=True)
def per_block_path(monkeypatch):
    """This file tests folding block by block through ATen's ops: FastResNet's whole-network
    oneDNN program (tests/test_folded_program.py) is switched off."""
    monkeypatch.setattr(folded_program, "onednn_program_class", lambda: None)


def _realistic(model: nn.Module, seed=0) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics, then eval."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _assert_eval_matches(fast, reference, x):
    with torch.no_grad():
        expected, got = reference(x), fast(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_matches_torch(conv_bias, affine):
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=conv_bias)
    bn = _realistic(nn.Sequential(nn.BatchNorm2d(16, affine=affine)))[0]
    weight, bias = fold_bn(conv, bn)
    expected_w, expected_b = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    torch.testing.assert_close(weight, expected_w)
    torch.testing.assert_close(bias, expected_b)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(
        nn.functional.conv2d(x, weight, bias, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5
    )


def test_eval_at_a_one_by_one_last_stage_matches_torchvision():
    """32 px images leave layer4 1x1: the residual-add convolution that torch 2.11's prepacked
    oneDNN binary op cannot run (fastres.plans.folded_convolution's
    onednn_binary_takes_packed_weight_at_1x1)."""
    reference = _realistic(torchvision.models.resnet18())
    fast = fastres.convert(reference).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    _assert_eval_matches(fast, reference, x)
    assert "oneDNN" in fastres.info()["folded_eval"]["cpu"]


def test_fold_bn_rejects_what_cannot_be_folded():
    with pytest.raises(ValueError, match="no running statistics"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="bn has 5 channels but conv has 4"):
        fold_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


@pytest.mark.parametrize("builder", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
@pytest.mark.parametrize(
    "memory_format",
    [torch.channels_last, torch.contiguous_format],
    ids=["channels_last", "contiguous"],
)
def test_eval_outputs_match_torchvision(builder, memory_format):
    reference = _realistic(getattr(torchvision.models, builder)(num_classes=10))
    reference = reference.to(memory_format=memory_format)
    fast = fastres.convert(reference, backend="cpu")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    _assert_eval_matches(fast, reference, x)
    assert any(block in FOLDED for block in fast.modules()), "the folded path did not run"


@pytest.mark.parametrize("builder", ["resnet50", "resnext50_32x4d"])
def test_every_convolution_runs_folded_in_eval(builder):
    """Each convolution of the model, the stem's included, is one oneDNN convolution with its
    BatchNorm folded in and its ReLU / residual add fused: no BatchNorm, ReLU, add or plain
    convolution is left, and nothing is folded again on the second call."""
    model = _realistic(getattr(fastres, builder)(num_classes=10, backend="cpu"))
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)  # folds and prepacks the weights: once
        with OpLog() as log:
            model(x)
    # Each block's last convolution adds its residual in place (mkldnn._convolution_pointwise_).
    assert (
        log.ops.count("mkldnn._convolution_pointwise")
        + log.ops.count("mkldnn._convolution_pointwise_")
        == convolutions
    )
    leftovers = [
        op
        for op in log.ops
        if "batch_norm" in op or "relu" in op or op in ("aten.convolution", "aten.add", "aten.add_")
    ]
    assert not leftovers


def _pair(backend="cpu"):
    reference = _realistic(torchvision.models.resnet18(num_classes=10))
    if backend == "triton":
        reference = reference.to(DEVICE)
    return reference, fastres.convert(reference, backend=backend)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = backend_params("cpu", "triton", triton="either")  # triton: a GPU, else interpreted


@pytest.mark.parametrize("builder", ["resnet18"])
def test_eval_outputs_match_torchvision_on_triton(builder):
    """The Triton convolution's bias + residual + ReLU epilogue, from folded weights (grouped
    convolutions: tests/test_fused_conv2d.py)."""
    reference = _realistic(getattr(torchvision.models, builder)(num_classes=10)).to(DEVICE)
    fast = fastres.convert(reference, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    _assert_eval_matches(fast, reference, x)
    assert any(block in FOLDED for block in fast.modules()), "the folded path did not run"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("builder", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_eval_outputs_match_torchvision_on_cudnn(builder, dtype):
    """cuDNN's fused convolution + bias + add + ReLU, float32 and under autocast, against
    torchvision in the same setting (error-factor rule against float64)."""
    reference = _realistic(getattr(torchvision.models, builder)(num_classes=10)).cuda()
    reference = reference.to(memory_format=torch.channels_last)
    fast = fastres.convert(reference, backend="cuda")
    reference64 = copy.deepcopy(reference).double()
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    low = dtype != torch.float32
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=low):
        got, theirs = fast(x), reference(x)
    with torch.no_grad():
        expected = reference64(x.double())
    assert any(block in FOLDED for block in fast.modules()), "the folded path did not run"
    assert_within_error_factor(
        got.float().cpu(),
        theirs.float().cpu(),
        expected.cpu(),
        "logits",
        dtype if low else torch.float32,
        term_magnitude=expected.abs().max().item(),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_model_cast_to_bfloat16_folds_on_the_gpu(backend):
    """``model.to(torch.bfloat16)`` with bfloat16 input: weights folded in float32 and cast
    once, the error-factor rule against float64 beside torchvision's own bfloat16 model."""
    reference = _realistic(torchvision.models.resnet18(num_classes=10)).cuda()
    fast = fastres.convert(reference, backend=backend).to(torch.bfloat16)
    reference64 = copy.deepcopy(reference).double()
    reference16 = copy.deepcopy(reference).to(torch.bfloat16)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        got, theirs = fast(x.bfloat16()), reference16(x.bfloat16())
        expected = reference64(x.double())
    assert got.dtype == torch.bfloat16
    assert any(block in FOLDED for block in fast.modules()), "the folded path did not run"
    assert_within_error_factor(got.cpu(), theirs.cpu(), expected.cpu(), "logits", torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_sees_in_place_edits(backend):
    reference, fast = _pair(backend)
    x = torch.randn(1, 3, 32, 32, device=reference.fc.weight.device)
    _assert_eval_matches(fast, reference, x)
    with torch.no_grad():
        for model in (reference, fast):
            model.conv1.weight.mul_(1.3)  # the stem's
            model.bn1.running_mean.add_(0.2)
            model.layer1[0].conv1.weight.mul_(1.7)
            model.layer2[0].bn2.running_var.add_(0.5)
            model.layer3[0].downsample[1].bias.add_(0.3)
    _assert_eval_matches(fast, reference, x)


def test_cache_sees_optimizer_steps_and_training():
    """After a training step of the converted model, eval folds its new weights and running
    statistics: it matches torchvision's model given the same state (training both instead
    would compare their float32 gradients, amplified by the step, not the cache)."""
    reference, fast = _pair()
    x = torch.randn(4, 3, 32, 32)
    _assert_eval_matches(fast, reference, x)
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.1)
    fast.train()
    fast(x).sum().backward()  # also moves the running statistics
    optimizer.step()
    fast.eval()
    reference.load_state_dict(fast.state_dict())
    _assert_eval_matches(fast, reference, x)


def test_cache_sees_load_state_dict_and_dtype_moves():
    reference, fast = _pair()
    x = torch.randn(2, 3, 48, 48)
    _assert_eval_matches(fast, reference, x)
    other = _realistic(torchvision.models.resnet18(num_classes=10), seed=1)
    reference.load_state_dict(other.state_dict())
    fast.load_state_dict(other.state_dict())
    _assert_eval_matches(fast, reference, x)
    reference.double()
    fast.double()
    _assert_eval_matches(fast, reference, x.double())
    reference.float()
    fast.float()
    _assert_eval_matches(fast, reference, x)


def test_autograd_in_eval_matches_the_unfused_computation():
    reference, fast = _pair()
    x = torch.randn(2, 3, 48, 48)
    results = []
    for model in (reference, fast):
        inp = x.clone().requires_grad_()
        out = model(inp)
        out.sum().backward()
        results.append((out.detach(), inp.grad, [p.grad for p in model.parameters()]))
    (ref_out, ref_dx, ref_grads), (out, dx, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)


def test_eval_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    reference, fast = _pair()
    x = torch.randn(2, 3, 48, 48)
    compiled = torch.compile(copy.deepcopy(fast), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def _rule_matches(fast, reference, x):
    """fast(x) against reference(x) by the error-factor rule (float64 reference)."""
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double())
        assert_within_error_factor(fast(x), reference(x), exact, "logits", torch.float32)


@pytest.mark.parametrize("builder", ["resnet18", "resnet50"])
@pytest.mark.parametrize(
    "memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"]
)
def test_the_callers_input_is_never_written(builder, memory_format):
    """Folded eval adds residuals in place into activations the network owns: never into the
    tensor the caller passed, to the model or to a block (whose input is its residual)."""
    reference = _realistic(getattr(torchvision.models, builder)(num_classes=10))
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=memory_format)
    before = x.clone()
    _rule_matches(fast, reference, x)
    assert torch.equal(x, before)
    for block in (fast.layer1[0], fast.layer1[1], fast.layer2[0]):  # with and without shortcut
        h = torch.randn(2, block.conv1.in_channels, 16, 16).contiguous(
            memory_format=torch.channels_last
        )
        before = h.clone()
        with torch.no_grad():
            block(h)
        assert torch.equal(h, before), "a block wrote its input (its residual)"


def test_blocks_add_their_residual_in_place_within_the_network():
    """Inside FastResNet every block's last convolution accumulates into a buffer the network
    owns (its input, or its shortcut's output) instead of allocating its output."""
    reference = _realistic(torchvision.models.resnet50(num_classes=10))
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), OpLog() as log:
        fast(x)
    blocks = sum(isinstance(m, fastres.FastBottleneck) for m in fast.modules())
    assert log.ops.count("mkldnn._convolution_pointwise_") == blocks
    _rule_matches(fast, reference, x)


def test_forward_hooks_see_every_activation_intact():
    """With a forward hook anywhere in the model, no activation is overwritten: what a hook
    kept is still what the module returned."""
    reference = _realistic(torchvision.models.resnet18(num_classes=10))
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    kept = []
    for module in (fast.maxpool, *fast.layer1, *fast.layer2):
        module.register_forward_hook(lambda m, i, out: kept.append((out, out.clone())))
    x = torch.randn(2, 3, 64, 64)
    _rule_matches(fast, reference, x)
    assert len(kept) == 5
    for out, copy_at_hook in kept:
        assert torch.equal(out, copy_at_hook), "an activation a hook kept was overwritten"


@pytest.mark.parametrize("images", [1, 5])
def test_stem_runs_image_chunks_with_its_pooling(monkeypatch, images):
    """In folded eval on CPU the stem convolves and max-pools a few images at a time (its
    output is the network's largest activation); the logits stay within the rule."""
    import fastres.plans.folded_eval as folded_eval

    reference = _realistic(torchvision.models.resnet18(num_classes=10))
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(images, 3, 64, 64)
    stem_bytes = 64 * 32 * 32 * 4  # one image's stem output
    monkeypatch.setattr(folded_eval, "STEM_CHUNK_BYTES", 2 * stem_bytes)
    with torch.no_grad(), OpLog() as log:
        fast(x)
    pools = log.ops.count("aten.max_pool2d_with_indices") + log.ops.count("aten.max_pool2d")
    assert pools == -(-images // 2)  # ceil: chunks of at most two images
    _rule_matches(fast, reference, x)


def test_a_hooked_stem_pooling_runs_once_on_the_whole_batch(monkeypatch):
    import fastres.plans.folded_eval as folded_eval

    reference = _realistic(torchvision.models.resnet18(num_classes=10))
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    monkeypatch.setattr(folded_eval, "STEM_CHUNK_BYTES", 1)
    shapes = []
    fast.maxpool.register_forward_hook(lambda m, i, out: shapes.append(out.shape[0]))
    _rule_matches(fast, reference, torch.randn(4, 3, 64, 64))
    assert shapes == [4]


def test_weights_are_prepacked_for_each_input_shape_they_meet():
    """oneDNN reorders a weight packed for another input shape on every call: each folded
    convolution keeps one packed weight per shape (and dtype), for the last PACKED_SHAPES."""
    from fastres.plans.folded_convolution import PACKED_SHAPES

    reference = _realistic(torchvision.models.resnet18(num_classes=10))
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    block = fast.layer1[0]
    for images in (1, 2, 1):
        _rule_matches(fast, reference, torch.randn(images, 3, 32, 32))
    first = FOLDED[block]._stages[0]
    # Keyed by (input shape, dtype), the least recently used first.
    assert [shape[0] for shape, _ in first.packed] == [2, 1]
    for images in range(3, 4 + PACKED_SHAPES):
        with torch.no_grad():
            fast(torch.randn(images, 3, 32, 32))
    assert len(first.packed) == PACKED_SHAPES
