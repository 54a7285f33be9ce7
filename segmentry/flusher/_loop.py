"""The flusher loop: claim batches, hand them to sender threads (each settles its own:
see _settle), wait; up to max_in_flight batches in flight, paced by an AIMD window.
Also the in-flight bookkeeping and the lease renewal that keeps a slow sender's rows
its own."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable

from .. import http, messages, telemetry
from ..config import Options
from ..exceptions import SegmentryError
from ..storage import Claim, Queue, Upkeep
from ._routes import Connect, Routes, connector
from ._settle import Counts, Settler

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


class Flusher:
    """Delivers one queue file, every destination its events carry, each on its own
    route (see _routes); ``client``: the flusher's own key and URL, for the events that
    carry none (None: no key of its own, those wait). ``connect`` makes the clients of
    the others (by default, with the flusher's options). Only the holder of the queue's
    lock runs one (see Lock)."""

    def __init__(self, queue: Queue, client: http.HTTPClient | None, options: Options,
                 clock: Callable[[], float] = time.time,
                 checkpoints: Queue | None = None, connect: Connect | None = None) -> None:
        self.queue, self.http_client, self.options, self.clock = queue, client, options, clock
        self.upkeep = Upkeep(queue, checkpoints)
        self.window = Window(options.max_in_flight)
        self.routes = Routes(queue, client, connect or connector(options))
        self.settler = Settler(queue, self.routes, options, clock, self.window.grow)
        self.counts: Counts = self.settler.counts
        self.deferred = self.settler.deferred
        self.in_flight = InFlight()
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
        self.settler.take_over()

    @property
    def pause_until(self) -> float:
        """Epoch seconds: the latest of the destinations' pauses (a stored backoff, an
        outage), during which no claim takes their rows."""
        return max(route.pause_until for route in self.routes.all())

    def misconfigured(self) -> str | None:
        """What is wrong with the flusher's own key, URL or CA bundle, while it lasts."""
        return self.routes.get(0).misconfigured

    def failing(self) -> str | None:
        """Why delivery to the flusher's own URL fails, while it does (an outage)."""
        return self.routes.get(0).failing

    def _delete_and_claim(self, batches: int = 1, partial: bool = True,
                          skip_paused: bool = False) -> list[Claim]:
        """Delete what the senders delivered meanwhile (see Deferred), and claim up to
        ``batches`` batches, oldest first, in one transaction (an empty list: nothing is
        ready); without ``partial``, full batches only. Never the rows no key can send;
        with ``skip_paused``, none of the paused destinations' either."""
        limit = 1 if self.options.sender == "immediate" else self.options.max_batch_size
        meta = {"queue_path": self.queue.path}
        delivered = self.deferred.take()
        try:
            with telemetry.span(("segmentry", "claim"), meta) as span:
                now = self.clock()
                claims = self.queue.claim_batches(batches, limit, CLAIM_BYTES, now, LEASE_S,
                                                  delivered, partial,
                                                  self.routes.paused(now) if skip_paused
                                                  else self.routes.keyless())
                # "status" as every stop has it, so one handler can serve all spans.
                span.set(claimed=sum(len(c.rows) for c in claims.batches), status="ok")
        except BaseException:
            self.deferred.give_back(delivered)  # still delivered: deleted by a later claim
            raise
        self.counts.add("sent", claims.deleted)
        if delivered:
            self.in_flight.notify()  # flush() waits for those deletes
        return claims.batches

    def run_once(self) -> int:
        """One synchronous claim/send cycle; return how many events it claimed."""
        claimed = 0
        for claim in self._delete_and_claim():
            self.settler.deliver(claim)
            claimed += len(claim.rows)
        return claimed

    def _delete_delivered(self) -> None:
        delivered = self.deferred.take()
        if delivered:
            self.counts.add("sent", self.queue.delete_many(delivered))
            self.in_flight.notify()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event, wake: threading.Event, drain: bool = False,
            deadline: float | None = None) -> bool:
        """Claim and send until ``stop`` (or, with ``drain``, until the queue is empty,
        a misconfiguration, or the monotonic ``deadline``). Return whether it drained."""
        senders = Senders(self.options.max_in_flight, self.settler.deliver, self.in_flight)
        self.deferred.switch(True)
        try:
            return self._loop(senders, stop, wake, drain, deadline)
        finally:
            senders.shutdown()
            self.deferred.switch(False)
            self._delete_delivered()  # what was left for a claim that will not come

    def _loop(self, senders: Senders, stop: threading.Event, wake: threading.Event,
              drain: bool, deadline: float | None) -> bool:
        while not stop.is_set():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._renew_leases()
            self._tick()
            if drain and self._only_blocked_left():
                return False
            if self._paused(stop):
                continue
            free = self.in_flight.free_slots(self.window)
            if not free:
                continue
            claims = self._delete_and_claim(free, self._partial_ok(drain), skip_paused=True)
            if not claims:
                if self._idle(drain):
                    return True
                self._wait(stop, wake, drain)
                continue
            self._claimed_at = time.monotonic()
            for claim in claims:
                senders.submit(claim)
            self.upkeep.run(empty=False, now=self.clock())
            if not drain and len(claims) < free:  # nothing more is ready to go now
                self._wait(stop, wake, drain)
        return False

    def _only_blocked_left(self) -> bool:
        """Draining: whether all that is left waits for a fix (a destination whose key or
        URL is refused, events no key of ours can send), the others delivered; until
        then a refused source does not stop the drain of the others."""
        if not (self.counts.misconfigured or self.settler.keyless_waiting):
            return False
        if self.in_flight.count():
            return False
        blocked = [d for r in self.routes.all() if r.misconfigured or r.http_client is None
                   for d in r.dests]
        self._delete_delivered()
        return not self.queue.pending_except(blocked)

    def _paused(self, stop: threading.Event) -> bool:
        """When every destination that has rows to go is paused (a stored backoff, an
        outage, a Retry-After), wait it out; a new pause halves the window. A paused
        destination among others only has its rows skipped by the claims."""
        routes = self.routes.all()
        if any(route.new_gate() for route in routes):
            self.window.shrink()
        now = self.clock()
        live = [r for r in routes if r.http_client is not None]
        if not live or any(not r.paused(now) for r in live):
            return False
        # Each deadline against its own clock: the stored backoff is epoch time, the HTTP
        # client's shared pause is on its clock (injectable, monotonic by default).
        pause = min(r.paused_until(now) for r in live) - now
        if pause > 0:
            self._wait_and_delete(stop, stop, min(pause, 1.0))
        return pause > 0

    def _partial_ok(self, drain: bool) -> bool:
        """Whether a batch that is not full may go now (see ``_due``)."""
        hurry = self.hurry.is_set()
        self.hurry.clear()
        return drain or self._due or hurry

    def _idle(self, drain: bool) -> bool:
        """Nothing ready. Return True when a drain is complete (the queue is empty)."""
        if self.in_flight.count():
            return False
        self._delete_delivered()  # what settled since the claim, so empty means empty
        empty = not self.queue.pending(0, 2**63 - 1)
        self.upkeep.run(empty, self.clock())
        return drain and empty

    def _wait(self, stop: threading.Event, wake: threading.Event, drain: bool) -> None:
        """Between cycles: until batch_every_ms passes, a producer wakes us, or (draining)
        a batch in flight settles."""
        if drain:
            if not self.in_flight.wait_if_any(0.5):
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
        flight or delivered, delete them every DELETE_LAG_S; and the WAL upkeep keeps its
        cadence (producers of other processes, who cannot wake us, write meanwhile)."""
        end = time.monotonic() + seconds
        while not stop.is_set() and (left := end - time.monotonic()) > 0:
            unsettled = self._unsettled()
            if event.wait(min(left, DELETE_LAG_S if unsettled else TICK_S,
                              self.upkeep.every_s)):
                return True
            if unsettled:
                self._delete_delivered()
                self._renew_leases()
            self.upkeep.run(empty=False, now=self.clock())
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
        outage or a Retry-After of every destination that can send; in the past when
        nothing holds delivery."""
        now = self.clock()
        live = [r for r in self.routes.all() if r.http_client is not None]
        return min((r.paused_until(now) for r in live), default=now)

    def _renew_leases(self) -> None:
        """A sender may hold its batch longer than a lease (retry_attempts waits of up to
        300 s each): renew the leases in flight well before they expire, or the next
        claim would take their rows while the sender still tries them (duplicates)."""
        now = self.clock()
        if now - self._renewed_at < RENEW_S:
            return
        self._renewed_at = now
        try:
            self.queue.renew(self.in_flight.tokens(), now + LEASE_S)
        except SegmentryError as exc:  # tried again at the next cycle
            logger.warning("could not renew the leases of batches in flight: %s", exc)

    def _unsettled(self) -> bool:
        """Whether a batch is in flight or delivered but not yet deleted."""
        return self.in_flight.count() > 0 or self.deferred.pending()

    def wait_settled(self, timeout: float) -> None:
        """Block until a batch in flight settles (or timeout)."""
        self.in_flight.wait(timeout)

    def finish(self, grace: float) -> None:
        """Let the batches in flight settle for up to ``grace`` seconds, then abort
        their retries and give their rows back (a sender still busy with one can only
        make it sent twice, never lost: its settle finds the lease gone)."""
        end = time.monotonic() + grace
        for route in self.routes.all():
            client = route.http_client
            if client is not None and client.paused_until() - client.clock() >= grace:
                client.close()  # a Retry-After outlasts the grace: give the rows back now
        unsettled = self.in_flight.wait_settled(end)
        self.routes.close()
        for claim in unsettled:  # given back now, not left leased for LEASE_S
            try:
                self.settler.hand_back(claim.token, claim.rows)
            except SegmentryError as exc:  # leased still: the next flusher resets them
                logger.warning("could not give back a batch in flight: %s", exc)
        self.upkeep.close()


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


class InFlight:
    """The claims in the senders' hands, and the condition their settling signals: the
    loop waits on it for a free slot, flush() for a settled batch, finish() for all."""

    def __init__(self) -> None:
        self._claims: dict[int, Claim] = {}  # by id()
        self._settled = threading.Condition()

    def add(self, claim: Claim) -> None:
        with self._settled:
            self._claims[id(claim)] = claim

    def remove(self, claim: Claim) -> None:
        with self._settled:
            self._claims.pop(id(claim), None)
            self._settled.notify_all()

    def count(self) -> int:
        with self._settled:
            return len(self._claims)

    def tokens(self) -> set[int]:
        with self._settled:
            return {claim.token for claim in self._claims.values()}

    def notify(self) -> None:
        with self._settled:
            self._settled.notify_all()

    def wait(self, timeout: float) -> None:
        with self._settled:
            self._settled.wait(timeout)

    def free_slots(self, window: Window) -> int:
        """How many batches the window lets us claim now (waits a little when none)."""
        with self._settled:
            free = window.free(len(self._claims))
            if not free:
                self._settled.wait(0.2)
        return free

    def wait_if_any(self, timeout: float) -> bool:
        """Wait for one to settle, if any is in flight; return whether one was."""
        with self._settled:
            if self._claims:
                self._settled.wait(timeout)
                return True
        return False

    def wait_settled(self, end: float) -> list[Claim]:
        """Wait until none is in flight or the monotonic ``end``; return those left."""
        with self._settled:
            while self._claims and time.monotonic() < end:
                self._settled.wait(end - time.monotonic())
            return list(self._claims.values())


class Senders:
    """``size`` daemon threads that deliver claims. Daemons, unlike ThreadPoolExecutor's
    workers, never hold up a process exit behind a hung request: Flusher.finish gives
    their rows back (or, if the process dies, the next flusher resets their leases)."""

    def __init__(self, size: int, deliver: Callable[[Claim], None],
                 in_flight: InFlight) -> None:
        self._work: queue.SimpleQueue[Claim | None] = queue.SimpleQueue()
        self._deliver, self._in_flight = deliver, in_flight
        self._threads = [threading.Thread(target=self._serve, name=f"segmentry-send-{i}",
                                          daemon=True) for i in range(size)]
        for thread in self._threads:
            thread.start()

    def submit(self, claim: Claim) -> None:
        self._in_flight.add(claim)
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
                self._in_flight.remove(claim)


