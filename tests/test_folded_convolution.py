"""fastres._onednn's FoldedConvolution (csrc/onednn/folded_convolution.cpp): one folded
convolution with the residual added after its activation, against the composition it fuses, in
float32 and bfloat16; its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from optional_libraries import needs_onednn

from fastres.activation import apply_activation
from fastres.testing import assert_within_error_factor

pytestmark = needs_onednn

# (C_in, C_out, kernel, stride, padding, dilation, groups)
CONVOLUTIONS = {
    "3x3": (16, 16, 3, 1, 1, 1, 1),
    "1x1-stride2": (16, 24, 1, 2, 0, 1, 1),
    "3x3-stride2-unpadded": (16, 16, 3, 2, 0, 1, 1),  # a negative right padding at 10 px
    "3x3-dilated": (16, 16, 3, 1, 2, 2, 1),
    "3x3-depthwise": (16, 16, 3, 1, 1, 1, 16),
}


def _convolution(kind: str, activation: str):
    c_in, c_out, k, stride, padding, dilation, groups = CONVOLUTIONS[kind]
    torch.manual_seed(0)
    fan_in = c_in // groups * k * k
    weight = torch.randn(c_out, c_in // groups, k, k, dtype=torch.float64) / fan_in**0.5
    bias = torch.randn(c_out, dtype=torch.float64)
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    fused = torch.classes.fastres.FoldedConvolution(
        weight.float(), bias.float(), *geometry, activation
    )

    def composed(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), stride, padding, dilation, groups)
        return apply_activation(out, activation) + residual

    return fused, composed, c_in


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["identity", "relu", "silu"])
@pytest.mark.parametrize("kind", CONVOLUTIONS)
def test_matches_the_composition_it_fuses(kind, activation, dtype):
    fused, composed, c_in = _convolution(kind, activation)
    x = torch.randn(2, c_in, 10, 9, dtype=torch.float64)
    residual = torch.randn_like(composed(x, 0))
    exact = composed(x, residual)

    def low(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous(memory_format=torch.channels_last)

    before = low(residual)
    ours = fused.conv_bias_act_add(low(x), before)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(before, low(residual))  # the residual is read, never written
    theirs = composed(low(x), low(residual))
    assert_within_error_factor(ours.double(), theirs.double(), exact, kind, dtype)


def test_errors_name_what_was_expected():
    fused, composed, c_in = _convolution("3x3", "silu")
    x = torch.randn(1, c_in, 6, 6).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="x must be a channels_last CPU tensor"):
        fused.conv_bias_act_add(x.contiguous(), residual)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        fused.conv_bias_act_add(x.double(), residual.double())
    # A channel slice: oneDNN would run its reference implementation, many times slower.
    sliced = torch.randn(1, 32, 6, 6).contiguous(memory_format=torch.channels_last)[:, 16:]
    with pytest.raises(RuntimeError, match="residual must be a channels_last"):
        fused.conv_bias_act_add(x, sliced)
    with pytest.raises(RuntimeError, match="residual must be a channels_last"):
        fused.conv_bias_act_add(x, torch.randn(1, 16, 5, 5))
    with pytest.raises(RuntimeError, match=r"\(padded\) is smaller than the kernel"):
        unpadded = _convolution("3x3-stride2-unpadded", "silu")[0]
        tiny = torch.randn(1, c_in, 2, 2).contiguous(memory_format=torch.channels_last)
        unpadded.conv_bias_act_add(tiny, torch.randn(1, 16, 1, 1))
    with pytest.raises(RuntimeError, match="stride and dilation must be at least 1"):
        torch.classes.fastres.FoldedConvolution(
            torch.zeros(4, 4, 1, 1), torch.zeros(4), [0, 1], [0, 0], [1, 1], 1, "relu"
        )
    with pytest.raises(RuntimeError, match="activation must be identity, relu or silu"):
        torch.classes.fastres.FoldedConvolution(
            torch.zeros(4, 4, 1, 1), torch.zeros(4), [1, 1], [0, 0], [1, 1], 1, "gelu"
        )
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.classes.fastres.FoldedConvolution(
            torch.zeros(4, 4, 1, 1), torch.zeros(3), [1, 1], [0, 0], [1, 1], 1, "relu"
        )
