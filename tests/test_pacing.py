"""Pacing after a 429: spaced at 90 % of the rate the receiver accepted, probing upwards,
released when the 429s stop. Time is a fake clock."""

from __future__ import annotations

import pytest

from segmentry.pacing import PACE_RELEASE_S, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def accepted(pacer: Pacer, clock: Clock, count: int, every: float) -> None:
    for _ in range(count):
        clock.now += every
        pacer.observe(200)


def slots(pacer: Pacer, count: int) -> list[float]:
    return [pacer.delay() for _ in range(count)]


def test_nothing_is_paced_before_a_429():
    clock = Clock()
    pacer = Pacer(clock)
    accepted(pacer, clock, 50, 0.01)
    pacer.observe(503)  # an outage is Retry-After's and the backoff's business
    assert pacer.rate is None
    assert slots(pacer, 5) == [0.0] * 5


def test_a_429_paces_at_90_percent_of_the_accepted_rate():
    clock = Clock()
    pacer = Pacer(clock)
    accepted(pacer, clock, 40, 0.1)  # 10 requests/s accepted over the last 4 s
    pacer.observe(429)
    assert pacer.rate == pytest.approx(0.9 * 40 / 3.9, rel=0.01)
    gaps = slots(pacer, 4)
    assert gaps[0] == 0.0
    assert gaps[1:] == pytest.approx([1 / pacer.rate * k for k in (1, 2, 3)])


def test_too_few_answers_to_measure_leaves_it_to_retry_after():
    clock = Clock()
    pacer = Pacer(clock)
    accepted(pacer, clock, 3, 0.1)
    pacer.observe(429)
    assert pacer.rate is None


def test_2xx_answers_raise_the_rate_and_the_pacing_ends_after_the_429s_stop():
    clock = Clock()
    pacer = Pacer(clock)
    accepted(pacer, clock, 40, 0.1)
    pacer.observe(429)
    first = pacer.rate
    assert first is not None
    accepted(pacer, clock, 20, 0.1)
    assert pacer.rate is not None and pacer.rate > first
    clock.now += PACE_RELEASE_S
    pacer.observe(200)
    assert pacer.rate is None
    assert pacer.delay() == 0.0


def test_the_rate_never_falls_below_the_floor():
    clock = Clock()
    pacer = Pacer(clock)
    accepted(pacer, clock, 5, 1.0)
    pacer.observe(429)
    assert pacer.rate is not None and pacer.rate >= 0.5
