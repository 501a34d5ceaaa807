"""Serving one model from several threads at once, for the tests of the inference paths."""

from __future__ import annotations

import threading

import torch
from torch import nn


def assert_threads_match_one_thread(
    model: nn.Module, inputs: list[torch.Tensor], threads: int = 4, rounds: int = 3
) -> None:
    """``threads`` threads call ``model`` (under no_grad) on every input ``rounds`` times each,
    starting at different inputs; every result must equal, bit for bit, what one thread got
    before, and no thread may hang."""
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    failures: list[BaseException] = []

    def serve(offset: int) -> None:
        try:
            for i in range(rounds * len(inputs)):
                k = (i + offset) % len(inputs)
                with torch.no_grad():
                    torch.testing.assert_close(model(inputs[k]), expected[k], rtol=0, atol=0)
        # Reported by the main thread.
        except BaseException as error:  # noqa: BLE001
            failures.append(error)

    workers = [threading.Thread(target=serve, args=(offset,)) for offset in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert not any(worker.is_alive() for worker in workers), "a serving thread hung"
    assert not failures, failures[0]
