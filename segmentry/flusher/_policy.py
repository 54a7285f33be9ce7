"""The settle policy: what becomes of a sent batch's rows, given the receiver's answer.
A pure function (no clock, no threads, no storage), tested as a table in
tests/test_policy.py. Imports nothing but ``http``'s Answer and its verdicts, which it
re-exports: the answer is classified there, once."""

from __future__ import annotations

import enum
from typing import NamedTuple

from ..http import MISCONFIGURED, OK, RETRY, Answer

__all__ = ["Action", "Answer", "Decision", "decide", "cycle_delay", "misconfigured_delay"]

CYCLE_DELAY_CAP_S = 60.0  # the longest pause after a cycle's retries ran out: how
# late, at worst, the end of a long outage is noticed
MISCONFIGURED_DELAY_S = (5.0, 300.0)  # first and longest slow retry after a 401/403/404
# (or an answer refused before it came: a certificate that fails verification)


class Action(enum.Enum):
    DELETE = "delete"  # delivered
    RELEASE = "release"  # a transient failure: keep the rows, try again after delay_s
    MISCONFIGURED = "misconfigured"  # a wrong key or URL: keep, retry after delay_s, report
    SPLIT = "split"  # refused, several events: send each half on its own
    BURY = "bury"  # refused, one event: to the dead letters


class Decision(NamedTuple):
    action: Action
    delay_s: float = 0.0  # RELEASE and MISCONFIGURED: how long the rows wait


DELETE = Decision(Action.DELETE)
SPLIT = Decision(Action.SPLIT)
BURY = Decision(Action.BURY)


def decide(answer: Answer, rows: int, attempts: int, retry_expiry_s: float,
           jitter: float, misconfigured: int = 0) -> Decision:
    """The decision for ``rows`` rows sent together, the ``attempts``-th cycle that
    tried the most tried of them. ``jitter`` in [0.5, 1] spreads the retries of many
    hosts; ``misconfigured`` counts the misconfigured answers in a row before this one.
    No answer at all is a RETRY (the network, a failure below us) or, when no retry can
    help (a certificate that fails verification, a missing CA bundle), MISCONFIGURED:
    our setting is wrong, as with a 401."""
    verdict = answer.verdict
    if verdict == OK:
        return DELETE
    if verdict == RETRY:
        if answer.retry_after_s is not None:  # the receiver's word wins
            return Decision(Action.RELEASE, answer.retry_after_s)
        return Decision(Action.RELEASE, cycle_delay(attempts, retry_expiry_s, jitter))
    if verdict == MISCONFIGURED:
        return Decision(Action.MISCONFIGURED, misconfigured_delay(misconfigured))
    return SPLIT if rows > 1 else BURY


def cycle_delay(attempts: int, retry_expiry_s: float, jitter: float) -> float:
    """After the ``attempts``-th cycle whose retries ran out: retry_expiry doubled per
    cycle, capped at CYCLE_DELAY_CAP_S, times the jitter."""
    base = retry_expiry_s * 2 ** min(attempts - 1, 16)
    return float(min(CYCLE_DELAY_CAP_S, base) * jitter)


def misconfigured_delay(before: int) -> float:
    """5 s, doubling with each misconfigured answer in a row, up to 300 s: a fixed key
    is noticed soon, a wrong one is not hammered."""
    first, longest = MISCONFIGURED_DELAY_S
    return float(min(first * 2 ** min(before, 16), longest))
