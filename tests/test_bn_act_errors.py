"""Bad input to bn_act: a clear error naming the argument, and nothing modified."""

import pytest
import torch

from fastres.ops import bn_act
from fastres.testing import backend_params

BACKENDS_HERE = backend_params("cpu", "triton", "torch")


def _args(n=2, c=4, h=3, w=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(n, c, h, w, generator=g, dtype=dtype),
        "weight": torch.rand(c, generator=g) + 0.5,
        "bias": torch.randn(c, generator=g),
        "running_mean": torch.randn(c, generator=g),
        "running_var": torch.rand(c, generator=g) + 0.5,
        "residual": torch.randn(n, c, h, w, generator=g, dtype=dtype),
    }


def _call(args, backend, training=True, **kwargs):
    return bn_act(
        args["x"],
        args["weight"],
        args["bias"],
        args["running_mean"],
        args["running_var"],
        residual=args["residual"],
        training=training,
        backend=backend,
        **kwargs,
    )


def _expect_error(args, backend, error, match, **kwargs):
    """Calls bn_act expecting `error`; checks that no tensor argument was modified."""
    # Meta tensors (the "other device" in these tests) hold no data to compare.
    before = {
        k: v.clone()
        for k, v in args.items()
        if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }
    with pytest.raises(error, match=match):
        _call(args, backend, **kwargs)
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} was modified by a failing call"


BAD_INPUTS = [
    # (what, how to break the arguments, error, message pattern)
    ("x 3-D", lambda a: a.update(x=a["x"][0]), ValueError, "x must be a 4-D"),
    ("x 5-D", lambda a: a.update(x=a["x"][None]), ValueError, "x must be a 4-D"),
    ("x integer", lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x must be float32"),
    ("x not a tensor", lambda a: a.update(x=[1.0]), TypeError, "x must be a Tensor"),
    (
        "weight channels",
        lambda a: a.update(weight=torch.ones(5)),
        ValueError,
        r"weight must have shape \(4,\)",
    ),
    (
        "bias channels",
        lambda a: a.update(bias=torch.ones(3)),
        ValueError,
        r"bias must have shape \(4,\)",
    ),
    (
        "running_mean channels",
        lambda a: a.update(running_mean=torch.ones(2, 2)),
        ValueError,
        r"running_mean must have shape \(4,\)",
    ),
    (
        "running_var channels",
        lambda a: a.update(running_var=torch.ones(8)),
        ValueError,
        r"running_var must have shape \(4,\)",
    ),
    (
        "weight dtype",
        lambda a: a.update(weight=a["weight"].double()),
        TypeError,
        "weight must be torch.float32",
    ),
    (
        "running_var integer",
        lambda a: a.update(running_var=torch.ones(4, dtype=torch.int64)),
        TypeError,
        "running_var must be torch.float32",
    ),
    (
        "residual shape",
        lambda a: a.update(residual=a["residual"][:, :, :2]),
        ValueError,
        "residual must have the shape of x",
    ),
    (
        "residual dtype",
        lambda a: a.update(residual=a["residual"].half()),
        TypeError,
        "residual must have the dtype of x",
    ),
    (
        "residual device",
        lambda a: a.update(residual=a["residual"].to("meta")),
        ValueError,
        "residual must be on cpu",
    ),
    (
        "weight device",
        lambda a: a.update(weight=a["weight"].to("meta")),
        ValueError,
        "weight must be on cpu",
    ),
    (
        "running_mean device",
        lambda a: a.update(running_mean=a["running_mean"].to("meta")),
        ValueError,
        "running_mean must be on cpu",
    ),
    (
        "only one running stat",
        lambda a: a.update(running_var=None),
        ValueError,
        "running_mean and running_var must both",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("what,breaker,error,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(backend, what, breaker, error, match):
    args = _args()
    breaker(args)
    _expect_error(args, backend, error, match)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_eval_without_running_stats(backend):
    args = _args()
    args["running_mean"] = args["running_var"] = None
    _expect_error(args, backend, ValueError, "required when training=False", training=False)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_single_value_per_channel_in_training_is_pytorchs_error(backend):
    args = _args(n=1, h=1, w=1)
    _expect_error(args, backend, ValueError, "Expected more than 1 value per channel when training")
    # The same input is fine in eval.
    _call(args, backend, training=False)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize(
    "momentum,eps,error,match",
    [
        (None, 1e-5, TypeError, "momentum must be a float"),
        (0.1, 0.0, ValueError, "eps must be a positive float"),
        (0.1, -1.0, ValueError, "eps must be a positive float"),
    ],
)
def test_bad_scalars(backend, momentum, eps, error, match):
    _expect_error(_args(), backend, error, match, momentum=momentum, eps=eps)


def test_unknown_backend():
    _expect_error(_args(), "cudnn", ValueError, "backend must be one of")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_unavailable_backend_says_why():
    _expect_error(_args(), "cuda", RuntimeError, "'cuda' is not available: .*GPU")


def test_backend_for_another_device():
    with pytest.raises(ValueError, match="'cpu' cannot run tensors on meta"):
        bn_act(
            torch.ones(2, 3, 2, 2, device="meta"),
            None,
            None,
            None,
            None,
            training=True,
            backend="cpu",
        )


def test_auto_skips_gpu_backends_that_do_not_take_the_dtype(monkeypatch):
    from fastres import backends

    for name in ("cuda", "triton"):
        monkeypatch.setitem(backends.STATUS, name, backends.BackendStatus(True, True, ""))
    cuda = torch.device("cuda")
    assert backends.resolve_backend("auto", cuda, torch.float64) == "torch"
    assert backends.resolve_backend("auto", cuda, torch.bfloat16) == "cuda"
    assert backends.resolve_backend("auto", cuda) == "cuda"
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float64) == "cpu"


@pytest.mark.cuda
def test_auto_runs_float64_cuda_tensors():
    args = {k: v.double().cuda() for k, v in _args().items()}
    expected = _call({k: v.clone() for k, v in args.items()}, "torch")
    torch.testing.assert_close(_call(args, "auto"), expected)


@pytest.mark.triton_interpreter
def test_triton_rejects_float64():
    args = {k: v.double() for k, v in _args().items()}
    _expect_error(args, "triton", TypeError, "triton backend takes float32")


# The compiled op checks its arguments too, for callers of torch.ops.fastres.* directly.
@pytest.mark.parametrize(
    "breaker,error,match",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, "x must be a 4-D"),
        (lambda a: a.update(weight=torch.ones(5)), ValueError, r"weight must have shape \[4\]"),
        (
            lambda a: a.update(residual=a["residual"][:1]),
            ValueError,
            "residual must have the shape of x",
        ),
        (
            lambda a: a.update(x=a["x"].to(torch.int64), residual=None),
            TypeError,
            "x must be float32",
        ),
    ],
)
def test_compiled_op_checks_arguments(breaker, error, match):
    args = _args()
    breaker(args)
    with pytest.raises(error, match=match):
        torch.ops.fastres.bn_act_forward(
            args["x"],
            args["weight"],
            args["bias"],
            args["residual"],
            args["running_mean"],
            args["running_var"],
            True,
            0.1,
            1e-5,
            "relu",
        )


def test_an_unknown_activation_is_refused_by_name():
    args = _args()
    with pytest.raises(ValueError, match="activation must be one of 'identity', 'relu', 'silu'"):
        bn_act(**args, training=True, activation="gelu")
    with pytest.raises(ValueError, match="activation must be 'identity', 'relu' or 'silu'"):
        torch.ops.fastres.bn_act_forward(
            args["x"], None, None, None, None, None, True, 0.1, 1e-5, "gelu"
        )


def test_compiled_backward_checks_the_mask():
    x = torch.randn(2, 4, 3, 3)
    stats = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="relu_mask must be the uint8 tensor of 9 bytes"):
        torch.ops.fastres.bn_act_backward(
            torch.ones_like(x),
            x,
            None,
            *stats,
            torch.zeros(3, dtype=torch.uint8),
            True,
            1e-5,
            True,
            False,
        )


def test_compiled_backward_rejects_a_strided_mask():
    x = torch.randn(2, 4, 3, 3)
    stats = torch.zeros(4), torch.ones(4)
    strided = torch.zeros(18, dtype=torch.uint8)[::2]  # 9 bytes, but every other one
    with pytest.raises(ValueError, match="relu_mask must be contiguous"):
        torch.ops.fastres.bn_act_backward(
            torch.ones_like(x), x, None, *stats, strided, True, 1e-5, True, False
        )


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["bn_act_backward", "bn_act_backward_reduce"])
def test_cuda_binding_rejects_a_cpu_x_next_to_a_cuda_mask(op):
    x = torch.randn(2, 4, 3, 3)
    stats = torch.zeros(4), torch.ones(4)
    mask = torch.zeros(9, dtype=torch.uint8, device="cuda")
    args = {
        "bn_act_backward": (torch.ones_like(x), x, None, *stats, mask, True, 1e-5, True, False),
        "bn_act_backward_reduce": (torch.ones_like(x), x, stats[0], mask, True),
    }[op]
    with pytest.raises(ValueError, match="x must be a cuda tensor"):
        getattr(torch.ops.fastres, op)(*args)


@pytest.mark.triton_interpreter
def test_triton_rejects_more_elements_than_int32_offsets_reach():
    """ResNet-50's first BatchNorm at batch 2,700 has 2**31 elements or more: a clear error, not
    offsets that wrap. Meta tensors: nothing is allocated."""
    from fastres.triton.bn_act import bn_act_forward

    x = torch.empty(2700, 64, 112, 112, device="meta")
    with pytest.raises(ValueError, match="bn_act: the triton backend addresses x with 32-bit"):
        bn_act_forward(x, None, None, None, None, None, True, 1e-5, "relu")
