"""Timing several configurations side by side: interleaved rounds, medians and their spread.

On a shared or throttling machine, timing one configuration after another turns drift (another
job starting, the clock dropping) into a false speed-up. Here each round runs one step of every
configuration, in an order rotated by one each round, so drift lands on all of them alike, and
a ratio is taken between steps of the same round (paired), then summarised by its median and
interquartile range. A ratio whose interquartile range contains 1.0 is not significant.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Spread", "time_interleaved", "paired_speedups", "spread_of"]


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range (``low`` = 25th, ``high`` = 75th percentile) of samples."""

    median: float
    low: float
    high: float
    samples: int

    @property
    def significant(self) -> bool:
        """For a ratio: True when the whole interquartile range lies on one side of 1.0."""
        return not (self.low <= 1.0 <= self.high)

    def scaled(self, factor: float) -> Spread:
        """The same spread of ``factor / sample`` (e.g. seconds per step -> images per second);
        the order of low and high flips with the reciprocal."""
        return Spread(factor / self.median, factor / self.high, factor / self.low, self.samples)


def spread_of(samples: Sequence[float]) -> Spread:
    """Median and interquartile range of ``samples`` (at least one)."""
    if not samples:
        raise ValueError("spread_of: samples is empty")
    values = sorted(samples)
    if len(values) == 1:
        return Spread(values[0], values[0], values[0], 1)
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(statistics.median(values), low, high, len(values))


def time_interleaved(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    sync: Callable[[], None] = lambda: None,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds of each step of each configuration, timed in interleaved rounds.

    Args:
        steps: configuration name -> a callable running one step (e.g. one training step).
        rounds: timed rounds; each runs every configuration once, in an order rotated by one
            position per round.
        sync: waits for queued device work (``torch.cuda.synchronize`` on a GPU); called before
            and after each timed step, so that each step is timed alone.
        warmup: untimed rounds first (compilation, algorithm selection, allocator growth).

    Returns:
        name -> list of ``rounds`` step times in seconds, round by round.
    """
    if rounds < 1:
        raise ValueError(f"time_interleaved: rounds must be at least 1, got {rounds}")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def paired_speedups(baseline_seconds: Sequence[float], seconds: Sequence[float]) -> list[float]:
    """Per round, the baseline's step time over the other configuration's (above 1.0: the other
    is faster). Both lists come from the same :func:`time_interleaved` run."""
    if len(baseline_seconds) != len(seconds):
        raise ValueError(
            f"paired_speedups: {len(baseline_seconds)} baseline rounds but "
            f"{len(seconds)} rounds to compare"
        )
    return [base / own for base, own in zip(baseline_seconds, seconds, strict=True)]
