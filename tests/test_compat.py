"""segmentry.compat is analytics-python 2.4 over the durable queue: its signatures,
argument orders, settings and (success, message) returns, checked against the installed
analytics-python itself and against its own README and test-suite call patterns."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import gzip
import inspect
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import segment.analytics as analytics_python

import segmentry.compat as analytics
from segmentry import ConfigurationError, InvalidMessage, MessageTooLarge
from segmentry.testing import Stub

KEY = "testsecret"
UTC = dt.timezone.utc
CALLS = ("track", "identify", "group", "alias", "page", "screen")


# -- a local receiver: one handler, requests recorded in arrival order -------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.recorded.append((self.path, dict(self.headers), json.loads(body)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"success": true}')

    def log_message(self, *args: Any) -> None:
        pass


class Receiver:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.url = f"http://127.0.0.1:{server.server_port}"
        self.recorded: list[tuple[str, dict[str, str], Any]] = server.recorded  # type: ignore[attr-defined]

    def events(self, user_agent: str = "") -> list[dict[str, Any]]:
        """Every event received, from clients whose User-Agent starts with ``user_agent``."""
        return [event for _, headers, body in self.recorded
                if headers.get("User-Agent", "").startswith(user_agent)
                for event in body["batch"]]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    for name in ("NO_PROXY", "no_proxy"):  # never route 127.0.0.1 through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.recorded = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield Receiver(server)
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module with a write key, its own queue file and send=False; settings a test
    changes with monkeypatch are restored, and the default client is closed after."""
    monkeypatch.setattr(analytics, "write_key", KEY)
    monkeypatch.setattr(analytics, "queue_path", str(tmp_path / "module.db"))
    monkeypatch.setattr(analytics, "send", False)
    yield analytics
    analytics._reset()


@pytest.fixture
def make_client(tmp_path: Any) -> Iterator[Any]:
    """compat.Client factory with a fresh queue file per client, all closed after."""
    made: list[analytics.Client] = []

    def make(*args: Any, **kwargs: Any) -> analytics.Client:
        kwargs.setdefault("queue_path", str(tmp_path / f"client{len(made)}.db"))
        kwargs.setdefault("host", "http://127.0.0.1:9")  # never the internet, even if broken
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


def parse(timestamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


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
    names = ("write_key", "host", "on_error", "debug", "log_handler", "send", "sync_mode",
             "max_queue_size", "gzip", "timeout", "max_retries", "oauth_client_id",
             "oauth_client_key", "oauth_key_id", "oauth_auth_server", "oauth_scope")
    for name in names:
        assert getattr(analytics.DefaultConfig, name) == getattr(analytics_python, name), name
    for name in vars(analytics_python.Client.DefaultConfig):
        if not name.startswith("_"):
            assert (getattr(analytics.Client.DefaultConfig, name)
                    == getattr(analytics_python.Client.DefaultConfig, name)), name
    for name in CALLS + ("flush", "join", "shutdown"):
        assert callable(getattr(analytics, name))


# -- analytics-python's README and test-suite call patterns ---------------------------------


def test_readme_usage_returns_success_and_the_message() -> None:
    success, msg = analytics.track("userId", "event", {"prop": 1})
    assert success is True
    assert msg["type"] == "track" and msg["event"] == "event"
    assert msg["userId"] == "userId" and msg["properties"] == {"prop": 1}
    assert isinstance(msg["messageId"], str) and isinstance(msg["timestamp"], str)
    assert isinstance(analytics.default_client, analytics.Client)
    assert analytics.flush() is True


def test_analytics_python_module_test_calls_all_succeed() -> None:
    results = [
        analytics.track("userId", "python module event"),
        analytics.identify("userId", {"email": "user@email.com"}),
        analytics.group("userId", "groupId"),
        analytics.alias("previousId", "userId"),
        analytics.page("userId"),
        analytics.screen("userId"),
    ]
    assert [success for success, _ in results] == [True] * 6
    assert [msg["type"] for _, msg in results] == list(CALLS)
    analytics.flush()


def test_basic_calls_return_analytics_pythons_message_shape() -> None:
    _, track = analytics.track("userId", "python test event")
    assert track["properties"] == {} and track["anonymousId"] is None
    _, identify = analytics.identify("userId", {"trait": "value"})
    assert identify["traits"] == {"trait": "value"} and identify["type"] == "identify"
    _, group = analytics.group("userId", "groupId")
    assert (group["groupId"], group["userId"], group["traits"]) == ("groupId", "userId", {})
    _, page = analytics.page("userId", name="name")
    assert (page["name"], page["category"], page["type"]) == ("name", None, "page")
    _, screen = analytics.screen("userId", name="name")
    assert (screen["name"], screen["type"]) == ("name", "screen")


def test_alias_takes_previous_id_first(stubbed: Any) -> None:
    client, stub = stubbed
    success, msg = client.alias("previousId", "userId")
    assert success and (msg["previousId"], msg["userId"]) == ("previousId", "userId")
    _, by_name = client.alias(user_id="userId", previous_id="previousId")
    assert (by_name["previousId"], by_name["userId"]) == ("previousId", "userId")
    assert client.flush(10)
    assert [(e["previousId"], e["userId"]) for e in stub.events] == [("previousId", "userId")] * 2


@pytest.mark.parametrize("method", ["page", "screen"])
def test_page_and_screen_take_category_before_name(stubbed: Any, method: str) -> None:
    client, stub = stubbed
    _, msg = getattr(client, method)("userId", "category", "name", {"property": "value"})
    assert (msg["category"], msg["name"], msg["properties"]) == (
        "category", "name", {"property": "value"})
    assert client.flush(10)
    [event] = stub.events
    assert (event["type"], event["category"], event["name"]) == (method, "category", "name")


ADVANCED = {  # analytics-python's test_advanced_*: every argument positional
    "track": ("userId", "python test event", {"property": "value"}),
    "identify": ("userId", {"trait": "value"}),
    "group": ("userId", "groupId", {"trait": "value"}),
    "page": ("userId", "category", "name", {"property": "value"}),
    "screen": ("userId", "category", "name", {"property": "value"}),
}


@pytest.mark.parametrize("method", sorted(ADVANCED))
def test_advanced_positional_calls_fill_every_field(stubbed: Any, method: str) -> None:
    client, stub = stubbed
    common = ({"ip": "192.168.0.1"}, dt.datetime(2014, 9, 3), "anonymousId",
              {"Amplitude": True}, "messageId")
    success, msg = getattr(client, method)(*ADVANCED[method], *common)
    assert success
    assert msg["timestamp"] == "2014-09-03T00:00:00.000Z"  # naive and old: read as UTC
    assert msg["integrations"] == {"Amplitude": True}
    assert msg["context"]["ip"] == "192.168.0.1"
    assert msg["context"]["library"]["name"] == "segmentry"
    assert (msg["anonymousId"], msg["messageId"], msg["userId"], msg["type"]) == (
        "anonymousId", "messageId", "userId", method)
    assert client.flush(10)
    [event] = stub.events
    assert event["messageId"] == "messageId" and event["integrations"] == {"Amplitude": True}


def test_alias_positional_order_has_no_anonymous_id(stubbed: Any) -> None:
    client, _ = stubbed
    _, msg = client.alias("previousId", "userId", {"ip": "192.168.0.1"},
                          dt.datetime(2014, 9, 3, tzinfo=UTC), {"Amplitude": True}, "messageId")
    assert msg["integrations"] == {"Amplitude": True} and msg["messageId"] == "messageId"
    assert msg["anonymousId"] is None


def test_positional_and_keyword_forms_give_the_same_event() -> None:
    args = ("userId", "Bought", {"price": 9}, {"ip": "10.0.0.1"})
    _, positional = analytics.track(*args, message_id="m1")
    _, keywords = analytics.track(properties={"price": 9}, event="Bought", user_id="userId",
                                  context={"ip": "10.0.0.1"}, message_id="m1")
    positional.pop("timestamp"), keywords.pop("timestamp")
    assert positional == keywords


def test_numeric_ids_are_stringified_like_analytics_python() -> None:
    _, msg = analytics.track(user_id=157963456373623802, event="python test event")
    assert (msg["userId"], msg["anonymousId"]) == ("157963456373623802", None)
    _, msg = analytics.track(anonymous_id=157963456373623803, event="python test event")
    assert (msg["userId"], msg["anonymousId"]) == (None, "157963456373623803")
    _, msg = analytics.group(1234, 5678)
    assert (msg["userId"], msg["groupId"]) == ("1234", "5678")


def test_returned_message_is_what_was_stored_and_delivered(stubbed: Any) -> None:
    client, stub = stubbed
    results = [
        client.track("u1", "Signed Up", {"plan": "pro"}, {"ip": "10.0.0.1"}),
        client.identify("u1", {"email": "a@example.com"}, integrations={"All": False}),
        client.alias("anon-1", "u1"),
        client.page("u1", "Docs", "Install", timestamp=dt.datetime(2024, 5, 6, 7, 8, 9,
                                                                       123000, tzinfo=UTC)),
    ]
    assert client.flush(10)
    for (success, msg), event in zip(results, stub.events):
        assert success
        expected = {k: v for k, v in msg.items() if v is not None and v != {} or k == "context"}
        assert {k: v for k, v in event.items() if v != {}} == expected
    assert results[3][1]["timestamp"] == "2024-05-06T07:08:09.123Z"


def test_date_values_are_returned_as_given_and_delivered_as_iso(stubbed: Any) -> None:
    client, stub = stubbed
    success, msg = client.identify("userId", {"birthdate": dt.date(1981, 2, 2)})
    assert success and msg["traits"] == {"birthdate": dt.date(1981, 2, 2)}
    assert client.flush(10)
    assert stub.events[0]["traits"] == {"birthdate": "1981-02-02"}


def test_a_recent_naive_datetime_is_read_as_local_time_like_analytics_python() -> None:
    now = dt.datetime.now().replace(microsecond=0)
    _, msg = analytics.track("u", "E", timestamp=now)
    assert parse(msg["timestamp"]) == now.astimezone()


def test_an_iso_string_timestamp_needs_its_offset() -> None:
    with pytest.raises(InvalidMessage, match="naive"):
        analytics.track("u", "E", timestamp="2024-05-01T12:00:00")  # whose noon?
    _, msg = analytics.track("u", "E", timestamp="2024-05-01T12:00:00-04:00")
    assert msg["timestamp"] == "2024-05-01T16:00:00.000Z"


def test_an_aware_datetime_before_1970_is_kept() -> None:
    moon = dt.datetime(1969, 7, 20, 20, 17, tzinfo=dt.timezone.utc)
    assert analytics.track("u", "E", timestamp=moon)[1]["timestamp"] == \
        "1969-07-20T20:17:00.000Z"


def test_falsy_context_and_integrations_are_empty_as_in_analytics_python() -> None:
    assert analytics.track("u", "E", context=[], integrations=0)[0]


def test_send_false_validates_but_never_touches_a_queue_file(tmp_path: Any,
                                                              make_client: Any) -> None:
    path = tmp_path / "shared.db"
    client = make_client(KEY, send=False, queue_path=str(path))
    success, msg = client.track("u", "E", {"plan": "pro"})
    assert success and msg["properties"] == {"plan": "pro"} and msg["messageId"]
    with pytest.raises(InvalidMessage):
        client.track(None, "E")  # no user: refused as when sending
    client.flush()
    assert not path.exists()  # nothing stored, no flusher that could take a shared file


def test_the_callers_context_is_not_modified() -> None:
    context = {"ip": "10.0.0.1"}
    _, msg = analytics.track("u", "E", context=context)
    assert context == {"ip": "10.0.0.1"}
    assert msg["context"]["ip"] == "10.0.0.1" and "library" in msg["context"]


# -- errors stay segmentry's -------------------------------------------------------------------


def test_bad_input_raises_invalid_message_naming_the_field() -> None:
    with pytest.raises(InvalidMessage) as missing_event:
        analytics.track("userId")
    assert missing_event.value.field == "event" and isinstance(missing_event.value, ValueError)
    with pytest.raises(InvalidMessage) as no_user:
        analytics.track(event="E")
    assert no_user.value.field == "user_id"
    with pytest.raises(InvalidMessage) as bad_properties:
        analytics.track("userId", "E", ["not", "a", "dict"])
    assert bad_properties.value.field == "properties"
    with pytest.raises(InvalidMessage) as no_previous:
        analytics.alias(user_id="userId")
    assert no_previous.value.field == "previous_id"


def test_an_event_over_32_kb_raises_message_too_large() -> None:
    with pytest.raises(MessageTooLarge):
        analytics.track("userId", "E", {"blob": "x" * 40_000})


def test_a_write_key_is_required_only_to_send(make_client: Any) -> None:
    with pytest.raises(ConfigurationError):
        make_client()
    assert make_client(send=False).track("u", "E")[0]
    assert make_client(thread=0).track("u", "E")[0]  # a flusher process sends


def test_oauth_is_refused_rather_than_ignored(make_client: Any) -> None:
    with pytest.raises(ConfigurationError, match="OAuth"):
        make_client(KEY, oauth_client_id="id", oauth_client_key="key", oauth_key_id="kid")
    make_client(KEY, oauth_client_id="id")  # analytics-python ignores an incomplete set too


# -- settings map onto segmentry's options ---------------------------------------------------


def test_settings_map_onto_segmentry_options(make_client: Any) -> None:
    def on_error(error: Exception, items: list[Any]) -> None: ...

    client = make_client(KEY, host="https://events.eu1.segmentapis.com/", send=False,
                         on_error=on_error, gzip=True, max_retries=4, timeout=7,
                         proxies={"https": "http://proxy:3128"}, thread=2, upload_size=10,
                         upload_interval=3, max_queue_size=1)
    options = client.segmentry_client.options
    assert options.api_url == "https://events.eu1.segmentapis.com/v1/"
    assert options.send_to_http is False and options.gzip is True
    assert options.on_error is on_error and options.retry_attempts == 4
    assert options.requests_options == {"timeout": 7, "proxies": {"https": "http://proxy:3128"}}
    assert (options.max_in_flight, options.max_batch_size, options.batch_every_ms) == (2, 10, 3000)
    assert client.max_queue_size == 1 and client.sync_mode is False


def test_default_settings_give_segments_api_and_analytics_python_limits(make_client: Any) -> None:
    options = make_client(KEY, host=None).segmentry_client.options  # None: the default
    assert options.api_url == "https://api.segment.io/v1/"
    assert options.requests_options == {"timeout": 15}
    assert (options.retry_attempts, options.max_in_flight, options.batch_every_ms) == (10, 1, 500)
    assert options.flusher == "thread"


def test_thread_zero_leaves_delivery_to_a_flusher_process(make_client: Any) -> None:
    assert make_client(KEY, thread=0).segmentry_client.options.flusher is None


def test_segmentry_options_can_be_passed_after_analytics_pythons(make_client: Any) -> None:
    client = make_client(KEY, durability="full", on_full="raise")
    assert client.segmentry_client.options.durability == "full"


def test_module_settings_are_read_when_the_first_call_creates_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analytics, "host", "http://collector.internal:8080")
    monkeypatch.setattr(analytics, "max_retries", 2)
    monkeypatch.setattr(analytics, "on_error", False)  # analytics-python's tests do this
    assert analytics.default_client is None
    analytics.identify("userId")
    options = analytics.default_client.segmentry_client.options
    assert options.api_url == "http://collector.internal:8080/v1/"
    assert options.retry_attempts == 2 and options.on_error is None
    assert options.send_to_http is False


def test_max_queue_size_does_not_bound_the_durable_queue(make_client: Any) -> None:
    client = make_client(KEY, max_queue_size=1, thread=0)
    assert all(client.identify("userId")[0] for _ in range(10))


@pytest.fixture
def segmentry_logger() -> Iterator[logging.Logger]:
    """The package logger, its level and handlers restored after the test."""
    logger = logging.getLogger("segmentry")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)  # setLevel, not an assignment: it also clears the loggers' caches


def test_debug_sets_the_segmentry_logger_to_debug_only_when_asked(
        make_client: Any, segmentry_logger: logging.Logger) -> None:
    segmentry_logger.setLevel(logging.NOTSET)
    handlers = list(segmentry_logger.handlers)
    make_client(KEY)
    assert segmentry_logger.level == logging.NOTSET
    make_client(KEY, debug=True)
    assert segmentry_logger.level == logging.DEBUG and segmentry_logger.handlers == handlers


def test_log_handler_is_added_to_the_segmentry_logger_once(
        make_client: Any, segmentry_logger: logging.Logger) -> None:
    handler = logging.NullHandler()
    make_client(KEY, log_handler=handler)
    make_client(KEY, log_handler=handler)
    assert segmentry_logger.handlers.count(handler) == 1


# -- success, drops, flush / join / shutdown ---------------------------------------------------


def test_a_dropped_event_returns_false_and_its_message(make_client: Any) -> None:
    client = make_client(KEY, thread=0, max_queue_bytes=64 * 1024)
    results = [client.track("userId", "Big", {"blob": "x" * 30_000}) for _ in range(5)]
    assert results[0][0] is True
    dropped = [msg for success, msg in results if not success]
    assert dropped and dropped[0]["event"] == "Big" and dropped[0]["messageId"]


def test_flush_join_and_shutdown_without_a_client_do_nothing() -> None:
    assert analytics.flush() is True
    analytics.join()
    analytics.shutdown()
    assert analytics.default_client is None


def test_join_closes_the_client_and_a_later_call_reopens_it(stubbed: Any) -> None:
    client, stub = stubbed
    client.track("userId", "Before")
    client.join()
    assert client.flush() is True  # nothing open, nothing to wait for
    assert client.track("userId", "After")[0]
    assert client.flush(10)
    assert [e["event"] for e in stub.events] == ["Before", "After"]


def test_shutdown_delivers_what_the_module_queued(
        receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analytics, "send", True)
    monkeypatch.setattr(analytics, "host", receiver.url)
    ids = [analytics.track("userId", f"E{i}")[1]["messageId"] for i in range(3)]
    analytics.shutdown()
    assert [e["messageId"] for e in receiver.events()] == ids


def test_sync_mode_returns_once_the_event_is_delivered(
        receiver: Receiver, make_client: Any) -> None:
    client = make_client(KEY, host=receiver.url, sync_mode=True)
    success, msg = client.track("userId", "Paid")
    assert success
    assert [e["messageId"] for e in receiver.events()] == [msg["messageId"]]
    assert receiver.recorded[0][0] == "/v1/batch"


def test_sync_mode_reports_false_when_not_delivered_in_time_and_keeps_the_event(
        make_client: Any) -> None:
    release = threading.Event()

    def slow(request: Any) -> int:
        release.wait(30)
        return 200

    stub = Stub(slow)
    client = make_client(KEY, sync_mode=True, timeout=0.1, requests_options={"adapter": stub})
    success, msg = client.track("userId", "Paid")
    assert success is False
    release.set()
    assert client.flush(10)
    assert [e["messageId"] for e in stub.events] == [msg["messageId"]]


def test_gzip_setting_compresses_request_bodies(receiver: Receiver, make_client: Any) -> None:
    client = make_client(KEY, host=receiver.url, gzip=True)
    client.identify("userId", {"trait": "value"})
    assert client.flush(10)
    [(_, headers, body)] = receiver.recorded
    assert headers["Content-Encoding"] == "gzip"
    assert body["batch"][0]["traits"] == {"trait": "value"}


# -- side by side with the real analytics-python ----------------------------------------------

WHEN = dt.datetime(2014, 9, 3, 12, 30, tzinfo=UTC)
SIDE_BY_SIDE = [
    ("track", ("user-1", "Signed Up", {"plan": "pro"}), {}),
    ("track", (), {"anonymous_id": 157963456373623803, "event": "Clicked",
                   "properties": {"x": 1}}),
    ("identify", ("user-1", {"email": "a@example.com"}, {"ip": "192.168.0.1"}, WHEN,
                  "anon-1", {"Amplitude": True}, "message-1"), {}),
    ("identify", (1234,), {}),
    ("group", ("user-1", "org-9", {"name": "Acme"}), {}),
    ("group", (), {"user_id": "user-1", "group_id": "org-9"}),
    ("alias", ("anon-42", "user-1"), {}),
    ("alias", (), {"previous_id": "anon-42", "user_id": "user-1", "timestamp": WHEN,
                   "message_id": "message-2"}),
    ("page", ("user-1", "Docs", "Install", {"path": "/docs"}), {}),
    ("page", ("user-1",), {"name": "Home"}),
    ("screen", ("user-1", "Onboarding", "Welcome", {"step": 1}, {"ip": "10.0.0.1"}, WHEN,
                None, {"All": False}, "message-3"), {}),
    ("screen", (), {"anonymous_id": "anon-7", "category": "Settings"}),
]
COMPARED = ("type", "userId", "anonymousId", "previousId", "groupId", "event", "name",
            "category", "properties", "traits")


def _fields(event: dict[str, Any], given_id: bool) -> dict[str, Any]:
    fields = {name: event.get(name) for name in COMPARED}
    fields["integrations"] = event.get("integrations") or {}
    fields["ip"] = event["context"].get("ip")
    if given_id:  # given with a timestamp; generated ones differ between clients, of course
        fields["messageId"] = event["messageId"]
        fields["timestamp"] = parse(event["timestamp"])
    return fields


@pytest.mark.parametrize(("method", "args", "kwargs"), SIDE_BY_SIDE,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(SIDE_BY_SIDE)])
def test_the_same_call_sends_the_same_fields_as_analytics_python(
        receiver: Receiver, make_client: Any, method: str, args: tuple[Any, ...],
        kwargs: dict[str, Any]) -> None:
    reference = analytics_python.Client(KEY, host=receiver.url, sync_mode=True)
    ours = make_client(KEY, host=receiver.url, sync_mode=True)

    their_success, their_msg = getattr(reference, method)(*copy.deepcopy(args), **kwargs)
    our_success, our_msg = getattr(ours, method)(*copy.deepcopy(args), **kwargs)

    assert our_success is their_success is True
    [theirs] = receiver.events("analytics-python/")
    [sent] = receiver.events("segmentry/")
    given_id = "message_id" in kwargs or len(args) > 6
    assert _fields(sent, given_id) == _fields(theirs, given_id)
    assert _fields(our_msg, given_id) == _fields(their_msg, given_id)
    auth = {headers["Authorization"] for _, headers, _ in receiver.recorded}
    assert auth == {"Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}
    assert {path for path, _, _ in receiver.recorded} == {"/v1/batch"}
