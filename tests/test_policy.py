"""The settle policy as a table: an answer goes in, a decision comes out. No threads,
sockets or clocks: the jitter and the count of misconfigured answers are arguments. Each
answer is the one http makes of such a response (or error), so the table pins the
status rules and the policy together."""

from __future__ import annotations

import pytest
import requests

from segmentry import http
from segmentry.exceptions import NetworkError
from segmentry.flusher._policy import (
    CYCLE_DELAY_CAP_S,
    Action,
    Decision,
    cycle_delay,
    decide,
    misconfigured_delay,
)

EXPIRY_S = 10.0  # retry_expiry
DOWN = NetworkError("connection refused")
REFUSED_CERT = NetworkError("TLS failed, certificate verify failed: unable to get local issuer")
REFUSED_CERT.retryable = False  # as http.py marks a verification failure
REQUEST = requests.Request("POST", "https://api.segment.io/v1/batch").prepare()


def replied(status, retry_after=None):
    """The Answer http makes of a response with this status (and Retry-After header)."""
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return http.answer(http.make_response(REQUEST, status, b"", headers))


@pytest.mark.parametrize("answer, rows, expected", [
    (replied(200), 100, Decision(Action.DELETE)),
    (replied(204), 1, Decision(Action.DELETE)),
    # transient: the receiver's Retry-After wins, else the cycle delay (attempt 1: 10 s)
    (replied(429, "30"), 100, Decision(Action.RELEASE, 30.0)),
    (replied(503, "0"), 100, Decision(Action.RELEASE, 0.0)),
    (replied(503), 100, Decision(Action.RELEASE, 10.0)),
    (replied(500), 1, Decision(Action.RELEASE, 10.0)),
    (replied(408), 100, Decision(Action.RELEASE, 10.0)),
    (http.answer(DOWN), 100, Decision(Action.RELEASE, 10.0)),
    # a wrong key or URL: kept, retried slowly (first 5 s)
    (replied(401), 100, Decision(Action.MISCONFIGURED, 5.0)),
    (replied(403), 1, Decision(Action.MISCONFIGURED, 5.0)),
    (replied(404), 100, Decision(Action.MISCONFIGURED, 5.0)),
    (replied(301), 100, Decision(Action.MISCONFIGURED, 5.0)),  # a redirect left unfollowed
    (replied(401, "1"), 100, Decision(Action.MISCONFIGURED, 5.0)),
    # a certificate that fails verification: our CA bundle or URL is wrong, as with a 401
    (http.answer(REFUSED_CERT), 100, Decision(Action.MISCONFIGURED, 5.0)),
    # refused: a batch is split to find the event refused, one event is buried
    (replied(400), 100, Decision(Action.SPLIT)),
    (replied(413), 2, Decision(Action.SPLIT)),
    (replied(400), 1, Decision(Action.BURY)),
    (replied(422, "5"), 1, Decision(Action.BURY)),
    (replied(501), 1, Decision(Action.BURY)),  # a 5xx that no retry can fix
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
    answer = http.answer(DOWN)
    assert decide(answer, 5, attempts, EXPIRY_S, jitter) == Decision(Action.RELEASE, delay)


@pytest.mark.parametrize("before, delay", [(0, 5.0), (1, 10.0), (5, 160.0), (6, 300.0),
                                           (1000, 300.0)])
def test_misconfigured_answers_in_a_row_double_the_wait_up_to_five_minutes(before, delay):
    assert misconfigured_delay(before) == delay
    decision = decide(replied(403), 1, 1, EXPIRY_S, 1.0, misconfigured=before)
    assert decision == Decision(Action.MISCONFIGURED, delay)


def test_a_retry_after_is_not_jittered_nor_capped_by_the_cycle_delay():
    decision = decide(replied(429, "300"), 100, 50, EXPIRY_S, jitter=0.5)
    assert decision == Decision(Action.RELEASE, 300.0)
