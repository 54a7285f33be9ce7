"""Prometheus metrics: the flusher service's --metrics-port endpoint, scraped over HTTP from
a real process, and the in-process handler on an application's own registry."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests
from fake_segment import FakeSegment
from helpers import FAST, enqueue, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import segmentry
from segmentry import http, prometheus, telemetry
from segmentry.config import DEFAULT_API_URL
from segmentry.exceptions import ConfigurationError
from segmentry.flusher import Lock, destination
from segmentry.testing import Stub, sequence

KEY = "metrics-test-key"
MISSING = "--metrics-port needs prometheus-client: pip install 'segmentry[prometheus]'"


def samples(text):
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page, name, **labels):
    return page.get((name, tuple(sorted(labels.items()))))


def flusher(path, url, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "segmentry.flusher", "--queue", path, "--api-url", url,
         *FAST, "--metrics-port", "0", *args],
        env={**os.environ, "SEGMENT_WRITE_KEY": KEY},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics_url(proc):
    """The endpoint the flusher logs once it listens (port 0: the system's choice)."""
    for line in proc.stderr:
        found = re.search(r"serving metrics on (http://\S+/metrics)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"no metrics endpoint logged; exit {proc.wait()}")


def scrape(url):
    answer = requests.get(url, timeout=10)
    answer.raise_for_status()
    return samples(answer.text)


def stop(proc):
    proc.terminate()
    proc.communicate(timeout=60)


@pytest.fixture
def receiver():
    with FakeSegment(write_key=KEY, record=True) as srv:
        yield srv


@pytest.mark.slow
def test_the_flusher_serves_its_metrics_over_http(receiver, queue_path):
    enqueue(queue_path, 120)
    proc = flusher(queue_path, receiver.url)
    try:
        url = metrics_url(proc)
        where = destination(receiver.url, KEY)
        assert wait_until(
            lambda: value(scrape(url), "segmentry_events_sent_total") == 120)
        # Rows are deleted just after their 2xx is counted (with the next claim).
        assert wait_until(
            lambda: value(scrape(url), "segmentry_queue_events", destination=where) == 0)
        page = scrape(url)
        assert value(page, "segmentry_queue_bytes", destination=where) == 0
        assert value(page, "segmentry_queue_oldest_age_seconds", destination=where) == 0
        assert value(page, "segmentry_dead_letters", destination=where) == 0
        assert value(page, "segmentry_requests_total", code="200") >= 1
        assert value(page, "segmentry_request_duration_seconds_count") >= 1
        assert value(page, "segmentry_flusher_active") == 1
        assert KEY not in requests.get(url, timeout=10).text
    finally:
        stop(proc)
    assert receiver.stats()["unique"] == 120


@pytest.mark.slow
def test_the_gauges_show_what_waits_and_a_standby_is_inactive(receiver, queue_path):
    """A standby serves the queue as it is: the events another flusher holds, their age,
    and flusher_active 0."""
    enqueue(queue_path, 30)
    holder = Lock(queue_path)
    assert holder.acquire(timeout=0)  # another flusher holds the queue
    proc = flusher(queue_path, receiver.url, "--wait")
    try:
        url = metrics_url(proc)
        where = destination(receiver.url, KEY)
        page = scrape(url)
        assert value(page, "segmentry_flusher_active") == 0
        assert value(page, "segmentry_queue_events", destination=where) == 30
        assert value(page, "segmentry_queue_bytes", destination=where) > 0
        assert value(page, "segmentry_queue_oldest_age_seconds", destination=where) > 0
        assert value(page, "segmentry_queue_file_bytes") > 0
        holder.release()  # the standby takes over and delivers
        assert wait_until(lambda: value(scrape(url), "segmentry_flusher_active") == 1)
        assert wait_until(
            lambda: value(scrape(url), "segmentry_queue_events", destination=where) == 0)
    finally:
        holder.release()
        stop(proc)


@pytest.mark.slow
def test_refused_events_and_failed_requests_are_counted(receiver, queue_path):
    enqueue(queue_path, 1)
    receiver.fail(400, count=1)  # the one event is refused: a dead letter
    proc = flusher(queue_path, receiver.url)
    try:
        url = metrics_url(proc)
        where = destination(receiver.url, KEY)
        assert wait_until(
            lambda: value(scrape(url), "segmentry_events_dead_lettered_total") == 1)
        page = scrape(url)
        assert value(page, "segmentry_dead_letters", destination=where) == 1
        assert value(page, "segmentry_requests_total", code="400") == 1
        assert value(page, "segmentry_events_sent_total") == 0
    finally:
        stop(proc)


def run_flusher(*args, env=None, code="from segmentry.flusher import main; "
                                      "raise SystemExit(main())"):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "SEGMENT_WRITE_KEY": KEY, **(env or {})},
                          timeout=60)


def test_metrics_port_without_prometheus_client_is_one_line_exit_2(queue_path):
    blocked = ("import sys; sys.modules['prometheus_client'] = None; "  # import fails
               "from segmentry.flusher import main; raise SystemExit(main())")
    done = run_flusher("--queue", queue_path, "--metrics-port", "9", code=blocked)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"segmentry: configuration error: {MISSING}"]
    assert not os.path.exists(queue_path)  # refused before the queue file is touched


@pytest.mark.parametrize("args, error", [
    (["--metrics-address", "127.0.0.1"], "--metrics-address goes with --metrics-port"),
    (["--metrics-port", "70000"], "--metrics-port must be 0 to 65535, not 70000"),
])
def test_bad_metrics_flags_are_one_line_exit_2(queue_path, args, error):
    done = run_flusher("--queue", queue_path, *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"segmentry: configuration error: {error}"]


def test_a_metrics_port_in_use_is_a_configuration_error(queue_path):
    endpoint = prometheus.serve_flusher(0, None, queue_path, "http://127.0.0.1:9/v1/", KEY)
    try:
        with pytest.raises(ConfigurationError, match="cannot listen on 127.0.0.1 port"):
            prometheus.serve_flusher(endpoint.port, None, queue_path, "http://x/", KEY)
    finally:
        endpoint.close()


# -- in-process: an application's own registry ------------------------------------------



@pytest.fixture
def registry():
    """An application's own registry, instrumented; detached after the test."""
    registry = CollectorRegistry()
    attached = []

    def instrument(*args, **kwargs):
        attached.append(prometheus.instrument(registry, *args, **kwargs))
        return attached[-1]

    registry.instrument = instrument
    yield registry
    for metrics in attached:
        metrics.detach()


def page_of(registry):
    return samples(generate_latest(registry).decode())


def test_an_in_process_client_feeds_the_applications_registry(registry, queue_path):
    stub = Stub(sequence(503, 200))
    registry.instrument(queue_path, write_key="K")
    with segmentry.Client("K", queue_path=queue_path, requests_options={"adapter": stub},
                          batch_every_ms=10, retry_start=1, retry_expiry=5) as client:
        for i in range(25):
            client.track("u", "E", {"i": i})
        assert client.flush(timeout=30)
        assert value(page_of(registry), "segmentry_flusher_active") == 1  # its thread's
    page = page_of(registry)
    assert value(page, "segmentry_events_sent_total") == 25
    assert value(page, "segmentry_requests_total", code="503") == 1
    assert value(page, "segmentry_requests_total", code="200") >= 1
    assert value(page, "segmentry_queue_events",
                 destination=destination(DEFAULT_API_URL, "K")) == 0
    assert value(page, "segmentry_flusher_active") == 0  # closed: the lock is let go


def test_no_response_counts_as_network_error(registry):
    registry.instrument()
    client = http.client("K", adapter=Stub(sequence(requests.ConnectionError, 200)),
                         retry_start=1, retry_expiry=5)
    http.batch(client, [segmentry.Track(user_id="u", event="E")] * 3)
    page = page_of(registry)
    assert value(page, "segmentry_requests_total", code="network_error") == 1
    assert value(page, "segmentry_requests_total", code="200") == 1
    assert value(page, "segmentry_events_sent_total") == 3
    assert value(page, "segmentry_request_duration_seconds_count") == 2


def test_refused_stores_count_as_dropped_by_reason(registry, queue_path):
    registry.instrument()
    with segmentry.Client(queue_path=queue_path, flusher=None,
                          max_queue_bytes=64 * 1024) as client:
        assert wait_until(lambda: client.track("u", "E", {"pad": "x" * 2000}) is None)
    assert value(page_of(registry), "segmentry_events_dropped_total", reason="QueueFull") == 1


def test_without_a_queue_path_there_are_no_queue_gauges(registry):
    registry.instrument()
    names = {name for name, _ in page_of(registry)}
    assert "segmentry_events_sent_total" in names
    assert not {"segmentry_queue_events", "segmentry_flusher_active"} & names


def test_a_scrape_never_creates_the_queue_file(registry, queue_path):
    registry.instrument(queue_path)
    page = page_of(registry)
    assert value(page, "segmentry_queue_events",
                 destination=destination(DEFAULT_API_URL, "")) == 0
    assert not os.path.exists(queue_path)


def test_detach_stops_the_feed_and_empties_the_registry(registry, queue_path):
    metrics = prometheus.instrument(registry, queue_path)
    metrics.detach()
    assert not telemetry.attached(("segmentry", "batch", "stop"))
    assert page_of(registry) == {}
    prometheus.instrument(registry, queue_path).detach()  # the names are free again


def test_the_labels_never_carry_the_write_key(registry, queue_path):
    enqueue(queue_path, 2)
    registry.instrument(queue_path, write_key=KEY)
    text = generate_latest(registry).decode()
    assert KEY not in text
    assert destination(DEFAULT_API_URL, KEY) in text


def test_an_unreadable_queue_loses_its_gauges_not_the_scrape(registry, tmp_path):
    path = tmp_path / "q.db"
    path.write_bytes(b"not a database, not at all" * 100)
    registry.instrument(str(path))
    names = {name for name, _ in page_of(registry)}
    assert "segmentry_events_sent_total" in names
    assert "segmentry_queue_events" not in names


def test_instrument_without_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.setattr(prometheus, "_INSTALLED", False)
    with pytest.raises(ConfigurationError, match=r"pip install 'segmentry\[prometheus\]'"):
        prometheus.instrument(CollectorRegistry())
    assert not telemetry.attached(("segmentry", "batch", "stop"))


# -- in-process: OpenTelemetry ------------------------------------------------------------


@pytest.fixture
def reader():
    """An OpenTelemetry SDK reader of what segmentry.otel feeds; detached after the test."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from segmentry import otel

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    attached = []

    def instrument(*args, **kwargs):
        attached.append(otel.instrument(provider, *args, **kwargs))
        return attached[-1]

    reader.instrument = instrument
    yield reader
    for metrics in attached:
        metrics.detach()
    provider.shutdown()


def points(reader):
    """{(metric name, sorted attributes): value, or a histogram's count}."""
    data = reader.get_metrics_data()  # None when there is nothing to report
    return {(metric.name, tuple(sorted(point.attributes.items()))):
            getattr(point, "value", getattr(point, "count", None))
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics for metric in scope.metrics
            for point in metric.data.data_points}


def test_an_in_process_client_feeds_opentelemetry(reader, queue_path):
    stub = Stub(sequence(503, 200))
    reader.instrument(queue_path, write_key="K")
    where = (("destination", destination(DEFAULT_API_URL, "K")),)
    with segmentry.Client("K", queue_path=queue_path, requests_options={"adapter": stub},
                          batch_every_ms=10, retry_start=1, retry_expiry=5) as client:
        for i in range(25):
            client.track("u", "E", {"i": i})
        assert client.flush(timeout=30)
        assert points(reader)[("segmentry.flusher.active", ())] == 1
    seen = points(reader)
    assert seen[("segmentry.events.sent", ())] == 25
    assert seen[("segmentry.requests", (("code", "503"),))] == 1
    assert seen[("segmentry.requests", (("code", "200"),))] >= 1
    assert seen[("segmentry.request.duration", ())] >= 2
    assert seen[("segmentry.queue.events", where)] == 0
    assert seen[("segmentry.flusher.active", ())] == 0  # closed: the lock is let go


def test_opentelemetry_gauges_read_the_queue_and_stop_at_detach(reader, queue_path):
    enqueue(queue_path, 7)
    metrics = reader.instrument(queue_path, write_key=KEY)
    where = (("destination", destination(DEFAULT_API_URL, KEY)),)
    seen = points(reader)
    assert seen[("segmentry.queue.events", where)] == 7
    assert seen[("segmentry.queue.bytes", where)] > 0
    assert seen[("segmentry.queue.oldest_age", where)] > 0
    assert seen[("segmentry.dead_letters", where)] == 0
    assert seen[("segmentry.flusher.active", ())] == 0  # no flusher here
    metrics.detach()
    assert not telemetry.attached(("segmentry", "batch", "stop"))
    assert ("segmentry.queue.events", where) not in points(reader)


@pytest.mark.slow
def test_the_gauges_have_a_series_per_destination_the_events_carry(receiver, queue_path):
    """A refused key's events wait under their own label; the others drain."""
    enqueue(queue_path, 2)  # no destination of their own: the flusher's key
    with segmentry.Client("refused-key", queue_path=queue_path, api_url=receiver.url,
                          flusher=None) as other:
        for _ in range(5):
            other.track("u", "E")
    proc = flusher(queue_path, receiver.url)
    try:
        url = metrics_url(proc)
        mine, theirs = destination(receiver.url, KEY), destination(receiver.url, "refused-key")
        assert wait_until(
            lambda: value(scrape(url), "segmentry_queue_events", destination=mine) == 0)
        page = scrape(url)
        assert value(page, "segmentry_queue_events", destination=theirs) == 5
        assert value(page, "segmentry_queue_oldest_age_seconds", destination=theirs) > 0
        assert "refused-key" not in requests.get(url, timeout=10).text
    finally:
        stop(proc)
