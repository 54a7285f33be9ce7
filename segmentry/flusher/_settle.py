"""Sending a claimed batch and settling its rows: the request and its Answer (both
``http``'s: ``deliver_batch``, ``deliver_event``), the policy's decision
(``_policy.decide``) and what it does to the stored rows (delete, release, bury), the
pause it sets, the log line, telemetry and on_error. Senders call it from their threads."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Callable

from .. import http, messages, telemetry
from ..config import Options
from ..exceptions import HTTPStatusError
from ..storage import Claim, Delivered, Queue, Row
from ..storage import destination as destination  # re-exported: how a destination is named
from ._failures import describe
from ._policy import MISCONFIGURED_DELAY_S, Action, Answer, decide
from ._routes import Route, Routes

logger = logging.getLogger("segmentry.flusher")  # the package's name: one logger for users


class Counts:
    """Counters of what the flusher did, for the CLI and tests."""

    def __init__(self) -> None:
        self.sent = 0
        self.buried = 0
        self.released = 0
        self.requests = 0
        # What is wrong, while it lasts: "the receiver answered HTTP 401", or why TLS
        # failed ("TLS failed, certificate verify failed: ..."). Never the key.
        self.misconfigured: str | None = None
        self._lock = threading.Lock()

    def add(self, name: str, count: int) -> None:
        """Count from any sender thread (a bare += would lose updates)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def __repr__(self) -> str:
        return (f"Counts(sent={self.sent}, buried={self.buried}, released={self.released}, "
                f"misconfigured={self.misconfigured})")


class Deferred:
    """The deletes the senders leave for the loop while it runs flat out: the next claim
    deletes them in its own transaction. A sender deleting them itself took the queue
    connection's lock once more per batch, and a thread holding that lock waits for the
    GIL behind the other senders: claims and deletes took 2-4 ms each."""

    def __init__(self) -> None:
        self._items: list[Delivered] = []
        self._lock = threading.Lock()
        self._on = False  # True while the loop runs

    def switch(self, on: bool) -> None:
        with self._lock:
            self._on = on

    def add(self, token: int, ids: list[int]) -> bool:
        """Leave these for the loop; False when it is not running (delete them now)."""
        with self._lock:
            if self._on:
                self._items.append((token, ids))
            return self._on

    def take(self) -> list[Delivered]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def give_back(self, items: list[Delivered]) -> None:
        with self._lock:
            self._items[:0] = items

    def pending(self) -> bool:
        with self._lock:
            return bool(self._items)


class Settler:
    """Sends claims and settles them by the policy, each on its destination's route
    (its client, its pause: see _routes)."""

    def __init__(self, queue: Queue, routes: Routes, options: Options,
                 clock: Callable[[], float], grow: Callable[[], None]) -> None:
        self.queue, self.routes, self.options, self.clock = queue, routes, options, clock
        self._grow = grow  # a delivered batch widens the window of batches in flight
        self.counts = Counts()
        self.deferred = Deferred()
        self.keyless_waiting = False  # events that carry no destination wait for a key

    def take_over(self) -> None:
        """The queue's lock is ours: leases left are a dead flusher's, and an ongoing
        backoff stored in the file is honoured, destination by destination (a restart
        does not forget it)."""
        reclaimed = self.queue.reset_leases()
        if reclaimed:
            logger.info("reclaimed %d events from a flusher that stopped mid-send", reclaimed)
        now = self.clock()
        for route in self.routes.refresh():
            route.owns_backoffs = False
            for dest in route.dests:
                ready_at = self.queue.next_ready_at(now, dest)
                if ready_at is not None and route.http_client is None:
                    self._keyless()
                elif ready_at and ready_at > now:
                    self._stored_backoff(route, dest, ready_at, now)

    def _keyless(self) -> None:
        """Events without a destination, and no key of our own to send them with."""
        if not self.keyless_waiting:
            self.keyless_waiting = True
            logger.warning("the queue holds events that carry no destination (enqueued "
                           "without a write key, or by segmentry 0.1) and this flusher has "
                           "no write key of its own: they stay queued until one is given")

    def _stored_backoff(self, route: Route, dest: int, ready_at: float, now: float) -> None:
        """Wait out a backoff this destination earned. Events that carry no destination
        go with our own key and URL: a backoff they earned with another (a wrong URL or
        key, fixed since) says nothing of ours, so they go at once."""
        owner = self.queue.backoff_owner()
        if dest == 0 and owner != route.name:
            resumed = self.queue.resume(now, 0)
            logger.info("%d events waited out a backoff earned by another destination "
                        "(%s): they go now", resumed, owner or "not recorded")
            return
        route.pause_until = max(route.pause_until, ready_at)
        logger.warning("waiting out the backoff stored after the last failures to %s: "
                       "next attempt at %s (in %.0f s)", route.name,
                       time.strftime("%H:%M:%S", time.localtime(ready_at)), ready_at - now)

    def deliver(self, claim: Claim) -> None:
        """Send a claimed batch on its destination's route and settle its rows by the
        answer."""
        route = self.routes.get(claim.dest)
        if route.http_client is None:  # no key to send them with: they wait
            self._keyless()
            self.hand_back(claim.token, claim.rows)
        elif self.options.sender == "immediate":
            for row in claim.rows:
                self._settle(route, claim.token, [row], self._request_event(route, row))
        else:
            self._send_and_settle(route, claim.token, claim.rows)

    def _send_and_settle(self, route: Route, token: int, rows: list[Row]) -> None:
        self._settle(route, token, rows, self._request_batch(route, [r.body for r in rows]))

    def _request_batch(self, route: Route, bodies: list[str]) -> Answer:
        self.counts.add("requests", 1)
        client = route.http_client
        assert client is not None
        return http.deliver_batch(client, bodies)

    def _request_event(self, route: Route, row: Row) -> Answer:
        self.counts.add("requests", 1)
        type_ = messages.type_of(row.body)
        client = route.http_client
        assert client is not None
        return http.deliver_event(client, type_, row.body)

    def _settle(self, route: Route, token: int, rows: list[Row], answer: Answer) -> None:
        """Ask the policy once, then do what it decided."""
        attempts = max(r.attempts for r in rows) + 1
        decision = decide(answer, len(rows), attempts, self.options.retry_expiry / 1000.0,
                          random.uniform(0.5, 1.0), route.misconfigured_in_a_row)
        action = decision.action
        client = route.http_client
        if action is Action.DELETE:
            self._settle_delivered(route, token, rows)
        elif action is Action.RELEASE:
            error = answer.error or HTTPStatusError(answer.status or 0, True, answer.text)
            self._release(route, token, rows, error, decision.delay_s)
        elif action is Action.MISCONFIGURED:
            self._misconfigured(route, token, rows, answer, decision.delay_s)
        elif client is not None and client.closing.is_set():  # stopping: nothing buried
            self.hand_back(token, rows)
        elif action is Action.SPLIT:
            half = len(rows) // 2
            self._send_and_settle(route, token, rows[:half])
            self._send_and_settle(route, token, rows[half:])
        else:
            self._bury(token, rows, answer)

    def _settle_delivered(self, route: Route, token: int, rows: list[Row]) -> None:
        """The receiver took these rows: delete them, in the loop's next claim while it
        runs (see Deferred), else now; and the receiver is well: widen, resume."""
        ids = [r.id for r in rows]
        if not self.deferred.add(token, ids):  # the loop has stopped: delete them now
            self.counts.add("sent", self.queue.delete(token, ids))
        self._grow()
        if route.failing:
            self._recovered(route)
        if route.misconfigured:
            route.misconfigured = None
            self.counts.misconfigured = self.routes.misconfigured()
        route.misconfigured_in_a_row = 0

    def _release(self, route: Route, token: int, rows: list[Row], error: Exception,
                 delay: float) -> None:
        """A transient failure outlived this cycle's retries: keep the rows, pause their
        destination."""
        not_before = self.clock() + delay
        if 0 in route.dests and not route.owns_backoffs:  # once per take-over: only we
            self.queue.set_backoff_owner(route.name)  # write the file meanwhile
            route.owns_backoffs = True
        released = self.queue.release(token, [r.id for r in rows], not_before)
        self.counts.add("released", released)
        route.pause_until = max(route.pause_until, not_before)
        url = route.http_client.api_url if route.http_client is not None else ""
        route.failing = describe(error, url)
        status = getattr(error, "status_code", None)
        telemetry.execute(("segmentry", "release"), {"count": released, "delay_s": delay},
                          {"status_code": status, "queue_path": self.queue.path})
        logger.warning("delivery failed (%s); %d events kept, next attempt in %.1f s%s",
                       route.failing, len(rows), delay, self._to(route))
        self._on_error(error, rows)

    def _to(self, route: Route) -> str:
        """Which destination, in a log line, once there are several."""
        return f" (to {route.name})" if len(self.routes.all()) > 1 else ""

    def _recovered(self, route: Route) -> None:
        """A 2xx after failures: the receiver is back. Rows of this destination still
        waiting out a backoff stored during the outage are ready now, so the backlog
        replays at once."""
        route.failing = None
        route.pause_until = min(route.pause_until, self.clock())
        resumed = sum(self.queue.resume(self.clock(), dest) for dest in route.dests)
        if resumed:
            logger.info("receiver is back: %d events waiting out a backoff resume now%s",
                        resumed, self._to(route))

    def _misconfigured(self, route: Route, token: int, rows: list[Row], answer: Answer,
                       delay: float) -> None:
        """401/403/404, or a certificate that fails verification: the key, the URL or
        the CA bundle is wrong. Keep everything (no stored backoff, so a fixed setting
        and a restart replay at once), log, report, retry this destination slowly;
        on_error is told too (a wrong key is what users alert on), with the events,
        which stay."""
        self.queue.release(token, [r.id for r in rows], 0.0)
        route.misconfigured_in_a_row += 1
        route.pause_until = max(route.pause_until, self.clock() + delay)
        error: Exception = answer.error or HTTPStatusError(answer.status or 0, False,
                                                           answer.text)
        what = str(answer.error) if answer.error else f"the receiver answered HTTP {answer.status}"
        if route.misconfigured != what:
            url = route.http_client.api_url if route.http_client is not None else ""
            logger.error("%s: check the write key, api_url and CA bundle (%s); nothing is "
                         "dropped, retrying every %.0f s at most",
                         what, route.name if self._to(route) else url, MISCONFIGURED_DELAY_S[1])
        route.misconfigured = what
        self.counts.misconfigured = self.routes.misconfigured()
        telemetry.execute(("segmentry", "misconfigured"), {"count": len(rows)},
                          {"status_code": answer.status, "queue_path": self.queue.path})
        self._on_error(error, rows)

    def _bury(self, token: int, rows: list[Row], answer: Answer) -> None:
        """The receiver refuses this one event (400, 413, another 4xx): dead letters."""
        status = answer.status or 0
        moved = self.queue.bury(token, [rows[0].id], status, answer.text, self.clock())
        self.counts.add("buried", moved)
        logger.error("receiver refused an event with HTTP %d; moved to dead letters", status)
        telemetry.execute(("segmentry", "dead_letter"), {"count": moved},
                          {"status_code": status, "queue_path": self.queue.path})
        self._on_error(HTTPStatusError(status, False, answer.text), rows)

    def _on_error(self, error: Exception, rows: list[Row]) -> None:
        callback = self.options.on_error
        if callback is None:
            return
        try:
            callback(error, [json.loads(r.body) for r in rows])
        except Exception:
            logger.exception("on_error callback raised")

    def hand_back(self, token: int, rows: list[Row]) -> None:
        """Stopping: give the rows back at once, ready for the next flusher."""
        self.counts.add("released", self.queue.release(token, [r.id for r in rows], 0.0))
