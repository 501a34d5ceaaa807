"""The activations the fused ops apply after BatchNorm (and the residual add), by name.

Every fused op takes ``activation`` as one of :data:`ACTIVATIONS`:

* ``"relu"``: the forward keeps a 1-bit-per-element mask (out > 0) for the backward;
* ``"silu"``: ``z * sigmoid(z)``; the backward recomputes ``z`` (the activation's input) from the
  saved pre-BatchNorm input, the statistics, the affine parameters and the residual, so nothing
  per element is kept beyond what the op's inputs already are;
* ``"identity"``: nothing.

The Triton kernels take the same choice as a ``constexpr`` code (:func:`activation_code`).
"""

from __future__ import annotations

from typing import Final

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "activation_code",
    "activation_name",
    "apply_activation",
    "check_activation",
]

ACTIVATIONS: Final = ("identity", "relu", "silu")

# The Triton kernels' ACTIVATION constexpr; keep in step with fastres/triton/activation.py.
_CODES: Final = {"identity": 0, "relu": 1, "silu": 2}


def check_activation(activation: object, where: str) -> str:
    """``activation`` if it is one of :data:`ACTIVATIONS`, else a ValueError naming ``where``."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{where}: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, "
            f"got {activation!r}"
        )
    return str(activation)


def activation_code(activation: str) -> int:
    """The Triton kernels' ``ACTIVATION`` constexpr for ``activation``."""
    return _CODES[check_activation(activation, "activation_code")]


def apply_activation(y: Tensor, activation: str) -> Tensor:
    """``activation`` applied to ``y`` as PyTorch does it eagerly (the reference)."""
    if activation == "relu":
        return F.relu(y)
    if activation == "silu":
        return F.silu(y)
    check_activation(activation, "apply_activation")
    return y


def activation_name(module: nn.Module | None) -> str:
    """What an activation module applies: ``"identity"`` (None or ``nn.Identity``), ``"relu"``
    (an exact ``nn.ReLU``), ``"silu"`` (an exact ``nn.SiLU``), else the module's class name,
    which no fused op applies."""
    if module is None or type(module) is nn.Identity:
        return "identity"
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    return type(module).__name__
