"""Plan: the block's own forward (its library's), the reference computation.

The last plan of the list: it supports any call (:data:`~fastres.plans.support.ANY_CALL`), so
it runs whatever the plans before it pass over: the ``torch`` backend, any block the fused ops
cannot reproduce (another norm layer or activation, a convolution with a bias, ...), never a
wrong answer; and the model while it is traced or exported (fastres/plans/exporting.py), so
that the trace or export holds the library's ATen ops, which every exporter and runtime knows.
"""

from __future__ import annotations

from torch import Tensor

from fastres.plans.description import ResidualBlock
from fastres.plans.support import ANY_CALL

__all__ = ["ReferencePlan"]


class ReferencePlan:
    name = "reference"
    support = ANY_CALL

    def not_supported_reasons(self, block: ResidualBlock, x: Tensor, backend: str) -> list[str]:
        return []  # ANY_CALL

    def engine(self, backend: str) -> str:
        return ""  # the library's own forward

    def run(
        self, block: ResidualBlock, x: Tensor, backend: str, *, input_is_scratch: bool = False
    ) -> Tensor:
        return block.reference(x)
