"""Execution plans: the ways to run a residual block, each on the canonical description
(:class:`~fastres.plans.description.ResidualBlock`).

Each plan declares what it supports as data (its :class:`~fastres.plans.support.Support`:
backends, compute dtypes, modes, norm layers, activations, autocast, autograd in eval,
``torch.compile``, tracing and export), says why a call falls outside it (an empty list when it
does not) and runs. A block's forward runs the first plan of :data:`PLANS` that applies;
:func:`plans_passed_over` gives the reasons of those before it, which :func:`fastres.explain`
prints:

========================  =================================================================
plan                      supports
========================  =================================================================
folded eval               cpu/cuda/triton, float32/16/bf16, eval, no gradients, not
                          compiling (plus: a folded convolution for the dtype here, running
                          statistics)
triton convolution chain  triton, float32/16/bf16, plain BatchNorms (plus: uniform convs)
fused ops                 cpu/cuda/triton, any dtype the ops take, synchronized BatchNorm
reference                 any call: the ``torch`` backend, layers the fused ops do not
                          reproduce, tracing and export (:func:`tracing_or_exporting`)
========================  =================================================================

The three fused plans run only blocks whose every layer the fused ops reproduce, and none while
the model is traced or exported. A network's stem has its plans too
(:mod:`fastres.plans.stem`), chosen by the same rule (:func:`fastres.plans.choice.first_applying`).
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
from fastres.plans.support import Support
from fastres.plans.triton_chain import TritonChainPlan

__all__ = [
    "PLANS",
    "Plan",
    "PlanChoice",
    "ResidualBlock",
    "Stage",
    "Support",
    "plan_for",
    "plan_label",
    "plans_passed_over",
    "tracing_or_exporting",
]


class Plan(Protocol):
    name: str
    support: Support  # what it runs, as data (fastres/plans/support.py)

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


PLANS: tuple[Plan, ...] = (FoldedEvalPlan(), TritonChainPlan(), FusedOpsPlan(), ReferencePlan())


def plan_for(block: ResidualBlock, x: Tensor, backend: str) -> Plan:
    """The first plan of :data:`PLANS` that applies (the reference plan always does)."""
    return next(plan for plan in PLANS if not plan.not_supported_reasons(block, x, backend))


def plans_passed_over(block: ResidualBlock, x: Tensor, backend: str) -> PlanChoice:
    """:func:`plan_for`'s choice, with the reasons of the plans it passed over."""
    return first_applying(PLANS, block, x, backend)


def plan_label(plan: Plan, backend: str) -> str:
    """The plan's name with what runs it on ``backend``: "folded eval (oneDNN)", "fused ops
    (C++ kernels)", "reference"."""
    engine = plan.engine(backend)
    return f"{plan.name} ({engine})" if engine else plan.name
