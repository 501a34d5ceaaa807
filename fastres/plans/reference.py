"""Plan: the block's own forward (its library's), the reference computation.

It runs on the ``torch`` backend, and for any block the fused ops cannot reproduce (another
norm layer or activation, a convolution with a bias, ...): never a wrong answer.
"""

from __future__ import annotations

from torch import Tensor

from fastres.plans.description import ResidualBlock

__all__ = ["ReferencePlan"]


class ReferencePlan:
    name = "reference"

    def applies(self, block: ResidualBlock, x: Tensor, backend: str) -> bool:
        return backend == "torch" or bool(block.fusion_issue())

    def run(self, block: ResidualBlock, x: Tensor, backend: str) -> Tensor:
        return block.reference(x)
