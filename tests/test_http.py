"""The low-level HTTP API: request shape, status rules, retries and backoff, the shared
pause, close(), error translation and telemetry spans. Time is faked: a clock that
moves only when slept on, so no test waits out a backoff."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import inspect
import itertools
import json
import logging
import socket
import ssl
import threading
import uuid
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import urllib3
from helpers import refused_port, wait_until

import segmentry.http as sh
from segmentry import telemetry
from segmentry._transport import Transport
from segmentry.exceptions import (
    ConfigurationError,
    HTTPStatusError,
    InvalidMessage,
    MessageTooLarge,
    NetworkError,
)
from segmentry.messages import (
    BATCH_OVERHEAD,
    Alias,
    Encoded,
    Group,
    Identify,
    Page,
    Screen,
    Track,
)
from segmentry.testing import Stub, StubAdapter, sequence
from segmentry.version import __version__

KEY = "WRITE-KEY-secret"
API = "https://receiver.test/v1/"


def retry_after(seconds: str, status: int = 429):
    """A handler: every request is refused with this Retry-After."""
    return lambda request: (status, "", {"Retry-After": seconds})


class FakeTime:
    """A monotonic clock that moves only when slept on: waits are recorded, never spent."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


@pytest.fixture
def make(fake):
    """make(handler, **options) -> (http, stub): a client on a recording stub, fake time."""
    clients = []

    def build(handler=None, adapter=None, **options):
        stub = adapter or Stub(handler)
        options = {"retry_start": 1, "retry_expiry": 8, "clock": fake.clock,
                   "sleep": fake.sleep, **options}
        http = sh.HTTPClient(KEY, API, adapter=stub, **options)
        clients.append(http)
        return http, stub

    yield build
    for http in clients:
        http.close()


@pytest.fixture
def listen():
    """listen(*events) -> list of (event, measurements, metadata) seen from now on."""
    ids = []

    def attach(*names):
        seen = []
        handler_id = f"test-{uuid.uuid4()}"
        telemetry.attach(handler_id, names, lambda e, m, md: seen.append((e, m, md)))
        ids.append(handler_id)
        return seen

    yield attach
    for handler_id in ids:
        telemetry.detach(handler_id)


def track(event="Signed Up", **kw):
    return Track(user_id="u1", event=event, **kw)


def sent_bodies(stub):
    return [r.body for r in stub.requests]


# -- request shape ----------------------------------------------------------------------


def test_batch_posts_json_with_basic_auth_to_api_url_batch(make):
    http, stub = make()
    response = sh.batch(http, [track("A"), track("B")])
    assert response.status_code == 200
    (request,) = stub.requests
    assert request.method == "POST" and request.path == "/v1/batch"
    token = base64.b64encode(f"{KEY}:".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {token}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"segmentry/{__version__}"
    assert "X-Retry-Count" not in request.headers
    assert [e["event"] for e in request.body["batch"]] == ["A", "B"]
    assert set(request.body) == {"batch", "sentAt"}


def test_api_url_without_trailing_slash_gets_one():
    stub = Stub()
    http = sh.client(KEY, "https://eu.receiver.test/v1", adapter=stub)
    sh.batch(http, [track()])
    assert http.api_url == "https://eu.receiver.test/v1/"
    assert stub.requests[0].path == "/v1/batch"


@pytest.mark.parametrize("message, path", [
    (Track(user_id="u", event="E"), "/v1/track"),
    (Identify(user_id="u", traits={"a": 1}), "/v1/identify"),
    (Page(user_id="u", name="Home"), "/v1/page"),
    (Screen(user_id="u", name="Home"), "/v1/screen"),
    (Group(user_id="u", group_id="g"), "/v1/group"),
    (Alias(user_id="u", previous_id="p"), "/v1/alias"),
])
def test_send_posts_one_event_to_its_type(make, message, path):
    http, stub = make()
    sh.send(http, message)
    (request,) = stub.requests
    assert request.path == path
    assert request.body["userId"] == "u" and "sentAt" in request.body
    assert "batch" not in request.body


def capture_raw(raw_bodies):
    """A handler keeping each request's exact body bytes."""
    def handler(request):
        raw_bodies.append(request.body)
        return 200
    return handler


def test_post_batch_splices_stored_texts_byte_for_byte_without_decoding(make, monkeypatch):
    raw: list[bytes] = []
    http, _ = make(adapter=StubAdapter(capture_raw(raw)))
    # Odd but valid texts: decoding and re-encoding would change their bytes.
    bodies = ['{"type":"track", "userId":"u","event":"A","n":1.50}',
              '{"type":"identify","userId":"u","traits":{"z":1,"a":2}}']
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("a body was decoded"))
    sh.post_batch(http, bodies)
    text = raw[0].decode()
    sent_at = json.JSONDecoder().decode(text)["sentAt"]  # JSONDecoder: not the patched loads
    assert text == '{"batch":[' + bodies[0] + "," + bodies[1] + '],"sentAt":"' + sent_at + '"}'


def test_post_event_splices_sent_at_into_the_stored_text(make):
    raw: list[bytes] = []
    http, _ = make(adapter=StubAdapter(capture_raw(raw)))
    body = '{"type":"track","userId":"u","event":"A"}'
    response = sh.post_event(http, "track", body)
    assert response.status_code == 200
    text = raw[0].decode()
    assert text.startswith(body[:-1] + ',"sentAt":"') and text.endswith('Z"}')
    assert set(json.loads(text)) == {"type", "userId", "event", "sentAt"}


def test_sent_at_is_set_fresh_on_every_attempt(make):
    ticks = itertools.count(1_800_000_000)
    http, stub = make(sequence(503, 503, 200), now=lambda: float(next(ticks)))
    sh.batch(http, [track()])
    sent = [body["sentAt"] for body in sent_bodies(stub)]
    assert len(sent) == 3 and sent == sorted(set(sent))


def test_sent_at_is_not_the_event_timestamp(make):
    http, stub = make()
    sh.batch(http, [track(timestamp=dt.datetime(2020, 1, 2, tzinfo=dt.timezone.utc))])
    body = stub.requests[0].body
    assert body["batch"][0]["timestamp"] == "2020-01-02T00:00:00.000Z"
    assert body["sentAt"] > "2025"


def test_retries_carry_x_retry_count(make):
    http, stub = make(sequence(503, 500, 200))
    sh.batch(http, [track()])
    assert [r.headers.get("X-Retry-Count") for r in stub.requests] == [None, "1", "2"]


def test_gzip_bodies_round_trip(make):
    raw: list[bytes] = []
    http, stub = make(capture_raw(raw), gzip=True)
    sh.batch(http, [track("Zipped")])
    assert stub.requests[0].headers["Content-Encoding"] == "gzip"
    assert raw[0][:2] == b"\x1f\x8b"  # the gzip magic: compressed on the wire
    assert json.loads(gzip.decompress(raw[0]))["batch"][0]["event"] == "Zipped"
    assert stub.events[0]["event"] == "Zipped"


@pytest.mark.parametrize("headers", [{"X-Tenant": 42}, {"X-Env": "prod\n"}, {"X-Lead": " v"}])
def test_a_header_requests_cannot_send_is_refused_when_the_client_is_built(headers):
    with pytest.raises(ConfigurationError, match="header 'X-"):
        sh.client(KEY, API, headers=headers)


def test_a_write_key_basic_auth_cannot_carry_is_refused_without_showing_it():
    key = "WRITE\u2019KEY"  # a typographic quote pasted with it
    with pytest.raises(ConfigurationError, match="write_key must be latin-1") as excinfo:
        sh.client(key, API)
    assert key not in str(excinfo.value)


def test_headers_option_merges_over_ours(make):
    http, stub = make(headers={"User-Agent": "mine/1", "X-Tenant": "t1"})
    sh.batch(http, [track()])
    headers = stub.requests[0].headers
    assert headers["User-Agent"] == "mine/1" and headers["X-Tenant"] == "t1"
    assert headers["Content-Type"] == "application/json"


def test_session_option_is_used_and_left_untouched(make):
    session = requests.Session()
    mounted = dict(session.adapters)
    http, stub = make(session=session)
    sh.batch(http, [track()])
    assert http.session is session and len(stub.requests) == 1
    http.close()
    # Nothing mounted on it: the application's own requests through it still go out.
    assert session.adapters == mounted and session.get_adapter(API) is mounted["https://"]


def test_send_to_http_false_wins_over_a_callers_session_and_its_mounts():
    session = requests.Session()
    theirs = Stub()
    session.mount(API, theirs)  # more specific than any http(s):// mount
    http = sh.client(KEY, API, send_to_http=False, session=session)
    assert sh.batch(http, [track()]).status_code == 200
    assert theirs.requests == [] and session.get_adapter(API) is theirs


def test_send_and_batch_accept_dicts_and_encoded_events(make):
    http, stub = make()
    event = {"type": "track", "userId": "u", "event": "Raw", "messageId": "m1",
             "sentAt": "stale"}
    sh.send(http, event)
    sh.batch(http, [event, Encoded("m2", "track", '{"type":"track","userId":"u","event":"E"}')])
    single, batched = stub.requests
    assert single.body["event"] == "Raw" and single.body["sentAt"] != "stale"
    assert [e["event"] for e in batched.body["batch"]] == ["Raw", "E"]
    assert "sentAt" not in batched.body["batch"][0]


@pytest.mark.parametrize("message, field", [
    ({"event": "no type"}, "type"),
    ({"type": "purchase"}, "type"),
    (Track(event="no user"), "user_id"),
    (Encoded("m", "../admin", "{}"), "type"),
])
def test_invalid_events_are_refused_before_sending(make, message, field):
    http, stub = make()
    with pytest.raises(InvalidMessage) as excinfo:
        sh.send(http, message)
    assert excinfo.value.field == field
    with pytest.raises(InvalidMessage):
        sh.batch(http, [message])
    assert stub.requests == []


def test_a_dict_event_over_32_kb_is_refused(make):
    http, stub = make()
    with pytest.raises(MessageTooLarge):
        sh.send(http, {"type": "track", "userId": "u", "event": "E", "p": "x" * 33_000})
    assert stub.requests == []


# -- batch limits -------------------------------------------------------------------------


def sized_bodies(total: int, count: int) -> list[str]:
    """``count`` event texts whose spliced batch body is exactly ``total`` bytes."""
    skeleton = '{"type":"track","userId":"u","event":"E","p":""}'
    budget = total - BATCH_OVERHEAD - (count - 1) - count * len(skeleton)
    pads = [budget // count] * count
    pads[-1] += budget - sum(pads)
    return ['{"type":"track","userId":"u","event":"E","p":"' + "x" * pad + '"}' for pad in pads]


def test_a_batch_of_exactly_500_000_bytes_is_sent(make):
    raw: list[bytes] = []
    http, _ = make(adapter=StubAdapter(capture_raw(raw)))
    sh.post_batch(http, sized_bodies(500_000, 20))
    assert len(raw[0]) == 500_000  # measured on the exact bytes sent


def test_a_batch_over_500_000_bytes_is_refused_naming_the_limit(make):
    http, stub = make()
    with pytest.raises(ValueError, match="500000-byte limit"):
        sh.post_batch(http, sized_bodies(500_001, 20))
    assert stub.requests == []


def test_a_batch_over_2500_events_is_refused_naming_the_limit(make):
    http, stub = make()
    body = '{"type":"track","userId":"u","event":"E"}'
    sh.post_batch(http, [body] * 2500)
    with pytest.raises(InvalidMessage, match="2500 events"):
        sh.post_batch(http, [body] * 2501)
    with pytest.raises(InvalidMessage, match="2500 events"):
        sh.batch(http, [track()] * 2501)
    assert len(stub.requests) == 1


def test_an_empty_batch_is_refused(make):
    http, stub = make()
    with pytest.raises(InvalidMessage):
        sh.batch(http, [])
    assert stub.requests == []


# -- status rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("status, verdict", [
    *((s, "ok") for s in (200, 201, 202, 204, 299)),
    *((s, "retry") for s in (408, 410, 429, 460, 500, 502, 503, 504, 507, 599)),
    *((s, "misconfigured") for s in (401, 403, 404)),
    *((s, "misconfigured") for s in (300, 301, 302, 303, 304, 307, 308, 399)),
    *((s, "reject") for s in (400, 402, 405, 409, 413, 415, 422, 499, 501, 505)),
    *((s, "reject") for s in (100, 600, 0, -1)),
])
def test_classify(status, verdict):
    assert sh.classify(status) == verdict


@pytest.mark.parametrize("status", [408, 410, 429, 460, 500, 502, 503, 504])
def test_a_retryable_status_is_retried(make, status):
    http, stub = make(sequence(status, 200))
    assert sh.batch(http, [track()]).status_code == 200
    assert [r.status for r in stub.requests] == [status, 200]
    assert len(stub.events) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422, 501, 505])
def test_a_final_status_is_returned_at_once(make, status):
    http, stub = make(sequence(status, 200))
    assert sh.batch(http, [track()]).status_code == status
    assert len(stub.requests) == 1


@pytest.mark.parametrize("retry_attempts", [0, 1, 3, 5])
def test_retry_attempts_bounds_the_attempts_and_the_last_response_is_returned(
        make, retry_attempts):
    http, stub = make(lambda request: (503, "down"), retry_attempts=retry_attempts)
    response = sh.batch(http, [track()])
    assert response.status_code == 503 and response.text == "down"
    assert len(stub.requests) == retry_attempts + 1


def test_timeouts_and_connection_errors_are_retried(make):
    http, stub = make(sequence(requests.ConnectTimeout, requests.ReadTimeout,
                               requests.ConnectionError, 200))
    assert sh.batch(http, [track()]).status_code == 200
    assert [r.status for r in stub.requests] == [None, None, None, 200]


def test_no_response_at_all_raises_network_error_after_the_last_attempt(make):
    cause = requests.ConnectionError("connection refused")
    http, stub = make(sequence(cause), retry_attempts=2)
    with pytest.raises(NetworkError) as excinfo:
        sh.batch(http, [track()])
    assert excinfo.value.__cause__ is cause and excinfo.value.retryable
    assert len(stub.requests) == 3


def requests_exception_classes():
    return [cls for _, cls in inspect.getmembers(requests.exceptions, inspect.isclass)
            if issubclass(cls, requests.RequestException)]


def instantiate(cls):
    try:
        return cls("boom")
    except TypeError:  # JSONDecodeError wants (msg, doc, pos)
        return cls("boom", "", 0)


TRANSIENT = (requests.ConnectionError, requests.Timeout,
             requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)


@pytest.mark.parametrize("cls", requests_exception_classes(), ids=lambda c: c.__name__)
def test_every_requests_exception_becomes_network_error(make, cls):
    """The mapping is complete: no requests error leaves the module; only transient ones
    are retried."""
    error = instantiate(cls)
    http, stub = make(sequence(error), retry_attempts=2)
    with pytest.raises(NetworkError) as excinfo:
        sh.batch(http, [track()])
    assert not isinstance(excinfo.value, requests.RequestException)
    assert excinfo.value.__cause__ is error
    transient = isinstance(error, TRANSIENT)
    assert excinfo.value.retryable is transient
    assert len(stub.requests) == (3 if transient else 1)


def test_the_mapping_test_covers_the_known_classes():
    names = {cls.__name__ for cls in requests_exception_classes()}
    assert {"ConnectionError", "ConnectTimeout", "ReadTimeout", "SSLError", "ProxyError",
            "ChunkedEncodingError", "InvalidURL", "TooManyRedirects"} <= names


@pytest.mark.parametrize("error", [
    OSError("no CA bundle"), ConnectionResetError("reset"), TimeoutError("timed out"),
    urllib3.exceptions.ProtocolError("broken"), urllib3.exceptions.ReadTimeoutError(None, "", "t"),
], ids=lambda e: type(e).__name__)
def test_stray_transport_errors_become_network_error(make, error):
    http, _ = make(sequence(error), retry_attempts=0)
    with pytest.raises(NetworkError) as excinfo:
        sh.batch(http, [track()])
    assert excinfo.value.__cause__ is error


# -- backoff and Retry-After -----------------------------------------------------------------


def test_backoff_doubles_from_retry_start_up_to_retry_expiry(make, fake):
    http, _ = make(lambda request: 503, retry_attempts=5, retry_start=100, retry_expiry=400,
                   jitter=lambda seconds: seconds)
    sh.batch(http, [track()])
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4])


def test_backoff_is_jittered_below_the_exponential_delay(make, fake, listen):
    retries = listen(("segmentry", "batch", "retry"))
    http, _ = make(lambda request: 503, retry_attempts=8, retry_start=100, retry_expiry=1_000)
    sh.batch(http, [track()])
    delays = [m["delay_s"] for _, m, _ in retries]
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings)) and len(delays) == 8
    assert len(set(delays)) > 1  # full jitter: uniform draws, not the ceiling every time


def test_retry_after_seconds_win_over_backoff_and_retry_expiry(make, fake, listen):
    retries = listen(("segmentry", "batch", "retry"))
    http, stub = make(sequence((429, "", {"Retry-After": "7"}), 200), retry_expiry=10)
    assert sh.batch(http, [track()]).status_code == 200
    assert fake.sleeps == pytest.approx([7.0])
    assert retries[0][1] == {"delay_s": 7.0}
    assert retries[0][2] == {"attempt": 1, "status_code": 429}


def test_retry_after_is_capped_at_300_seconds(make, fake):
    http, _ = make(retry_after("86400", status=503), retry_attempts=1)
    sh.batch(http, [track()])
    assert fake.sleeps == pytest.approx([300.0])


def headers_response(**headers):
    response = requests.Response()
    response.headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    return response


def http_date(seconds_from_now: float) -> str:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds_from_now)
    return format_datetime(when, usegmt=True)


@pytest.mark.parametrize("value, expected", [
    ("30", 30.0), (" 2 ", 2.0), ("0", 0.0), ("1.5", 1.5), ("301", 300.0), ("999999", 300.0),
    ("", None), ("soon", None), ("-5", None), ("1e3", None),
])
def test_retry_after_seconds_parsing(value, expected):
    assert sh.retry_after_s(headers_response(Retry_After=value)) == expected


def test_an_answer_reads_the_status_once_into_its_verdict_and_retry_after():
    request = requests.Request("POST", API + "batch").prepare()
    ok = sh.answer(sh.make_response(request, 200, b'{"success":true}', {"Retry-After": "9"}))
    assert (ok.status, ok.verdict, ok.retry_after_s, ok.text, ok.error) == (
        200, sh.OK, None, "", None)
    busy = sh.answer(sh.make_response(request, 429, b"slow \x1b[2J down", {"Retry-After": "7"}))
    assert (busy.verdict, busy.retry_after_s, busy.text) == (sh.RETRY, 7.0, "slow \\x1b[2J down")
    refused = sh.answer(sh.make_response(request, 400, b"x" * 5000, {"Retry-After": "7"}))
    assert (refused.verdict, refused.retry_after_s, refused.text) == (sh.REJECT, None, "x" * 2000)
    assert busy.response.status_code == 429 and refused.response.status_code == 400


def test_an_answer_that_never_came_has_no_retry_after_and_says_if_a_retry_can_help():
    down, refused = NetworkError("connection refused"), NetworkError("certificate refused")
    refused.retryable = False
    assert sh.answer(down) == sh.Answer(None, sh.RETRY, error=down)
    assert sh.answer(refused) == sh.Answer(None, sh.MISCONFIGURED, error=refused)


def test_deliver_batch_answers_what_post_batch_raises_or_returns(make):
    http, _ = make(sequence(requests.ConnectionError, 503, 200), retry_attempts=0)
    down = sh.deliver_batch(http, ['{"type":"track"}'])
    assert down.status is None and "ConnectionError" in str(down.error)
    assert sh.deliver_batch(http, ['{"type":"track"}']).verdict == sh.RETRY
    assert sh.deliver_batch(http, ['{"type":"track"}']).response.status_code == 200


def test_retry_after_http_date_is_seconds_from_now():
    assert sh.retry_after_s(headers_response(Retry_After=http_date(60))) == pytest.approx(
        60, abs=2)
    assert sh.retry_after_s(headers_response(Retry_After=http_date(-60))) == 0.0
    assert sh.retry_after_s(headers_response(Retry_After=http_date(3600))) == 300.0


def test_no_retry_after_header_is_none():
    assert sh.retry_after_s(headers_response()) is None


# -- the shared pause -------------------------------------------------------------------------


def test_a_retry_after_pauses_a_concurrent_call_on_the_same_client(make, fake):
    """Thread A sees 503 Retry-After: 30; thread B, started while A backs off, waits
    out the same pause before its first attempt, though it never saw the 503."""
    arrivals = []

    def handler(request):
        event = json.loads(request.body)["batch"][0]["event"]
        arrivals.append((event, fake.now, request.headers.get("X-Retry-Count")))
        if len(arrivals) == 1:
            return 503, "", {"Retry-After": "30"}
        return 200

    second: dict = {}

    def sleep(seconds):
        if not second:  # A is backing off: run B on another thread now
            second["thread"] = threading.Thread(
                target=lambda: second.update(response=sh.batch(http, [track("B")])))
            second["thread"].start()
            second["thread"].join(10)
        fake.sleep(seconds)

    http, _ = make(handler, sleep=sleep)
    start = fake.now
    assert sh.batch(http, [track("A")]).status_code == 200
    assert second["response"].status_code == 200
    (a1, _, _), (b, b_time, b_retry), (a2, _, a_retry) = arrivals
    assert (a1, b, a2) == ("A", "B", "A")
    assert b_time >= start + 30 and b_retry is None  # B paused; its own first attempt
    assert a_retry == "1"


def test_paused_until_reports_the_pause_for_the_flusher(make, fake):
    http, _ = make(retry_after("30"), retry_attempts=0)
    assert http.paused_until() <= fake.now
    http.pause(5)
    assert http.paused_until() == pytest.approx(fake.now + 5)
    http.pause(1)  # a shorter pause never shortens the gate
    assert http.paused_until() == pytest.approx(fake.now + 5)


# -- close() ------------------------------------------------------------------------------------


def test_close_ends_a_backoff_wait_at_once_and_makes_no_further_retry(listen):
    """Real waiting (close() must interrupt it): a 300 s Retry-After ends at close()."""
    retrying = threading.Event()
    telemetry_id = f"test-{uuid.uuid4()}"
    # Telemetry is global: count only this test's worker (another test's flusher
    # thread may still be retrying in the background).
    telemetry.attach(telemetry_id, [("segmentry", "batch", "retry")],
                     lambda *args: threading.current_thread() is worker and retrying.set())
    stub = Stub(retry_after("300", status=503))
    http = sh.client(KEY, API, adapter=stub)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=sh.batch(http, [track()])))
    try:
        worker.start()
        assert retrying.wait(10)
        http.close()
        worker.join(10)
        assert not worker.is_alive()
    finally:
        telemetry.detach(telemetry_id)
        http.close()
        worker.join(10)
    assert result["r"].status_code == 503
    assert len(stub.requests) == 1


def test_a_closing_client_makes_no_retry_and_pauses_nobody(make, listen, fake):
    retries = listen(("segmentry", "batch", "retry"))
    http, stub = make(sequence(503, 200))
    http.close()
    assert sh.batch(http, [track()]).status_code == 503
    assert len(stub.requests) == 1
    assert retries == [] and http.paused_until() <= fake.now


def test_a_closing_client_raises_network_error_when_no_response_came(make):
    http, stub = make(sequence(requests.ConnectionError, 200))
    http.close()
    with pytest.raises(NetworkError):
        sh.batch(http, [track()])
    assert len(stub.requests) == 1


# -- send_to_http=False, options ----------------------------------------------------------------


def test_send_to_http_false_answers_200_and_never_touches_the_network(monkeypatch, caplog):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    http = sh.client(KEY, "http://127.0.0.1:9/v1/", send_to_http=False)
    caplog.set_level(logging.DEBUG, logger="segmentry.http")
    response = sh.batch(http, [track("Secret Event", properties={"email": "a@b.c"})] * 3)
    assert response.status_code == 200 and response.json() == {"success": True}
    assert sh.send(http, track()).status_code == 200
    assert "3 event(s)" in caplog.text
    assert KEY not in caplog.text and "a@b.c" not in caplog.text
    assert "Secret Event" not in caplog.text


@pytest.mark.parametrize("kwargs, named", [
    ({"tmeout": 3}, "tmeout"),
    ({"retry_attempts": -1}, "retry_attempts"),
    ({"retry_attempts": 1.5}, "retry_attempts"),
    ({"retry_attempts": True}, "retry_attempts"),
    ({"retry_start": 0}, "retry_start"),
    ({"retry_start": "100"}, "retry_start"),
    ({"retry_start": 500, "retry_expiry": 100}, "retry_expiry"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": None}, "timeout"),
    ({"timeout": (1, -1)}, "timeout"),
    ({"session": "s"}, "session"),
    ({"adapter": object()}, "adapter"),
    ({"headers": [("a", "b")]}, "headers"),
    ({"api_url": "ftp://receiver.test/"}, "api_url"),
    ({"api_url": "receiver.test/v1"}, "api_url"),
    ({"write_key": ""}, "write_key"),
])
def test_bad_options_raise_configuration_error_naming_them(kwargs, named):
    kwargs = {"write_key": KEY, **kwargs}
    with pytest.raises(ConfigurationError, match=named) as excinfo:
        sh.client(**kwargs)
    assert isinstance(excinfo.value, ValueError)


def test_good_options_are_passed_to_every_request(make):
    seen = {}

    class Spy(StubAdapter):
        def send(self, request, **kwargs):
            seen.update(kwargs)
            return super().send(request, **kwargs)

    http, _ = make(adapter=Spy(), timeout=(2, 5), verify="/ca.pem", cert="/c.pem",
                   proxies={"https": "http://proxy.test:3128"})
    sh.batch(http, [track()])
    assert seen["timeout"] == (2, 5) and seen["verify"] == "/ca.pem"
    assert seen["cert"] == "/c.pem" and seen["proxies"]["https"] == "http://proxy.test:3128"


def test_timeout_defaults_to_15_seconds(make):
    seen = {}

    class Spy(StubAdapter):
        def send(self, request, **kwargs):
            seen.update(kwargs)
            return super().send(request, **kwargs)

    http, _ = make(adapter=Spy())
    sh.batch(http, [track()])
    assert seen["timeout"] == 15.0


def test_the_write_key_and_bodies_are_never_logged(make, caplog):
    caplog.set_level(logging.DEBUG)
    http, _ = make(sequence(503, requests.ConnectionError, 200))
    sh.batch(http, [track(properties={"email": "private@example.com"})])
    assert "retry" in caplog.text
    assert KEY not in caplog.text and "private@example.com" not in caplog.text
    assert KEY not in repr(http)


# -- telemetry -----------------------------------------------------------------------------------


def test_a_batch_attempt_is_a_span_with_the_events(make, listen):
    seen = listen(("segmentry", "batch", "start"), ("segmentry", "batch", "stop"))
    http, _ = make()
    sh.batch(http, [track("A"), track("B")])
    (start, start_m, start_md), (stop, stop_m, stop_md) = seen
    assert start == ("segmentry", "batch", "start") and stop == ("segmentry", "batch", "stop")
    assert type(start_m["system_time"]) is int and type(stop_m["duration"]) is int
    assert stop_m["duration"] >= 0
    assert [e["event"] for e in start_md["events"]] == ["A", "B"]
    assert stop_md["status"] == "ok" and stop_md["result"].status_code == 200
    assert "error" not in stop_md


def test_post_batch_decodes_stored_texts_for_a_listening_handler(make, listen):
    seen = listen(("segmentry", "batch", "stop"))
    http, _ = make()
    sh.post_batch(http, ['{"type":"track","userId":"u","event":"Stored"}'])
    assert seen[0][2]["events"] == [{"type": "track", "userId": "u", "event": "Stored"}]


def test_a_send_attempt_is_a_span_with_the_event(make, listen):
    seen = listen(("segmentry", "send", "start"), ("segmentry", "send", "stop"))
    http, _ = make()
    sh.send(http, track("One"))
    sh.post_event(http, "identify", '{"type":"identify","userId":"u"}')
    assert [e for e, _, _ in seen] == [("segmentry", "send", "start"),
                                       ("segmentry", "send", "stop")] * 2
    assert seen[0][2]["event"]["event"] == "One"
    assert seen[3][2]["event"] == {"type": "identify", "userId": "u"}


@pytest.mark.parametrize("status, retryable", [(400, False), (401, False), (503, True)])
def test_a_non_2xx_stop_carries_an_http_status_error(make, listen, status, retryable):
    seen = listen(("segmentry", "batch", "stop"))
    http, _ = make(lambda request: (status, "x" * 800), retry_attempts=0)
    sh.batch(http, [track()])
    metadata = seen[0][2]
    assert metadata["status"] == "error" and metadata["result"].status_code == status
    error = metadata["error"]
    assert isinstance(error, HTTPStatusError)
    assert error.status_code == status and error.retryable is retryable
    assert error.body == "x" * 500


def test_each_attempt_is_a_span_and_each_retry_is_reported(make, listen):
    seen = listen(*telemetry.ALL_EVENTS)
    http, _ = make(sequence(503, requests.ConnectionError, 200))
    sh.batch(http, [track()])
    assert [e[-1] for e, _, _ in seen] == [
        "start", "stop", "retry", "start", "exception", "retry", "start", "stop"]
    retries = [md for e, _, md in seen if e[-1] == "retry"]
    assert retries == [{"attempt": 1, "status_code": 503}, {"attempt": 2, "status_code": None}]


def test_send_retries_are_reported_as_send_retry(make, listen):
    seen = listen(("segmentry", "send", "retry"))
    http, _ = make(sequence(500, 200))
    sh.send(http, track())
    assert seen[0][2] == {"attempt": 1, "status_code": 500}


def test_no_response_is_a_span_exception_with_the_network_error(make, listen):
    seen = listen(("segmentry", "batch", "exception"), ("segmentry", "batch", "stop"))
    http, _ = make(sequence(requests.ConnectionError("refused")), retry_attempts=0)
    with pytest.raises(NetworkError) as excinfo:
        sh.batch(http, [track()])
    ((event, measurements, metadata),) = seen
    assert event == ("segmentry", "batch", "exception")
    assert type(measurements["duration"]) is int
    assert metadata["kind"] == "NetworkError" and metadata["reason"] is excinfo.value
    assert "NetworkError" in metadata["stacktrace"]
    assert len(metadata["events"]) == 1


def test_a_raising_handler_is_detached_and_delivery_still_works(make, caplog):
    def broken(*args):
        raise RuntimeError("handler bug")

    handler_id = f"test-{uuid.uuid4()}"
    telemetry.attach(handler_id, telemetry.ALL_EVENTS, broken)
    try:
        http, stub = make(sequence(503, 200))
        assert sh.batch(http, [track("Kept")]).status_code == 200
        assert [e["event"] for e in stub.events] == ["Kept"]
        assert telemetry.detach(handler_id) is False  # already detached by the failure
        assert "handler bug" in caplog.text
    finally:
        telemetry.detach(handler_id)


# -- a real server on 127.0.0.1 ------------------------------------------------------------------


class Receiver(BaseHTTPRequestHandler):
    """A /v1 receiver on a real socket, with keep-alive; it records what it got."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        self.server.seen.append(  # type: ignore[attr-defined]
            (self.client_address, self.path, dict(self.headers), json.loads(raw)))
        self.server.gate.wait(10)  # type: ignore[attr-defined]
        body = b'{"success":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:  # the client closed the connection (or we did)
        super().finish()
        try:  # our FIN sent before it is recorded (the server shuts the socket only later)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.server.closed.append(self.client_address)  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:
        pass


def answering(status: int, body: bytes, headers: list[tuple[str, str]]) -> type[Receiver]:
    """A receiver that records each batch and answers ``status`` with ``body`` and these
    headers (a name may repeat), and a Content-Length unless the status is 204."""
    class Answering(Receiver):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            self.server.seen.append(  # type: ignore[attr-defined]
                (self.client_address, self.path, dict(self.headers), json.loads(raw)))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if status != 204:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Answering


@pytest.fixture
def server():
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    receiver.seen, receiver.closed = [], []  # type: ignore[attr-defined]
    receiver.gate = threading.Event()  # type: ignore[attr-defined]
    receiver.gate.set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield receiver
    receiver.gate.set()  # type: ignore[attr-defined]
    receiver.shutdown()
    receiver.server_close()
    thread.join(10)


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.mark.parametrize("gzip_bodies", [False, True])
def test_a_real_server_gets_every_request_over_one_kept_alive_connection(server, gzip_bodies):
    with sh.client(KEY, url_of(server), gzip=gzip_bodies) as http:
        assert sh.batch(http, [track("A"), track("B")]).json() == {"success": True}
        assert sh.send(http, track("C")).status_code == 200
        assert sh.post_batch(http, ['{"type":"track","userId":"u","event":"D"}']).ok
    clients = {client for client, _, _, _ in server.seen}
    assert len(clients) == 1  # one TCP connection: keep-alive
    paths = [path for _, path, _, _ in server.seen]
    assert paths == ["/v1/batch", "/v1/track", "/v1/batch"]
    _, _, headers, body = server.seen[0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    assert [e["event"] for e in body["batch"]] == ["A", "B"]


def test_a_kept_alive_connection_the_receiver_closed_is_replaced_not_reused(server):
    class ClosesWhenIdle(Receiver):  # as a receiver's idle timeout does, without telling
        def do_POST(self) -> None:
            super().do_POST()
            self.close_connection = True

    server.RequestHandlerClass = ClosesWhenIdle
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        assert sh.batch(http, [track("A")]).status_code == 200
        assert wait_until(lambda: len(server.closed) == 1, timeout=10)  # its end has reached us
        assert sh.batch(http, [track("B")]).status_code == 200  # no retry was allowed
    assert [body["batch"][0]["event"] for _, _, _, body in server.seen] == ["A", "B"]
    assert server.seen[0][0] != server.seen[1][0]  # over a new connection


@pytest.fixture
def pools(monkeypatch):
    """Every connection pool a Transport makes, kept referenced: a pool merely forgotten
    would close its sockets as it is freed, and hide a close() that does nothing."""
    made = []
    original = Transport._pool

    def keep(self, *args):
        pool = original(self, *args)
        made.append(pool)
        return pool

    monkeypatch.setattr(Transport, "_pool", keep)
    return made


def test_closing_the_client_closes_its_connections(server, pools):
    http = sh.client(KEY, url_of(server), retry_attempts=0)
    assert sh.batch(http, [track("A")]).status_code == 200
    assert server.closed == [] and pools  # kept alive
    http.close()
    assert wait_until(lambda: server.closed == [server.seen[0][0]], timeout=10)


def test_a_request_after_close_leaves_no_connection_open(server, pools):
    http = sh.client(KEY, url_of(server), retry_attempts=0)
    http.close()
    assert sh.batch(http, [track("late")]).status_code == 200  # its one attempt is made
    assert wait_until(lambda: server.closed == [server.seen[0][0]], timeout=10)


def test_through_a_proxy_requests_own_adapter_sends(server):
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    with sh.client(KEY, "http://segment.invalid/v1/", proxies={"http": proxy},
                   retry_attempts=0) as http:
        assert sh.batch(http, [track("A")]).status_code == 200
    assert [path for _, path, _, _ in server.seen] == ["http://segment.invalid/v1/batch"]


def test_a_compressed_answer_is_decoded_and_repeated_headers_joined(server):
    server.RequestHandlerClass = answering(200, gzip.compress(b'{"success":true}'), [
        ("Content-Encoding", "gzip"), ("X-Seen", "a"), ("X-Seen", "b")])
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        response = sh.batch(http, [track("A")])
    assert response.json() == {"success": True} and response.headers["x-seen"] == "a, b"


@pytest.fixture
def tls_server(tmp_path):
    import trustme  # the test extra installs it
    ca = trustme.CA()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    receiver.socket = context.wrap_socket(receiver.socket, server_side=True)
    receiver.seen, receiver.closed = [], []  # type: ignore[attr-defined]
    receiver.gate = threading.Event()  # type: ignore[attr-defined]
    receiver.gate.set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=receiver.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield receiver, str(ca_file)
    receiver.shutdown()
    receiver.server_close()
    thread.join(10)


def test_https_checks_the_receivers_certificate_on_every_client(tls_server, monkeypatch):
    receiver, ca_file = tls_server
    url = f"https://127.0.0.1:{receiver.server_address[1]}/v1/"
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with sh.client(KEY, url, verify=ca_file, retry_attempts=0) as http:
        assert sh.batch(http, [track("A")]).status_code == 200
        assert sh.batch(http, [track("B")]).status_code == 200  # the pool kept, still TLS
    with sh.client(KEY, url, retry_attempts=0) as http:  # the default CA bundle: refused
        with pytest.raises(NetworkError) as excinfo:
            sh.batch(http, [track("C")])
    assert isinstance(excinfo.value.__cause__, requests.exceptions.SSLError)
    assert [body["batch"][0]["event"] for _, _, _, body in receiver.seen] == ["A", "B"]


def moved(status: int, then: int | None = None) -> type[Receiver]:
    """A receiver that answers ``status`` to POST /v1/batch, pointing to /v1/moved/batch,
    which answers ``then`` pointing to /v1/moved2/batch (or takes the batch when ``then`` is
    None). It records the batches it takes, and answers 200 to any GET, as a login page
    or a load balancer would."""
    hops = {"/v1/batch": (status, "/v1/moved/batch"), "/v1/moved/batch": (then, "/v1/moved2/batch")}

    class Moved(Receiver):
        def do_POST(self) -> None:
            code, location = hops.get(self.path, (None, ""))
            if code is None:
                return super().do_POST()
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self.server.seen.append(("GET", self.path, None, None))  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    return Moved


@pytest.mark.parametrize("status", [307, 308])
def test_a_307_or_308_is_followed_with_the_same_body_as_requests_follows_it(server, status):
    server.RequestHandlerClass = moved(status)
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        response = sh.batch(http, [track("A")])
    assert response.status_code == 200 and len(response.history) == 1
    assert [(path, body["batch"][0]["event"]) for _, path, _, body in server.seen] == [
        ("/v1/moved/batch", "A")]


@pytest.mark.parametrize("status", [301, 302, 303])
@pytest.mark.parametrize("own_session", [True, False])
def test_a_redirect_that_would_drop_the_body_is_not_followed(server, status, own_session):
    # requests follows these as a GET without the body: its 200 would count as delivered.
    server.RequestHandlerClass = moved(status)
    options = {} if own_session else {"session": requests.Session()}
    with sh.client(KEY, url_of(server), retry_attempts=0, **options) as http:
        response = sh.batch(http, [track("A")])
    assert response.status_code == status and sh.classify(status) == sh.MISCONFIGURED
    assert server.seen == []


def test_a_307_then_a_302_stops_at_the_302(server):
    server.RequestHandlerClass = moved(307, then=302)
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        response = sh.batch(http, [track("A")])
    assert response.status_code == 302 and [r.status_code for r in response.history] == [307]
    assert server.seen == []


def moved_to(location, status=307):
    """A stub handler: ``status`` to ``location`` for the first request, then 200."""
    return sequence((status, "", {"Location": location}), 200)


@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("session", [None, "theirs"])
def test_a_callers_adapter_has_its_307_or_308_followed_with_the_same_body(make, status, session):
    """With or without a session of theirs (whose mounts are left alone: see _session)."""
    theirs = {"session": requests.Session()} if session else {}
    http, stub = make(moved_to("/v1/moved/batch", status), **theirs)
    response = sh.batch(http, [track("A")])
    assert response.status_code == 200 and [r.status_code for r in response.history] == [status]
    first, second = stub.requests
    assert (first.method, first.path, second.method, second.path) == (
        "POST", "/v1/batch", "POST", "/v1/moved/batch")
    assert second.body["batch"][0]["event"] == "A"
    assert second.headers["Authorization"] == first.headers["Authorization"]  # same host


@pytest.mark.parametrize("session", [None, "theirs"])
def test_a_redirect_to_another_host_does_not_carry_the_write_key(make, session):
    theirs = {"session": requests.Session()} if session else {}
    http, stub = make(moved_to("https://elsewhere.test/v1/batch"), **theirs)
    assert sh.batch(http, [track("A")]).status_code == 200
    first, second = stub.requests
    assert "Authorization" in first.headers and "Authorization" not in second.headers
    assert second.body["batch"][0]["event"] == "A"


@pytest.mark.parametrize("session", [None, "theirs"])
def test_a_redirect_loop_stops_at_the_sessions_limit_and_is_not_retried(make, session):
    theirs = {"session": requests.Session()} if session else {}
    http, stub = make(lambda request: (307, "", {"Location": "/v1/batch"}), retry_attempts=3,
                      **theirs)
    with pytest.raises(NetworkError, match="TooManyRedirects") as excinfo:
        sh.batch(http, [track("A")])
    assert not excinfo.value.retryable
    assert len(stub.requests) == http.session.max_redirects + 1


def test_a_callers_session_is_sent_through_its_mounted_adapter_never_session_send():
    class NoSend(requests.Session):
        def send(self, *args, **kwargs):
            raise AssertionError("session.send was called")

    session, stub, hooked = NoSend(), Stub(moved_to("/v1/moved/batch")), []
    session.mount(API, stub)
    session.hooks["response"].append(lambda response, **kw: hooked.append(response.status_code))
    with sh.client(KEY, API, session=session, retry_attempts=0) as http:
        assert sh.batch(http, [track("A")]).status_code == 200
    assert [r.path for r in stub.requests] == ["/v1/batch", "/v1/moved/batch"]
    assert hooked == [307, 200]  # the session's response hooks still see each answer


def test_a_callers_session_gets_the_ca_bundle_from_the_environment(tls_server, monkeypatch):
    receiver, ca_file = tls_server
    url = f"https://127.0.0.1:{receiver.server_address[1]}/v1/"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca_file)  # as plain requests.post honours it
    with sh.client(KEY, url, session=requests.Session(), retry_attempts=0) as http:
        assert sh.batch(http, [track("A")]).status_code == 200
    assert [body["batch"][0]["event"] for _, _, _, body in receiver.seen] == ["A"]


def test_a_real_server_too_slow_for_the_timeout_is_a_network_error(server):
    server.gate.clear()  # the receiver holds its answer until the test ends
    with sh.client(KEY, url_of(server), timeout=0.2, retry_attempts=0) as http:
        with pytest.raises(NetworkError) as excinfo:
            sh.batch(http, [track()])
    assert isinstance(excinfo.value.__cause__, requests.Timeout)


def test_a_refused_connection_is_retried_then_a_network_error():
    port = refused_port()
    attempts = []
    handler_id = f"test-{uuid.uuid4()}"
    telemetry.attach(handler_id, [("segmentry", "batch", "start")],
                     lambda *args: attempts.append(1))
    try:
        http = sh.client(KEY, f"http://127.0.0.1:{port}/v1/", retry_attempts=2, retry_start=1,
                         retry_expiry=2)
        with pytest.raises(NetworkError) as excinfo:
            sh.batch(http, [track()])
    finally:
        telemetry.detach(handler_id)
    assert isinstance(excinfo.value.__cause__, requests.ConnectionError)
    assert len(attempts) == 3


def test_after_a_429_requests_wait_for_their_pacing_slot(make, fake):
    # 20 answers 200, then a 429 with Retry-After: 0, then 200 again: the retry and the
    # calls after it are spaced by the pacer, not sent back to back.
    answers = iter([200] * 20 + [429] + [200] * 10)

    def handler(request):
        status = next(answers)
        return (status, "", {"Retry-After": "0"} if status == 429 else {})

    http, stub = make(handler)
    for _ in range(20):
        fake.now += 0.1  # 10 requests/s accepted
        assert sh.batch(http, [track()]).status_code == 200
    assert fake.sleeps == []
    for _ in range(3):
        assert sh.batch(http, [track()]).status_code == 200
    rate = http.pacer.rate
    assert rate is not None and rate < 10
    paced = [s for s in fake.sleeps if s > 0]
    assert len(paced) >= 2 and all(s == pytest.approx(1 / rate, rel=0.2) for s in paced[-2:])


def test_a_request_paced_into_a_new_pause_waits_for_it(make, fake):
    http, stub = make()
    http.pacer.observe(429)  # pacing at the floor, one request a second
    http.pacer.delay()  # a slot taken: the next request waits a second for its own
    slept = []

    def sleep(seconds):  # meanwhile a batch of another thread gets a Retry-After of 5 s
        slept.append(round(seconds, 3))
        if len(slept) == 1:
            http.pause(5.0)
        fake.sleep(seconds)

    http.sleep = sleep
    assert http.wait_open()
    assert slept == [1.0, 4.0] and fake.clock() >= 1005.0  # the pause, then what is left


def test_a_retry_after_on_the_last_attempt_still_pauses_the_other_senders(make, fake):
    http, stub = make(retry_after("5"), retry_attempts=0)
    assert sh.batch(http, [track()]).status_code == 429
    assert http.paused_until() - fake.clock() == pytest.approx(5.0)


def test_an_answer_sent_before_the_body_was_read_is_the_answer(server):
    # A receiver may refuse a body it finds too large from its headers, answer at once
    # and close: the rest of the upload then fails, and the answer must still be read.
    class RefusesEarly(Receiver):
        def do_POST(self) -> None:
            body = b'{"success":false}'
            self.send_response(413)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

    server.RequestHandlerClass = RefusesEarly
    big = '{"type":"track","userId":"u","event":"' + "x" * 8_000_000 + '"}'
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        response = http.post(http.api_url + "batch", big)
    assert response.status_code == 413


@pytest.mark.parametrize("status", [200, 204])
def test_an_empty_compressed_answer_is_a_delivery(server, status):
    # A 2xx with Content-Encoding: gzip and no body (a proxy may label every answer so):
    # requests hands over b"", the batch was taken. It must not become a retryable error.
    server.RequestHandlerClass = answering(status, b"", [("Content-Encoding", "gzip")])
    with sh.client(KEY, url_of(server), retry_attempts=2, retry_start=1, retry_expiry=1) as http:
        assert sh.batch(http, [track("A")]).status_code == status
    assert len(server.seen) == 1  # taken once, not three times


def test_a_multi_member_gzip_answer_is_decoded_whole(server):
    two_members = gzip.compress(b'{"success":') + gzip.compress(b'true}')
    server.RequestHandlerClass = answering(400, two_members, [("Content-Encoding", "gzip")])
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        assert sh.batch(http, [track("A")]).content == b'{"success":true}'


def test_an_informational_answer_is_not_the_answer(server):
    # 103 Early Hints before the final answer: http.client only skips 100. The 103 must
    # not be the batch's answer (classify: reject -> split, dead letters), and the 200 that
    # follows must not become the next batch's answer on the reused connection.
    class Hints(Receiver):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            event = json.loads(raw)["batch"][0]["event"]
            self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            body = json.dumps({"for": event}).encode()
            self.send_response(200 if event == "A" else 400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server.RequestHandlerClass = Hints
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        first = sh.batch(http, [track("A")])
        second = sh.batch(http, [track("B")])
    assert (first.status_code, first.json()) == (200, {"for": "A"})
    assert (second.status_code, second.json()) == (400, {"for": "B"})


def test_a_missing_ca_bundle_is_a_network_error_not_worth_a_retry(tmp_path):
    missing = str(tmp_path / "no-such-ca.pem")
    with sh.client(KEY, "https://127.0.0.1:9/v1/", verify=missing, retry_attempts=3) as http:
        with pytest.raises(NetworkError) as excinfo:
            sh.batch(http, [track()])
    assert excinfo.value.retryable is False and missing in str(excinfo.value)


OK_REPLY = b'HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{"success":true}'


def scripted(*replies: tuple[bytes, bool]) -> type[Receiver]:
    """A receiver that writes each request's answer as raw bytes, the next of ``replies``
    (the answer, and whether to close the connection after it)."""
    script = list(replies)

    class Scripted(Receiver):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            self.server.seen.append(  # type: ignore[attr-defined]
                (self.client_address, self.path, dict(self.headers), json.loads(raw)))
            reply, close = script.pop(0)
            self.wfile.write(reply)
            self.wfile.flush()
            self.close_connection = close

    return Scripted


@pytest.mark.parametrize("reply, close, body, reused", [
    # chunked, with a chunk extension and a trailer
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\n{"suc\r\n'
     b'0b\r\ncess":true}\r\n0\r\nX-Trailer: 1\r\n\r\n', False, b'{"success":true}', True),
    # no length: the body ends with the connection
    (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"success":true}', True,
     b'{"success":true}', False),
    # said closed, left open: a new connection all the same
    (b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}', False, b"{}",
     False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}", False, b"{}", False),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n{}", False, b"{}",
     True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, b"", True),
    # a coding that is not chunked: the body ends with the connection, as it came
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", True,
     b"2\r\n{}\r\n0\r\n\r\n", False),
    # bytes past the answer: the connection is out of step, never reused
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n", False, b"{}", False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", False, b"{}",
     True),
    # a length repeated, the same; of repeated Connection headers the first counts
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\n{}", False, b"{}",
     True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 2"
     b"\r\n\r\n{}", False, b"{}", False),
    (b"HTTP/1.1\t200\tOK\r\nContent-Length: 2\r\n\r\n{}", False, b"{}", True),
    # an obsolete folded header, a bare LF line end
    (b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\nContent-Length: 2\r\n\r\n{}", False, b"{}", True),
])
def test_each_way_an_answer_can_end_is_read_and_the_connection_reused_only_when_it_may(
        server, reply, close, body, reused):
    server.RequestHandlerClass = scripted((reply, close), (OK_REPLY, False))
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        first = sh.batch(http, [track("A")])
        second = sh.batch(http, [track("B")])
    assert first.content == body
    if b"X-Long" in reply:
        assert first.headers["X-Long"] == "a b"
    assert second.json() == {"success": True}  # nothing of the first answer was left over
    (one, _, headers, _), (two, _, _, _) = server.seen
    assert (one == two) is reused
    port = server.server_address[1]
    assert headers["Host"] == f"127.0.0.1:{port}"  # (and the body whole: the server parsed it)


@pytest.mark.parametrize("reply", [
    b"",  # closed without an answer
    b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"succ',  # closed in the body
    b"SPDY/3 200 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    "HTTP/1.1 2²0 OK\r\nContent-Length: 2\r\n\r\n{}".encode("latin-1"),  # str.isdigit() says yes
    b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-7\r\nGARBAGE\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}xx\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n",
    # framed two ways, or not framed at all (http.client takes the first, or reads to the close)
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 5\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: xchunked\r\n\r\n{}",
    # header lines without a colon, or with whitespace before it
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\n Content-Length: 2\r\n\r\n{}",
    # unfinished: a head without its empty line is no answer, whatever it said
    b"HTTP/1.1 200",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: appl",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: 1\r\n",
    # statuses that are not three ASCII digits
    b"HTTP/1.1 +200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 0200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 2_00 OK\r\nContent-Length: 2\r\n\r\n{}",
])
def test_a_broken_answer_is_a_retryable_network_error_and_its_connection_dropped(server, reply):
    server.RequestHandlerClass = scripted((reply, True), (OK_REPLY, False))
    with sh.client(KEY, url_of(server), retry_attempts=0) as http:
        with pytest.raises(NetworkError) as excinfo:
            sh.batch(http, [track("A")])
        assert excinfo.value.retryable
        assert sh.batch(http, [track("B")]).json() == {"success": True}
    (one, _, _, _), (two, _, _, _) = server.seen
    assert one != two
