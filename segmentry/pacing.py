"""Request pacing after the receiver says 429, for one HTTP client (one host).

``Retry-After`` alone pauses every host of a fleet and lets them all resume at once: in
the fleet simulation (4 hosts against a receiver limited to R requests/s) a quarter of
all requests were refused so. After a 429 the client spaces its requests at 90 % of the
rate the receiver accepted from it lately, then probes upwards (10 % a second, at least
PACE_STEP requests/s a second) until the next 429. It stops pacing PACE_RELEASE_S after
the last 429. Before any 429 nothing is paced.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Callable

PACE_WINDOW_S = 5.0  # the accepted rate is measured over the 2xx answers of this long
PACE_MIN_ACCEPTED = 5  # fewer 2xx than this in the window: too little to measure a rate
PACE_BACKOFF = 0.9  # after a 429: this share of the accepted rate
PACE_GROWTH = 0.10  # per second of 2xx answers, as a share of the rate ...
PACE_STEP = 0.5  # ... or at least this many requests/s
PACE_FLOOR = 0.5  # requests/s
PACE_RELEASE_S = 30.0


class Pacer:
    """Thread-safe. ``clock`` is monotonic seconds (an argument, so tests drive time)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rate: float | None = None  # requests/s; None: not pacing
        self._next = 0.0  # the clock() time of the next free slot
        self._accepted: deque[float] = deque()
        self._limited_at = -math.inf
        self._lock = threading.Lock()

    def observe(self, status: int) -> None:
        """Learn from an answer's status."""
        now = self.clock()
        with self._lock:
            if 200 <= status < 300:
                self._accepted.append(now)
                self._forget(now)
                self._grow(now)
            elif status == 429:
                self._limited_at = now
                self._forget(now)
                if len(self._accepted) >= PACE_MIN_ACCEPTED:
                    span = max(1.0, now - self._accepted[0])
                    self.rate = max(PACE_FLOOR, PACE_BACKOFF * len(self._accepted) / span)

    def delay(self) -> float:
        """Reserve the next request slot; return the seconds to wait for it (0 unpaced)."""
        with self._lock:
            if self.rate is None:
                return 0.0
            now = self.clock()
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.rate
            return slot - now

    def _grow(self, now: float) -> None:
        if self.rate is None:
            return
        if now - self._limited_at > PACE_RELEASE_S:
            self.rate = None
            return
        # One 2xx is 1/rate of a second's worth of answers: per second the rate grows
        # by max(PACE_STEP, PACE_GROWTH x rate).
        self.rate += max(PACE_STEP, PACE_GROWTH * self.rate) / self.rate

    def _forget(self, now: float) -> None:
        while self._accepted and now - self._accepted[0] > PACE_WINDOW_S:
            self._accepted.popleft()
