"""Plans for a network's stem (:class:`~fastres.plans.description.NetworkStem`), chosen as the
blocks' plans are (:func:`fastres.plans.choice.first_applying`):

============================  =================================================================
plan                          applies when
============================  =================================================================
folded stem                   eval, a stage the fused ops reproduce, a backend that folds the
                              input's dtype, not traced or exported
the library's own forward     everything else
============================  =================================================================

Unlike the blocks' plans, these take the module's backend setting (``"auto"`` included): the
library's own forward gets any input as the library would, a tensor or not, and only a stem
that folds resolves the backend for its input.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from fastres.backends import resolve_backend
from fastres.plans.choice import PlanChoice, first_applying
from fastres.plans.description import NetworkStem
from fastres.plans.folded_eval import (
    FOLDED_EVAL_SUPPORT,
    FoldedEvalPlan,
    run_folded_stem,
    stem_folding_issues,
)
from fastres.plans.support import ANY_CALL, Support

__all__ = [
    "STEM_PLANS",
    "FoldedStemPlan",
    "LibraryStemPlan",
    "StemPlan",
    "stem_plan_choice",
    "stem_plan_label",
]


class StemPlan(Protocol):
    name: str
    support: Support

    def not_supported_reasons(self, stem: NetworkStem, x: object, backend: str) -> list[str]:
        """Why this plan cannot run ``stem`` on ``x`` now; [] when it can."""
        ...

    def engine(self, x: Tensor, backend: str) -> str:
        """What runs the plan for ``x`` on ``backend``, in words ("" where the name says it)."""
        ...

    def run(self, stem: NetworkStem, x: Tensor, backend: str) -> Tensor:
        """The stem's output for ``x`` (for :class:`LibraryStemPlan`, ``stem.reference``'s)."""
        ...


class FoldedStemPlan:
    """``pool(activation(norm(conv(x))))`` as one fused convolution from folded weights, then
    the pooling (:func:`fastres.plans.folded_eval.run_folded_stem`); channels_last output."""

    name = "folded stem"
    support = FOLDED_EVAL_SUPPORT

    def not_supported_reasons(self, stem: NetworkStem, x: object, backend: str) -> list[str]:
        return stem_folding_issues(stem, x, backend)

    def engine(self, x: Tensor, backend: str) -> str:
        return FoldedEvalPlan().engine(resolve_backend(backend, x.device, x.dtype))

    def run(self, stem: NetworkStem, x: Tensor, backend: str) -> Tensor:
        name = resolve_backend(backend, x.device, x.dtype)
        return run_folded_stem(stem.module, stem.stage, stem.pool, x, name)


class LibraryStemPlan:
    """The library's own forward of the module holding the stem."""

    name = "the library's own forward"
    support = ANY_CALL

    def not_supported_reasons(self, stem: NetworkStem, x: object, backend: str) -> list[str]:
        return []  # ANY_CALL: every input, a tensor or not, as the library takes it

    def engine(self, x: Tensor, backend: str) -> str:
        return ""

    def run(self, stem: NetworkStem, x: Tensor, backend: str) -> Tensor:
        return stem.reference(x)


STEM_PLANS: tuple[StemPlan, ...] = (FoldedStemPlan(), LibraryStemPlan())


def stem_plan_choice(stem: NetworkStem, x: object, backend: str) -> PlanChoice:
    """The first plan of :data:`STEM_PLANS` that applies, with the reasons of those before it."""
    return first_applying(STEM_PLANS, stem, x, backend)


def stem_plan_label(plan: StemPlan, x: Tensor, backend: str) -> str:
    """The plan's name with what runs it: "folded stem (oneDNN)", "the library's own forward"."""
    engine = plan.engine(x, backend)
    return f"{plan.name} ({engine})" if engine else plan.name
