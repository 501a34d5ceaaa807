"""Execution plans: the ways to run a residual block, each on the canonical description
(:class:`~fastres.plans.description.ResidualBlock`).

A plan says why it does not apply (the block, the input, the concrete backend, the mode: an
empty list when it does) and runs. A block's forward runs the first plan of :data:`PLANS` that
applies; :func:`plans_passed_over` gives the reasons of those before it, which
:func:`fastres.explain` prints:

========================  =====================================================================
plan                      applies when
========================  =====================================================================
reference                 backend ``torch``, a layer the fused ops do not reproduce, or while
                          tracing or exporting (:func:`tracing_or_exporting`)
folded eval               eval, no gradients needed, not compiling, a backend that folds the dtype
triton convolution chain  backend ``triton``, float32/16/bf16, plain BatchNorms, uniform convs
fused ops                 everything else (any backend; synchronized BatchNorm in training)
========================  =====================================================================

A network's stem has its plans too (:mod:`fastres.plans.stem`), chosen by the same rule
(:func:`fastres.plans.choice.first_applying`).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from fastres.plans.choice import PlanChoice, first_applying
from fastres.plans.description import ResidualBlock, Stage
from fastres.plans.exporting import tracing_or_exporting
from fastres.plans.folded_eval import FoldedEvalPlan
from fastres.plans.fused_ops import FusedOpsPlan
from fastres.plans.reference import ReferencePlan
from fastres.plans.triton_chain import TritonChainPlan

__all__ = [
    "PLANS",
    "Plan",
    "PlanChoice",
    "ResidualBlock",
    "Stage",
    "plan_for",
    "plan_label",
    "plans_passed_over",
    "tracing_or_exporting",
]


class Plan(Protocol):
    name: str

    def not_supported_reasons(self, block: ResidualBlock, x: Tensor, backend: str) -> list[str]:
        """Why this plan cannot run ``block`` on ``x`` now; [] when it can."""
        ...

    def engine(self, backend: str) -> str:
        """What runs the plan's computation on ``backend``, in words ("" where the plan's name
        says it): the backend names the fused ops' kernels in training (``cpu``: C++ kernels)
        and the fused convolution in folded eval (``cpu``: oneDNN)."""
        ...

    def run(
        self, block: ResidualBlock, x: Tensor, backend: str, *, input_is_scratch: bool = False
    ) -> Tensor:
        """The block's output for ``x``. ``input_is_scratch=True`` says ``x`` is an activation
        the network owns and needs no more (never a caller's tensor, nothing a hook saw), which
        the plan may overwrite; plans that have no use for that ignore it."""
        ...


PLANS: tuple[Plan, ...] = (ReferencePlan(), FoldedEvalPlan(), TritonChainPlan(), FusedOpsPlan())


def plan_for(block: ResidualBlock, x: Tensor, backend: str) -> Plan:
    """The first plan of :data:`PLANS` that applies (the fused-ops plan always does)."""
    return next(plan for plan in PLANS if not plan.not_supported_reasons(block, x, backend))


def plans_passed_over(block: ResidualBlock, x: Tensor, backend: str) -> PlanChoice:
    """:func:`plan_for`'s choice, with the reasons of the plans it passed over."""
    return first_applying(PLANS, block, x, backend)


def plan_label(plan: Plan, backend: str) -> str:
    """The plan's name with what runs it on ``backend``: "folded eval (oneDNN)", "fused ops
    (C++ kernels)", "reference"."""
    engine = plan.engine(backend)
    return f"{plan.name} ({engine})" if engine else plan.name
