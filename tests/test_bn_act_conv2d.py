"""bn_act_conv2d: conv2d(act(batch_norm(y))) without keeping the activation's output for
backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.library import opcheck

from fastres.activation import ACTIVATIONS, apply_activation
from fastres.ops import bn_act_conv2d
from fastres.testing import assert_close, assert_within_error_factor, backend_params

# (id, channels in, channels out, kernel, stride, padding, dilation, groups): every kind of
# convolution that follows a BatchNorm + ReLU in ResNet-50 and ResNeXt.
CONVS = [
    ("1x1", 8, 12, 1, 1, 0, 1, 1),
    ("3x3", 8, 8, 3, 1, 1, 1, 1),
    ("3x3-stride2", 8, 16, 3, 2, 1, 1, 1),
    ("3x3-grouped", 8, 8, 3, 1, 1, 1, 4),
    ("3x3-dilated", 8, 8, 3, 1, 2, 2, 1),
]
BACKENDS = backend_params("cpu", "cuda", "triton")


def _inputs(cin, cout, k, groups, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    param = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        y=(make(3, cin, 7, 6) * 1.3 + 0.4).to(device, dtype).requires_grad_(),
        bn_weight=(make(cin).abs() + 0.5).to(device, param).requires_grad_(),
        bn_bias=make(cin).to(device, param).requires_grad_(),
        running_mean=make(cin).to(device, param) * 0.1,
        running_var=(make(cin).abs() + 0.5).to(device, param),
        conv_weight=(make(cout, cin // groups, k, k) * 0.3).to(device, dtype).requires_grad_(),
    )


def _reference(t, stride, padding, dilation, groups, training, eps=1e-5, activation="relu"):
    z = apply_activation(
        F.batch_norm(
            t["y"],
            t["running_mean"].clone(),
            t["running_var"].clone(),
            t["bn_weight"],
            t["bn_bias"],
            training,
            0.0,
            eps,
        ),
        activation,
    )
    return F.conv2d(z, t["conv_weight"], None, stride, padding, dilation, groups)


def _run(fn, t, grad):
    for v in t.values():
        v.grad = None
    out = fn(t)
    out.backward(grad)
    return {"out": out.detach(), **{f"grad {k}": v.grad for k, v in t.items() if v.requires_grad}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "name,cin,cout,k,stride,padding,dilation,groups", CONVS, ids=[c[0] for c in CONVS]
)
def test_matches_reference(
    name, cin, cout, k, stride, padding, dilation, groups, dtype, training, activation, backend
):
    device = "cuda" if backend == "cuda" else "cpu"
    if dtype == torch.float16 and device == "cpu":
        dtype = torch.bfloat16  # oneDNN runs bfloat16 convolutions on CPU; float16 on GPU
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)

    def fused(t):
        out, _, _ = bn_act_conv2d(
            t["y"],
            t["bn_weight"],
            t["bn_bias"],
            t["running_mean"],
            t["running_var"],
            t["conv_weight"],
            *args,
            training,
            1e-5,
            backend,
            activation,
        )
        return out

    def reference(t):
        return _reference(t, *args, training, activation=activation)

    t = _inputs(cin, cout, k, groups, dtype, device)
    with torch.no_grad():
        out_shape = reference(t).shape
    # Seeded, so the case does not depend on what ran before it.
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = _run(fused, t, grad)
    expected = _run(reference, t, grad)
    t64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in t.items()}
    exact = _run(reference, t64, grad.double())
    for key, value in exact.items():
        assert_within_error_factor(got[key], expected[key], value, key, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "name,cin,cout,k,stride,padding,dilation,groups", CONVS, ids=[c[0] for c in CONVS]
)
def test_float64_matches_and_gradchecks(
    name, cin, cout, k, stride, padding, dilation, groups, training, activation
):
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    t = _inputs(cin, cout, k, groups, torch.float64)

    def fused(y, bn_weight, bn_bias, conv_weight):
        return bn_act_conv2d(
            y,
            bn_weight,
            bn_bias,
            t["running_mean"],
            t["running_var"],
            conv_weight,
            *args,
            training,
            1e-5,
            "cpu",
            activation,
        )[0]

    out = fused(t["y"], t["bn_weight"], t["bn_bias"], t["conv_weight"])
    assert_close(out, _reference(t, *args, training, activation=activation), "out")
    assert gradcheck(
        fused,
        (t["y"], t["bn_weight"], t["bn_bias"], t["conv_weight"]),
        eps=1e-6,
        atol=1e-6,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    "op_name,device",
    [
        ("bn_act_conv2d", "cpu"),
        pytest.param("bn_act_conv2d_triton", "cpu", marks=pytest.mark.triton_interpreter),
        pytest.param("bn_act_conv2d", "cuda", marks=pytest.mark.cuda),
    ],
)
@pytest.mark.parametrize(
    "memory_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["contiguous", "channels_last"],
)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_opcheck(op_name, device, memory_format, activation):
    """One op per family (fastres/ops/registry.py), no backend argument in the schema."""
    t = _inputs(8, 8, 3, 2, torch.float32, device)
    t["y"] = t["y"].detach().contiguous(memory_format=memory_format).requires_grad_()
    opcheck(
        getattr(torch.ops.fastres, op_name).default,
        (
            t["y"],
            t["bn_weight"],
            t["bn_bias"],
            t["running_mean"],
            t["running_var"],
            t["conv_weight"],
            [1, 1],
            [1, 1],
            [1, 1],
            2,
            True,
            1e-5,
            activation,
        ),
    )


def test_the_torch_backend_is_pytorchs_composition():
    """backend="torch" runs F.batch_norm, relu and conv2d, and returns the ops' results: the
    batch statistics, the running statistics untouched."""
    t = _inputs(8, 8, 3, 1, torch.float64)
    running = (t["running_mean"].clone(), t["running_var"].clone())
    args = (t["y"], t["bn_weight"], t["bn_bias"], *running, t["conv_weight"])
    out, mean, var = bn_act_conv2d(*args, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, "torch")
    expected, expected_mean, expected_var = bn_act_conv2d(
        *args, [1, 1], [1, 1], [1, 1], 1, True, 1e-5, "cpu"
    )
    assert_close(out, expected, "out")
    assert_close(mean, expected_mean, "mean")
    assert_close(var, expected_var, "var")
    assert torch.equal(running[0], t["running_mean"]) and torch.equal(running[1], t["running_var"])


def test_keeps_only_the_batch_norm_input():
    t = _inputs(8, 8, 3, 1, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        bn_act_conv2d(
            t["y"],
            t["bn_weight"],
            t["bn_bias"],
            None,
            None,
            t["conv_weight"],
            [1, 1],
            [1, 1],
            [1, 1],
            1,
            True,
            1e-5,
            "cpu",
        )
    activations = [s for s in saved if s.dim() == 4 and s.shape[0] == 3]
    assert len(activations) == 1 and activations[0].data_ptr() == t["y"].data_ptr()
