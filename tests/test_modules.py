"""FastBottleneck and FastBasicBlock against torchvision's blocks.

Every configuration ResNet-18/50 and ResNeXt use, train and eval, on every backend that runs
here: output, input gradient, every parameter gradient, running statistics and
num_batches_tracked after two steps. float64 tightly; float32 with the error-factor rule of
fastres/testing.py against a float64 run of torchvision's block.
"""

import copy
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

import fastres
from fastres import FastBasicBlock, FastBottleneck
from fastres.testing import assert_close, assert_within_error_factor, backend_params

BACKENDS = backend_params()


def _downsample(inplanes, outplanes, stride, norm_layer=nn.BatchNorm2d):
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), norm_layer(outplanes)
    )


# (name, block class, constructor arguments, downsample arguments or None, input side)
CONFIGS = [
    ("resnet50-layer1-first", Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1), 8),
    ("resnet50-plain", Bottleneck, dict(inplanes=64, planes=16), None, 8),
    ("resnet50-stride2", Bottleneck, dict(inplanes=64, planes=32, stride=2), (64, 128, 2), 9),
    (
        "resnext-groups",
        Bottleneck,
        dict(inplanes=64, planes=16, groups=8, base_width=8),
        (64, 64, 1),
        8,
    ),
    ("resnet50-dilated", Bottleneck, dict(inplanes=64, planes=16, dilation=2), None, 8),
    ("resnet18-plain", BasicBlock, dict(inplanes=16, planes=16), None, 8),
    ("resnet18-stride2", BasicBlock, dict(inplanes=16, planes=32, stride=2), (16, 32, 2), 9),
]


def _make(block_cls, kwargs, ds, norm_layer=None, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    downsample = _downsample(*ds, norm_layer=norm_layer or nn.BatchNorm2d) if ds else None
    block = block_cls(downsample=downsample, **kwargs)
    # Non-trivial affine parameters and running statistics, so that all of them matter.
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.3)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
    return block


def _run(block, x, grad, steps=2):
    """Forward and backward `steps` times; returns every result to compare."""
    x = x.detach().clone().requires_grad_()
    for _ in range(steps):
        out = block(x)
        out.backward(grad)
    results = {"out": out.detach(), "grad_x": x.grad}
    results.update({f"grad {n}": p.grad for n, p in block.named_parameters()})
    results.update({f"buffer {n}": b for n, b in block.named_buffers()})
    return results


def _compare(
    block_cls,
    kwargs,
    ds,
    side,
    backend,
    device,
    dtype,
    training,
    norm_layer=None,
    channels_last=False,
):
    reference = _make(block_cls, kwargs, ds, norm_layer).to(device)
    fast = fastres.convert(reference, backend=backend)
    assert type(fast) in (FastBottleneck, FastBasicBlock)
    fast.train(training)
    reference.train(training)
    g = torch.Generator().manual_seed(1)
    inplanes = kwargs["inplanes"]
    x = torch.randn(4, inplanes, side, side, generator=g).to(device) * 1.5 + 0.3
    with torch.no_grad():
        out_shape = reference(x).shape
    reference.load_state_dict(fast.state_dict())  # undo the buffers that probe forward touched
    grad = torch.randn(out_shape, generator=g).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)

    got = _run(fast.to(dtype), x.to(dtype), grad.to(dtype))
    if dtype == torch.float64:
        expected = _run(reference.double(), x.double(), grad.double())
        for name, value in expected.items():
            if value is None:
                assert got[name] is None, name
            else:
                assert_close(got[name], value, name)
        return
    expected = _run(copy.deepcopy(reference).to(dtype), x.to(dtype), grad.to(dtype))
    ref64 = _run(copy.deepcopy(reference).double(), x.double(), grad.double())
    for name, value in ref64.items():
        if value is None:
            assert got[name] is None, name
        elif not value.dtype.is_floating_point:
            assert torch.equal(got[name], expected[name]), name  # num_batches_tracked
        else:
            assert_within_error_factor(got[name], expected[name], value, name, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,block_cls,kwargs,ds,side", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_block_float32(name, block_cls, kwargs, ds, side, backend, training):
    device = "cuda" if backend == "cuda" else "cpu"
    _compare(block_cls, kwargs, ds, side, backend, device, torch.float32, training)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,block_cls,kwargs,ds,side", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_block_float64(name, block_cls, kwargs, ds, side, backend, training):
    _compare(block_cls, kwargs, ds, side, backend, "cpu", torch.float64, training)


def test_block_channels_last():
    _compare(
        Bottleneck,
        dict(inplanes=64, planes=16),
        (64, 64, 1),
        8,
        "cpu",
        "cpu",
        torch.float64,
        True,
        channels_last=True,
    )


NORM_LAYERS = [
    ("momentum-none", partial(nn.BatchNorm2d, momentum=None)),
    ("eps-1e-3", partial(nn.BatchNorm2d, eps=1e-3)),
    ("no-affine", partial(nn.BatchNorm2d, affine=False)),
    ("no-running-stats", partial(nn.BatchNorm2d, track_running_stats=False)),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm_name,norm_layer", NORM_LAYERS, ids=[n for n, _ in NORM_LAYERS])
def test_batch_norm_configurations_are_honoured(norm_name, norm_layer, training):
    block = _make(Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1), norm_layer)
    assert fastres.convert(block).fusion_issue() == ""
    _compare(
        Bottleneck,
        dict(inplanes=64, planes=16),
        (64, 64, 1),
        8,
        "cpu",
        "cpu",
        torch.float64,
        training,
        norm_layer=norm_layer,
    )


@pytest.mark.parametrize(
    "norm_name,norm_layer",
    [
        ("frozen", FrozenBatchNorm2d),
        ("group-norm", lambda c: nn.GroupNorm(4, c)),
    ],
)
def test_other_norm_layers_run_the_reference_computation(norm_name, norm_layer):
    """A fast block built with a norm layer the fused ops do not reproduce runs torchvision's
    forward; convert() leaves such a torchvision block alone, saying why."""
    block = _make(Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1), norm_layer)
    fast = _make(FastBottleneck, dict(inplanes=64, planes=16), (64, 64, 1), norm_layer)
    fast.load_state_dict(block.state_dict())
    assert "is not an nn.BatchNorm2d" in fast.fusion_issue()
    x = torch.randn(2, 64, 6, 6)
    assert fast.plan_for(x).name == "reference"
    torch.testing.assert_close(fast(x), block(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="is not an nn.BatchNorm2d"):
        assert type(fastres.convert(block)) is Bottleneck


def test_other_activation_runs_the_reference_computation():
    """As for other norm layers: a fast block given another activation runs torchvision's
    forward; convert() leaves such a torchvision block alone."""
    block = _make(Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1))
    block.relu = nn.GELU()
    fast = _make(FastBottleneck, dict(inplanes=64, planes=16), (64, 64, 1))
    fast.relu = nn.GELU()
    fast.load_state_dict(block.state_dict())
    assert fast.fusion_issue() == "the activation is GELU"
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(fast(x), block(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="the activation is GELU"):
        assert type(fastres.convert(block)) is Bottleneck


def test_a_silu_block_trains_fused_and_matches_torchvision():
    """SiLU is a fused activation: training runs bn_act_conv2d and bn_act with it."""
    block = _make(Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1)).double()
    block.relu = nn.SiLU()
    fast = fastres.convert(copy.deepcopy(block), backend="cpu")
    assert fast.fusion_issue() == ""
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    assert fast.plan_for(x).name == "fused ops"
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [fast(xs[0]), block(xs[1])]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for out in outs:
        out.sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(block.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_a_silu_block_folds_in_eval_and_follows_the_error_factor_rule():
    """Folded eval applies SiLU as oneDNN's swish post-op (after the residual add: its own
    pass); judged against torchvision's float32 result by the error-factor rule."""
    block = _make(Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1)).eval()
    block.relu = nn.SiLU()
    exact = copy.deepcopy(block).double()
    fast = fastres.convert(copy.deepcopy(block), backend="cpu")
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert fast.plan_for(x).name == "folded eval"
        got, expected, reference = fast(x), block(x), exact(x.double())
    assert_within_error_factor(got, expected, reference, "eval output", torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_autocast_bfloat16_matches_torchvision(training):
    """Under autocast both blocks run in bfloat16; each is judged against torchvision's float32
    result with the error-factor rule (bfloat16 input gradients through a training BatchNorm are
    coarse for PyTorch too: about 0.5 on values of about 2 here)."""
    reference = _make(Bottleneck, dict(inplanes=64, planes=16, stride=2), (64, 64, 2))
    reference.train(training)
    exact = copy.deepcopy(reference)
    fast = fastres.convert(reference, backend="cpu")
    x = torch.randn(4, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    results = []
    for block, autocast in ((exact, False), (reference, True), (fast, True)):
        inp = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(inp)
        out.float().sum().backward()
        results.append(
            {
                "out": out,
                "grad_x": inp.grad,
                **{f"grad {n}": p.grad for n, p in block.named_parameters()},
            }
        )
    exact_results, torch_results, fast_results = results
    assert fast_results["out"].dtype == torch_results["out"].dtype == torch.bfloat16
    for name, value in exact_results.items():
        assert_within_error_factor(
            fast_results[name], torch_results[name], value, name, torch.bfloat16
        )


def test_fast_blocks_keep_torchvision_constructor_and_attributes():
    block = FastBottleneck(64, 16, 2, _downsample(64, 64, 2), backend="cpu")
    for attr in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample", "stride"):
        assert hasattr(block, attr)
    assert block.conv2.stride == (2, 2)  # ResNet v1.5: the stride is on the 3x3
    assert isinstance(block, Bottleneck)
    assert set(block.state_dict()) == set(
        Bottleneck(64, 16, 2, _downsample(64, 64, 2)).state_dict()
    )


@pytest.mark.parametrize("block_cls", [FastBottleneck, FastBasicBlock])
def test_bad_input_names_the_problem(block_cls):
    block = block_cls(64, 64)
    with pytest.raises(ValueError, match="x must have 64 channels"):
        block(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        block(torch.randn(64, 4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        block_cls(64, 64, backend="gpu")


@pytest.mark.parametrize("library_cls", [Bottleneck, BasicBlock])
def test_wrong_channels_raise_what_runtime_error_and_value_error_both_catch(library_cls):
    """torchvision's block raises RuntimeError (from conv2d) for an input with the wrong channel
    count; the fast block's clearer error is caught by ``except RuntimeError`` as that one is,
    and by ``except ValueError`` as before."""
    library = library_cls(64, 64 // library_cls.expansion)
    fast = fastres.convert(library)
    x = torch.randn(2, 32, 4, 4)
    with pytest.raises(RuntimeError):
        library(x)
    for caught in (RuntimeError, ValueError):
        with pytest.raises(
            caught, match=f"{type(fast).__name__}: x must have 64 channels"
        ) as error:
            fast(x)
        assert error.type is fastres.BlockInputError


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_model_cast_to_half_precision_on_cpu_names_the_layer_and_the_way_out(training, dtype):
    """``model.half()`` puts BatchNorm's tensors in float16, which the fused ops do not take:
    the error names the block, the BatchNorm and what to run instead, and changes nothing."""
    block = fastres.convert(BasicBlock(64, 64)).to(dtype)
    block.train(training)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    advice = "bfloat16" if dtype == torch.float16 else "torch.autocast"
    with pytest.raises(TypeError, match=rf"FastBasicBlock: BatchNorm 'bn1' .*{advice}.*revert"):
        block(torch.randn(2, 64, 8, 8, dtype=dtype))
    for name, value in block.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    block = fastres.convert(_make(Bottleneck, dict(inplanes=64, planes=16), (64, 64, 1)))
    twin = copy.deepcopy(block)
    x = torch.randn(2, 64, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(twin, fullgraph=True)
    for module in (block, compiled):
        out = module(x)
        out.sum().backward()
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(block.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(block.named_buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=name)


def test_one_value_per_channel_raises_and_updates_state_like_torchvision():
    """Stride 2 leaves one value per channel: both raise at bn2, after the same updates."""
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    reference = Bottleneck(16, 8, 2, downsample).train()
    fast = fastres.convert(copy.deepcopy(reference), backend="cpu")
    x = torch.randn(1, 16, 2, 2)
    for model in (reference, fast):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model(x)
    for (name, a), b in zip(
        fast.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
