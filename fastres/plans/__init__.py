"""Execution plans: the ways to run a residual block, each on the canonical description
(:class:`~fastres.plans.description.ResidualBlock`).

A plan says whether it applies (the block, the input, the concrete backend, the mode) and runs.
A block's forward runs the first plan of :data:`PLANS` that applies:

========================  =====================================================================
plan                      applies when
========================  =====================================================================
reference                 backend ``torch``, a layer the fused ops do not reproduce, or while
                          tracing or exporting (:func:`tracing_or_exporting`)
folded eval               eval, no gradients needed, not compiling, a backend that folds the dtype
triton convolution chain  backend ``triton``, float32/16/bf16, plain BatchNorms, uniform convs
fused ops                 everything else (any backend; synchronized BatchNorm in training)
========================  =====================================================================
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from fastres.plans.description import ResidualBlock, Stage
from fastres.plans.exporting import tracing_or_exporting
from fastres.plans.folded_eval import FoldedEvalPlan
from fastres.plans.fused_ops import FusedOpsPlan
from fastres.plans.reference import ReferencePlan
from fastres.plans.triton_chain import TritonChainPlan

__all__ = ["PLANS", "Plan", "ResidualBlock", "Stage", "plan_for", "tracing_or_exporting"]


class Plan(Protocol):
    name: str

    def applies(self, block: ResidualBlock, x: Tensor, backend: str) -> bool: ...

    def run(self, block: ResidualBlock, x: Tensor, backend: str) -> Tensor: ...


PLANS: tuple[Plan, ...] = (ReferencePlan(), FoldedEvalPlan(), TritonChainPlan(), FusedOpsPlan())


def plan_for(block: ResidualBlock, x: Tensor, backend: str) -> Plan:
    """The first plan of :data:`PLANS` that applies (the fused-ops plan always does)."""
    return next(plan for plan in PLANS if plan.applies(block, x, backend))
