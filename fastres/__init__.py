"""fastres: fused conv / BatchNorm / ReLU / residual-add kernels for residual networks.

Ops live in :mod:`fastres.ops` (``fastres.ops.bn_act``); :func:`fastres.info` says which kernel
backends were built and which can run here.
"""

from fastres import backends as _backends  # loads fastres._C first: it defines torch.ops.fastres.*
from fastres import ops


def info() -> dict:
    """What was built, what can run here, and why anything is missing (see fastres._info)."""
    from fastres._info import info as _info

    return _info()

__all__ = ["info", "ops"]
__version__ = "0.1.0"
