"""Drain progress: a one-line bar on a terminal (sent, remaining, events/s, ETA), plain
periodic log lines otherwise, so an operator sees a backlog go down, or why it does not
(a stored backoff being waited out, and until when)."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import time
from typing import Any

from .storage import Queue

logger = logging.getLogger("segmentry.flusher")

BAR_EVERY_S = 0.5
LOG_EVERY_S = 10.0


class Progress:
    def __init__(self, flusher: Any, mode: str = "auto", stream: Any = None,
                 every: float | None = None) -> None:
        self.flusher = flusher
        self.every = every
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()
        self._last = (self._start, 0)  # (when, sent) at the previous report

    def __enter__(self) -> Progress:
        if self.mode != "none":
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="segmentry-progress")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self.report(final=True)

    def _loop(self) -> None:
        every = self.every or (BAR_EVERY_S if self.mode == "bar" else LOG_EVERY_S)
        while not self._stop.wait(every):
            self.report()

    def report(self, final: bool = False) -> None:
        sent = self.flusher.counts.sent
        try:
            remaining = self.flusher.queue.stats(time.time()).depth
        except Exception:  # a status line must never stop a drain
            return
        try:
            waiting = waiting_out(self.flusher.queue, time.time()) if remaining else ""
        except Exception:  # nor must its note on a backoff cost the line
            waiting = ""
        # The rate of the last interval (of the whole run in the final line): an average
        # since the start would show a rate and an ETA through an outage.
        now = time.monotonic()
        since, sent_then = (self._start, 0) if final else self._last
        self._last = (now, sent)
        rate = (sent - sent_then) / max(now - since, 1e-6)
        eta = f"{remaining / rate:.0f}s" if rate > 0 and remaining else "-"
        counts = self.flusher.counts
        line = f"sent {sent}  remaining {remaining}  {rate:,.0f} events/s  ETA {eta}"
        if counts.buried or counts.released:
            line += f"  dead-lettered {counts.buried}  retried later {counts.released}"
        if waiting and not final:
            line += f"  {waiting}"
        if self.mode == "bar":
            self.stream.write("\r" + line.ljust(72) + ("\n" if final else ""))
            self.stream.flush()
        else:
            logger.info("%s", line)


def waiting_out(queue: Queue, now: float) -> str:
    """What the drain waits for when the next event is not ready: a backoff stored with it
    (a restart keeps it), named with its end, so "sent 0" is not a silent stall."""
    ready = queue.next_ready_at(now)
    if ready is None or ready <= now:
        return ""
    until = dt.datetime.fromtimestamp(ready, dt.timezone.utc).strftime("%H:%M:%S")
    return f"waiting out a backoff until {until} UTC ({ready - now:.0f} s)"
