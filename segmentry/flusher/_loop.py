"""The flusher loop: claim batches, hand them to sender threads, settle what came back
(delete, release, split, bury) as the policy decides; up to max_in_flight batches in
flight, paced by an AIMD window."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import random
import threading
import time
from typing import Callable

import requests

from .. import http, messages, telemetry
from ..config import Options
from ..exceptions import HTTPStatusError, NetworkError, SegmentryError
from ..storage import Claim, Delivered, Row, SQLiteQueue, Upkeep
from ._failures import describe
from ._policy import MISCONFIGURED_DELAY_S, Action, Answer, decide

logger = logging.getLogger("segmentry.flusher")  # the package's name: one logger for users

LEASE_S = 600.0  # a backstop only: a new lock holder resets every lease at once
RENEW_S = LEASE_S / 4  # the leases of batches in flight are renewed this often
TICK_S = 1.0  # with an on_cycle hook, the loop calls it at least this often, even idle
# How long a delivered batch may wait for the next claim to delete it (a claim comes
# with every full batch while producers are busy: half the write transactions).
DELETE_LAG_S = 0.05
# While producers of this process fill batches faster than this, the batches that fill
# within it of the last claim go in one claim: a claim at every full batch cost them
# ~10 % of their rate (loop CPU 8.3 -> 5.7 µs an event, benchmarks/thread_cpu.py).
GATHER_S = 0.02
# The stored bodies (plus a comma each) a claim may take: the request stays under 500 KB.
CLAIM_BYTES = messages.MAX_BATCH_BYTES - messages.BATCH_OVERHEAD


class Counts:
    """Counters of what the flusher did, for the CLI and tests."""

    def __init__(self) -> None:
        self.sent = 0
        self.buried = 0
        self.released = 0
        self.requests = 0
        self.misconfigured: int | None = None  # the status, while it lasts
        self._lock = threading.Lock()

    def add(self, name: str, count: int) -> None:
        """Count from any sender thread (a bare += would lose updates)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def __repr__(self) -> str:
        return (f"Counts(sent={self.sent}, buried={self.buried}, released={self.released}, "
                f"misconfigured={self.misconfigured})")


class Flusher:
    """Delivers one queue file. Only the holder of the queue's lock runs one (see Lock)."""

    def __init__(self, queue: SQLiteQueue, client: http.HTTPClient, options: Options,
                 clock: Callable[[], float] = time.time,
                 checkpoints: SQLiteQueue | None = None) -> None:
        self.queue = queue
        self.upkeep = Upkeep(queue, checkpoints)
        self.http = client
        self.options = options
        self.clock = clock
        self.counts = Counts()
        self.pause_until = 0.0  # epoch seconds; no claim before (an outage pauses everything)
        self._misconfigured_in_a_row = 0
        self.destination = destination(getattr(client, "api_url", ""),
                                       getattr(client, "write_key", ""))
        self._owns_backoffs = False  # whether the file names us as the backoffs' owner
        self.window = Window(options.max_in_flight)
        self._gate_seen = client.paused_until()  # the shared pause last noticed
        self._failing = False  # a transient failure since the last 2xx
        self._pool: Senders | None = None
        self._settled = threading.Condition()
        self._flying: dict[int, Claim] = {}  # the claims in the senders' hands, by id()
        self.deferred = Deferred()
        # A batch that is not full waits for batch_every_ms to pass since the last wait
        # (``_due``) or for flush() (``hurry``); full ones go at once. In a producer's
        # process the loop is woken at every max_batch_size events, and claiming the
        # remainder each time sent batches of 70 events on average instead of 100.
        self._due = True
        self.hurry = threading.Event()
        self._claimed_at = -math.inf  # time.monotonic() of the last claim that found rows
        self._renewed_at = clock()  # self.clock() of the last renewal of leases in flight
        # Called by the loop at every turn and at least every TICK_S while it waits (the
        # service's systemd watchdog and status): a loop that stops turning stops calling.
        self.on_cycle: Callable[[], None] | None = None

    # -- one cycle ----------------------------------------------------------------------

    def take_over(self) -> None:
        """Called once the queue's lock is ours: leases left are a dead flusher's, and an
        ongoing backoff stored in the file is honoured (a restart does not forget it)."""
        self.upkeep.start()
        reclaimed = self.queue.reset_leases()
        if reclaimed:
            logger.info("reclaimed %d events from a flusher that stopped mid-send", reclaimed)
        self._owns_backoffs = False
        now = self.clock()
        ready_at = self.queue.next_ready_at(now)
        if ready_at and ready_at > now:
            self._stored_backoff(ready_at, now)

    def _stored_backoff(self, ready_at: float, now: float) -> None:
        """Wait out a backoff this destination earned; one earned by another (a wrong URL
        or key, fixed since) says nothing of ours: its events go at once."""
        owner = self.queue.backoff_owner()
        if owner != self.destination:
            resumed = self.queue.resume(now)
            logger.info("%d events waited out a backoff earned by another destination "
                        "(%s): they go now", resumed, owner or "not recorded")
            return
        self.pause_until = max(self.pause_until, ready_at)
        logger.warning("waiting out the backoff stored after the last failures to %s: "
                       "next attempt at %s (in %.0f s)", self.http.api_url,
                       time.strftime("%H:%M:%S", time.localtime(ready_at)), ready_at - now)

    def _delete_and_claim(self, batches: int = 1, partial: bool = True) -> list[Claim]:
        """Delete what the senders delivered meanwhile (see Deferred), and claim up to
        ``batches`` batches, oldest first, in one transaction (an empty list: nothing is
        ready); without ``partial``, full batches only."""
        limit = 1 if self.options.sender == "immediate" else self.options.max_batch_size
        meta = {"queue_path": self.queue.path}
        delivered = self.deferred.take()
        try:
            with telemetry.span(("segmentry", "claim"), meta) as span:
                claims = self.queue.claim_batches(batches, limit, CLAIM_BYTES, self.clock(),
                                                  LEASE_S, delivered, partial)
                # "status" as every stop has it, so one handler can serve all spans.
                span.set(claimed=sum(len(c.rows) for c in claims.batches), status="ok")
        except BaseException:
            self.deferred.give_back(delivered)  # still delivered: deleted by a later claim
            raise
        self.counts.add("sent", claims.deleted)
        if delivered:
            self._notify_settled()  # flush() waits for those deletes
        return claims.batches

    def run_once(self) -> int:
        """One synchronous claim/send cycle; return how many events it claimed."""
        claimed = 0
        for claim in self._delete_and_claim():
            self.deliver(claim)
            claimed += len(claim.rows)
        return claimed

    def deliver(self, claim: Claim) -> None:
        """Send a claimed batch and settle its rows by the answer."""
        if self.options.sender == "immediate":
            for row in claim.rows:
                self._settle(claim.token, [row], self._request_event(row))
        else:
            self._send_and_settle(claim.token, claim.rows)

    def _send_and_settle(self, token: int, rows: list[Row]) -> None:
        self._settle(token, rows, self._request_batch([r.body for r in rows]))

    def _request_batch(self, bodies: list[str]) -> Answer:
        self.counts.add("requests", 1)
        return _answer(lambda: http.post_batch(self.http, bodies))

    def _request_event(self, row: Row) -> Answer:
        self.counts.add("requests", 1)
        return _answer(lambda: http.post_event(self.http, messages.type_of(row.body), row.body))

    def _settle(self, token: int, rows: list[Row], answer: Answer) -> None:
        """Ask the policy once, then do what it decided."""
        attempts = max(r.attempts for r in rows) + 1
        decision = decide(answer, len(rows), attempts, self.options.retry_expiry / 1000.0,
                          random.uniform(0.5, 1.0), self._misconfigured_in_a_row)
        action = decision.action
        if action is Action.DELETE:
            self._delivered(token, rows)
        elif action is Action.RELEASE:
            error = answer.error or HTTPStatusError(answer.status or 0, True, answer.text)
            self._release(token, rows, error, decision.delay_s)
        elif action is Action.MISCONFIGURED:
            self._misconfigured(token, rows, answer, decision.delay_s)
        elif self.http.closing.is_set():  # stopping: no new requests, nothing buried
            self._hand_back(token, rows)
        elif action is Action.SPLIT:
            half = len(rows) // 2
            self._send_and_settle(token, rows[:half])
            self._send_and_settle(token, rows[half:])
        else:
            self._bury(token, rows, answer)

    def _delivered(self, token: int, rows: list[Row]) -> None:
        ids = [r.id for r in rows]
        if not self.deferred.add(token, ids):  # the loop has stopped: delete them now
            self.counts.add("sent", self.queue.delete(token, ids))
        self.window.grow()
        if self._failing:
            self._recovered()
        self.counts.misconfigured = None
        self._misconfigured_in_a_row = 0

    def _delete_delivered(self) -> None:
        delivered = self.deferred.take()
        if delivered:
            self.counts.add("sent", self.queue.delete_many(delivered))
            self._notify_settled()

    def _notify_settled(self) -> None:
        with self._settled:
            self._settled.notify_all()

    def _release(self, token: int, rows: list[Row], error: Exception, delay: float) -> None:
        """A transient failure outlived this cycle's retries: keep the rows, pause."""
        not_before = self.clock() + delay
        if not self._owns_backoffs:  # once per take-over: only we write the file meanwhile
            self.queue.set_backoff_owner(self.destination)
            self._owns_backoffs = True
        released = self.queue.release(token, [r.id for r in rows], not_before)
        self.counts.add("released", released)
        self.pause_until = max(self.pause_until, not_before)
        self._failing = True
        status = getattr(error, "status_code", None)
        telemetry.execute(("segmentry", "release"), {"count": released, "delay_s": delay},
                          {"status_code": status, "queue_path": self.queue.path})
        logger.warning("delivery failed (%s); %d events kept, next attempt in %.1f s",
                       describe(error, self.http.api_url), len(rows), delay)
        self._on_error(error, rows)

    def _recovered(self) -> None:
        """A 2xx after failures: the receiver is back. Rows still waiting out a backoff
        stored during the outage are ready now, so the backlog replays at once."""
        self._failing = False
        self.pause_until = min(self.pause_until, self.clock())
        resumed = self.queue.resume(self.clock())
        if resumed:
            logger.info("receiver is back: %d events waiting out a backoff resume now", resumed)

    def _misconfigured(self, token: int, rows: list[Row], answer: Answer,
                       delay: float) -> None:
        """401/403/404: the key or URL is wrong. Keep everything (no stored backoff, so a
        fixed key and a restart replay at once), log, report, retry slowly; on_error is
        told too (a wrong key is what users alert on), with the events, which stay."""
        status = answer.status or 0
        self.queue.release(token, [r.id for r in rows], 0.0)
        self._misconfigured_in_a_row += 1
        self.pause_until = max(self.pause_until, self.clock() + delay)
        if self.counts.misconfigured != status:
            logger.error("receiver answered HTTP %d: check the write key and api_url (%s); "
                         "nothing is dropped, retrying every %.0f s at most",
                         status, self.http.api_url, MISCONFIGURED_DELAY_S[1])
        self.counts.misconfigured = status
        telemetry.execute(("segmentry", "misconfigured"), {"count": len(rows)},
                          {"status_code": status, "queue_path": self.queue.path})
        self._on_error(HTTPStatusError(status, False, answer.text), rows)

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

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, wake: threading.Event, drain: bool = False,
            deadline: float | None = None) -> bool:
        """Claim and send until ``stop`` (or, with ``drain``, until the queue is empty,
        a misconfiguration, or the monotonic ``deadline``). Return whether it drained."""
        self._pool = Senders(self.options.max_in_flight, self.deliver, self._done)
        self.deferred.switch(True)
        try:
            return self._loop(stop, wake, drain, deadline)
        finally:
            self._pool.shutdown()
            self.deferred.switch(False)
            self._delete_delivered()  # what was left for a claim that will not come

    def _loop(self, stop: threading.Event, wake: threading.Event, drain: bool,
              deadline: float | None) -> bool:
        while not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._renew_leases()
            self._tick()
            if drain and self.counts.misconfigured:
                return False
            if self._paused(stop):
                continue
            free = self._free_slots()
            if not free:
                continue
            claims = self._delete_and_claim(free, partial=self._partial_ok(drain))
            if not claims:
                if self._idle(drain):
                    return True
                self._wait(stop, wake, drain)
                continue
            self._claimed_at = time.monotonic()
            for claim in claims:
                self._submit(claim)
            self.upkeep.run(empty=False, now=self.clock())
            if not drain and len(claims) < free:  # nothing more is ready to go now
                self._wait(stop, wake, drain)
        return False

    def _paused(self, stop: threading.Event) -> bool:
        """Wait out a stored backoff or a Retry-After; a new pause halves the window."""
        gate = self.http.paused_until()
        if gate > self._gate_seen:
            self._gate_seen = gate
            self.window.shrink()
        # Each deadline against its own clock: the stored backoff is epoch time, the HTTP
        # client's shared pause is on its clock (injectable, monotonic by default).
        pause = max(self.pause_until - self.clock(), gate - self.http.clock())
        if pause > 0:
            self._wait_and_delete(stop, stop, min(pause, 1.0))
        return pause > 0

    def _free_slots(self) -> int:
        """How many batches the window lets us claim now (waits a little when none)."""
        with self._settled:
            free = self.window.free(len(self._flying))
            if not free:
                self._settled.wait(0.2)
        return free

    def _partial_ok(self, drain: bool) -> bool:
        """Whether a batch that is not full may go now (see ``_due``)."""
        hurry = self.hurry.is_set()
        self.hurry.clear()
        return drain or self._due or hurry

    def _submit(self, claim: Claim) -> None:
        with self._settled:
            self._flying[id(claim)] = claim
        assert self._pool is not None
        self._pool.submit(claim)

    def _done(self, claim: Claim) -> None:
        with self._settled:
            self._flying.pop(id(claim), None)
            self._settled.notify_all()

    def _idle(self, drain: bool) -> bool:
        """Nothing ready. Return True when a drain is complete (the queue is empty)."""
        with self._settled:
            flying = len(self._flying)
        if flying:
            return False
        self._delete_delivered()  # what settled since the claim, so empty means empty
        empty = not self.queue.pending(0, 2**63 - 1)
        self.upkeep.run(empty, self.clock())
        return drain and empty

    def _wait(self, stop: threading.Event, wake: threading.Event, drain: bool) -> None:
        """Between cycles: until batch_every_ms passes, a producer wakes us, or (draining)
        a batch in flight settles."""
        if drain:
            with self._settled:
                if self._flying:
                    self._settled.wait(0.5)
                    return
            stop.wait(0.05)  # only rows in backoff are left: look again shortly
            return
        self._due = not self._wait_and_delete(stop, wake, self.options.batch_every_ms / 1000.0)
        wake.clear()
        if not self._due and not stop.is_set():  # a stop wakes the loop too: no gather
            self._gather()

    def _gather(self) -> None:
        """Woken by a producer of this process at a full batch: wait until GATHER_S has
        passed since the last claim, so that the batches filling meanwhile join the next
        claim (one transaction, one wake of this thread); flush() and Background.stop()
        cut it short."""
        if self.options.sender == "immediate":  # one event a request, sent at once
            return
        delay = self._claimed_at + GATHER_S - time.monotonic()
        if delay > 0:
            self.hurry.wait(delay)

    def _wait_and_delete(self, stop: threading.Event, event: threading.Event,
                         seconds: float) -> bool:
        """Wait up to ``seconds`` for ``event`` (or ``stop``); return whether it was set.
        No claim comes meanwhile to delete what is delivered, so while batches are in
        flight or delivered, delete them every DELETE_LAG_S."""
        end = time.monotonic() + seconds
        while not stop.is_set() and (left := end - time.monotonic()) > 0:
            unsettled = self._unsettled()
            if not unsettled and self.on_cycle is None:
                return event.wait(left)
            if event.wait(min(left, DELETE_LAG_S if unsettled else TICK_S)):
                return True
            if unsettled:
                self._delete_delivered()
                self._renew_leases()
            self._tick()
        return event.is_set()

    def _tick(self) -> None:
        if self.on_cycle is not None:
            try:
                self.on_cycle()
            except Exception:  # a status line must never stop delivery
                logger.exception("the flusher's on_cycle hook failed")

    def paused_until(self) -> float:
        """Until when (epoch seconds, ``clock()``) no batch goes: a stored backoff, an
        outage or a Retry-After; in the past when nothing holds delivery."""
        gate = self.http.paused_until() - self.http.clock()
        return max(self.pause_until, self.clock() + gate)

    def _renew_leases(self) -> None:
        """A sender may hold its batch longer than a lease (retry_attempts waits of up to
        300 s each): renew the leases in flight well before they expire, or the next
        claim would take their rows while the sender still tries them (duplicates)."""
        now = self.clock()
        if now - self._renewed_at < RENEW_S:
            return
        self._renewed_at = now
        with self._settled:
            tokens = {claim.token for claim in self._flying.values()}
        try:
            self.queue.renew(tokens, now + LEASE_S)
        except SegmentryError as exc:  # tried again at the next cycle
            logger.warning("could not renew the leases of batches in flight: %s", exc)

    def _unsettled(self) -> bool:
        """Whether a batch is in flight or delivered but not yet deleted."""
        with self._settled:
            if self._flying:
                return True
        return self.deferred.pending()

    def wait_settled(self, timeout: float) -> None:
        """Block until a batch in flight settles (or timeout)."""
        with self._settled:
            self._settled.wait(timeout)

    def finish(self, grace: float) -> None:
        """Let the batches in flight settle for up to ``grace`` seconds, then abort
        their retries and give their rows back (a sender still busy with one can only
        make it sent twice, never lost: its settle finds the lease gone)."""
        end = time.monotonic() + grace
        if self.http.paused_until() - self.http.clock() >= grace:
            self.http.close()  # a Retry-After outlasts the grace: give the rows back now
        with self._settled:
            while self._flying and time.monotonic() < end:
                self._settled.wait(end - time.monotonic())
            unsettled = list(self._flying.values())
        self.http.close()
        for claim in unsettled:  # given back now, not left leased for LEASE_S
            try:
                self._hand_back(claim.token, claim.rows)
            except SegmentryError as exc:  # leased still: the next flusher resets them
                logger.warning("could not give back a batch in flight: %s", exc)

    def _hand_back(self, token: int, rows: list[Row]) -> None:
        """Stopping: give the rows back at once, ready for the next flusher."""
        self.counts.add("released", self.queue.release(token, [r.id for r in rows], 0.0))


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


class Window:
    """How many batches may be in flight: additive increase, multiplicative decrease,
    as TCP does. Without it, N hosts x max_in_flight batches all retried together after
    each Retry-After, and a rate-limited receiver refused a third of all requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = float(limit)
        self._lock = threading.Lock()

    def free(self, in_flight: int) -> int:
        return max(0, int(self.size) - in_flight)

    def grow(self) -> None:
        """A delivered batch: one more in flight per window's worth of successes."""
        with self._lock:
            self.size = min(float(self.limit), self.size + 1.0 / self.size)

    def shrink(self) -> None:
        """The receiver asked to slow down (429, an outage): halve, down to one."""
        with self._lock:
            self.size = max(1.0, self.size / 2)


class Senders:
    """``size`` daemon threads that deliver claims. Daemons, unlike ThreadPoolExecutor's
    workers, never hold up a process exit behind a hung request: Flusher.finish gives
    their rows back (or, if the process dies, the next flusher resets their leases)."""

    def __init__(self, size: int, deliver: Callable[[Claim], None],
                 done: Callable[[Claim], None]) -> None:
        self._work: queue.SimpleQueue[Claim | None] = queue.SimpleQueue()
        self._deliver, self._done = deliver, done
        self._threads = [threading.Thread(target=self._serve, name=f"segmentry-send-{i}",
                                          daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, claim: Claim) -> None:
        self._work.put(claim)

    def shutdown(self) -> None:
        """Each thread ends after the claims already submitted."""
        for _ in self._threads:
            self._work.put(None)

    def _serve(self) -> None:
        while (claim := self._work.get()) is not None:
            try:
                self._deliver(claim)
            except Exception:  # a storage failure while settling: the lease stays
                logger.exception("delivering a batch failed")
            finally:
                self._done(claim)


def _answer(send: Callable[[], requests.Response]) -> Answer:
    """The one place a request's result becomes an Answer: the response read once, or
    the NetworkError that stands for it: no answer at all, or an unexpected failure below
    us (a custom adapter's bug), whose rows are then released and retried like a network
    failure's, not left leased until the lease runs out."""
    try:
        response = send()
    except NetworkError as exc:
        return Answer(None, error=exc)
    except Exception as exc:
        logger.exception("sending a batch failed unexpectedly; its events are kept")
        return Answer(None, error=NetworkError(f"sending failed: {type(exc).__name__}"))
    return Answer(response.status_code, http.retry_after_s(response), _text(response))


def _text(response: requests.Response) -> str:
    try:
        return str(response.text)[:2000]
    except Exception:
        return ""


def destination(api_url: str, write_key: str) -> str:
    """Where a flusher sends, as recorded beside the backoffs it stores: the URL and a
    short hash of the key (never the key)."""
    digest = hashlib.sha256(write_key.encode("utf-8", "replace")).hexdigest()[:12]
    return f"{api_url} key sha256:{digest}"


