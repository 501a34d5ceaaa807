"""The one rule every plan list follows: the first plan that applies runs, and the plans before
it say why they do not (what :func:`fastres.explain` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["PlanChoice", "first_applying"]


class Applies(Protocol):
    name: str

    def not_supported_reasons(self, *args: Any) -> list[str]: ...


@dataclass(frozen=True)
class PlanChoice:
    """The plan that runs, and why each plan before it in its list does not apply."""

    plan: Any
    passed_over: dict[str, list[str]]  # plan name -> reasons


def first_applying(plans: Sequence[Applies], *args: Any) -> PlanChoice:
    """The first of ``plans`` whose ``not_supported_reasons(*args)`` is empty, with the reasons
    of those before it. The last plan of every list applies to everything."""
    passed_over: dict[str, list[str]] = {}
    for plan in plans:
        reasons = plan.not_supported_reasons(*args)
        if not reasons:
            return PlanChoice(plan, passed_over)
        passed_over[plan.name] = reasons
    raise AssertionError(f"the last plan, {plans[-1].name}, applies to everything")
