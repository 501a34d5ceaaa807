"""Every Triton op takes its per-channel vectors (BatchNorm weight, bias, running and saved
statistics, gradient sums, the convolution bias) with any 1-D stride.

The kernels index such a vector as ``ptr + channel``; the launchers make each one dense first.
A strided vector here is a column of a ``(C, 4)`` tensor whose other columns hold other values,
so reading it as if dense reads the wrong numbers. Each op is called twice, with strided and with
dense copies of the same vectors, and must give the same bits (and leave its inputs as they
were); bn_act's eval path is also checked against PyTorch.
"""

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres.ops.fused_conv2d import (
    bn_act_conv2d_stats_backward_triton,
    bn_act_conv2d_stats_triton,
    conv2d_bias_act_triton,
)
from fastres.triton import bn_act as triton_bn_act

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C = 5  # odd, and fewer than a channel block: every lane past C is masked
FORMATS = [torch.contiguous_format, torch.channels_last]


def _strided(values: torch.Tensor) -> torch.Tensor:
    """``values`` (C,) as column 1 of a (C, 4) tensor: stride 4, and the memory that a dense
    read would see past element 0 holds other, random values."""
    base = torch.randn(values.shape[0], 4, device=values.device, dtype=values.dtype) * 10
    base[:, 1] = values
    column = base[:, 1]
    assert column.stride() == (4,)
    return column


def _vectors(seed: int, *positive: bool) -> list[torch.Tensor]:
    """Float32 per-channel vectors, dense; ``positive`` ones (variances, weights) in [0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        ((torch.rand(C, generator=gen) + 0.5) if p else torch.randn(C, generator=gen)).to(DEVICE)
        for p in positive
    ]


def _same_calls(call, dense: list, strided_positions: list[int]):
    """(results with dense vectors, results with the ones at ``strided_positions`` strided),
    checking that the strided vectors (and their bases) are not modified."""
    strided = list(dense)
    for i in strided_positions:
        strided[i] = _strided(dense[i])
    bases = [strided[i]._base.clone() for i in strided_positions]
    expected, got = call(*dense), call(*strided)
    for i, base in zip(strided_positions, bases, strict=True):
        assert torch.equal(strided[i]._base, base), f"argument {i} was modified"
    return expected, got


def _assert_same(expected, got) -> None:
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        same = torch.equal(e, g)
        assert same, f"result {i}: max difference {(e.double() - g.double()).abs().max().item()}"


def _x(memory_format, seed=0, shape=(2, C, 3, 3)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 2 + 1
    return x.to(DEVICE).contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_forward(memory_format, training):
    """weight, bias, running_mean, running_var (the launcher: the op's schema is changing)."""
    x = _x(memory_format)
    vectors = _vectors(1, True, False, False, True)

    def call(weight, bias, running_mean, running_var):
        return triton_bn_act.bn_act_forward(
            x, weight, bias, None, running_mean, running_var, training, 1e-5, "relu"
        )

    _assert_same(*_same_calls(call, vectors, [0, 1, 2, 3]))


def test_bn_act_eval_matches_torch_with_strided_vectors():
    x = _x(torch.channels_last)
    weight, bias, mean, var = (_strided(v) for v in _vectors(2, True, False, False, True))
    out = fastres.ops.bn_act(
        x, weight, bias, mean, var, training=False, activation="relu", backend="triton"
    )
    expected = F.relu(F.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-5))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _forward_for_backward(x, relu=True):
    """save_mean, save_var and the ReLU mask of a training forward (dense vectors)."""
    _, save_mean, save_var, mask = triton_bn_act.bn_act_forward(
        x, None, None, None, None, None, True, 1e-5, "relu" if relu else "identity"
    )
    return save_mean, save_var, mask


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_backward_op(memory_format, training):
    x, grad = _x(memory_format), _x(memory_format, seed=1)
    save_mean, save_var, mask = _forward_for_backward(x)
    (weight,) = _vectors(3, True)

    def call(weight, save_mean, save_var):
        return torch.ops.fastres.bn_act_backward_triton(
            grad, x, weight, save_mean, save_var, mask, training, 1e-5, True, True
        )

    _assert_same(*_same_calls(call, [weight, save_mean, save_var], [0, 1, 2]))


def test_bn_act_backward_reduce_op():
    x, grad = _x(torch.channels_last), _x(torch.channels_last, seed=1)
    save_mean, _, mask = _forward_for_backward(x)

    def call(save_mean):
        return torch.ops.fastres.bn_act_backward_reduce_triton(grad, x, save_mean, mask, True)

    _assert_same(*_same_calls(call, [save_mean], [0]))


@pytest.mark.parametrize("memory_format", FORMATS, ids=["nchw", "channels_last"])
def test_bn_act_backward_apply_op(memory_format):
    x, grad = _x(memory_format), _x(memory_format, seed=1)
    save_mean, save_var, mask = _forward_for_backward(x)
    weight, sum_grad, sum_grad_centred = _vectors(4, True, False, False)

    def call(weight, save_mean, save_var, sum_grad, sum_grad_centred):
        return torch.ops.fastres.bn_act_backward_apply_triton(
            grad,
            x,
            weight,
            save_mean,
            save_var,
            mask,
            sum_grad,
            sum_grad_centred,
            x.numel() // C,
            1e-5,
            True,
            True,
        )

    dense = [weight, save_mean, save_var, sum_grad, sum_grad_centred]
    _assert_same(*_same_calls(call, dense, [0, 1, 2, 3, 4]))


def _conv_inputs(seed=0):
    """x (2, C, 5, 5) channels_last and a 3x3 stride-2 weight (4, C, 3, 3), float32."""
    gen = torch.Generator().manual_seed(seed)
    x = _x(torch.channels_last, seed, (2, C, 5, 5))
    weight = (torch.randn(4, C, 3, 3, generator=gen) / 7).to(DEVICE)
    return x, weight


@pytest.mark.parametrize("stats", [True, False], ids=["stats", "no-stats"])
def test_bn_act_conv2d_stats_op(stats):
    """bn_mean, bn_var, bn_weight, bn_bias: the prologue (and the statistics finalize)."""
    x, weight = _conv_inputs()

    def call(bn_mean, bn_var, bn_weight, bn_bias):
        return bn_act_conv2d_stats_triton(
            x, weight, bn_mean, bn_var, bn_weight, bn_bias, False, 1e-5, "relu", 2, 1, 1, 1, stats
        )

    _assert_same(*_same_calls(call, _vectors(5, False, True, True, False), [0, 1, 2, 3]))


@pytest.mark.parametrize("bn_training", [True, False], ids=["bn-train", "bn-eval"])
def test_bn_act_conv2d_stats_backward_op(bn_training):
    """The prologue recomputed in both gradients, and BatchNorm's backward from the partials."""
    x, weight = _conv_inputs()
    grad = _x(torch.channels_last, 2, (2, 4, 3, 3))

    def call(bn_mean, bn_var, bn_weight, bn_bias):
        return bn_act_conv2d_stats_backward_triton(
            grad,
            x,
            weight,
            bn_mean,
            bn_var,
            bn_weight,
            bn_bias,
            bn_training,
            1e-5,
            "relu",
            2,
            1,
            1,
            1,
            True,
            True,
        )

    _assert_same(*_same_calls(call, _vectors(6, False, True, True, False), [0, 1, 2, 3]))


def test_conv2d_bias_act_op():
    x, weight = _conv_inputs()
    (bias,) = _vectors(7, False)
    bias = torch.cat([bias, bias[:1]])[:4]  # the weight's 4 output channels

    def call(bias):
        return (conv2d_bias_act_triton(x, weight, bias, None, "relu", 2, 1, 1, 1),)

    expected, got = _same_calls(call, [bias], [0])
    _assert_same(expected, got)
    torch.testing.assert_close(got[0], F.relu(F.conv2d(x, weight, bias, 2, 1)))


def _transposed(partials: torch.Tensor) -> torch.Tensor:
    """The same (k, rows, C) values stored channel-major: each (rows, C) plane is strided."""
    return partials.transpose(1, 2).contiguous().transpose(1, 2)


def test_statistics_finalize_takes_partials_and_vectors_in_any_layout():
    """The convolution statistics' finalize (finalize_stats): its (3, rows, C) partials and
    the BatchNorm weight and bias."""
    from fastres.triton.conv import finalize_stats

    gen = torch.Generator().manual_seed(8)
    values = torch.randn(3, 4, C, generator=gen) * 3 + 2  # 3 rows of 4 elements
    partials = torch.stack(
        [values.new_full((3, C), 4.0), values.mean(1), values.var(1, correction=0) * 4]
    ).to(DEVICE)

    def call(weight, bias, partials):
        mean, var, prologue = finalize_stats(partials, weight, bias, 1e-5)
        return mean, var, prologue.scale, prologue.shift

    weight, bias = _vectors(9, True, False)
    expected = call(weight, bias, partials)
    got = call(_strided(weight), _strided(bias), _transposed(partials))
    _assert_same(expected, got)


def test_batch_norm_backward_from_partials_in_any_layout():
    """bn_backward_from_partials (the convolution input gradient's BatchNorm backward): its
    (2, rows, C) partial sums."""
    x, grad = _x(torch.channels_last), _x(torch.channels_last, seed=1)
    save_mean, save_var, _ = _forward_for_backward(x)
    (weight,) = _vectors(10, True)
    partials = torch.randn(2, 3, C, generator=torch.Generator().manual_seed(11)).to(DEVICE)

    def call(partials):
        return triton_bn_act.bn_backward_from_partials(
            grad, x, weight, save_mean, save_var, partials, True, 1e-5
        )

    _assert_same(call(partials), call(_transposed(partials)))
