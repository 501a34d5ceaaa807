"""``fastres.explain(model, x)``: what each fast module runs for an input, why, and which ops.

One forward of the model on ``x``, as the caller would run it (same grad mode, autocast and
training flags), recorded: for each fast block, stem and ResNet, the execution plan or path
taken, why each plan before it in the dispatch order was passed over (fastres/plans/), and the
ops dispatched while it ran. Running statistics the forward updates (training mode) are put back
afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastres.plans.decisions import Decision, recording

__all__ = ["Explanation", "explain"]


@dataclass(frozen=True)
class Explanation:
    """The decisions of one recorded forward, in call order (see :func:`explain`)."""

    input_description: str
    decisions: tuple[Decision, ...]

    def __str__(self) -> str:
        lines = [f"fastres.explain: {self.input_description}"]
        if not self.decisions:
            lines.append("  no fast module ran (fastres.convert(model) makes them)")
        for d in self.decisions:
            lines.append(f"{d.name or '<model>'} ({d.module_type}): {d.runs}")
            for plan, reasons in d.passed_over.items():
                lines.append(f"    passed over {plan}: {'; '.join(reasons)}")
            if d.ops:
                ops = ", ".join(f"{op} x{n}" for op, n in d.ops.items())
                lines.append(f"    ops: {ops}")
        return "\n".join(lines)

    def runs(self) -> dict[str, str]:
        """Each recorded module's qualified name -> what it ran (its last call's)."""
        return {d.name: d.runs for d in self.decisions}


def explain(model: nn.Module, x: Tensor) -> Explanation:
    """Runs ``model(x)`` once and says, per fast module, what ran and why.

    Call it where the model will run (inside ``torch.no_grad()``, ``torch.autocast(...)``, in
    eval or training mode): the choice depends on all of them. ``print(fastres.explain(model,
    x))`` prints one entry per fast block, stem or ResNet in call order: the plan or path that
    ran, each earlier plan with why it does not apply, and the ops dispatched meanwhile.

    The model's buffers (BatchNorm running statistics, which a training forward updates) are
    restored afterwards; parameters are not touched and the output is discarded.

    Raises:
        TypeError: ``model`` is not an nn.Module or ``x`` not a tensor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"explain: x must be a Tensor, got {type(x).__name__}")
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with recording(model) as recorder:
            model(x)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                # Compared, not version-checked: ATen's batch_norm updates running statistics
                # without moving their version counters. Unchanged buffers are not written, so
                # that folded weights built from them stay valid.
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
    described = f"{type(model).__name__} on {tuple(x.shape)} {x.dtype} {x.device.type}"
    modes = [
        "training" if model.training else "eval",
        "autograd on" if torch.is_grad_enabled() else "no_grad",
    ]
    if torch.is_autocast_enabled(x.device.type):
        modes.append(f"autocast {torch.get_autocast_dtype(x.device.type)}")
    return Explanation(f"{described} ({', '.join(modes)})", tuple(recorder.decisions))
