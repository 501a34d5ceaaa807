"""Runs bn_act and its reference on identical inputs and compares everything they produce.

Everything means: the output, the gradient of every input (x, weight, bias, residual) and the
running statistics after several training steps. Comparison follows fastres/testing.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastres.ops import bn_act
from fastres.ops.bn_act import bn_act_reference
from fastres.testing import (
    RESNET50_BN_SHAPES,
    RULE_DTYPES,
    assert_close,
    assert_within_error_factor,
)

# ResNet-50's BatchNorm shapes at batch 2.
RESNET50_SHAPES = [(2, c, side, side) for c, side, _ in RESNET50_BN_SHAPES]
# The same channel counts at a spatial size the Triton interpreter runs quickly.
RESNET50_CHANNELS_SMALL = [(2, c, 3, 3) for c in sorted({c for c, _, _ in RESNET50_BN_SHAPES})]
# Odd H and W, C not a multiple of 8, N = 1, a single pixel per image.
ODD_SHAPES = [(3, 5, 7, 9), (1, 3, 5, 1), (4, 13, 3, 3), (2, 7, 1, 1), (5, 1, 2, 3)]

MEMORY_FORMATS = [torch.contiguous_format, torch.channels_last]


@dataclass
class Case:
    shape: tuple
    dtype: torch.dtype = torch.float32
    memory_format: torch.memory_format = torch.contiguous_format
    residual: bool = True
    activation: str = "relu"
    affine: bool = True
    track_running_stats: bool = True
    training: bool = True
    steps: int = 2
    momentum: float = 0.1
    eps: float = 1e-5
    seed: int = 0
    # Optional strided view: applied to x, residual and grad before use (non-dense inputs).
    view: object | None = field(default=None, repr=False)


def make_inputs(case: Case) -> dict:
    """Float64 master copies of every input; rounded to the case's dtype when used."""
    g = torch.Generator().manual_seed(case.seed)
    c = case.shape[1]
    big = case.shape if case.view is None else case.view.source_shape(case.shape)
    dt = torch.float64
    return {
        # Non-zero mean and non-unit spread, so that centring and scaling both matter.
        "x": torch.randn(big, generator=g, dtype=dt) * 1.7 + 0.6,
        "residual": torch.randn(big, generator=g, dtype=dt) if case.residual else None,
        "weight": torch.rand(c, generator=g, dtype=dt) + 0.5 if case.affine else None,
        "bias": torch.randn(c, generator=g, dtype=dt) if case.affine else None,
        "running_mean": torch.randn(c, generator=g, dtype=dt) * 0.1
        if case.track_running_stats
        else None,
        "running_var": torch.rand(c, generator=g, dtype=dt) + 0.5
        if case.track_running_stats
        else None,
        "grad": torch.randn(big, generator=g, dtype=dt),
    }


def _activation(t, dtype, case, device, requires_grad):
    if t is None:
        return None
    t = t.to(device=device, dtype=dtype).contiguous(memory_format=case.memory_format)
    if case.view is not None:
        t = case.view.apply(t)
    return t.detach().requires_grad_(requires_grad)


def run(fn, inputs: dict, case: Case, dtype: torch.dtype, device: str) -> dict:
    """Runs `case.steps` training (or eval) steps of fn; returns outputs, grads and buffers."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _activation(inputs["x"], dtype, case, device, True)
    residual = _activation(inputs["residual"], dtype, case, device, True)
    grad = _activation(inputs["grad"], dtype, case, device, False)

    def param(name, requires_grad):
        t = inputs[name]
        return (
            None if t is None else t.to(device, param_dtype).detach().requires_grad_(requires_grad)
        )

    weight, bias = param("weight", True), param("bias", True)
    running_mean, running_var = param("running_mean", False), param("running_var", False)
    originals = {
        "x": x.detach().clone(),
        "residual": None if residual is None else residual.detach().clone(),
    }
    for _ in range(case.steps):
        out = fn(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            residual=residual,
            training=case.training,
            momentum=case.momentum,
            eps=case.eps,
            activation=case.activation,
        )
        out.backward(grad)
    # The op must never modify the caller's activations.
    assert torch.equal(x.detach(), originals["x"]), "x was modified"
    if residual is not None:
        assert torch.equal(residual.detach(), originals["residual"]), "residual was modified"
    return {
        "out": out.detach(),
        "grad_x": x.grad,
        "grad_weight": None if weight is None else weight.grad,
        "grad_bias": None if bias is None else bias.grad,
        "grad_residual": None if residual is None else residual.grad,
        "running_mean": running_mean,
        "running_var": running_var,
    }


def check_case(backend: str, device: str, case: Case) -> None:
    """Asserts that bn_act with `backend` matches the reference on every result of `case`."""
    inputs = make_inputs(case)

    def ours(*args, **kwargs):
        return bn_act(*args, backend=backend, **kwargs)

    got = run(ours, inputs, case, case.dtype, device)
    expected = run(bn_act_reference, inputs, case, case.dtype, device)
    out = got["out"]
    assert out.dtype == case.dtype
    expected_format = (
        torch.channels_last
        if case.memory_format == torch.channels_last and case.view is None
        else None
    )
    if expected_format is not None:
        assert out.is_contiguous(memory_format=expected_format), "output lost channels_last"
    if case.dtype in RULE_DTYPES:
        reference = run(
            bn_act_reference,
            {k: _rounded(v, case.dtype, k) for k, v in inputs.items()},
            case,
            torch.float64,
            device,
        )
    for name, value in got.items():
        if expected[name] is None:
            assert value is None, f"{name} should be None"
            continue
        assert value is not None, f"{name} is missing"
        assert value.dtype == expected[name].dtype, (
            f"{name}: dtype {value.dtype} != {expected[name].dtype}"
        )
        if case.dtype in RULE_DTYPES:
            terms = _input_grad_term_magnitude(inputs, case) if name == "grad_x" else 0.0
            assert_within_error_factor(
                value, expected[name], reference[name], name, case.dtype, terms
            )
        else:
            assert_close(value, expected[name], name)


def _input_grad_term_magnitude(inputs: dict, case: Case) -> float:
    """Size of the terms of BatchNorm's input gradient: |grad| * |weight| * invstd."""
    x = inputs["x"] if case.view is None else case.view.apply(inputs["x"])
    if case.training:
        var = x.var(dim=(0, 2, 3), unbiased=False)
    else:
        var = inputs["running_var"]
    invstd = (var + case.eps).rsqrt().max().item()
    weight = 1.0 if inputs["weight"] is None else inputs["weight"].abs().max().item()
    return inputs["grad"].abs().max().item() * weight * invstd


def _rounded(t, dtype, name):
    """The float64 reference sees exactly the values the lower-precision run saw."""
    if t is None:
        return None
    if name in ("x", "residual", "grad"):
        return t.to(dtype).double()
    return t.float().double()  # parameters and statistics are float32 unless x is float64


class SlicedView:
    """Every other column of a twice-as-wide tensor: not dense, so the op must copy it."""

    def source_shape(self, shape):
        n, c, h, w = shape
        return (n, c, h, 2 * w)

    def apply(self, t):
        return t[..., ::2]


class TransposedView:
    """H and W swapped by strides: dense but in neither NCHW nor channels_last order."""

    def source_shape(self, shape):
        n, c, h, w = shape
        return (n, c, w, h)

    def apply(self, t):
        return t.transpose(2, 3)
