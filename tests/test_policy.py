"""The settle policy as a table: an answer goes in, a decision comes out. No threads,
sockets or clocks: the jitter and the count of misconfigured answers are arguments."""

from __future__ import annotations

import pytest

from segmentry.exceptions import NetworkError
from segmentry.flusher._policy import (
    CYCLE_DELAY_CAP_S,
    Action,
    Answer,
    Decision,
    cycle_delay,
    decide,
    misconfigured_delay,
)

EXPIRY_S = 10.0  # retry_expiry
DOWN = NetworkError("connection refused")
REFUSED_CERT = NetworkError("TLS failed, certificate verify failed: unable to get local issuer")
REFUSED_CERT.retryable = False  # as http.py marks a verification failure


@pytest.mark.parametrize("answer, rows, expected", [
    (Answer(200), 100, Decision(Action.DELETE)),
    (Answer(204), 1, Decision(Action.DELETE)),
    # transient: the receiver's Retry-After wins, else the cycle delay (attempt 1: 10 s)
    (Answer(429, retry_after_s=30.0), 100, Decision(Action.RELEASE, 30.0)),
    (Answer(503, retry_after_s=0.0), 100, Decision(Action.RELEASE, 0.0)),
    (Answer(503), 100, Decision(Action.RELEASE, 10.0)),
    (Answer(500), 1, Decision(Action.RELEASE, 10.0)),
    (Answer(408), 100, Decision(Action.RELEASE, 10.0)),
    (Answer(None, error=DOWN), 100, Decision(Action.RELEASE, 10.0)),
    # no answer at all: a Retry-After cannot have come with it
    (Answer(None, retry_after_s=99.0, error=DOWN), 100, Decision(Action.RELEASE, 10.0)),
    # a wrong key or URL: kept, retried slowly (first 5 s)
    (Answer(401), 100, Decision(Action.MISCONFIGURED, 5.0)),
    (Answer(403), 1, Decision(Action.MISCONFIGURED, 5.0)),
    (Answer(404), 100, Decision(Action.MISCONFIGURED, 5.0)),
    (Answer(301), 100, Decision(Action.MISCONFIGURED, 5.0)),  # a redirect left unfollowed
    (Answer(401, retry_after_s=1.0), 100, Decision(Action.MISCONFIGURED, 5.0)),
    # a certificate that fails verification: our CA bundle or URL is wrong, as with a 401
    (Answer(None, error=REFUSED_CERT), 100, Decision(Action.MISCONFIGURED, 5.0)),
    # refused: a batch is split to find the event refused, one event is buried
    (Answer(400), 100, Decision(Action.SPLIT)),
    (Answer(413), 2, Decision(Action.SPLIT)),
    (Answer(400), 1, Decision(Action.BURY)),
    (Answer(422, retry_after_s=5.0), 1, Decision(Action.BURY)),
    (Answer(501), 1, Decision(Action.BURY)),  # a 5xx that no retry can fix
])
def test_the_decision_for_each_answer(answer, rows, expected):
    assert decide(answer, rows, attempts=1, retry_expiry_s=EXPIRY_S, jitter=1.0) == expected


@pytest.mark.parametrize("attempts, jitter, delay", [
    (1, 1.0, 10.0), (2, 1.0, 20.0), (3, 0.5, 20.0), (4, 1.0, CYCLE_DELAY_CAP_S),
    (10_000, 1.0, CYCLE_DELAY_CAP_S), (10_000, 0.5, CYCLE_DELAY_CAP_S / 2),
])
def test_the_cycle_delay_doubles_per_cycle_up_to_its_cap_times_the_jitter(attempts, jitter,
                                                                          delay):
    assert cycle_delay(attempts, EXPIRY_S, jitter) == delay
    answer = Answer(None, error=DOWN)
    assert decide(answer, 5, attempts, EXPIRY_S, jitter) == Decision(Action.RELEASE, delay)


@pytest.mark.parametrize("before, delay", [(0, 5.0), (1, 10.0), (5, 160.0), (6, 300.0),
                                           (1000, 300.0)])
def test_misconfigured_answers_in_a_row_double_the_wait_up_to_five_minutes(before, delay):
    assert misconfigured_delay(before) == delay
    decision = decide(Answer(403), 1, 1, EXPIRY_S, 1.0, misconfigured=before)
    assert decision == Decision(Action.MISCONFIGURED, delay)


def test_a_retry_after_is_not_jittered_nor_capped_by_the_cycle_delay():
    decision = decide(Answer(429, retry_after_s=300.0), 100, 50, EXPIRY_S, jitter=0.5)
    assert decision == Decision(Action.RELEASE, 300.0)
