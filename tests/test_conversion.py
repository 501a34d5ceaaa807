"""fastres.resnet50 and friends, convert() and revert(), against torchvision's models."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from op_log import OpLog
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, ResNet50_Weights
from torchvision.ops import FrozenBatchNorm2d

import fastres
from fastres import FastBasicBlock, FastBottleneck, FastResNet
from fastres.bench.memory import saved_tensor_bytes
from fastres.testing import assert_within_error_factor

ACTIVATION_BYTES_TARGET = 0.86  # of torchvision's, for a converted ResNet-50 in training


def _training_step(model, x, labels, lr=0.05):
    """Forward, cross-entropy backward and one SGD step; returns the logits and loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    return logits.detach(), loss.detach()


def _resnet50_pair(dtype, seed=0):
    torch.manual_seed(seed)
    reference = torchvision.models.resnet50(num_classes=10).to(dtype)
    return reference, fastres.convert(reference, backend="cpu")


def test_resnet50_training_step_float64_matches_exactly():
    reference, fast = _resnet50_pair(torch.float64)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,))
    ref_logits, _ = _training_step(reference, x, labels)
    fast_logits, _ = _training_step(fast, x, labels)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10, msg=name)
    for (name, b), c in zip(reference.named_buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-10, atol=1e-10, msg=name)


def _relative_error(values, reference) -> float:
    """||values - reference|| / ||reference|| over whole lists of tensors, in float64."""
    diff = torch.cat(
        [(v.double() - r.double()).flatten() for v, r in zip(values, reference, strict=True)]
    )
    return (diff.norm() / torch.cat([r.double().flatten() for r in reference]).norm()).item()


def test_resnet50_training_step_float32():
    """A float32 training step against torchvision's float32 and float64 steps.

    Per-tensor float32 gradients of a deep random network are chaotic (PyTorch's own differ from
    float64 by up to ~10% on some layer4 tensors), so gradients and weight updates are judged
    over the whole model, with the error-factor rule of fastres/testing.py: fastres's relative
    error against float64 at most twice PyTorch's. Per-tensor gradient checks are in
    test_modules.py (blocks, float32) and above (whole model, float64).
    """
    reference64, _ = _resnet50_pair(torch.float64)
    reference = copy.deepcopy(reference64).float()
    fast = fastres.convert(reference, backend="cpu")
    initial = [p.detach().clone() for p in reference64.parameters()]
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    labels = torch.randint(0, 10, (4,))
    logits64, _ = _training_step(reference64, x, labels)
    ref_logits, ref_loss = _training_step(reference, x.float(), labels)
    fast_logits, fast_loss = _training_step(fast, x.float(), labels)

    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads64 = [p.grad for p in reference64.parameters()]
    updates64 = [p.detach() - p0 for p, p0 in zip(reference64.parameters(), initial, strict=True)]
    for what, ours, theirs, exact in [
        (
            "gradients",
            [p.grad for p in fast.parameters()],
            [p.grad for p in reference.parameters()],
            grads64,
        ),
        (
            "SGD updates",
            [p.detach() - p0 for p, p0 in zip(fast.parameters(), initial, strict=True)],
            [p.detach() - p0 for p, p0 in zip(reference.parameters(), initial, strict=True)],
            updates64,
        ),
    ]:
        ours_err, theirs_err = _relative_error(ours, exact), _relative_error(theirs, exact)
        assert ours_err <= 2 * theirs_err + 1e-6, (what, ours_err, theirs_err)
    for (name, b), c in zip(reference.named_buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4, msg=name)
    # Eval on identical weights and (trained, non-trivial) running statistics.
    fast.load_state_dict(reference.state_dict())
    reference.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x.float()), reference(x.float()), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resnet50_autocast_training_step_cuda(dtype):
    reference, _ = _resnet50_pair(torch.float32)
    reference = reference.cuda().to(memory_format=torch.channels_last)
    fast = fastres.convert(reference, backend="cuda")
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        ref_logits, ref_loss = _training_step(reference, x, labels)
        fast_logits, fast_loss = _training_step(fast, x, labels)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(fast_logits.float(), ref_logits.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=tol, atol=tol)


def test_converted_resnet50_keeps_fewer_activation_bytes():
    reference, fast = _resnet50_pair(torch.float32)
    x = torch.randn(2, 3, 128, 128)
    ref_bytes = saved_tensor_bytes(lambda: reference(x), exclude=reference.parameters())
    fast_bytes = saved_tensor_bytes(lambda: fast(x), exclude=fast.parameters())
    assert fast_bytes <= ACTIVATION_BYTES_TARGET * ref_bytes, (fast_bytes, ref_bytes)


# --- convert / revert -------------------------------------------------------------------------


def _blocks(model, types):
    return [m for m in model.modules() if type(m) in types]


@pytest.mark.parametrize("builder", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_convert_every_block_and_revert(builder):
    reference = getattr(torchvision.models, builder)()
    fast = fastres.convert(reference)
    assert not _blocks(fast, (Bottleneck, BasicBlock))
    assert len(_blocks(fast, (FastBottleneck, FastBasicBlock))) == len(
        _blocks(reference, (Bottleneck, BasicBlock))
    )
    assert type(fast) is FastResNet and fast.backend == "auto"
    back = fastres.revert(fast)
    assert [type(m) for m in back.modules()] == [type(m) for m in reference.modules()]
    for (name, a), b in zip(
        reference.state_dict().items(), back.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_convert_keeps_every_tensor_and_its_properties():
    model = torchvision.models.resnet18().to(memory_format=torch.channels_last)
    model.layer1.eval()
    model.layer2[0].conv1.weight.requires_grad_(False)
    before = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    converted = fastres.convert(model, inplace=True)
    assert converted is model and type(model) is FastResNet
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for name, t in after.items():
        assert t is before[name], f"{name} was replaced"
    assert not model.layer1.training and not model.layer1[0].training and model.layer2.training
    assert not model.layer2[0].conv1.weight.requires_grad
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_convert_copies_unless_inplace():
    model = torchvision.models.resnet18()
    converted = fastres.convert(model)
    assert type(model.layer1[0]) is BasicBlock and type(converted.layer1[0]) is FastBasicBlock
    for (name, a), b in zip(
        model.state_dict().items(), converted.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


def test_convert_finds_nested_backbones_and_reports(caplog):
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*list(torchvision.models.resnet50().children())[:-2])
            self.head = nn.Conv2d(2048, 4, 1)

    class CustomBlock(BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    model = Detector()
    model.extra = CustomBlock(4, 4)
    with caplog.at_level(logging.INFO, logger="fastres"):
        converted = fastres.convert(model)
    assert len(_blocks(converted, (FastBottleneck,))) == 16
    assert type(converted.extra) is CustomBlock
    assert "converted 16 block(s)" in caplog.text
    assert "extra: CustomBlock subclasses torchvision's BasicBlock" in caplog.text


def test_blocks_with_frozen_batch_norm_are_left_alone_with_the_reason():
    """torchvision's detection backbones use FrozenBatchNorm2d, which the fused ops do not
    reproduce: their blocks keep torchvision's classes, reported as left alone with the
    reason, as timm's and transformers' adapters do; revert() then finds nothing either."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None)
    model = FasterRCNN(backbone, num_classes=3)
    classes = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="no block to convert") as warned:
        converted = fastres.convert(model)
    assert [type(m) for m in converted.modules()] == classes
    message = str(warned[0].message)
    assert "converted 0 block(s)" in message and "left 16 alone" in message, message
    assert "backbone.body.layer1.0: FrozenBatchNorm2d is not an nn.BatchNorm2d" in message
    with pytest.warns(UserWarning, match="no block to revert"):
        reverted = fastres.revert(converted)
    assert [type(m) for m in reverted.modules()] == classes


def test_convert_and_revert_round_trip_a_model_with_blocks_left_alone(caplog):
    """Blocks (and a ResNet stem) with FrozenBatchNorm2d are left alone beside converted ones;
    the log says which and why, and revert() restores every class."""
    model = nn.Sequential(
        torchvision.models.resnet18(), torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    )
    classes = [type(m) for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="fastres"):
        converted = fastres.convert(model)
    assert len(_blocks(converted, (FastBasicBlock,))) == 8
    assert type(converted[1]) is ResNet and type(converted[1].layer1[0]) is BasicBlock
    assert "converted 8 block(s), 1 ResNet stem(s); left 9 alone" in caplog.text
    assert "1: FrozenBatchNorm2d is not an nn.BatchNorm2d" in caplog.text
    assert "1.layer4.1: FrozenBatchNorm2d is not an nn.BatchNorm2d" in caplog.text
    assert [type(m) for m in fastres.revert(converted).modules()] == classes


def test_convert_without_blocks_returns_the_model_and_says_so():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="no block to convert"):
        converted = fastres.convert(model, inplace=True)
    assert converted is model and type(model[0]) is nn.Conv2d


def test_filter_fn_picks_what_is_converted_and_the_report_says_so():
    """filter_fn(module, qualified_name) is asked of each candidate, the model itself as "";
    False leaves it alone with the reason, its children still visited."""
    asked = []

    def layer4_only(module: nn.Module, name: str) -> bool:
        asked.append(name)
        return name.startswith("layer4")

    fast = fastres.convert(torchvision.models.resnet18(), filter_fn=layer4_only)
    report = fastres.conversion_report(fast)
    assert asked[0] == "" and len(asked) == 9
    assert report.converted == ["layer4.0", "layer4.1"] and not report.resnets
    assert report.left_alone["<model>"] == "filter_fn returned False"
    assert report.left_alone["layer1.0"] == "filter_fn returned False"
    assert type(fast) is ResNet and type(fast.layer1[0]) is BasicBlock
    assert type(fast.layer4[1]) is FastBasicBlock
    assert fastres.conversion_report(fastres.revert(fast)).converted == ["layer4.0", "layer4.1"]


def test_a_filter_fn_that_fails_leaves_the_model_as_it_was():
    model = torchvision.models.resnet18()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="filter_fn must return a bool, got str for 'layer1.0'"):
        fastres.convert(model, inplace=True, filter_fn=lambda m, name: name or True)
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        fastres.convert(model, inplace=True, filter_fn="layer4")
    assert [type(m) for m in model.modules()] == classes
    with pytest.raises(LookupError, match="was not returned by fastres.convert"):
        fastres.conversion_report(model)


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastres.convert(torchvision.models.resnet18(), backend="gpu")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastres.convert("resnet50")


# --- builders ---------------------------------------------------------------------------------


def test_resnet50_builder_is_torchvisions_model_on_fast_blocks():
    model = fastres.resnet50(backend="cpu")
    assert type(model) is FastResNet and model.backend == "cpu"
    assert len(_blocks(model, (FastBottleneck,))) == 16
    assert all(b.backend == "cpu" for b in _blocks(model, (FastBottleneck,)))
    reference = torchvision.models.resnet50()
    model.load_state_dict(reference.state_dict())  # strict: the same keys and shapes
    back = fastres.revert(model)
    assert type(back) is ResNet
    for (name, a), b in zip(
        reference.state_dict().items(), back.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resnet50_builder_accepts_torchvisions_weights_enum(monkeypatch):
    """Weights load as torchvision loads them (the download itself is replaced here)."""
    torch.manual_seed(3)
    state = torchvision.models.resnet50().state_dict()
    monkeypatch.setattr(
        type(ResNet50_Weights.IMAGENET1K_V2), "get_state_dict", lambda self, *args, **kwargs: state
    )
    model = fastres.resnet50(weights=ResNet50_Weights.IMAGENET1K_V2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_zero_init_residual_keeps_working():
    model = ResNet(FastBottleneck, [3, 4, 6, 3], zero_init_residual=True)
    blocks = _blocks(model, (FastBottleneck,))
    assert blocks and all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)


def test_resnet50_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fastres.resnet50(num_classes=10, backend="cpu")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    eager_out = model(x)
    compiled_out = torch.compile(twin, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-4)
    for (name, b), c in zip(model.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=name)


def test_folded_eval_of_an_nchw_input_reorders_it_once():
    """An NCHW input is made channels_last once, before the folded stem, so that no block converts
    its output back (each did: the whole network ran no faster than torchvision's); the caller's
    input is left as it was."""
    reference = torchvision.models.resnet18().eval()
    fast = fastres.convert(reference, backend="cpu").eval()
    exact = copy.deepcopy(reference).double()
    x = torch.randn(2, 3, 64, 64)
    before = x.clone()
    with torch.no_grad():
        fast(x)  # folds and packs the weights
        with OpLog() as log:
            got = fast(x)
        expected, truth = reference(x), exact(x.double())
    assert log.ops.count("aten.clone") == 1, [op for op in log.ops if "clone" in op]
    assert torch.equal(x, before) and x.is_contiguous()
    assert_within_error_factor(got, expected, truth, "logits", torch.float32)
