"""The in-process flusher of a Client: a daemon thread that stands by for the queue's
lock, then runs the Flusher loop until stopped."""

from __future__ import annotations

import logging
import math
import threading
import time

from ..config import Options
from ..storage import Queue, SQLiteQueue
from ._lock import Lock
from ._loop import Flusher
from ._routes import make_http

logger = logging.getLogger("segmentry.flusher")  # the package's name: one logger for users

LOCK_POLL_S = 0.5  # how often a standby flusher tries the lock
RESTART_S = 5.0  # an in-process flusher that failed unexpectedly starts again after this
STOP_GRACE_S = 2.0  # the longest a stopping flusher thread lets the batches in flight settle


class Background:
    """The in-process flusher of a Client: a daemon thread that stands by until it
    holds the queue's lock, then runs the Flusher loop until stopped."""

    def __init__(self, write_key: str, queue: Queue, options: Options) -> None:
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

    def blocked(self) -> str | None:
        """What keeps this client's requests from being accepted, while it lasts: "the
        receiver answered HTTP 401", or why TLS failed (another destination's is not)."""
        return self.flusher.misconfigured()

    def failing(self) -> str | None:
        """Why this client's events are not delivered yet, during an outage."""
        return self.flusher.failing()

    def gone(self) -> str | None:
        return None  # a thread that fails starts its flusher again (see _main)

    def revive(self) -> None:
        pass

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
                        self._run_while_locked()
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

    def _run_while_locked(self) -> None:
        try:
            self.flusher.take_over()
            self.flusher.run(self._stop, self._wake)
        finally:
            self.flusher.finish(grace=self._grace())
            self.lock.release()

    def _grace(self) -> float:
        """How long the batches in flight may settle: STOP_GRACE_S, or what stop() left."""
        return max(0.0, min(STOP_GRACE_S, self._grace_end - time.monotonic()))
