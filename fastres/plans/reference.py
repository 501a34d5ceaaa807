"""Plan: the block's own forward (its library's), the reference computation.

It runs on the ``torch`` backend, for any block the fused ops cannot reproduce (another norm
layer or activation, a convolution with a bias, ...): never a wrong answer; and while the model
is traced or exported (fastres/plans/exporting.py), so that the trace or export holds the
library's ATen ops, which every exporter and runtime knows.
"""

from __future__ import annotations

from torch import Tensor

from fastres.plans.description import ResidualBlock
from fastres.plans.exporting import tracing_or_exporting

__all__ = ["ReferencePlan"]


class ReferencePlan:
    name = "reference"

    def not_supported_reasons(self, block: ResidualBlock, x: Tensor, backend: str) -> list[str]:
        if backend == "torch" or block.fusion_issue() or tracing_or_exporting():
            return []
        return [
            f"the fused ops reproduce every layer on the {backend!r} backend, and the model is "
            "not traced or exported"
        ]

    def engine(self, backend: str) -> str:
        return ""  # the library's own forward

    def run(
        self, block: ResidualBlock, x: Tensor, backend: str, *, input_is_scratch: bool = False
    ) -> Tensor:
        return block.reference(x)
