"""bn_act against the PyTorch reference on every backend that runs here.

cpu and torch run everywhere; triton runs on CPU under the Triton interpreter (small shapes) and
on a GPU; cuda (and triton at full size) only with a GPU, marked `cuda`.
"""

import itertools

import pytest
import torch
from bn_act_harness import (
    MEMORY_FORMATS,
    ODD_SHAPES,
    RESNET50_CHANNELS_SMALL,
    RESNET50_SHAPES,
    Case,
    check_case,
)
from torch.autograd import gradcheck

from fastres.activation import ACTIVATIONS
from fastres.ops import bn_act
from fastres.testing import backend_device_params

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (backend, device): at ResNet-50's full-size shapes, and at every shape (the interpreter too).
FULL_SIZE = backend_device_params(triton_interpreter=False)
ALL_BACKENDS = backend_device_params()


def _fmt_id(fmt):
    return "channels_last" if fmt == torch.channels_last else "contiguous"


@pytest.mark.parametrize("backend,device", FULL_SIZE)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RESNET50_SHAPES, ids=str)
def test_resnet50_shapes(backend, device, shape, dtype, memory_format):
    check_case(backend, device, Case(shape, dtype, memory_format))


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RESNET50_CHANNELS_SMALL, ids=str)
def test_resnet50_channels_triton_interpreter(shape, dtype, memory_format):
    check_case("triton", "cpu", Case(shape, dtype, memory_format))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shapes(backend, device, shape, dtype, memory_format):
    check_case(backend, device, Case(shape, dtype, memory_format))


FLAG_COMBINATIONS = [
    dict(residual=r, affine=f, track_running_stats=t, training=tr)
    for r, f, t, tr in itertools.product([True, False], repeat=4)
    if tr or t  # eval needs running statistics
]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "flags", FLAG_COMBINATIONS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "none"
)
def test_flags(backend, device, activation, flags):
    check_case(backend, device, Case((3, 6, 5, 3), activation=activation, **flags))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_in_every_dtype(backend, device, dtype, memory_format):
    """SiLU recomputes its input in backward (nothing per element is saved for it): training
    and eval, with a residual, by the tolerance rule in each dtype."""
    for training in (True, False):
        case = Case((4, 13, 5, 3), dtype, memory_format, activation="silu", training=training)
        check_case(backend, device, case)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_running_stats_over_steps(backend, device, momentum):
    check_case(backend, device, Case((4, 8, 3, 5), steps=4, momentum=momentum, residual=False))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_eval_single_pixel_batch_of_one(backend, device):
    check_case(backend, device, Case((1, 8, 1, 1), training=False))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_stats_are_robust_to_a_large_mean(backend, device):
    """A mean 1e4 times the spread: the one-pass sum-of-squares formula would lose the variance."""
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 0.01 + 100.0
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = bn_act(
        x.float().to(device),
        None,
        None,
        rm.to(device),
        rv.to(device),
        training=True,
        backend=backend,
        activation="identity",
    )
    ref = bn_act(
        x,
        None,
        None,
        rm_ref.double(),
        rv_ref.double(),
        training=True,
        backend="torch",
        activation="identity",
    )
    # float32 inputs carry about 1e-5 relative error at this offset; the normalised output then
    # scatters by about that much relative to the (0.01) spread.
    torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS, ids=_fmt_id)
def test_gradcheck_float64(backend, activation, training, memory_format):
    g = torch.Generator().manual_seed(1)
    x = (
        (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64) * 2 + 0.5)
        .contiguous(memory_format=memory_format)
        .requires_grad_()
    )
    residual = (
        torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
        .contiguous(memory_format=memory_format)
        .requires_grad_()
    )
    weight = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def fn(x, weight, bias, residual):
        # Fresh copies: gradcheck calls this many times and must see the same running stats.
        return bn_act(
            x,
            weight,
            bias,
            rm.clone(),
            rv.clone(),
            residual=residual,
            training=training,
            activation=activation,
            backend=backend,
        )

    assert gradcheck(fn, (x, weight, bias, residual), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_callers_input_and_residual_are_never_written(backend, device, training):
    """bn_act reads x and residual and writes only its output and (training) the running
    statistics; forward and backward leave the caller's tensors as they were."""
    x = torch.randn(3, 4, 5, 5, device=device, requires_grad=True)
    residual = torch.randn(3, 4, 5, 5, device=device, requires_grad=True)
    weight, bias = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    mean, var = torch.zeros(4, device=device), torch.ones(4, device=device)
    before = (x.detach().clone(), residual.detach().clone(), x._version, residual._version)
    out = bn_act(x, weight, bias, mean, var, residual=residual, training=training, backend=backend)
    out.sum().backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(residual.detach(), before[1])
    assert (x._version, residual._version) == before[2:]
