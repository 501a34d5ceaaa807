"""fastres.bench.interleaved: rounds rotate the order, spreads and paired speed-ups are right."""

import pytest

from fastres.bench.interleaved import Spread, paired_speedups, spread_of, time_interleaved


def test_rounds_run_every_configuration_once_in_rotating_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(steps, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_sync_brackets_every_timed_step():
    events = []
    times = time_interleaved(
        {"a": lambda: events.append("step")}, rounds=2, warmup=0, sync=lambda: events.append("sync")
    )
    assert events == ["sync", "sync", "step", "sync", "sync", "step", "sync"]
    assert len(times["a"]) == 2


def test_spread_is_median_and_interquartile_range():
    spread = spread_of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert spread == Spread(median=3.0, low=2.0, high=4.0, samples=5)
    assert spread_of([7.0]) == Spread(7.0, 7.0, 7.0, 1)


def test_scaled_turns_seconds_into_rates_and_flips_the_range():
    rate = spread_of([1.0, 2.0, 4.0]).scaled(16)
    assert (rate.median, rate.low, rate.high) == (8.0, 16 / 3.0, 16 / 1.5)


def test_significance_of_a_ratio():
    assert spread_of([1.2, 1.3, 1.4]).significant
    assert spread_of([0.7, 0.8, 0.9]).significant
    assert not spread_of([0.9, 1.1, 1.3]).significant


def test_paired_speedups_are_per_round():
    assert paired_speedups([2.0, 4.0], [1.0, 4.0]) == [2.0, 1.0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: spread_of([]), "samples is empty"),
        (lambda: time_interleaved({"a": lambda: None}, rounds=0), "rounds must be at least 1"),
        (lambda: paired_speedups([1.0], [1.0, 2.0]), "1 baseline rounds but 2"),
    ],
)
def test_bad_arguments_say_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()
