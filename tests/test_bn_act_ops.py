"""bn_act as a torch.library custom op: opcheck, torch.compile, saved tensors."""

import pytest
import torch
from torch.library import opcheck

from fastres.ops import bn_act
from fastres.testing import backend_params

cuda = pytest.mark.cuda

# (forward op, backward op, device)
OP_FAMILIES = [
    pytest.param("bn_act_forward", "bn_act_backward", "cpu", id="compiled-cpu"),
    pytest.param(
        "bn_act_forward_triton",
        "bn_act_backward_triton",
        "cpu",
        id="triton-interpreter",
        marks=pytest.mark.triton_interpreter,
    ),
    pytest.param("bn_act_forward", "bn_act_backward", "cuda", id="compiled-cuda", marks=cuda),
    pytest.param(
        "bn_act_forward_triton", "bn_act_backward_triton", "cuda", id="triton-gpu", marks=cuda
    ),
]


def _sample(device, memory_format, training, activation, residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 4, generator=g).to(device).contiguous(memory_format=memory_format)
    return dict(
        x=x.requires_grad_(),
        weight=(torch.rand(5, generator=g) + 0.5).to(device).requires_grad_(),
        bias=torch.randn(5, generator=g).to(device).requires_grad_(),
        residual=torch.randn(2, 5, 3, 4, generator=g)
        .to(device)
        .contiguous(memory_format=memory_format)
        .requires_grad_()
        if residual
        else None,
        running_mean=torch.zeros(5, device=device),
        running_var=torch.ones(5, device=device),
        training=training,
        momentum=0.1,
        eps=1e-5,
        activation=activation,
    )


@pytest.mark.parametrize("forward,backward,device", OP_FAMILIES)
@pytest.mark.parametrize(
    "memory_format",
    [torch.contiguous_format, torch.channels_last],
    ids=["contiguous", "channels_last"],
)
@pytest.mark.parametrize(
    "training,activation,residual",
    [
        (True, "relu", True),
        (False, "relu", False),
        (True, "identity", False),
        (True, "silu", True),
        (False, "silu", False),
    ],
)
def test_opcheck(forward, backward, device, memory_format, training, activation, residual):
    kwargs = _sample(device, memory_format, training, activation, residual)
    forward_op = getattr(torch.ops.fastres, forward)
    opcheck(forward_op, (), kwargs)

    out, mean, var, mask = forward_op(**kwargs)
    x = kwargs["x"].detach()
    opcheck(
        getattr(torch.ops.fastres, backward),
        (
            torch.randn_like(out),
            x,
            kwargs["weight"].detach(),
            mean,
            var,
            mask,
            training,
            1e-5,
            activation == "relu",
            residual,
        ),
    )


def _block(backend):
    """A small function with two fused BatchNorms, the second with a residual, as in a block
    (the first with SiLU, as in an Ultralytics block, the second with ReLU)."""

    def fn(x, w1, b1, w2, b2, rm1, rv1, rm2, rv2):
        y = bn_act(x, w1, b1, rm1, rv1, training=True, activation="silu", backend=backend)
        return bn_act(y * 0.5, w2, b2, rm2, rv2, residual=x, training=True, backend=backend)

    return fn


@pytest.mark.parametrize(
    "backend,device,compiler",
    [
        pytest.param("cpu", "cpu", "inductor", id="cpu-inductor"),
        pytest.param(
            "triton",
            "cpu",
            "aot_eager",
            id="triton-interpreter-aot_eager",
            marks=pytest.mark.triton_interpreter,
        ),
        pytest.param("cuda", "cuda", "inductor", id="cuda-inductor", marks=cuda),
        pytest.param("triton", "cuda", "inductor", id="triton-gpu-inductor", marks=cuda),
    ],
)
def test_torch_compile_fullgraph_matches_eager(backend, device, compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(4, 6, 5, 5, generator=g)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
    )
    params = [
        (torch.rand(6, generator=g) + 0.5).to(device),
        torch.randn(6, generator=g).to(device),
        (torch.rand(6, generator=g) + 0.5).to(device),
        torch.randn(6, generator=g).to(device),
    ]
    stats = [torch.zeros(6, device=device), torch.ones(6, device=device)] * 2

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in [x] + params]
        buffers = [t.clone() for t in stats]
        out = fn(*leaves, *buffers)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves] + buffers

    eager = run(_block(backend))
    compiled = run(torch.compile(_block(backend), fullgraph=True, backend=compiler))
    for i, (a, b) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"result {i}: {m}"
        )


def _saved_for_backward(backend: str, activation: str):
    """(x, residual, out, every tensor autograd saved) for a training bn_act with a residual."""
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    residual = torch.randn(4, 8, 6, 6, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bn_act(
            x,
            torch.ones(8, requires_grad=True),
            torch.zeros(8, requires_grad=True),
            torch.zeros(8),
            torch.ones(8),
            residual=residual,
            training=True,
            activation=activation,
            backend=backend,
        )
    return x, residual, out, saved


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
def test_backward_saves_no_output_or_normalised_tensor(backend):
    """Saved for backward: x, the parameters, per-channel statistics and a 1-bit mask only."""
    x, _, out, saved = _saved_for_backward(backend, "relu")
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr(), (
        "only x itself may be saved at full size"
    )
    assert all(t.data_ptr() != out.data_ptr() for t in saved), "the output was saved"
    mask = [t for t in saved if t.dtype == torch.uint8]
    assert len(mask) == 1 and mask[0].numel() == x.numel() // 8


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
def test_silu_backward_saves_only_the_inputs_it_was_given(backend):
    """SiLU keeps no mask and no output: its input is recomputed from x, the statistics, the
    affine parameters and the residual, all tensors the caller holds anyway."""
    x, residual, out, saved = _saved_for_backward(backend, "silu")
    full_size = {t.data_ptr() for t in saved if t.numel() == x.numel()}
    assert full_size == {x.data_ptr(), residual.data_ptr()}, "a new full-size tensor was saved"
    assert all(t.data_ptr() != out.data_ptr() for t in saved), "the output was saved"
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert all(t.numel() == 0 for t in masks), "SiLU needs no mask"
