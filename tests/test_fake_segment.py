"""The fake Segment receiver (tools/fake_segment.py), over real HTTP on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from fake_segment import MAX_EVENT_BYTES, FakeSegment, TokenBucket, main

KEY = "test-key"
TOOL = Path(__file__).resolve().parent.parent / "tools" / "fake_segment.py"


def event(message_id: str, name: str = "Signed Up", **fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": name, "userId": "u1", "messageId": message_id, **fields}


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    return {"batch": list(events), "sentAt": "2024-05-01T12:00:00.000Z"}


@pytest.fixture
def srv():
    with FakeSegment(write_key=KEY, record=True) as server:
        yield server


@pytest.fixture
def http():
    with requests.Session() as session:
        session.auth = (KEY, "")
        yield session


def post(http: requests.Session, srv: FakeSegment, *events: dict[str, Any]) -> requests.Response:
    return http.post(srv.url + "batch", json=batch(*events), timeout=10)


def control(srv: FakeSegment, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, srv.url.replace("/v1/", path), timeout=10, **kwargs)


# --- ingesting --------------------------------------------------------------------------------


def test_a_batch_is_ingested_and_counted_by_message_id(srv, http):
    first = post(http, srv, event("m1"), event("m2"), event("m1"))
    second = post(http, srv, event("m2"))
    assert (first.status_code, first.json()) == (200, {"success": True})
    assert second.status_code == 200
    stats = srv.stats()
    assert stats["requests"] == 2 and stats["requests_by_status"] == {"200": 2}
    assert (stats["events"], stats["unique"], stats["duplicates"]) == (4, 2, 2)
    assert stats["batches"] == 2
    assert stats["bytes"] == len(first.request.body) + len(second.request.body)
    assert [e["messageId"] for e in srv.events()] == ["m1", "m2", "m1", "m2"]


def test_a_single_event_endpoint_takes_one_event_with_its_sent_at(srv, http):
    identify = {"type": "identify", "userId": "u1", "messageId": "i1", "traits": {"a": 1},
                "sentAt": "2024-05-01T12:00:00.000Z"}
    assert http.post(srv.url + "identify", json=identify).status_code == 200
    assert http.post(srv.url + "identify", json=event("t1")).status_code == 400
    assert srv.events() == [identify]
    assert (srv.stats()["singles"], srv.stats()["unique"]) == (1, 1)


def test_a_gzip_body_is_accepted(srv, http):
    data = gzip.compress(json.dumps(batch(event("g1"))).encode())
    reply = http.post(srv.url + "batch", data=data, headers={"Content-Encoding": "gzip"})
    assert reply.status_code == 200
    assert srv.stats()["unique"] == 1 and srv.batches()[0]["gzip"] is True
    broken = http.post(srv.url + "batch", data=data[:-8], headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400


def test_a_wrong_or_missing_write_key_is_401_and_ingests_nothing(srv):
    assert requests.post(srv.url + "batch", json=batch(event("a")), auth=("wrong", "")
                         ).status_code == 401
    assert requests.post(srv.url + "batch", json=batch(event("a"))).status_code == 401
    assert srv.stats()["requests_by_status"] == {"401": 2} and srv.stats()["events"] == 0


def test_without_a_write_key_any_key_is_accepted():
    with FakeSegment() as server:
        assert requests.post(server.url + "batch", json=batch(event("a"))).status_code == 200


@pytest.mark.parametrize("body", [
    b'{"batch": [', b"[]", b'{"batch": {}}', b'{"batch": [1]}', b'{"batch": []} extra',
    b'{"batch": [{"type": "track"}]}', b'{"batch": [{"messageId": "m", "type": "nope"}]}',
    b"\xff\xfe",
])
def test_a_malformed_body_is_400_and_ingests_nothing(srv, http, body):
    reply = http.post(srv.url + "batch", data=body)
    assert reply.status_code == 400 and reply.json()["success"] is False
    assert srv.stats()["events"] == 0


def test_a_chunked_body_is_411(srv, http):
    reply = http.post(srv.url + "batch", data=iter([json.dumps(batch(event("a"))).encode()]))
    assert reply.status_code == 411 and srv.stats()["requests_by_status"] == {"411": 1}


def test_a_body_over_500000_bytes_is_413(srv, http):
    events = [event(f"m{i}", pad="x" * 20_000) for i in range(26)]
    reply = post(http, srv, *events)
    assert reply.status_code == 413 and srv.stats()["events"] == 0


def test_an_event_over_32_kb_is_400_naming_it_and_32_kb_exactly_passes(srv, http):
    def sized(message_id: str, size: int) -> dict[str, Any]:
        base = event(message_id, pad="")
        return event(message_id, pad="x" * (size - len(json.dumps(base))))

    assert post(http, srv, sized("fits", MAX_EVENT_BYTES)).status_code == 200
    reply = post(http, srv, event("ok"), sized("big", MAX_EVENT_BYTES + 1))
    assert reply.status_code == 400 and reply.json()["messageId"] == "big"
    assert srv.stats()["unique"] == 1


def test_each_event_is_recorded_with_its_exact_text(srv, http):
    first = '{"type":"track","messageId":"a","event":"\\u00c9t\u00e9"}'
    second = '{ "messageId" : "b", "type": "identify",\n "traits": {"n": [1, 2.50]} }'
    body = f'{{ "sentAt": "s",\n "batch" : [ {first} ,\n{second}] }}'
    assert http.post(srv.url + "batch", data=body.encode()).status_code == 200
    assert srv.raw_events() == [first, second] and srv.raw("b") == [second]
    assert srv.events() == [json.loads(first), json.loads(second)]
    assert srv.batches()[0]["sentAt"] == "s"
    over_http = control(srv, "GET", "/__events", params={"since": 1})
    assert over_http.json() == {"next": 2, "events": [json.loads(second)]}
    assert second.encode() in over_http.content  # spliced in, byte for byte
    raw = control(srv, "GET", "/__events", params={"since": 0, "raw": 1}).json()
    assert raw["events"] == [first, second]


def test_events_are_not_recorded_unless_asked():
    with FakeSegment() as server:
        requests.post(server.url + "batch", json=batch(event("a")))
        assert server.stats()["unique"] == 1
        assert control(server, "GET", "/__events").status_code == 409
        with pytest.raises(RuntimeError):
            server.events()


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "v1/nothing", 404), ("GET", "v1/batch", 405), ("POST", "__nothing", 404),
])
def test_unknown_routes_are_refused_and_the_connection_stays_usable(srv, http, method, path,
                                                                    status):
    reply = http.request(method, srv.url.replace("v1/", path), json=batch(event("a")))
    assert reply.status_code == status
    assert post(http, srv, event("b")).status_code == 200  # the refused body was consumed


# --- faults -----------------------------------------------------------------------------------


def test_fail_answers_the_status_and_retry_after_for_count_requests(srv, http):
    srv.fail(503, count=2, retry_after=7)
    replies = [post(http, srv, event("m")) for _ in range(3)]
    assert [r.status_code for r in replies] == [503, 503, 200]
    assert replies[0].headers["Retry-After"] == "7"
    assert srv.stats()["requests_by_status"] == {"503": 2, "200": 1}
    assert srv.stats()["events"] == 1 and srv.active_faults() == {}


def test_fail_without_a_count_lasts_until_cleared(srv, http):
    srv.fail(500)
    assert [post(http, srv, event("m")).status_code for _ in range(3)] == [500] * 3
    assert "Retry-After" not in post(http, srv, event("m")).headers
    srv.clear_faults()
    assert post(http, srv, event("m")).status_code == 200


def test_drop_closes_the_connection_without_reply_and_ingests_nothing(srv, http):
    srv.drop(count=1)
    with pytest.raises(requests.ConnectionError):
        post(http, srv, event("m"))
    assert post(http, srv, event("m")).status_code == 200
    stats = srv.stats()
    assert stats["requests_by_status"] == {"drop": 1, "200": 1} and stats["events"] == 1


def test_ambiguous_ingests_then_closes_without_reply(srv, http):
    srv.ambiguous(count=1)
    with pytest.raises(requests.ConnectionError):
        post(http, srv, event("m"))
    assert srv.stats()["events"] == 1
    assert post(http, srv, event("m")).status_code == 200
    stats = srv.stats()
    assert stats["requests_by_status"] == {"ambiguous": 1, "200": 1}
    assert (stats["unique"], stats["duplicates"]) == (1, 1)


def test_delay_holds_every_reply(srv, http):
    srv.delay(ms=50)
    for _ in range(2):
        start = time.monotonic()
        assert post(http, srv, event("m")).status_code == 200
        assert time.monotonic() - start >= 0.05
    srv.delay(ms=0)
    assert srv.active_faults() == {}


def test_reject_answers_400_naming_the_poison_event(srv, http):
    srv.reject("Poison", "bad-id")
    reply = post(http, srv, event("ok"), event("p1", name="Poison"))
    assert reply.status_code == 400
    assert reply.json()["rejected"] == "Poison" and reply.json()["messageId"] == "p1"
    assert post(http, srv, event("bad-id")).json()["rejected"] == "bad-id"
    assert srv.stats()["events"] == 0
    assert post(http, srv, event("ok")).status_code == 200


def test_rate_limit_answers_429_with_retry_after_past_the_rate(srv, http):
    srv.rate_limit(per_second=1, retry_after=3)
    replies = [post(http, srv, event(f"m{i}")) for i in range(6)]
    statuses = [r.status_code for r in replies]
    assert statuses[0] == 200 and 429 in statuses
    assert {r.headers["Retry-After"] for r in replies if r.status_code == 429} == {"3"}
    stats = srv.stats()
    assert stats["rate_limited"] == statuses.count(429) == stats["requests_by_status"]["429"]
    assert stats["events"] == statuses.count(200)


def test_the_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2, burst=2, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert bucket.take(0.25) is False  # half a token
    assert bucket.take(0.5) is True
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]  # capped at the burst


def test_faults_are_armed_read_and_cleared_over_http(srv, http):
    spec = {"status": {"code": 500, "count": 1, "retry_after": "2"}, "reject": ["X"],
            "delay_ms": 1, "rate_limit": {"per_second": 1000}}
    armed = control(srv, "POST", "/__faults", json=spec)
    assert armed.status_code == 200 and armed.json()["status"]["code"] == 500
    assert control(srv, "GET", "/__faults").json() == armed.json() == srv.active_faults()
    assert post(http, srv, event("m")).status_code == 500
    assert control(srv, "DELETE", "/__faults").json() == {}
    assert srv.active_faults() == {}
    control(srv, "POST", "/__faults", json={"drop": {"count": 1}})
    with pytest.raises(requests.ConnectionError):
        post(http, srv, event("m"))


@pytest.mark.parametrize("spec", [
    {"drop": {"count": 1}, "bogus": {}}, {"status": {"code": 99}}, {"drop": {"count": -1}},
    {"status": {"code": 500, "when": 1}}, {"drop": {"cuont": 1}}, {"reject": "Poison"}, [],
])
def test_a_bad_fault_spec_is_400_and_arms_nothing(srv, spec):
    reply = control(srv, "POST", "/__faults", json=spec)
    assert reply.status_code == 400 and reply.json()["error"]
    assert srv.active_faults() == {}


# --- control and waiting ----------------------------------------------------------------------


def test_stats_batches_and_reset_over_http(srv, http):
    srv.fail(503, count=1)
    post(http, srv, event("m1"))
    post(http, srv, event("m1"), event("m2"))
    assert control(srv, "GET", "/__stats").json() == srv.stats()
    batches = control(srv, "GET", "/__batches", params={"since": 0}).json()
    assert batches["next"] == 1 and batches["batches"][0]["events"] == 2
    srv.fail(503)
    assert control(srv, "POST", "/__reset").status_code == 200
    assert srv.stats()["requests"] == 0 and srv.stats()["unique"] == 0
    assert srv.events() == [] and srv.active_faults() == {}


def test_wait_for_wakes_on_ingest(srv, http):
    waiting = threading.Event()

    def arrived(stats: dict[str, Any]) -> bool:
        waiting.set()  # the poster sends only once the waiter is inside wait_for
        return stats["unique"] >= 1

    poster = threading.Thread(target=lambda: waiting.wait(10) and post(http, srv, event("m")))
    poster.start()
    start = time.monotonic()
    assert srv.wait_for(arrived, timeout=20)
    assert time.monotonic() - start < 10  # woken by the ingest, not by the timeout
    poster.join()


def test_wait_for_returns_false_at_the_timeout(srv):
    assert srv.wait_for(lambda s: s["events"] > 0, timeout=0.01) is False


def test_only_loopback_is_served():
    with pytest.raises(ValueError):
        FakeSegment(host="0.0.0.0")
    with pytest.raises(SystemExit) as exit_info:
        main(["--host", "0.0.0.0"])
    assert exit_info.value.code == 2


@pytest.mark.timeout(20)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_the_command_prints_its_url_and_exits_0_on_a_stop_signal(tmp_path, stop):
    ready = tmp_path / "url"
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), "--port", "0", "--write-key", KEY, "--record",
         "--ready-file", str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+/v1/)", line)
        assert match, line
        url = match.group(1)
        assert ready.read_text().strip() == url
        assert requests.post(url + "batch", json=batch(event("m")), auth=(KEY, "")).ok
        assert requests.get(url.replace("/v1/", "/__stats")).json()["unique"] == 1
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
        proc.communicate()
