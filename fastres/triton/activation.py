"""The fused ops' activations inside Triton kernels: ``ACTIVATION`` is the constexpr code of
:func:`fastres.activation.activation_code` (0 identity, 1 relu, 2 silu)."""

from __future__ import annotations

import triton
import triton.language as tl

IDENTITY: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)
SILU: tl.constexpr = tl.constexpr(2)


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr):
    """The activation of float32 ``y``, as bn_act's elementwise pass computes it."""
    if ACTIVATION == RELU:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as in torch.relu
    elif ACTIVATION == SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def activation_grad(g, z, ACTIVATION: tl.constexpr):
    """``g`` (the gradient at the activation's output) times the activation's derivative at its
    float32 input ``z``. ReLU keeps g only where z > 0 (exactly 0 elsewhere, even for a
    non-finite g, as torch's threshold_backward); SiLU's derivative is s * (1 + z * (1 - s))."""
    if ACTIVATION == RELU:
        g = tl.where(z > 0.0, g, 0.0)
    elif ACTIVATION == SILU:
        s = tl.sigmoid(z)
        g = g * (s * (1.0 + z * (1.0 - s)))
    return g
