"""What each fast module decided to run for one forward, and the ops it launched: recorded only
while :func:`fastres.explain` runs a model (fastres/explain.py prints it).

Fast modules ask :func:`recorder` once per forward (a module global read, nothing else when no
explanation is being recorded: torch.compile traces that, where it cannot trace a context
variable) and, when there is one, report their decision through it:
:meth:`Recorder.ran` around the work, so that the ops dispatched meanwhile (seen by a
``TorchDispatchMode``) are counted against that module.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Decision", "Recorder", "count_call", "recorded", "recorder", "recording"]


@dataclass
class Decision:
    """One fast module's choice for one call.

    Attributes:
        name: its qualified name in the model (``""`` for the model itself).
        module_type: its class name.
        runs: what ran: a plan's name, or the module's own path (``"folded stem"``, ...).
        passed_over: each alternative tried before, by name, with why it does not apply.
        ops: the ops dispatched while it ran and no module inside it was running, with counts.
    """

    name: str
    module_type: str
    runs: str
    passed_over: dict[str, list[str]] = field(default_factory=dict)
    ops: Counter[str] = field(default_factory=Counter)


class Recorder(TorchDispatchMode):
    """Collects :class:`Decision` objects, in call order, for the modules of one model."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names  # id(module) -> qualified name
        self.thread = threading.get_ident()  # the thread explain() runs the model in
        self.decisions: list[Decision] = []
        self._running: list[Decision] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if self._running:
            self._running[-1].ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def ran(
        self,
        module: nn.Module,
        runs: str,
        passed_over: dict[str, list[str]] | None = None,
        calls: tuple[str, ...] = (),
    ) -> Iterator[Decision]:
        """Records that ``module`` runs ``runs``; ops dispatched inside count against it, as do
        ``calls``, work no dispatch mode sees (a oneDNN program's run)."""
        decision = Decision(
            self.names.get(id(module), f"<{type(module).__name__} outside the model>"),
            type(module).__name__,
            runs,
            dict(passed_over or {}),
            Counter(calls),
        )
        self.decisions.append(decision)
        self._running.append(decision)
        try:
            yield decision
        finally:
            self._running.pop()


# The explanation being recorded, if any (one at a time, in the thread that records it).
_RECORDER: Recorder | None = None
_RECORDING_LOCK = threading.Lock()


def recorder() -> Recorder | None:
    """The recorder of the explanation being taken in this thread, or None."""
    rec = _RECORDER
    if rec is None or rec.thread != threading.get_ident():
        return None
    return rec


def recorded(
    module: nn.Module,
    runs: str,
    passed_over: dict[str, list[str]] | None = None,
    calls: tuple[str, ...] = (),
) -> contextlib.AbstractContextManager[Decision | None]:
    """:meth:`Recorder.ran` while an explanation is recorded, else a context that does
    nothing."""
    rec = recorder()
    if rec is None:
        return contextlib.nullcontext()
    return rec.ran(module, runs, passed_over, calls)


def count_call(name: str) -> None:
    """Counts ``name``, work no dispatch mode sees (a call into fastres._onednn), against the
    module running, while an explanation is recorded."""
    rec = recorder()
    if rec is not None and rec._running:
        rec._running[-1].ops[name] += 1


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[Recorder]:
    """Records every fast module's decision, and the ops dispatched, while the block runs."""
    global _RECORDER
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    rec = Recorder(names)
    if not _RECORDING_LOCK.acquire(blocking=False):
        raise RuntimeError("fastres.explain: another explanation is being recorded")
    try:
        _RECORDER = rec
        with rec:
            yield rec
    finally:
        _RECORDER = None
        _RECORDING_LOCK.release()
