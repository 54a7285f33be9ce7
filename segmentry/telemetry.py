"""Telemetry hooks in the shape of Elixir's :telemetry: attach, detach, execute, span.

Events are tuples such as ("segmentry", "batch", "start"). Handlers are plain
callables ``handler(event, measurements, metadata)``; one that raises is logged
and detached, so a broken hook never breaks delivery. Imports nothing foreign.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable

from ._forksafe import ForkSafeLock

Event = tuple[str, ...]
Handler = Callable[[Event, dict[str, Any], dict[str, Any]], None]

logger = logging.getLogger(__name__)

_lock = ForkSafeLock()  # a child's flusher would hang in its first span on a held one
_handlers: dict[str, tuple[frozenset[Event], Handler]] = {}


def attach(handler_id: str, event_names: Iterable[Event], handler: Handler) -> None:
    """Call ``handler`` for each event in ``event_names``; ``handler_id`` must be unique."""
    names = frozenset(tuple(name) for name in event_names)
    with _lock:
        if handler_id in _handlers:
            raise ValueError(f"telemetry handler {handler_id!r} is already attached")
        _handlers[handler_id] = (names, handler)


def detach(handler_id: str) -> bool:
    """Remove a handler; return whether it was attached."""
    with _lock:
        return _handlers.pop(handler_id, None) is not None


def execute(event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Call every handler attached to ``event``; a handler that raises is detached."""
    if not _handlers:  # the common case in production: no lock, no copy
        return
    with _lock:
        targets = [(hid, h) for hid, (names, h) in _handlers.items() if event in names]
    for handler_id, handler in targets:
        try:
            handler(event, measurements, metadata)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # even CancelledError: a handler must not kill a sender
            logger.exception("telemetry handler %r raised; detaching it", handler_id)
            with _lock:  # this handler, not one attached since under the same id
                if _handlers.get(handler_id, (None, None))[1] is handler:
                    del _handlers[handler_id]


def attached(event: Event) -> bool:
    """Whether a handler listens to ``event``, so a caller can skip costly metadata."""
    if not _handlers:  # no lock: the common case must stay cheap
        return False
    with _lock:
        return any(event in names for names, _ in _handlers.values())


class Span:
    """What a span's body may add to the stop event's metadata."""

    def __init__(self) -> None:
        self.stop_metadata: dict[str, Any] = {}

    def set(self, **metadata: Any) -> None:
        self.stop_metadata.update(metadata)


@contextmanager
def span(prefix: Event, metadata: dict[str, Any]) -> Iterator[Span]:
    """Emit prefix+start, then prefix+stop (or prefix+exception if the body raises)."""
    execute(prefix + ("start",), {"system_time": time.time_ns()}, metadata)
    started = time.monotonic_ns()
    state = Span()
    try:
        yield state
    except BaseException as exc:
        measurements = {"duration": time.monotonic_ns() - started}
        execute(
            prefix + ("exception",),
            measurements,
            {
                **metadata,
                "kind": type(exc).__name__,
                "reason": exc,
                "stacktrace": traceback.format_exc(),
            },
        )
        raise
    execute(
        prefix + ("stop",),
        {"duration": time.monotonic_ns() - started},
        {**metadata, **state.stop_metadata},
    )


def log_bridge(level: int = logging.INFO, logger_name: str = "segmentry.events") -> Handler:
    """A ready handler that logs each event with its measurements and counts, never bodies.

    ``attach("log", ALL_EVENTS, log_bridge())`` is all a service needs.
    """
    target = logging.getLogger(logger_name)

    def handle(event: Event, measurements: dict[str, Any], metadata: dict[str, Any]) -> None:
        summary = {k: v for k, v in metadata.items() if k in _LOGGABLE}
        if "events" in metadata:
            summary["count"] = len(metadata["events"])
        target.log(level, "%s %s %s", ".".join(event), measurements, summary)

    return handle


# Metadata keys that hold no user data: safe to log.
_LOGGABLE = frozenset(
    {"status", "claimed", "queue_path", "kind", "error", "count", "reason_code", "attempt",
     "delay_s", "status_code", "reason"}
)

ALL_EVENTS: tuple[Event, ...] = tuple(
    ("segmentry", name, phase)
    for name in ("claim", "batch", "send")
    for phase in ("start", "stop", "exception")
) + (
    ("segmentry", "enqueue", "drop"),
    ("segmentry", "batch", "retry"),
    ("segmentry", "send", "retry"),
    ("segmentry", "release"),
    ("segmentry", "dead_letter"),
    ("segmentry", "misconfigured"),
)
