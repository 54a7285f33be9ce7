"""The flusher: one claim -> send -> delete/release/bury cycle, the loop around it with
up to max_in_flight batches in flight, the one-flusher-per-queue lock (an flock on a
separate file), the in-process Background thread, and ``main(argv)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import threading
import time
import urllib.parse
from typing import Any, Callable

from . import http, messages, telemetry
from .config import Options
from .exceptions import HTTPStatusError, NetworkError, SegmentryError, StorageError
from .storage import Claim, Delivered, Row, SQLiteQueue

logger = logging.getLogger(__name__)

LEASE_S = 600.0  # a backstop only: a new lock holder resets every lease at once
RENEW_S = LEASE_S / 4  # the leases of batches in flight are renewed this often
TICK_S = 1.0  # with an on_cycle hook, the loop calls it at least this often, even idle
CYCLE_DELAY_CAP_S = 60.0  # the longest pause after a cycle's retries ran out: how
# late, at worst, the end of a long outage is noticed
MISCONFIGURED_DELAY_S = (5.0, 300.0)  # first and longest slow retry after a 401/403/404
LOCK_POLL_S = 0.5  # how often a standby flusher tries the lock
RESTART_S = 5.0  # an in-process flusher that failed unexpectedly starts again after this
STOP_GRACE_S = 2.0  # the longest a stopping flusher thread lets the batches in flight settle
MAINTAIN_EVERY_S = 1.0  # WAL checkpoint cadence of a flusher process
# And beside this process's producers (the flusher thread). At 25 k events/s they write
# ~140 MB of WAL a second (a page per commit); it must start over before their own
# checkpoint at 64 MB (PRODUCER_AUTOCHECKPOINT), a 75 ms stall with their lock held.
THREAD_MAINTAIN_EVERY_S = 0.25
TAIL_FRAMES = 2048  # what that checkpoint may leave undone for the one under their lock
# How long a delivered batch may wait for the next claim to delete it (a claim comes
# with every full batch while producers are busy: half the write transactions).
DELETE_LAG_S = 0.05
# While producers of this process fill batches faster than this, the batches that fill
# within it of the last claim go in one claim: a claim at every full batch cost them
# ~10 % of their rate (loop CPU 8.3 -> 5.7 µs an event, benchmarks/thread_cpu.py).
GATHER_S = 0.02
FLUSHER_AUTOCHECKPOINT = 1000  # pages: the flusher's commits checkpoint, producers' do not
# The stored bodies (plus a comma each) a claim may take: the request stays under 500 KB.
CLAIM_BYTES = messages.MAX_BATCH_BYTES - messages.BATCH_OVERHEAD


class Outcome:
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
        return (f"Outcome(sent={self.sent}, buried={self.buried}, released={self.released}, "
                f"misconfigured={self.misconfigured})")


class Flusher:
    """Delivers one queue file. Only the holder of the queue's lock runs one (see Lock)."""

    def __init__(self, queue: SQLiteQueue, client: http.HTTPClient, options: Options,
                 clock: Callable[[], float] = time.time,
                 checkpoints: SQLiteQueue | None = None) -> None:
        self.queue = queue
        # A second connection to run the WAL checkpoints on, when ``queue`` is shared with
        # producers: on the shared one they would stall every producer of the process.
        self.checkpoints = checkpoints
        self.http = client
        self.options = options
        self.clock = clock
        self.outcome = Outcome()
        self.pause_until = 0.0  # epoch seconds; no claim before (an outage pauses everything)
        self._misconfig_delay = MISCONFIGURED_DELAY_S[0]
        self.destination = destination(getattr(client, "api_url", ""),
                                       getattr(client, "write_key", ""))
        self._owns_backoffs = False  # whether the file names us as the backoffs' owner
        self.window = Window(options.max_in_flight)
        self._gate_seen = client.paused_until()  # the shared pause last noticed
        self._failing = False  # a transient failure since the last 2xx
        self._pool: Senders | None = None
        self._settled = threading.Condition()
        self._flying: dict[int, Claim] = {}  # the claims in the senders' hands, by id()
        self._last_maintain = 0.0
        self._maintain_every_s = (MAINTAIN_EVERY_S if checkpoints is None
                                  else THREAD_MAINTAIN_EVERY_S)
        # While the loop runs flat out, senders leave what they delivered here and the
        # next claim deletes it in its own transaction. A sender deleting it itself took
        # the connection's lock once more per batch, and a thread holding that lock waits
        # for the GIL behind the other senders: claims and deletes took 2-4 ms each.
        self._delivered: list[Delivered] = []
        self._delivered_lock = threading.Lock()
        self._batching = False  # True while the loop runs; False once it stops
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
        if self.checkpoints is None:  # this connection's commits checkpoint, not producers'
            self.queue.set_autocheckpoint(FLUSHER_AUTOCHECKPOINT)
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

    def claim(self, batches: int = 1, partial: bool = True) -> list[Claim]:
        """Up to ``batches`` batches, oldest first (an empty list: nothing is ready);
        without ``partial``, full batches only."""
        limit = 1 if self.options.sender == "immediate" else self.options.max_batch_size
        meta = {"queue_path": self.queue.path}
        delivered = self._take_delivered()
        try:
            with telemetry.span(("segmentry", "claim"), meta) as span:
                claims = self.queue.claim_batches(batches, limit, CLAIM_BYTES, self.clock(),
                                                  LEASE_S, delivered, partial)
                # "status" as every stop has it, so one handler can serve all spans.
                span.set(claimed=sum(len(c.rows) for c in claims.batches), status="ok")
        except BaseException:
            self._give_back(delivered)  # still delivered: deleted by a later claim
            raise
        self.outcome.add("sent", claims.deleted)
        if delivered:
            self._notify_settled()  # flush() waits for those deletes
        return claims.batches

    def run_once(self) -> int:
        """One synchronous claim/send cycle; return how many events it claimed."""
        claimed = 0
        for claim in self.claim():
            self.deliver(claim)
            claimed += len(claim.rows)
        return claimed

    def deliver(self, claim: Claim) -> None:
        """Send a claimed batch and settle its rows by the answer."""
        if self.options.sender == "immediate":
            for row in claim.rows:
                self._settle(claim.token, [row], self._post_event(row))
        else:
            self._send_and_settle(claim.token, claim.rows)

    def _send_and_settle(self, token: int, rows: list[Row]) -> None:
        self._settle(token, rows, self._post([r.body for r in rows]))

    def _post(self, bodies: list[str]) -> Any:
        self.outcome.add("requests", 1)
        return _answer(lambda: http.post_batch(self.http, bodies))

    def _post_event(self, row: Row) -> Any:
        self.outcome.add("requests", 1)
        return _answer(lambda: http.post_event(self.http, messages.type_of(row.body), row.body))

    def _settle(self, token: int, rows: list[Row], answer: Any) -> None:
        ids = [r.id for r in rows]
        if isinstance(answer, NetworkError):
            return self._release(token, rows, answer, None)
        verdict = http.classify(answer.status_code)
        if verdict == "ok":
            self._delete(token, ids)
            self.window.grow()
            if self._failing:
                self._recovered()
            self.outcome.misconfigured = None
            self._misconfig_delay = MISCONFIGURED_DELAY_S[0]
        elif verdict == "retry":
            error = HTTPStatusError(answer.status_code, True, _text(answer))
            self._release(token, rows, error, http.retry_after_s(answer))
        elif verdict == "misconfigured":
            self._misconfigured(token, rows, answer)
        else:
            self._reject(token, rows, answer)

    def _delete(self, token: int, ids: list[int]) -> None:
        with self._delivered_lock:
            if self._batching:
                self._delivered.append((token, ids))
                return
        self.outcome.add("sent", self.queue.delete(token, ids))

    def _take_delivered(self) -> list[Delivered]:
        with self._delivered_lock:
            delivered, self._delivered = self._delivered, []
        return delivered

    def _give_back(self, delivered: list[Delivered]) -> None:
        with self._delivered_lock:
            self._delivered[:0] = delivered

    def _batch_deletes(self, on: bool) -> None:
        """Switch between deletes left for the next claim (on: while the loop runs; its
        waits delete them too, see _sleep) and deletes by the senders themselves (off:
        the loop has stopped). Switching off deletes what is left at once."""
        with self._delivered_lock:
            self._batching = on
        if not on:
            self._delete_delivered()

    def _delete_delivered(self) -> None:
        delivered = self._take_delivered()
        if delivered:
            self.outcome.add("sent", self.queue.delete_many(delivered))
            self._notify_settled()

    def _notify_settled(self) -> None:
        with self._settled:
            self._settled.notify_all()

    def _release(self, token: int, rows: list[Row], error: Exception,
                 retry_after: float | None) -> None:
        """A transient failure outlived this cycle's retries: keep the rows, pause."""
        attempts = max(r.attempts for r in rows) + 1
        delay = retry_after if retry_after is not None else self._cycle_delay(attempts)
        not_before = self.clock() + delay
        if not self._owns_backoffs:  # once per take-over: only we write the file meanwhile
            self.queue.set_backoff_owner(self.destination)
            self._owns_backoffs = True
        released = self.queue.release(token, [r.id for r in rows], not_before)
        self.outcome.add("released", released)
        self.pause_until = max(self.pause_until, not_before)
        self._failing = True
        status = getattr(error, "status_code", None)
        telemetry.execute(("segmentry", "release"), {"count": released, "delay_s": delay},
                          {"status_code": status, "queue_path": self.queue.path})
        logger.warning("delivery failed (%s); %d events kept, next attempt in %.1f s",
                       _describe(error, self.http.api_url), len(rows), delay)
        self._on_error(error, rows)

    def _recovered(self) -> None:
        """A 2xx after failures: the receiver is back. Rows still waiting out a backoff
        stored during the outage are ready now, so the backlog replays at once."""
        self._failing = False
        self.pause_until = min(self.pause_until, self.clock())
        resumed = self.queue.resume(self.clock())
        if resumed:
            logger.info("receiver is back: %d events waiting out a backoff resume now", resumed)

    def _cycle_delay(self, attempts: int) -> float:
        base = self.options.retry_expiry / 1000.0 * 2 ** min(attempts - 1, 16)
        return float(min(CYCLE_DELAY_CAP_S, base) * random.uniform(0.5, 1.0))

    def _misconfigured(self, token: int, rows: list[Row], answer: Any) -> None:
        """401/403/404: the key or URL is wrong. Keep everything (no stored backoff, so a
        fixed key and a restart replay at once), log, report, retry slowly; on_error is
        told too (a wrong key is what users alert on), with the events, which stay."""
        status = answer.status_code
        self.queue.release(token, [r.id for r in rows], 0.0)
        delay = self._misconfig_delay
        self._misconfig_delay = min(delay * 2, MISCONFIGURED_DELAY_S[1])
        self.pause_until = max(self.pause_until, self.clock() + delay)
        if self.outcome.misconfigured != status:
            logger.error("receiver answered HTTP %d: check the write key and api_url (%s); "
                         "nothing is dropped, retrying every %.0f s at most",
                         status, self.http.api_url, MISCONFIGURED_DELAY_S[1])
        self.outcome.misconfigured = status
        telemetry.execute(("segmentry", "misconfigured"), {"count": len(rows)},
                          {"status_code": status, "queue_path": self.queue.path})
        self._on_error(HTTPStatusError(status, False, _text(answer)), rows)

    def _reject(self, token: int, rows: list[Row], answer: Any) -> None:
        """400/413/other 4xx: split the batch to isolate what the receiver refuses."""
        if self.http.closing.is_set():  # stopping: no new requests
            self._hand_back(token, rows)
            return
        if len(rows) > 1:
            half = len(rows) // 2
            self._send_and_settle(token, rows[:half])
            self._send_and_settle(token, rows[half:])
            return
        body = _text(answer)
        moved = self.queue.bury(token, [rows[0].id], answer.status_code, body, self.clock())
        self.outcome.add("buried", moved)
        logger.error("receiver refused an event with HTTP %d; moved to dead letters",
                     answer.status_code)
        telemetry.execute(("segmentry", "dead_letter"), {"count": moved},
                          {"status_code": answer.status_code, "queue_path": self.queue.path})
        self._on_error(HTTPStatusError(answer.status_code, False, body), rows)

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
        self._batch_deletes(True)
        try:
            return self._loop(stop, wake, drain, deadline)
        finally:
            self._pool.shutdown()
            self._batch_deletes(False)

    def _loop(self, stop: threading.Event, wake: threading.Event, drain: bool,
              deadline: float | None) -> bool:
        while not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._renew_leases()
            self._tick()
            if drain and self.outcome.misconfigured:
                return False
            if self._paused(stop):
                continue
            free = self._free_slots()
            if not free:
                continue
            claims = self.claim(free, partial=self._partial_ok(drain))
            if not claims:
                if self._idle(drain):
                    return True
                self._wait(stop, wake, drain)
                continue
            self._claimed_at = time.monotonic()
            for claim in claims:
                self._submit(claim)
            self._maintain(empty=False)
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
            self._sleep(stop, stop, min(pause, 1.0))
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
        if empty or self.clock() - self._last_maintain > self._maintain_every_s:
            self._maintain(empty)
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
        self._due = not self._sleep(stop, wake, self.options.batch_every_ms / 1000.0)
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

    def _sleep(self, stop: threading.Event, event: threading.Event, seconds: float) -> bool:
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
        with self._delivered_lock:
            return bool(self._delivered)

    def _maintain(self, empty: bool) -> None:
        now = self.clock()
        if not empty and now - self._last_maintain < self._maintain_every_s:
            return
        self._last_maintain = now
        try:
            left = (self.checkpoints or self.queue).maintain(empty)
            if self.checkpoints is not None and left is not None and left <= TAIL_FRAMES:
                # The checkpoint above ran beside this process's producers and never
                # reaches the WAL's end while they commit, so the WAL never started over.
                # The frames they added meanwhile, checkpointed under their lock, take a
                # few ms; the WAL starts over at the next write.
                self.queue.checkpoint()
        except SegmentryError as exc:
            logger.warning("queue maintenance failed: %s", exc)

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
        self.outcome.add("released", self.queue.release(token, [r.id for r in rows], 0.0))


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


def _answer(post: Callable[[], Any]) -> Any:
    """The response, or the NetworkError that stands for it: no answer at all, or an
    unexpected failure below us (a custom adapter's bug), whose rows are then released
    and retried like a network failure's, not left leased until the lease runs out."""
    try:
        return post()
    except NetworkError as exc:
        return exc
    except Exception as exc:
        logger.exception("sending a batch failed unexpectedly; its events are kept")
        return NetworkError(f"sending failed: {type(exc).__name__}")


def _text(answer: Any) -> str:
    try:
        return http.printable(str(answer.text)[:2000])  # a server's bytes, for logs
    except Exception:
        return ""


def _describe(error: Exception, api_url: str = "") -> str:
    """The failure in a few words for the log line: the status, or what stood in the
    way of an answer."""
    if isinstance(error, HTTPStatusError):
        return f"HTTP {error.status_code}"
    if isinstance(error, NetworkError) and not error.retryable:
        return str(error)  # why no retry can help: a refused certificate, a bad header
    cause = _cause(error, api_url)
    return f"{type(error).__name__}: {cause}" if cause else type(error).__name__


_DNS_FAILURES = ("Name or service not known", "nodename nor servname", "getaddrinfo failed",
                 "Temporary failure in name resolution", "No address associated",
                 "gaierror")
_PROXY_FAILURES = ("ProxyError", "Unable to connect to proxy", "Tunnel connection failed")
_TLS_VERIFY = re.compile(r"certificate verify failed: ([^()'\"]+)")
_CA_PATH = re.compile(r"invalid path: ([^\s()'\"]+)")


def _cause(error: BaseException, api_url: str) -> str:
    """What stood in the way of an answer, from the texts of the error's chain: the
    exceptions below requests carry neither a request body nor the write key (which
    travels in a header only). Empty when nothing is known."""
    chain = _chain(error)
    text = " ".join(f"{type(e).__name__} {e}" for e in chain)
    where = _host_port(api_url)
    innermost = _short(str(chain[-1]))
    if verify := _TLS_VERIFY.search(text):
        return f"TLS verification failed for {where}: {verify.group(1).strip()}"
    if "CA certificate bundle" in text:
        path = _CA_PATH.search(text)
        return f"CA bundle missing: {path.group(1) if path else innermost}"
    if any(s in text for s in _PROXY_FAILURES):
        return f"cannot go through the proxy: {innermost}"
    if any(s in text for s in _DNS_FAILURES):
        return f"DNS lookup failed for {where.rsplit(':', 1)[0]}: {innermost}"
    if "Connection refused" in text:
        return f"connection refused by {where}"
    if "timed out" in text.lower() or "Timeout" in text:
        return f"timed out talking to {where}"
    if "SSL" in text:
        return f"TLS failed with {where}: {innermost}"
    return innermost if chain[-1] is not error else ""


def _chain(error: BaseException) -> list[BaseException]:
    """The error and what caused it, outermost first (a cycle is cut)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _short(text: str) -> str:
    return re.sub(r"^\[Errno -?\d+\] ", "", text)[:200]


def _host_port(api_url: str) -> str:
    parts = urllib.parse.urlsplit(api_url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return parts.netloc
    return f"{parts.hostname}:{port}"


def destination(api_url: str, write_key: str) -> str:
    """Where a flusher sends, as recorded beside the backoffs it stores: the URL and a
    short hash of the key (never the key)."""
    digest = hashlib.sha256(write_key.encode("utf-8", "replace")).hexdigest()[:12]
    return f"{api_url} key sha256:{digest}"


class Lock:
    """One active flusher per queue file: an ``flock`` on ``<queue>.lock`` (never the
    database, -wal or -shm: closing a descriptor of those drops SQLite's own locks), and
    the holder's pid in ``<queue>.flusher`` for ``segmentry status``. The directory may be
    group-writable (the shared layout), so neither file is opened through a symbolic link
    nor truncated in place: a group member cannot aim them at a file the flusher's user
    can write."""

    def __init__(self, queue_path: str) -> None:
        self.path = queue_path + ".lock"
        self.pid_path = queue_path + ".flusher"
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the lock, polling for up to ``timeout`` seconds; return whether we hold it."""
        fd = self._open()
        end = time.monotonic() + timeout
        while not _try_flock(fd):
            if time.monotonic() >= end:
                os.close(fd)
                return False
            time.sleep(min(LOCK_RETRY_S, max(0.0, end - time.monotonic())))
        self._fd = fd
        try:  # best effort: a pid file we cannot write must not cost us the lock
            _write_pid(self.pid_path)
        except OSError as exc:  # e.g. a directory we may not write
            logger.warning("cannot write %s (%s): `segmentry status` will not name this "
                           "flusher", self.pid_path, exc.strerror)
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.pid_path)
            except OSError:  # gone, or one we could not write either (see acquire)
                pass
            os.close(self._fd)  # closing the descriptor ends the flock
            self._fd = None

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking, which
        would free the parent's lock (an flock belongs to the shared descriptor)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        """The lock file, created 0660 (the apps of a host that share the queue's group
        may stand by too), never through a link and never truncated."""
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o660)
                os.fchmod(fd, 0o660)  # the umask must not take the group's write bit
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR | _NOFOLLOW)
        except OSError as exc:  # ELOOP: a symbolic link where the lock file should be
            raise StorageError(f"cannot open the flusher lock file {self.path}: "
                               f"{exc.strerror}") from exc
        return fd


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
LOCK_RETRY_S = 0.05  # how often a waiting acquire() tries the lock again


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_pid(path: str) -> None:
    """Our pid, and our start time where /proc tells it (see holder_pid): written to a
    new file of our own, then renamed over the old one (a rename replaces a link, it
    does not follow it)."""
    pid = os.getpid()
    start = _started(pid)
    temporary = f"{path}.{pid}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # a crashed flusher's of the same pid
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:  # a pid is no secret
        f.write(f"{pid}\n" if start is None else f"{pid} {start}\n")
    os.replace(temporary, path)


def holder_pid(queue_path: str) -> int | None:
    """The pid of the process holding the queue's flusher lock, or None. Read from the
    pid file, never by probing the lock: a probe could make a starting flusher think
    another holds it. A pid file left by a SIGKILLed flusher names a dead process, or,
    after a reboot or enough forks, another one: the start time tells them apart."""
    try:
        with open(queue_path + ".flusher") as f:
            fields = [int(v) for v in f.read().split()]
    except (OSError, ValueError):
        return None
    if not fields or fields[0] <= 0:
        return None
    pid = fields[0]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's process
    if len(fields) > 1 and _started(pid) not in (None, fields[1]):
        return None  # the pid was reused
    return pid


def _started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot: /proc/<pid>/stat's field 22), or None
    where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_line = f.read()
        return int(stat_line[stat_line.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def make_http(write_key: str, options: Options) -> http.HTTPClient:
    if not options.send_to_http:
        write_key = write_key or "no-send"  # nothing is sent: no key is needed
    return http.client(
        write_key, options.api_url, retry_attempts=options.retry_attempts,
        retry_start=options.retry_start, retry_expiry=options.retry_expiry, gzip=options.gzip,
        send_to_http=options.send_to_http, **options.requests_options)


class Background:
    """The in-process flusher of a Client: a daemon thread that stands by until it
    holds the queue's lock, then runs the Flusher loop until stopped."""

    def __init__(self, write_key: str, queue: SQLiteQueue, options: Options) -> None:
        self.options = options
        self._key = write_key
        # Claims and deletes go through the Client's own queue object. A second connection
        # would fight the producers for SQLite's write lock (busy retries) and throw away
        # their page cache at each claim and delete; one lock hands over cleanly (measured:
        # +10 % enqueue and end to end, a quarter less CPU an event). Checkpoints, which
        # take milliseconds, run on a connection of their own, beside the producers.
        self.queue = queue
        self._checkpoints = SQLiteQueue(queue.path, options.durability)
        self.flusher = self._new_flusher()
        self.lock = Lock(queue.path)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._enqueued = 0
        self._grace_end = math.inf  # set by stop()
        self._thread = threading.Thread(target=self._main, name="segmentry-flusher",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enqueued(self) -> None:
        """A producer stored one event: wake the loop once a batch is full, or at once
        in immediate mode."""
        self._enqueued += 1
        if self.options.sender == "immediate" or self._enqueued >= self.options.max_batch_size:
            self._enqueued = 0
            self._wake.set()

    def wake(self) -> None:
        """flush(): send what is queued now, full batches or not."""
        self.flusher.hurry.set()
        self._wake.set()

    def wait_cycle(self, timeout: float) -> None:
        self.flusher.wait_settled(timeout)

    def blocked(self) -> int | None:
        """The status (401/403/404) the receiver keeps answering, while it lasts."""
        return self.flusher.outcome.misconfigured

    def stop(self, timeout: float) -> None:
        """Stop the thread, waiting for it ``timeout`` seconds at most; the batches in
        flight get half of that (at most STOP_GRACE_S) to settle, the rest is given
        back. A thread still busy then (a hung request) ends on its own."""
        self._grace_end = time.monotonic() + min(STOP_GRACE_S, timeout / 2)
        self._stop.set()
        self.flusher.hurry.set()  # ends a gather under way (Flusher._gather)
        self._wake.set()
        self._thread.join(timeout)

    def abandon(self) -> None:
        self.lock.abandon()

    def _main(self) -> None:
        """Stand by for the lock, then deliver; an unexpected error restarts the flusher
        (a dead thread would leave flush() waiting and the queue growing)."""
        try:
            while not self._stop.is_set():
                try:
                    if self.lock.acquire(timeout=LOCK_POLL_S):
                        self._deliver()
                except Exception:
                    logger.exception("segmentry flusher failed; restarting in %.0f s",
                                     RESTART_S)
                    self.flusher = self._new_flusher()
                    self._stop.wait(RESTART_S)
        finally:
            # Stopped by Client.close(), which closes the queue too; a thread that outlived
            # its join timeout (a hung request) must not leave a reopened connection.
            self._checkpoints.close()
            self.queue.close()

    def _new_flusher(self) -> Flusher:
        return Flusher(self.queue, make_http(self._key, self.options), self.options,
                       checkpoints=self._checkpoints)

    def _deliver(self) -> None:
        try:
            self.flusher.take_over()
            self.flusher.run(self._stop, self._wake)
        finally:
            self.flusher.finish(grace=self._grace())
            self.lock.release()

    def _grace(self) -> float:
        """How long the batches in flight may settle: STOP_GRACE_S, or what stop() left."""
        return max(0.0, min(STOP_GRACE_S, self._grace_end - time.monotonic()))


# -- the command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m segmentry.flusher``: see service.py."""
    from .service import main as service_main

    return service_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
