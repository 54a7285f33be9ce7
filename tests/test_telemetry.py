"""Telemetry hooks: attach/detach, spans in the shape of :telemetry.span/3, and the rule
that a broken handler is detached without breaking what it observes."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from segmentry import telemetry

START = ("segmentry", "batch", "start")
STOP = ("segmentry", "batch", "stop")
EXCEPTION = ("segmentry", "batch", "exception")


@pytest.fixture
def attach():
    """attach(names, handler=None) -> (handler_id, seen); detached after the test."""
    ids = []

    def attach_(names, handler=None):
        seen = []
        handler_id = f"test-{uuid.uuid4()}"
        telemetry.attach(handler_id, names, handler or (lambda *event: seen.append(event)))
        ids.append(handler_id)
        return handler_id, seen

    yield attach_
    for handler_id in ids:
        telemetry.detach(handler_id)


def test_a_handler_gets_only_the_events_it_attached_to(attach):
    _, seen = attach([START])
    telemetry.execute(START, {"system_time": 1}, {"events": []})
    telemetry.execute(STOP, {"duration": 1}, {})
    assert seen == [(START, {"system_time": 1}, {"events": []})]


def test_detach_stops_the_calls_and_says_whether_it_was_attached(attach):
    handler_id, seen = attach([START])
    assert telemetry.detach(handler_id) is True
    assert telemetry.detach(handler_id) is False
    telemetry.execute(START, {}, {})
    assert seen == []


def test_a_handler_id_is_attached_once(attach):
    handler_id, _ = attach([START])
    with pytest.raises(ValueError, match=handler_id):
        telemetry.attach(handler_id, [STOP], lambda *event: None)


def test_attached_tells_whether_anyone_listens(attach):
    assert not telemetry.attached(("segmentry", "nobody", "start"))
    handler_id, _ = attach([START])
    assert telemetry.attached(START)
    assert not telemetry.attached(STOP)
    telemetry.detach(handler_id)
    assert not telemetry.attached(START)


def test_a_span_emits_start_then_stop_with_integer_ns(attach):
    _, seen = attach([START, STOP, EXCEPTION])
    before = time.time_ns()
    with telemetry.span(("segmentry", "batch"), {"events": [{"event": "E"}]}) as span:
        span.set(status="ok", result="response")
    (start, start_m, start_md), (stop, stop_m, stop_md) = seen
    assert (start, stop) == (START, STOP)
    assert type(start_m["system_time"]) is int and before <= start_m["system_time"]
    assert start_m["system_time"] <= time.time_ns()
    assert set(stop_m) == {"duration"} and type(stop_m["duration"]) is int
    assert stop_m["duration"] >= 0
    assert start_md == {"events": [{"event": "E"}]}
    assert stop_md == {"events": [{"event": "E"}], "status": "ok", "result": "response"}


def test_a_span_whose_body_raises_emits_exception_and_reraises(attach):
    _, seen = attach([START, STOP, EXCEPTION])
    error = RuntimeError("no route")
    with pytest.raises(RuntimeError):
        with telemetry.span(("segmentry", "batch"), {"events": []}):
            raise error
    assert [event for event, _, _ in seen] == [START, EXCEPTION]
    _, measurements, metadata = seen[1]
    assert type(measurements["duration"]) is int
    assert metadata["kind"] == "RuntimeError" and metadata["reason"] is error
    assert "no route" in metadata["stacktrace"] and "Traceback" in metadata["stacktrace"]
    assert metadata["events"] == []


def test_a_raising_handler_is_logged_detached_and_others_still_run(attach, caplog):
    def broken(*event):
        raise ZeroDivisionError("bug in a hook")

    broken_id, _ = attach([START, STOP], broken)
    _, seen = attach([START, STOP])
    with telemetry.span(("segmentry", "batch"), {}) as span:
        span.set(status="ok")
    assert [event for event, _, _ in seen] == [START, STOP]
    assert "bug in a hook" in caplog.text and broken_id in caplog.text
    assert not telemetry.detach(broken_id)  # already gone after its first failure


def test_execute_without_handlers_is_a_no_op(caplog):
    with caplog.at_level("DEBUG", logger="segmentry"):
        telemetry.execute(("segmentry", "nobody"), {}, {})
    assert caplog.records == []


def test_log_bridge_logs_counts_and_status_never_bodies(caplog):
    handle = telemetry.log_bridge(logging.INFO)
    caplog.set_level(logging.INFO, logger="segmentry.events")
    secret = {"type": "track", "userId": "u", "properties": {"email": "private@example.com"}}
    handle(STOP, {"duration": 5}, {"events": [secret, secret], "status": "error",
                                   "result": "<Response body private@example.com>",
                                   "event": secret})
    text = caplog.text
    assert "segmentry.batch.stop" in text and "'count': 2" in text and "'status': 'error'" in text
    assert "private@example.com" not in text


def test_log_bridge_is_attachable_to_all_events(attach, caplog):
    caplog.set_level(logging.DEBUG, logger="segmentry.events")
    attach(telemetry.ALL_EVENTS, telemetry.log_bridge(logging.DEBUG))
    telemetry.execute(("segmentry", "batch", "retry"), {"delay_s": 0.5},
                      {"attempt": 1, "status_code": 503})
    assert "segmentry.batch.retry" in caplog.text and "'status_code': 503" in caplog.text


def test_all_events_lists_the_spans_and_reports():
    for name in ("claim", "batch", "send"):
        for phase in ("start", "stop", "exception"):
            assert ("segmentry", name, phase) in telemetry.ALL_EVENTS
    assert ("segmentry", "batch", "retry") in telemetry.ALL_EVENTS
    assert ("segmentry", "send", "retry") in telemetry.ALL_EVENTS


def test_a_raising_handler_is_detached_not_the_one_attached_since_under_its_id(attach):
    handler_id, seen = attach([START])
    replacement = []

    def flaky(*event):
        telemetry.detach(handler_id)  # replaced while it runs, as another thread could
        telemetry.attach(handler_id, [START], lambda *e: replacement.append(e))
        raise RuntimeError("boom")

    telemetry.detach(handler_id)
    telemetry.attach(handler_id, [START], flaky)
    telemetry.execute(START, {}, {})
    telemetry.execute(START, {}, {})
    assert len(replacement) == 1  # still attached after the old handler was detached


def test_a_handler_raising_a_base_exception_is_detached_too(attach):
    import asyncio

    def cancelled(*event):
        raise asyncio.CancelledError()

    handler_id, _ = attach([START], cancelled)
    telemetry.execute(START, {}, {})  # does not raise: the sender thread lives on
    assert not telemetry.detach(handler_id)
