"""Pacing after a 429: AIMD on a request rate, seeded from this client's recent requests,
released when the 429s stop. Time is a fake clock."""

from __future__ import annotations

import pytest

from segmentry._pacing import PACE_BACKOFF, PACE_FLOOR, PACE_RELEASE_S, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def send(pacer: Pacer, clock: Clock, count: int, every: float, status: int = 200) -> None:
    """``count`` requests, one each ``every`` seconds (waiting for their slots), answered
    with ``status``."""
    for _ in range(count):
        clock.now += every + pacer.delay()
        pacer.observe(status)


def test_nothing_is_paced_before_a_429():
    clock = Clock()
    pacer = Pacer(clock)
    send(pacer, clock, 50, 0.01)
    send(pacer, clock, 3, 0.01, status=503)  # an outage is Retry-After's and backoff's
    assert pacer.rate is None
    assert [pacer.delay() for _ in range(5)] == [0.0] * 5


def test_the_first_429_paces_below_the_recent_request_rate():
    clock = Clock()
    pacer = Pacer(clock)
    send(pacer, clock, 40, 0.1)  # 10 requests/s
    pacer.observe(429)
    assert pacer.rate == pytest.approx(PACE_BACKOFF * 10, rel=0.1)
    gaps = [pacer.delay() for _ in range(4)]
    assert gaps[0] == 0.0
    assert gaps[1:] == pytest.approx([k / pacer.rate for k in (1, 2, 3)])


def test_429s_together_cut_the_rate_once_and_a_later_one_cuts_it_again():
    clock = Clock()
    pacer = Pacer(clock)
    send(pacer, clock, 40, 0.1)
    for _ in range(5):  # the batches in flight, refused together
        pacer.observe(429)
    first = pacer.rate
    assert first == pytest.approx(PACE_BACKOFF * 10, rel=0.1)
    clock.now += 1.0
    pacer.observe(429)
    assert pacer.rate == pytest.approx(PACE_BACKOFF * first)


def test_2xx_answers_raise_the_rate_and_the_pacing_ends_after_the_429s_stop():
    clock = Clock()
    pacer = Pacer(clock)
    send(pacer, clock, 40, 0.1)
    pacer.observe(429)
    first = pacer.rate
    assert first is not None
    send(pacer, clock, 20, 0.0)
    assert pacer.rate is not None and pacer.rate > first
    clock.now += PACE_RELEASE_S
    pacer.observe(200)
    assert pacer.rate is None
    assert pacer.delay() == 0.0


def test_the_rate_never_falls_below_the_floor():
    clock = Clock()
    pacer = Pacer(clock)
    for _ in range(20):
        clock.now += 1.0
        pacer.delay()
        pacer.observe(429)
    assert pacer.rate == PACE_FLOOR


def test_a_retry_afters_pause_does_not_count_toward_the_release():
    clock = Clock()
    pacer = Pacer(clock)
    send(pacer, clock, 40, 0.1)
    pacer.observe(429)  # with a Retry-After of 60 s: nothing is sent meanwhile
    clock.now += 60.0
    send(pacer, clock, 1, 0.0)  # the first request after the pause
    assert pacer.rate is not None  # still paced: the 8 senders do not go out as a burst
    assert pacer.delay() > 0
    clock.now += PACE_RELEASE_S + 1
    pacer.observe(200)
    assert pacer.rate is None
