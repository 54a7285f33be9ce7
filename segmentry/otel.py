"""OpenTelemetry metrics: the metrics of ``segmentry.prometheus`` through an OpenTelemetry
``MeterProvider``, so that the application's own exporter ships them. The only importer of
``opentelemetry`` (the optional extra ``segmentry[otel]``, the API only: the SDK and its
exporter are the application's).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import telemetry
from .config import DEFAULT_API_URL
from .exceptions import ConfigurationError
from .flusher import destination
from .prometheus import DURATION_BUCKETS, EVENTS, Active, Reading, feed, holds_lock, read_queue
from .version import __version__

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError:  # the extra is not installed: instrument() says so
    _INSTALLED = False
else:
    _INSTALLED = True

INSTALL = "pip install 'segmentry[otel]'"
READ_EVERY_S = 1.0  # the gauges of one collection share one read of the queue file

# name, unit, description, and the field of a Reading each observes
_GAUGES = (
    ("segmentry.queue.events", "{event}", "Events in the queue, waiting or in flight.",
     "events"),
    ("segmentry.queue.bytes", "By", "Bytes of event JSON in the queue.", "bytes"),
    ("segmentry.queue.oldest_age", "s", "Age of the oldest event in the queue (0 when "
     "empty).", "oldest_age_s"),
    ("segmentry.dead_letters", "{event}", "Events refused by the receiver, kept aside.",
     "dead_letters"),
)


def instrument(meter_provider: Any = None, queue_path: str | None = None, *,
               api_url: str = DEFAULT_API_URL, write_key: str = "",
               active: Active | None = None) -> Instrumentation:
    """Feed segmentry's metrics to ``meter_provider`` (default: the global one).

    As ``segmentry.prometheus.instrument``: with ``queue_path``, the queue's gauges too
    (attribute ``destination``: ``api_url`` and a hash of ``write_key``, never the key)
    and ``segmentry.flusher.active``. ``.detach()`` on the result stops it.
    """
    if not _INSTALLED:
        raise ConfigurationError(f"segmentry.otel needs opentelemetry-api: {INSTALL}")
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    return Instrumentation(provider.get_meter("segmentry", __version__), queue_path,
                           destination(api_url, write_key or ""), active)


class Instrumentation:
    """The instruments of one meter, and the telemetry handler that feeds them."""

    def __init__(self, meter: Any, queue_path: str | None, destination: str,
                 active: Active | None) -> None:
        self.handler_id = f"segmentry.otel.{id(self)}"  # the handler keeps self alive
        self.attached = True
        self.sent = meter.create_counter(
            "segmentry.events.sent", "{event}", "Events the receiver accepted (2xx).")
        self.dead_lettered = meter.create_counter(
            "segmentry.events.dead_lettered", "{event}",
            "Events the receiver refused, moved to the dead letters.")
        self.dropped = meter.create_counter(
            "segmentry.events.dropped", "{event}",
            "Events a producer could not store, by reason.")
        self.requests = meter.create_counter(
            "segmentry.requests", "{request}",
            "Requests to the receiver, by status code (network_error: no response).")
        self.duration = meter.create_histogram(
            "segmentry.request.duration", "s",
            "Time from sending a request to its answer (or to its failure).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        if queue_path is not None:
            self._observe(meter, os.path.abspath(queue_path), destination, active)
        telemetry.attach(self.handler_id, EVENTS, feed(self))

    def _observe(self, meter: Any, path: str, where: str, active: Active | None) -> None:
        queue = _Shared(path)
        for name, unit, text, field in _GAUGES:
            meter.create_observable_gauge(
                name, [self._gauge(queue, field, {"destination": where})], unit, text)
        meter.create_observable_gauge(
            "segmentry.queue.file_bytes", [self._gauge(queue, "file_bytes", {})], "By",
            "Disk used by the queue file and its WAL.")
        is_active = active or holds_lock(path)
        meter.create_observable_gauge(
            "segmentry.flusher.active",
            [lambda _: [Observation(1 if is_active() else 0)] if self.attached else []],
            "1", "1 while this process holds the queue's flusher lock, 0 on standby.")

    def _gauge(self, queue: _Shared, field: str, attributes: dict[str, str]) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            reading = queue.read() if self.attached else None
            if reading is None:  # detached, or unreadable (logged): no point
                return []
            return [Observation(getattr(reading, field), attributes)]

        return observe

    def requested(self, code: str, seconds: float) -> None:
        self.requests.add(1, {"code": code})
        self.duration.record(seconds)

    def delivered(self, count: int) -> None:
        self.sent.add(count)

    def buried(self, count: int) -> None:
        self.dead_lettered.add(count)

    def refused(self, reason: str, count: int) -> None:
        self.dropped.add(count, {"reason": reason})

    def detach(self) -> None:
        """Stop feeding the metrics; the gauges report nothing from now on (OpenTelemetry
        cannot take an instrument back)."""
        telemetry.detach(self.handler_id)
        self.attached = False


class _Shared:
    """One read of the queue file for the gauges of a collection, not one per gauge."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._at = -math.inf
        self._reading: Reading | None = None

    def read(self) -> Reading | None:
        with self._lock:
            if time.monotonic() - self._at >= READ_EVERY_S:
                self._reading = read_queue(self.path, time.time())
                self._at = time.monotonic()
            return self._reading
