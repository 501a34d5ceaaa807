"""bn_act_add: activation(batch_norm(x)) + residual, on every backend, against PyTorch's own
composition: outputs, every gradient, the running statistics; as custom ops (opcheck); bad
input."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from fastres.activation import apply_activation
from fastres.ops import bn_act_add
from fastres.testing import (
    RULE_DTYPES,
    assert_close,
    assert_within_error_factor,
    backend_device_params,
)

SHAPES = [(2, 5, 3, 4), (3, 16, 7, 9), (4, 64, 8, 8)]
FORMATS = [torch.contiguous_format, torch.channels_last]


def _inputs(shape, dtype, device, memory_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    param = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    residual = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return dict(
        x=x.to(device).contiguous(memory_format=memory_format),
        residual=residual.to(device).contiguous(memory_format=memory_format),
        weight=(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(param).to(device),
        bias=torch.randn(c, generator=g, dtype=torch.float64).to(param).to(device),
        running_mean=torch.randn(c, generator=g, dtype=torch.float64).to(param).to(device),
        running_var=(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(param).to(device),
    )


def _run(fn, t, training, activation, grad):
    """fn's output, the gradients of x, weight, bias and residual, and the running statistics
    after the call, on copies of ``t``."""
    leaves = {
        k: t[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")
    }
    stats = {k: t[k].clone() for k in ("running_mean", "running_var")}
    out = fn(leaves, stats, training, activation)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [leaves[k].grad for k in leaves] + list(stats.values())


def _fastres(backend):
    def call(leaves, stats, training, activation):
        return bn_act_add(
            leaves["x"],
            leaves["weight"],
            leaves["bias"],
            stats["running_mean"],
            stats["running_var"],
            residual=leaves["residual"],
            training=training,
            momentum=0.1,
            eps=1e-5,
            activation=activation,
            backend=backend,
        )

    return call


def _composition(leaves, stats, training, activation):
    y = F.batch_norm(
        leaves["x"],
        stats["running_mean"],
        stats["running_var"],
        leaves["weight"],
        leaves["bias"],
        training,
        0.1,
        1e-5,
    )
    return apply_activation(y, activation) + leaves["residual"]


def _as(t, dtype):
    return {k: (v.to(torch.float64) if dtype == torch.float64 else v) for k, v in t.items()}


NAMES = [
    "out",
    "grad_x",
    "grad_weight",
    "grad_bias",
    "grad_residual",
    "running_mean",
    "running_var",
]


def _backend_dtype_params():
    """Every backend with every dtype it takes: the GPU backends compute in float32 and take no
    float64."""
    params = []
    for backend_device in backend_device_params():
        backend, _ = backend_device.values
        dtypes = RULE_DTYPES if backend in ("cuda", "triton") else (torch.float64, *RULE_DTYPES)
        for dtype in dtypes:
            params.append(
                pytest.param(
                    *backend_device.values,
                    dtype,
                    marks=backend_device.marks,
                    id=f"{backend_device.id}-{dtype}",
                )
            )
    return params


@pytest.mark.parametrize("backend,device,dtype", _backend_dtype_params())
@pytest.mark.parametrize("memory_format", FORMATS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["silu", "relu", "identity"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_the_composition(
    backend, device, dtype, memory_format, activation, training, shape
):
    t = _inputs(shape, dtype, device, memory_format)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grad = grad.to(device).contiguous(memory_format=memory_format)
    ours = _run(_fastres(backend), t, training, activation, grad)
    wide = {k: v.to(torch.float64) for k, v in t.items()}
    reference = _run(_composition, wide, training, activation, grad)
    if dtype == torch.float64:
        for name, a, b in zip(NAMES, ours, reference, strict=True):
            assert_close(a, b, name)
        return
    theirs = _run(_composition, t, training, activation, grad)
    for name, a, low, b in zip(NAMES, ours, theirs, reference, strict=True):
        assert a.dtype == low.dtype, name
        if name in ("out", "grad_x", "grad_residual"):
            assert a.is_contiguous(memory_format=memory_format), name
        magnitude = t["x"].abs().max().item() if name == "grad_x" else 0.0
        assert_within_error_factor(a, low, b, name, dtype, term_magnitude=magnitude)


@pytest.mark.parametrize(
    "name,device",
    [
        pytest.param("bn_act_add_forward", "cpu", id="compiled-cpu"),
        pytest.param(
            "bn_act_add_forward_triton",
            "cpu",
            id="triton-interpreter",
            marks=pytest.mark.triton_interpreter,
        ),
        pytest.param("bn_act_add_forward", "cuda", id="compiled-cuda", marks=pytest.mark.cuda),
        pytest.param("bn_act_add_forward_triton", "cuda", id="triton-gpu", marks=pytest.mark.cuda),
    ],
)
@pytest.mark.parametrize("activation", ["silu", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_passes_opcheck(name, device, activation, training):
    t = _inputs((2, 5, 3, 4), torch.float32, device, torch.contiguous_format)
    args = (
        t["x"].requires_grad_(),
        t["weight"].requires_grad_(),
        t["bias"].requires_grad_(),
        t["residual"].requires_grad_(),
        t["running_mean"],
        t["running_var"],
        training,
        0.1,
        1e-5,
        activation,
    )
    opcheck(getattr(torch.ops.fastres, name), args)


@pytest.mark.parametrize("activation", ["silu", "relu", "identity"])
def test_gradcheck_float64(activation):
    t = _inputs((2, 3, 3, 3), torch.float64, "cpu", torch.channels_last)
    leaves = [t[k].requires_grad_() for k in ("x", "weight", "bias", "residual")]

    def fn(x, weight, bias, residual):
        return bn_act_add(
            x, weight, bias, None, None, residual=residual, training=True,
            activation=activation, backend="cpu",
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, leaves)


def test_bad_input_names_the_argument_and_leaves_the_statistics():
    t = _inputs((2, 5, 3, 4), torch.float32, "cpu", torch.contiguous_format)
    before = t["running_mean"].clone()
    args = (t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"])
    with pytest.raises(TypeError, match="bn_act_add: residual must be a Tensor"):
        bn_act_add(*args, residual=None, training=True)
    with pytest.raises(ValueError, match=r"bn_act_add: residual must have the shape of x"):
        bn_act_add(*args, residual=t["residual"][:1], training=True)
    with pytest.raises(ValueError, match="bn_act_add: activation"):
        bn_act_add(*args, residual=t["residual"], training=True, activation="gelu")
    assert torch.equal(t["running_mean"], before)


@pytest.mark.parametrize("backend,device", backend_device_params("cpu", "triton"))
def test_the_callers_input_and_residual_are_never_written(backend, device):
    t = _inputs((2, 5, 3, 4), torch.float32, device, torch.channels_last)
    x, residual = t["x"].clone(), t["residual"].clone()
    bn_act_add(
        t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"],
        residual=t["residual"], training=True, backend=backend,
    )  # fmt: skip
    assert torch.equal(t["x"], x) and torch.equal(t["residual"], residual)


def test_compiles_whole_and_matches_eager():
    """Forward and backward under torch.compile(fullgraph=True), running statistics included."""
    torch._dynamo.reset()
    t = _inputs((2, 8, 5, 5), torch.float32, "cpu", torch.channels_last)
    grad = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)

    def step(leaves, stats, training, activation):
        return _fastres("cpu")(leaves, stats, training, activation)

    eager = _run(step, t, True, "silu", grad)
    compiled = _run(torch.compile(step, fullgraph=True), t, True, "silu", grad)
    for name, a, b in zip(NAMES, compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
