"""segmentry.compat behaves as analytics-python 2.4 over the durable queue: its
signatures, checks and exceptions, cleaning, logger, return values, on_error and
sync_mode, max_queue_size, and its wire payload field by field, checked against the
installed analytics-python itself. (Its own test suite runs in test_upstream_suite.py.)"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import decimal
import gzip
import inspect
import json
import logging
import numbers
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import segment.analytics as analytics_python

import segmentry
import segmentry.compat as analytics
from segmentry import ConfigurationError, InvalidMessage, MessageTooLarge, StorageError
from segmentry.compat import client as compat_client
from segmentry.exceptions import HTTPStatusError, NetworkError
from segmentry.testing import Stub

KEY = "testsecret"
UTC = dt.timezone.utc
CALLS = ("track", "identify", "group", "alias", "page", "screen")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens, never the internet


# -- a local receiver: one handler, requests recorded in arrival order -------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.recorded.append((self.path, dict(self.headers), json.loads(body)))  # type: ignore[attr-defined]
        status = self.server.status  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"success": true}' if status == 200 else b'{"success": false}')

    def log_message(self, *args: Any) -> None:
        pass


class Receiver:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_port}"
        self.recorded: list[tuple[str, dict[str, str], Any]] = server.recorded  # type: ignore[attr-defined]

    def answer(self, status: int) -> None:
        self.server.status = status  # type: ignore[attr-defined]

    def bodies(self, user_agent: str) -> list[dict[str, Any]]:
        """Request bodies from clients whose User-Agent starts with ``user_agent``."""
        return [body for _, headers, body in self.recorded
                if headers.get("User-Agent", "").startswith(user_agent)]

    def events(self, user_agent: str = "") -> list[dict[str, Any]]:
        return [event for body in self.bodies(user_agent) for event in body["batch"]]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    for name in ("NO_PROXY", "no_proxy"):  # never route 127.0.0.1 through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.recorded = []  # type: ignore[attr-defined]
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield Receiver(server)
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def state_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Default queue files go to the test's own directory, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SEGMENTRY_QUEUE", raising=False)
    monkeypatch.delenv("SEGMENTRY_API_URL", raising=False)
    return str(tmp_path / "state")


@pytest.fixture(autouse=True)
def module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module with a write key and send=False; settings a test changes with
    monkeypatch are restored, and the default client is stopped after."""
    monkeypatch.setattr(analytics, "write_key", KEY)
    monkeypatch.setattr(analytics, "send", False)
    monkeypatch.setattr(analytics, "host", CLOSED_PORT)
    yield analytics
    analytics._reset()


@pytest.fixture(autouse=True)
def segment_logger() -> Iterator[logging.Logger]:
    """analytics-python's logger and segmentry's, levels and handlers restored after."""
    loggers = [logging.getLogger("segment"), logging.getLogger("segmentry")]
    saved = [(lg.level, list(lg.handlers)) for lg in loggers]
    yield loggers[0]
    for lg, (level, handlers) in zip(loggers, saved):
        lg.handlers[:] = handlers
        lg.setLevel(level)  # setLevel, not an assignment: it also clears the loggers' caches


@pytest.fixture
def make_client() -> Iterator[Any]:
    """compat.Client factory, every client stopped after."""
    made: list[analytics.Client] = []

    def make(*args: Any, **kwargs: Any) -> analytics.Client:
        kwargs.setdefault("host", CLOSED_PORT)
        client = analytics.Client(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.join()


@pytest.fixture
def stubbed(make_client: Any) -> tuple[Any, Stub]:
    """A client that sends to a stub recording what it receives."""
    stub = Stub()
    return make_client(KEY, requests_options={"adapter": stub}), stub


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    event = threading.Event()
    end = dt.datetime.now() + dt.timedelta(seconds=timeout)
    while dt.datetime.now() < end:
        if predicate():
            return True
        event.wait(0.02)
    return False


# -- the surface is analytics-python's ------------------------------------------------------


@pytest.mark.parametrize("method", CALLS)
def test_each_call_has_analytics_pythons_exact_parameters_in_order(method: str) -> None:
    theirs = inspect.signature(getattr(analytics_python.Client, method)).parameters
    ours = inspect.signature(getattr(analytics.Client, method)).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_client_accepts_every_analytics_python_constructor_argument_with_its_default() -> None:
    theirs = inspect.signature(analytics_python.Client.__init__).parameters
    ours = inspect.signature(analytics.Client.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)  # same positional order
    for name, param in theirs.items():
        assert ours[name].default == param.default, name
    extra = [p for name, p in ours.items() if name not in theirs]
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in extra)


def test_module_settings_have_analytics_pythons_names_and_defaults() -> None:
    for name in vars(analytics_python.Client.DefaultConfig):
        if not name.startswith("_"):
            assert (getattr(analytics.Client.DefaultConfig, name)
                    == getattr(analytics_python.Client.DefaultConfig, name)), name
    for name in CALLS + ("flush", "join", "shutdown"):
        assert callable(getattr(analytics, name))


def test_client_is_importable_where_analytics_python_has_it() -> None:
    from segmentry.compat.client import Client

    assert Client is analytics.Client
    assert analytics.Client.log is logging.getLogger("segment")


# -- 1. cleaning, id rules and exceptions as analytics-python's ------------------------------


class Int64:
    """An integer that is not an int, as numpy.int64 (straight from pandas) is not:
    registered as a numbers.Integral, as numpy registers its own."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value

    def __str__(self) -> str:
        return str(self.value)


numbers.Integral.register(Int64)


def test_unsendable_values_are_dropped_with_a_warning_and_the_rest_sent(
        stubbed: Any, segment_logger: logging.Logger) -> None:
    client, stub = stubbed
    records = Records()
    segment_logger.addHandler(records)
    properties = {"b": b"caf\xc3\xa9", "model": object(), "delta": dt.timedelta(1),
                  "id": uuid.UUID(int=1), "price": decimal.Decimal("9.5"), "tags": {"x"},
                  "plan": "pro"}
    success, msg = client.track("u", "Bought", properties)
    assert success
    assert msg["properties"] == {"b": "café", "price": 9.5, "tags": ["x"], "plan": "pro"}
    assert client.flush(10)
    assert stub.events[0]["properties"] == msg["properties"]
    warned = " ".join(records.messages())
    assert "model" in warned and "delta" in warned and "UUID" in warned
    assert "café" not in warned  # keys and types only, never values


def test_ids_follow_analytics_pythons_rules(stubbed: Any) -> None:
    client, stub = stubbed
    assert client.track(Int64(42), "E")[1]["userId"] == "42"
    assert client.track(1.5, "E")[1]["userId"] == "1.5"
    assert client.track(decimal.Decimal("7"), "E")[1]["userId"] == "7"
    assert client.track("u", "")[1]["event"] == ""
    assert client.group("u", "")[1]["groupId"] == ""
    assert client.alias("", "u")[1]["previousId"] == ""
    with pytest.raises(AssertionError, match="user_id or anonymous_id"):
        client.track(0, "E")  # falsy: analytics-python refuses it
    assert client.flush(10)
    assert stub.events[0]["userId"] == "42"


def test_numpy_integers_are_ids_and_numbers() -> None:
    numpy = pytest.importorskip("numpy")
    _, msg = analytics.track(numpy.int64(7), "E", {"n": numpy.int64(3)})
    assert msg["userId"] == "7"
    assert json.loads(compat_client.m.encode(msg))["properties"] == {"n": 3}


def test_an_integral_value_that_is_not_an_int_is_sent_as_a_number() -> None:
    _, msg = analytics.track("u", "E", {"n": Int64(3)})
    assert json.loads(compat_client.m.encode(msg))["properties"] == {"n": 3}


def test_bad_input_raises_assertion_error_and_invalid_message() -> None:
    for call in (lambda: analytics.track("userId"),
                 lambda: analytics.track(event="E"),
                 lambda: analytics.track("userId", "E", ["not", "a", "dict"]),
                 lambda: analytics.alias(user_id="userId"),
                 lambda: analytics.track("u", "E", timestamp="2024-05-01T12:00:00Z"),
                 lambda: analytics.page("u", name=3)):
        with pytest.raises(AssertionError) as error:
            call()
        assert isinstance(error.value, InvalidMessage) and isinstance(error.value, ValueError)


def test_no_write_key_raises_assertion_error(make_client: Any) -> None:
    with pytest.raises(AssertionError):
        make_client()
    with pytest.raises(ConfigurationError):
        make_client(None, send=False)


def test_an_event_over_32_kb_raises_runtime_error_and_message_too_large() -> None:
    with pytest.raises(RuntimeError) as error:
        analytics.track("userId", "E", {"blob": "x" * 40_000})
    assert isinstance(error.value, MessageTooLarge)


def test_nan_is_refused_at_the_call_as_segment_would_refuse_it() -> None:
    with pytest.raises(InvalidMessage, match="JSON"):
        analytics.track("u", "E", {"ratio": float("nan")})


def test_the_native_api_keeps_its_stricter_rules(tmp_path: Any) -> None:
    with segmentry.Client(KEY, queue_path=str(tmp_path / "n.db"), flusher=None) as native:
        with pytest.raises(InvalidMessage, match="properties.b"):
            native.track("u", "E", {"b": b"bytes"})
    assert analytics.track("u", "E", {"b": b"bytes"})[1]["properties"] == {"b": "bytes"}


# -- 2. one queue file per destination ---------------------------------------------------------


def test_each_destination_has_its_own_default_queue_file(state_home: str) -> None:
    url = "https://api.segment.io/v1/"
    path = compat_client.queue_path_for("A", url, True)
    assert path.startswith(state_home)
    assert path == compat_client.queue_path_for("A", url, True)
    others = {compat_client.queue_path_for("B", url, True),
              compat_client.queue_path_for("A", "https://events.eu1.segmentapis.com/v1/", True),
              compat_client.queue_path_for("A", url, False)}
    assert path not in others and len(others) == 3
    assert "A" not in os.path.basename(path)  # a digest, never the key


def test_two_clients_with_other_keys_and_hosts_each_send_their_own_way(
        receiver: Receiver, make_client: Any) -> None:
    a = make_client("key-a", host=receiver.url)
    b = make_client("key-b", host=receiver.url)
    eu = make_client("key-a", host=receiver.url + "/eu")
    dry = make_client("key-a", host=receiver.url, send=False)
    ids = {name: client.track("u", "E")[1]["messageId"]
           for name, client in (("a", a), ("b", b), ("eu", eu), ("dry", dry))}
    assert a.flush(10) and b.flush(10) and eu.flush(10)
    sent = {(path, headers["Authorization"], body["writeKey"], event["messageId"])
            for path, headers, body in receiver.recorded for event in body["batch"]}

    def auth(key: str) -> str:
        return "Basic " + base64.b64encode(f"{key}:".encode()).decode()

    assert sent == {("/v1/batch", auth("key-a"), "key-a", ids["a"]),
                    ("/v1/batch", auth("key-b"), "key-b", ids["b"]),
                    ("/eu/v1/batch", auth("key-a"), "key-a", ids["eu"])}


APP = """
import sys
import segmentry.compat as analytics
analytics.write_key, analytics.host = sys.argv[1], sys.argv[2]
print(analytics.track("u", "E")[1]["messageId"], flush=True)
sys.stdin.readline()  # held open (with its flusher) until the test says
analytics.shutdown()
"""


def test_two_apps_of_one_user_with_other_keys_each_send_under_their_own(
        receiver: Receiver, tmp_path: Any) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_STATE_HOME": str(tmp_path / "s")}
    apps, ids = {}, {}
    for key in ("key-a", "key-b"):  # one after the other: app A's flusher runs first
        apps[key] = subprocess.Popen([sys.executable, "-c", APP, key, receiver.url], env=env,
                                     cwd=tmp_path, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ids[key] = apps[key].stdout.readline().strip()  # type: ignore[union-attr]
    assert wait_for(lambda: len(receiver.events()) == 2)  # both running, both delivered
    for app in apps.values():
        app.communicate("\n", timeout=60)
    sent = {(headers["Authorization"], event["messageId"])
            for _, headers, body in receiver.recorded for event in body["batch"]}
    assert sent == {("Basic " + base64.b64encode(f"{key}:".encode()).decode(), message_id)
                    for key, message_id in ids.items()}


# -- 3. an unwritable state directory ------------------------------------------------------------


def test_an_unwritable_state_dir_falls_back_to_the_temp_dir_loudly(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, make_client: Any,
        segment_logger: logging.Logger) -> None:
    (tmp_path / "file").write_text("")  # a directory below a file: refused even to root
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "file" / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    records = Records()
    segment_logger.addHandler(records)
    stub = Stub()
    client = make_client(KEY, requests_options={"adapter": stub})
    assert client.track("u", "E")[0]
    assert client.flush(10) and len(stub.events) == 1
    assert client.segmentry_client.queue_path.startswith(str(tmp_path / "tmp"))
    [warning] = [r for r in records.records if r.levelno == logging.WARNING]
    assert "cannot write" in warning.getMessage() and "queue_path" in warning.getMessage()


def test_no_writable_place_at_all_raises_at_construction(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, make_client: Any) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "file" / "state"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "file" / "tmp"))
    with pytest.raises(StorageError, match="queue_path"):
        make_client(KEY)


# -- 4. logging as analytics-python's ----------------------------------------------------------


def test_debug_prints_what_it_does_on_the_segment_logger_once(
        make_client: Any, segment_logger: logging.Logger) -> None:
    before = len(segment_logger.handlers)
    make_client(KEY, debug=True, send=False)
    make_client(KEY, debug=True, send=False)
    assert segment_logger.level == logging.DEBUG
    assert len(segment_logger.handlers) == before + 1  # one stderr handler, not one a client
    records = Records()
    segment_logger.addHandler(records)
    make_client(KEY, send=False).track("u", "E", {"secret": "s3cr3t"})
    assert any("queueing a track event" in m for m in records.messages())
    assert not any("s3cr3t" in m for m in records.messages())


def test_a_log_handler_is_added_to_the_segment_logger_once(
        make_client: Any, segment_logger: logging.Logger) -> None:
    handler = logging.NullHandler()
    make_client(KEY, log_handler=handler, send=False)
    make_client(KEY, log_handler=handler, send=False)
    assert segment_logger.handlers.count(handler) == 1


def test_segmentrys_warnings_reach_the_segment_loggers_handlers(
        make_client: Any, segment_logger: logging.Logger) -> None:
    records = Records()
    make_client(KEY, log_handler=records, send=False)
    logging.getLogger("segmentry.flusher").warning("delivery failed (NetworkError)")
    assert records.messages() == ["delivery failed (NetworkError)"]


def test_with_no_logging_configured_warnings_reach_stderr(
        make_client: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    make_client(KEY, send=False)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in an app without logging
    logging.getLogger("segmentry.flusher").warning("delivery failed (NetworkError)")
    assert "delivery failed (NetworkError)" in capsys.readouterr().err


# -- 5. on_error: what is given up on, never a transient failure -----------------------------------


def test_on_error_is_not_called_for_what_stays_queued() -> None:
    called: list[Any] = []
    on_error = compat_client._given_up(lambda error, events: called.append(error))
    on_error(NetworkError("refused"), [{}])
    on_error(HTTPStatusError(503, True), [{}])
    on_error(HTTPStatusError(429, True), [{}])
    refused, wrong_key = HTTPStatusError(400, False), HTTPStatusError(401, True)
    on_error(refused, [{}])
    on_error(wrong_key, [{}])  # kept until the key is fixed, but refused: the user must know
    assert called == [refused, wrong_key]


def test_on_error_gets_an_event_the_receiver_refuses(make_client: Any) -> None:
    called: list[tuple[Any, Any]] = []
    stub = Stub(lambda request: 400)
    client = make_client(KEY, on_error=lambda e, batch: called.append((e, batch)),
                         requests_options={"adapter": stub})
    _, msg = client.track("u", "Bad")
    assert wait_for(lambda: called)
    [(error, batch)] = called
    assert error.status_code == 400 and batch[0]["messageId"] == msg["messageId"]


def test_on_error_is_called_soon_for_a_wrong_write_key(make_client: Any) -> None:
    called: list[Any] = []
    client = make_client(KEY, on_error=lambda e, batch: called.append(e),
                         requests_options={"adapter": Stub(lambda request: 401)})
    client.track("u", "E")
    assert wait_for(lambda: called, timeout=5)
    assert called[0].status_code == 401
    assert client.flush(30) is False  # at once: blocked, not waited on for 30 s


# -- 6. sync_mode: one POST in the caller's thread, as analytics-python -------------------------


def test_sync_mode_posts_in_the_call_and_stores_nothing(
        receiver: Receiver, make_client: Any) -> None:
    client = make_client(KEY, host=receiver.url, sync_mode=True)
    success, msg = client.track("userId", "Paid")
    assert success and client.consumers is None and client.queue.empty()
    [body] = receiver.bodies("segmentry/")
    assert [e["messageId"] for e in body["batch"]] == [msg["messageId"]]


def test_sync_mode_raises_at_once_when_the_receiver_is_down(make_client: Any) -> None:
    client = make_client(KEY, host=CLOSED_PORT, sync_mode=True, max_retries=10)
    with pytest.raises(NetworkError):
        client.track("userId", "Paid")
    assert client.queue.empty()


def test_sync_mode_raises_when_the_receiver_refuses_the_event(
        receiver: Receiver, make_client: Any) -> None:
    receiver.answer(400)
    client = make_client(KEY, host=receiver.url, sync_mode=True)
    with pytest.raises(HTTPStatusError) as error:
        client.track("userId", "Paid")
    assert error.value.status_code == 400


# -- 7. max_queue_size, the module functions -------------------------------------------------------


def test_max_queue_size_bounds_the_events_waiting(
        make_client: Any, segment_logger: logging.Logger) -> None:
    records = Records()
    segment_logger.addHandler(records)
    client = make_client(KEY, max_queue_size=3, thread=0)  # nothing delivers here
    results = [client.track("u", f"E{i}") for i in range(5)]
    assert [success for success, _ in results] == [True, True, True, False, False]
    assert results[4][1]["event"] == "E4" and client.queue.qsize() == 3
    assert client.queue.maxsize == 3 and client.queue.full()
    assert records.messages() == ["analytics-python queue is full (1 events refused so far)"]
    assert client.refused == 2  # the second refusal is counted, not logged again


def test_after_join_events_are_stored_for_the_next_client_of_the_destination(
        receiver: Receiver, make_client: Any) -> None:
    first = make_client(KEY, host=receiver.url)
    first.join()
    assert not any(consumer.is_alive() for consumer in first.consumers)
    _, msg = first.track("u", "After join")
    assert not receiver.recorded and first.queue.qsize() == 1
    second = make_client(KEY, host=receiver.url)
    second.track("u", "Next start")
    assert second.flush(10)
    assert msg["messageId"] in {e["messageId"] for e in receiver.events()}


def test_module_functions_create_the_default_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for function in (analytics.flush, analytics.join, analytics.shutdown):
        analytics._reset()
        function()
        assert isinstance(analytics.default_client, analytics.Client)
    analytics._reset()
    monkeypatch.setattr(analytics, "write_key", None)
    with pytest.raises(AssertionError):
        analytics.flush()


def test_module_settings_are_read_when_the_first_call_creates_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analytics, "host", "http://collector.internal:8080")
    monkeypatch.setattr(analytics, "max_queue_size", 1337)
    monkeypatch.setattr(analytics, "on_error", False)  # analytics-python's tests do this
    analytics.identify("userId")
    client = analytics.default_client
    assert client.host == "http://collector.internal:8080" and client.queue.maxsize == 1337


# -- 8. the returned message --------------------------------------------------------------------


def test_the_returned_message_is_json_and_its_timestamp_is_python_iso() -> None:
    context = {"ip": "10.0.0.1"}
    _, msg = analytics.track("u", "E", {"price": decimal.Decimal("1.5"), "id": uuid.uuid4()},
                             context)
    json.dumps(msg)
    assert msg["properties"] == {"price": 1.5}
    assert dt.datetime.fromisoformat(msg["timestamp"]).utcoffset() == dt.timedelta(0)
    assert msg["timestamp"].endswith("+00:00")
    assert context["library"] == compat_client.LIBRARY  # added to the caller's dict, as there


def test_a_given_offset_is_kept_and_sub_milliseconds_truncated() -> None:
    when = dt.datetime(2014, 9, 3, 12, 30, 1, 123987, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert analytics.track("u", "E", timestamp=when)[1]["timestamp"] == \
        "2014-09-03T12:30:01.123+02:00"
    assert analytics.track("u", "E", timestamp=dt.datetime(2014, 9, 3))[1]["timestamp"] == \
        "2014-09-03T00:00:00.000+00:00"  # naive and old: UTC, as analytics-python guesses


def test_a_recent_naive_datetime_is_read_as_local_time() -> None:
    now = dt.datetime.now().replace(microsecond=0)
    _, msg = analytics.track("u", "E", timestamp=now)
    assert dt.datetime.fromisoformat(msg["timestamp"]) == now.astimezone()


# -- 10. settings analytics-python does not range-check ------------------------------------------


def test_large_settings_are_clamped_and_none_budgets_refused(make_client: Any) -> None:
    client = make_client(KEY, max_retries=1000, upload_size=5000, thread=100)
    options = client.segmentry_client.options
    assert (options.retry_attempts, options.max_batch_size, options.max_in_flight) == (
        100, 2500, 64)
    assert client.consumers[0].retries == 1000  # as given, as analytics-python keeps it
    for name in ("max_total_backoff_duration", "max_rate_limit_duration"):
        with pytest.raises(ValueError):
            make_client(KEY, **{name: None})


@pytest.mark.parametrize("mode", [{}, {"send": False}, {"sync_mode": True}])
def test_a_host_without_its_scheme_is_refused_at_construction(
        make_client: Any, mode: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="api.segment.io"):
        make_client(KEY, host="api.segment.io", **mode)


def test_oauth_is_refused_rather_than_ignored(make_client: Any) -> None:
    with pytest.raises(ConfigurationError, match="OAuth"):
        make_client(KEY, oauth_client_id="id", oauth_client_key="key", oauth_key_id="kid")
    make_client(KEY, oauth_client_id="id")  # analytics-python ignores an incomplete set too


def test_settings_map_onto_segmentry_options(make_client: Any) -> None:
    client = make_client(KEY, host="https://events.eu1.segmentapis.com/", gzip=True,
                         max_retries=4, timeout=7, proxies={"https": "http://proxy:3128"},
                         thread=2, upload_size=10, upload_interval=3)
    options = client.segmentry_client.options
    assert options.api_url == "https://events.eu1.segmentapis.com/v1/"
    assert options.gzip is True and options.retry_attempts == 4
    assert options.requests_options["timeout"] == 7
    assert options.requests_options["proxies"] == {"https": "http://proxy:3128"}
    assert (options.max_in_flight, options.max_batch_size, options.batch_every_ms) == (2, 10, 3000)
    assert [c.timeout for c in client.consumers] == [7, 7]


def test_thread_zero_leaves_delivery_to_a_flusher_process(make_client: Any) -> None:
    client = make_client(KEY, thread=0)
    assert client.segmentry_client.options.flusher is None and client.consumers == []


def test_gzip_setting_compresses_request_bodies(receiver: Receiver, make_client: Any) -> None:
    client = make_client(KEY, host=receiver.url, gzip=True)
    client.identify("userId", {"trait": "value"})
    assert client.flush(10)
    [(_, headers, body)] = receiver.recorded
    assert headers["Content-Encoding"] == "gzip"
    assert body["batch"][0]["traits"] == {"trait": "value"} and body["writeKey"] == KEY


# -- 9. side by side with the real analytics-python: the same wire payload ---------------------

WHEN = dt.datetime(2014, 9, 3, 12, 30, 1, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
SIDE_BY_SIDE = [
    ("track", ("user-1", "Signed Up", {"plan": "pro", "at": dt.date(2020, 1, 2),
                                       "price": decimal.Decimal("9.5"), "id": uuid.UUID(int=1),
                                       "raw": b"bytes", "tags": ("a", "b")}), {}),
    ("track", (), {"anonymous_id": 157963456373623803, "event": "Clicked",
                   "properties": {"x": 1}}),
    ("identify", ("user-1", {"email": "a@example.com"}, {"ip": "192.168.0.1"}, WHEN,
                  "anon-1", {"Amplitude": True}, "message-1"), {}),
    ("identify", (1234,), {}),
    ("group", ("user-1", 42, {"name": "Acme"}), {}),
    ("group", (), {"user_id": "user-1", "group_id": "org-9"}),
    ("alias", ("anon-42", "user-1"), {}),
    ("alias", (), {"previous_id": 7, "user_id": "user-1", "timestamp": WHEN,
                   "message_id": "message-2"}),
    ("page", ("user-1", "Docs", "Install", {"path": "/docs"}), {}),
    ("page", ("user-1",), {"name": "Home"}),
    ("screen", ("user-1", "Onboarding", "Welcome", {"step": 1}, {"ip": "10.0.0.1"}, WHEN,
                None, {"All": False}, "message-3"), {}),
    ("screen", (), {"anonymous_id": "anon-7", "category": "Settings"}),
]


def _normalized(event: dict[str, Any], given_id: bool) -> dict[str, Any]:
    """An event less what differs between any two sends: a generated messageId, the
    time of the call, and the library's name and version."""
    event = copy.deepcopy(event)
    event["context"].pop("library")
    if not given_id:
        event["messageId"] = "generated"
        event["timestamp"] = "now"
    return event


@pytest.mark.parametrize(("method", "args", "kwargs"), SIDE_BY_SIDE,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(SIDE_BY_SIDE)])
def test_the_same_call_sends_the_same_payload_as_analytics_python(
        receiver: Receiver, make_client: Any, method: str, args: tuple[Any, ...],
        kwargs: dict[str, Any]) -> None:
    reference = analytics_python.Client(KEY, host=receiver.url, sync_mode=True)
    ours = make_client(KEY, host=receiver.url)

    their_success, their_msg = getattr(reference, method)(*copy.deepcopy(args), **kwargs)
    our_success, our_msg = getattr(ours, method)(*copy.deepcopy(args), **kwargs)
    assert ours.flush(10)

    assert our_success is their_success is True
    [theirs] = receiver.bodies("analytics-python/")
    [sent] = receiver.bodies("segmentry/")
    assert set(sent) == set(theirs) == {"batch", "sentAt", "writeKey"}
    assert sent["writeKey"] == theirs["writeKey"] == KEY
    given_id = "message_id" in kwargs or len(args) > 6
    assert [_normalized(e, given_id) for e in sent["batch"]] == \
        [_normalized(e, given_id) for e in theirs["batch"]]
    assert _normalized(our_msg, given_id) == _normalized(their_msg, given_id)
    auth = {headers["Authorization"] for _, headers, _ in receiver.recorded}
    assert auth == {"Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
    assert {path for path, _, _ in receiver.recorded} == {"/v1/batch"}


def test_a_fork_while_another_thread_builds_the_default_client_does_not_hang_the_child(
        tmp_path):
    from helpers import fork_holding

    import segmentry.compat as analytics

    def child() -> bool:  # as if a thread were inside the first call's _default()
        analytics.write_key, analytics.send = "K", False
        analytics.queue_path = str(tmp_path / "child.db")
        return bool(analytics.track("u", "E")[0])

    assert fork_holding(analytics._default_lock, child) == 0

