"""Request pacing after the receiver says 429, for one HTTP client (one host).

``Retry-After`` alone pauses every host of a fleet and lets them all resume at once: in
the fleet simulation (4 hosts against a receiver limited to R requests/s) a quarter of
all requests were refused so. After a 429 the client spaces its requests instead, with
additive increase and multiplicative decrease of a rate, as TCP does with its window:

- the first 429 starts pacing at PACE_BACKOFF x the rate of this client's recent
  requests (over PACE_WINDOW_S); a later one multiplies the current rate by PACE_BACKOFF,
  at most once a second (the batches in flight are refused together);
- each 2xx raises the rate by max(PACE_STEP, PACE_GROWTH x rate) per second's worth;
- after PACE_RELEASE_S of requests let through since the last 429 (a Retry-After's pause
  does not count), requests are not paced any more.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Callable

PACE_WINDOW_S = 2.0
PACE_BACKOFF = 0.7
PACE_GROWTH = 0.10  # of the rate, per second ...
PACE_STEP = 0.5  # ... or at least this many requests/s per second
PACE_FLOOR = 1.0  # requests/s
PACE_RELEASE_S = 30.0


class Pacer:
    """Thread-safe. ``clock`` is monotonic seconds (an argument, so tests drive time)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rate: float | None = None  # requests/s; None: not pacing
        self._next = -math.inf  # the clock() time of the next free slot
        self._sent: deque[float] = deque()  # when recent requests were let through
        self._limited_at = self._decreased_at = -math.inf
        self._resumed_at = -math.inf  # the first slot let through since the last 429
        self._lock = threading.Lock()

    def delay(self) -> float:
        """Reserve the next request slot; return the seconds to wait for it (0 unpaced)."""
        with self._lock:
            now = self.clock()
            slot = now if self.rate is None else max(now, self._next)
            if self.rate is not None:
                self._next = slot + 1.0 / self.rate
            if self._resumed_at < self._limited_at:
                self._resumed_at = slot
            self._sent.append(slot)
            while now - self._sent[0] > PACE_WINDOW_S:
                self._sent.popleft()
            return slot - now

    def observe(self, status: int) -> None:
        """Learn from an answer's status."""
        now = self.clock()
        with self._lock:
            if 200 <= status < 300 and self.rate is not None:
                if self._resumed_at >= self._limited_at and \
                        now - self._resumed_at > PACE_RELEASE_S:
                    self.rate = None
                else:  # one 2xx is 1/rate of a second's worth of answers
                    self.rate += max(PACE_STEP, PACE_GROWTH * self.rate) / self.rate
            elif status == 429:
                self._limited_at = now
                if now - self._decreased_at >= 1.0:
                    self._decreased_at = now
                    base = self.rate if self.rate is not None else (
                        len(self._sent) / PACE_WINDOW_S)
                    self.rate = max(PACE_FLOOR, PACE_BACKOFF * base)
