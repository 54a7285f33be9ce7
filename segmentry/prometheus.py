"""Prometheus metrics: telemetry handlers feed the counters and the request histogram, and a
collector reads the queue file at scrape time for the gauges. ``instrument()`` puts them in
an application's registry; ``serve_flusher()`` is the flusher service's ``--metrics-port``.
What ``segmentry.otel`` shares with it (``feed``, ``read_queue``) imports nothing foreign.
The only importer of ``prometheus_client`` (the optional extra ``segmentry[prometheus]``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple, Protocol

from . import telemetry
from .config import DEFAULT_API_URL
from .exceptions import ConfigurationError, StorageError
from .flusher import destination, holder_pid
from .storage import NO_DESTINATION, inspect

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the extra is not installed: instrument() and serve_flusher() say so
    _INSTALLED = False
else:
    _INSTALLED = True

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"  # an endpoint for this host's scraper, not the network
INSTALL = "pip install 'segmentry[prometheus]'"
# Requests to Segment take tens of milliseconds to seconds; the default timeout is 15 s.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)

Active = Callable[[], bool]

_REQUESTS = [("segmentry", kind, phase) for kind in ("batch", "send")
             for phase in ("stop", "exception")]
EVENTS: tuple[telemetry.Event, ...] = (
    *_REQUESTS, ("segmentry", "dead_letter"), ("segmentry", "enqueue", "drop"))


def instrument(registry: Any = None, queue_path: str | None = None, *,
               api_url: str = DEFAULT_API_URL, write_key: str = "",
               active: Active | None = None) -> Instrumentation:
    """Feed segmentry's metrics into ``registry`` (default: prometheus_client's global one).

    With ``queue_path``, also the queue's gauges, read at each scrape, labelled with the
    destination ``api_url`` and a hash of ``write_key`` (never the key), and
    ``segmentry_flusher_active``: ``active()``, by default whether this process holds the
    queue's flusher lock. Call ``.detach()`` on the result to stop.
    """
    _require("segmentry.prometheus")
    return Instrumentation(REGISTRY if registry is None else registry, queue_path,
                           destination(api_url, write_key or ""), active)


def serve_flusher(port: int | None, address: str | None, queue_path: str, api_url: str,
                  write_key: str) -> Endpoint | None:
    """The flusher service's ``--metrics-port``/``--metrics-address``: serve the metrics on
    ``http://address:port/metrics`` from a thread, on a registry of their own. None without
    a port; errors are ConfigurationErrors naming the flags."""
    if port is None:
        if address is not None:
            raise ConfigurationError("--metrics-address goes with --metrics-port")
        return None
    _require("--metrics-port")
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"--metrics-port must be 0 to 65535, not {port}")
    address = DEFAULT_ADDRESS if address is None else address
    registry = CollectorRegistry()
    metrics = instrument(registry, queue_path, api_url=api_url, write_key=write_key)
    try:
        server, thread = start_http_server(port, address, registry=registry)
    except OSError as exc:  # in use, not ours to bind, or no such address
        metrics.detach()
        why = exc.strerror or str(exc)
        raise ConfigurationError(
            f"--metrics-port: cannot listen on {address} port {port}: {why}") from None
    host = f"[{address}]" if ":" in address else address  # an IPv6 address
    logger.info("serving metrics on http://%s:%d/metrics", host, server.server_port)
    return Endpoint(server, thread, metrics)


def _require(what: str) -> None:
    if not _INSTALLED:
        raise ConfigurationError(f"{what} needs prometheus-client: {INSTALL}")


class Instrumentation:
    """The metrics of one registry, and the telemetry handler that feeds them."""

    def __init__(self, registry: Any, queue_path: str | None, destination: str,
                 active: Active | None) -> None:
        self.registry = registry
        self.handler_id = f"segmentry.prometheus.{id(self)}"  # the handler keeps self alive
        self.sent = Counter("segmentry_events_sent", "Events the receiver accepted (2xx).",
                            registry=registry)
        self.dead_lettered = Counter(
            "segmentry_events_dead_lettered", "Events the receiver refused, moved to the "
            "dead letters.", registry=registry)
        self.dropped = Counter(
            "segmentry_events_dropped", "Events a producer could not store, by reason.",
            ["reason"], registry=registry)
        self.requests = Counter(
            "segmentry_requests", "Requests to the receiver, by status code "
            "(network_error: no response).", ["code"], registry=registry)
        self.duration = Histogram(
            "segmentry_request_duration_seconds", "Time from sending a request to its "
            "answer (or to its failure).", buckets=DURATION_BUCKETS, registry=registry)
        self._collectors: list[Any] = [self.sent, self.dead_lettered, self.dropped,
                                       self.requests, self.duration]
        if queue_path is not None:
            path = os.path.abspath(queue_path)
            queue = QueueCollector(path, destination, active or holds_lock(path))
            registry.register(queue)
            self._collectors.append(queue)
        telemetry.attach(self.handler_id, EVENTS, feed(self))

    def requested(self, code: str, seconds: float) -> None:
        self.requests.labels(code).inc()
        self.duration.observe(seconds)

    def delivered(self, count: int) -> None:
        self.sent.inc(count)

    def buried(self, count: int) -> None:
        self.dead_lettered.inc(count)

    def refused(self, reason: str, count: int) -> None:
        self.dropped.labels(reason).inc(count)

    def detach(self) -> None:
        """Stop feeding the metrics and take them out of the registry."""
        telemetry.detach(self.handler_id)
        for collector in self._collectors:
            self.registry.unregister(collector)
        self._collectors = []


class QueueCollector:
    """The queue's gauges and ``segmentry_flusher_active``, read at each scrape."""

    def __init__(self, path: str, destination: str, active: Active) -> None:
        self.path = path
        self.destination = destination
        self.active = active

    def collect(self) -> Iterator[Any]:
        reading = read_queue(self.path, time.time())
        if reading is not None:  # else the gauges go missing; the counters are still served
            # One series per destination the events carry; those that carry none go with
            # the flusher's own key and URL, and are labelled so (as an empty queue is).
            series = _by_label(reading, self.destination)
            for i, (name, text) in enumerate(_GAUGES):  # file_bytes is not one of them
                gauge = GaugeMetricFamily(name, text, labels=["destination"])
                for where, values in series.items():
                    gauge.add_metric([where], float(values[i]))
                yield gauge
            disk = GaugeMetricFamily("segmentry_queue_file_bytes",
                                     "Disk used by the queue file and its WAL.")
            disk.add_metric([], float(reading.file_bytes))
            yield disk
        flusher = GaugeMetricFamily(
            "segmentry_flusher_active", "1 while this process holds the queue's flusher "
            "lock, 0 on standby.")
        flusher.add_metric([], 1.0 if self.active() else 0.0)
        yield flusher


def _by_label(reading: Reading, own: str) -> dict[str, list[float]]:
    """The four gauges by destination label. The events that carry none go with the
    flusher's own key and URL (``own``), and are counted under it, with those that carry
    it; ``own`` is always shown, at 0 when nothing waits for it."""
    series: dict[str, list[float]] = {own: [0, 0, 0.0, 0]}
    for name, values in reading.destinations:
        where = own if name == NO_DESTINATION else name
        total = series.setdefault(where, [0, 0, 0.0, 0])
        series[where] = [total[0] + values[0], total[1] + values[1],
                         max(total[2], values[2]), total[3] + values[3]]
    return series


# -- what the Prometheus and OpenTelemetry handlers share (no foreign import) ------------


class Sink(Protocol):
    """Where ``feed`` puts what the telemetry events say."""

    def requested(self, code: str, seconds: float) -> None: ...  # one request's answer
    def delivered(self, count: int) -> None: ...  # events accepted (2xx)
    def buried(self, count: int) -> None: ...  # events dead-lettered
    def refused(self, reason: str, count: int) -> None: ...  # events a producer dropped


def feed(sink: Sink) -> telemetry.Handler:
    """A telemetry handler for ``EVENTS`` that tells ``sink`` what they measure."""

    def handle(event: telemetry.Event, measurements: dict[str, Any],
               metadata: dict[str, Any]) -> None:
        kind, phase = event[1], event[-1]
        if kind in ("batch", "send"):  # a stop or an exception: one request
            seconds = measurements.get("duration", 0) / 1e9
            if phase == "exception":  # the transport raises only when no answer came
                sink.requested("network_error", seconds)
                return
            sink.requested(str(metadata["result"].status_code), seconds)
            if metadata.get("status") == "ok":
                sink.delivered(len(metadata.get("events", ())) if kind == "batch" else 1)
        elif kind == "dead_letter":
            sink.buried(int(measurements.get("count", 0)))
        elif kind == "enqueue":
            sink.refused(str(metadata.get("reason", "unknown")), int(measurements.get("count", 1)))

    return handle


class Reading(NamedTuple):
    """The queue's gauges: in all, and per destination (by name: see storage.destination;
    the same four values each), but for the file's size."""

    events: int
    bytes: int
    oldest_age_s: float
    dead_letters: int
    file_bytes: int = 0
    destinations: tuple[tuple[str, tuple[int, int, float, int]], ...] = ()


_GAUGES = (("segmentry_queue_events", "Events in the queue, waiting or in flight."),
           ("segmentry_queue_bytes", "Bytes of event JSON in the queue."),
           ("segmentry_queue_oldest_age_seconds", "Age of the oldest event in the queue "
            "(0 when empty)."),
           ("segmentry_dead_letters", "Events refused by the receiver, kept aside."))


def read_queue(path: str, now: float) -> Reading | None:
    """The queue file's gauges, read by a read-only connection of its own: never a write,
    never a new file, no wait on the producers' connection. None (logged) if unreadable."""
    try:
        seen = inspect(path, now)
    except StorageError as exc:
        logger.warning("metrics: cannot read the queue: %s", exc)
        return None
    if seen is None:  # no file yet: an empty queue
        return Reading(0, 0, 0.0, 0)
    stats = seen.stats
    each = tuple((d.name, (d.depth, d.bytes, _age(d.oldest_created, now), d.dead_letters))
                 for d in seen.destinations)
    return Reading(stats.depth, stats.bytes, _age(stats.oldest_created, now),
                   stats.dead_letters, seen.disk_bytes, each)


def _age(created: float | None, now: float) -> float:
    return 0.0 if created is None else max(0.0, now - created)


def holds_lock(path: str) -> Active:
    """Whether this process is the one the queue's pid file names (the flusher lock's
    holder writes it on taking the lock and removes it on letting go)."""
    return lambda: holder_pid(path) == os.getpid()


class Endpoint:
    """A running ``/metrics`` server; ``close()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread,
                 metrics: Instrumentation) -> None:
        self.server = server
        self.thread = thread
        self.metrics = metrics

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        self.metrics.detach()
