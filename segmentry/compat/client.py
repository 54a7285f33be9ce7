"""analytics-python 2.4's ``Client`` over segmentry's durable queue: its arguments,
checks, cleaning, ``(success, message)`` returns, logger and wire payload; every event
goes through a :class:`segmentry.Client` and its queue file (sync_mode aside, which
posts in the caller's thread as analytics-python does). Imports ``requests`` only
through segmentry's transport and http modules.
"""

from __future__ import annotations

import datetime as dt
import gzip as gzip_module
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable

from .. import config, http
from .._transport import Transport
from ..client import CLOSE_TIMEOUT_S
from ..client import Client as SegmentryClient
from ..exceptions import ConfigurationError, HTTPStatusError, StorageError
from ..messages import Encoded
from ..storage import default_queue_path
from ..version import __version__
from . import message as m
from .message import ID_TYPES, require

UPSTREAM_VERSION = "2.4.0"  # the analytics-python release whose behaviour this follows
VERSION = f"{UPSTREAM_VERSION}+segmentry.{__version__}"
LIBRARY = {"name": "analytics-python", "version": VERSION}
FLUSH_TIMEOUT_S = 60.0  # flush() never hangs: what is not delivered by then stays on disk
MAX_RETRIES = 100  # segmentry's bounds; analytics-python has none, so larger values are
MAX_UPLOAD_SIZE = 2500  # clamped to them (Segment refuses batches of more than 2,500)
MAX_THREADS = 64
FULL_RECOUNT_S = 0.1  # while max_queue_size is reached, the file is counted this often
FULL_LOG_EVERY_S = 10.0

Result = tuple[bool, dict[str, Any]]  # analytics-python's (success, message)
log = logging.getLogger("segment")


class MissingWriteKey(ConfigurationError, AssertionError):
    """No write key: an ``AssertionError`` as in analytics-python, and a
    ``segmentry.ConfigurationError``."""


class DefaultConfig:
    """analytics-python 2.4's defaults (``Client.DefaultConfig``)."""

    write_key: str | None = None
    host: str | None = None
    on_error: Any = None
    debug = False
    log_handler: logging.Handler | None = None
    send = True
    sync_mode = False
    max_queue_size = 10000
    gzip = False
    timeout: Any = 15
    max_retries = 10
    max_total_backoff_duration = 43200
    max_rate_limit_duration = 1800
    proxies: dict[str, str] | None = None
    thread = 1
    upload_interval = 0.5
    upload_size = 100
    oauth_client_id: str | None = None
    oauth_client_key: str | None = None
    oauth_key_id: str | None = None
    oauth_auth_server = "https://oauth2.segment.io"
    oauth_scope = "tracking_api:write"


class Client:
    """analytics-python's ``Client``: the same constructor (plus keyword-only
    ``queue_path`` and segmentry's own options), the six calls, flush/join/shutdown."""

    DefaultConfig = DefaultConfig
    log = log

    def __init__(
        self,
        write_key: str | None = DefaultConfig.write_key,
        host: str | None = DefaultConfig.host,
        debug: bool = DefaultConfig.debug,
        max_queue_size: int = DefaultConfig.max_queue_size,
        send: bool = DefaultConfig.send,
        on_error: Any = DefaultConfig.on_error,
        gzip: bool = DefaultConfig.gzip,
        max_retries: int = DefaultConfig.max_retries,
        sync_mode: bool = DefaultConfig.sync_mode,
        timeout: Any = DefaultConfig.timeout,
        proxies: dict[str, str] | None = DefaultConfig.proxies,
        thread: int = DefaultConfig.thread,
        upload_size: int = DefaultConfig.upload_size,
        upload_interval: float = DefaultConfig.upload_interval,
        log_handler: logging.Handler | None = DefaultConfig.log_handler,
        oauth_client_id: str | None = DefaultConfig.oauth_client_id,
        oauth_client_key: str | None = DefaultConfig.oauth_client_key,
        oauth_key_id: str | None = DefaultConfig.oauth_key_id,
        oauth_auth_server: str = DefaultConfig.oauth_auth_server,  # ignored: no OAuth
        oauth_scope: str = DefaultConfig.oauth_scope,  # ignored: no OAuth
        max_total_backoff_duration: float = DefaultConfig.max_total_backoff_duration,
        max_rate_limit_duration: float = DefaultConfig.max_rate_limit_duration,
        *,
        queue_path: str | None = None,
        **segmentry_options: Any,
    ) -> None:
        if not isinstance(write_key, str):
            raise MissingWriteKey(f"write_key must have {str}, got: {write_key!r}")
        _check_budget("max_total_backoff_duration", max_total_backoff_duration)
        _check_budget("max_rate_limit_duration", max_rate_limit_duration)
        if oauth_client_id and oauth_client_key and oauth_key_id:
            raise ConfigurationError(
                "segmentry.compat does not support OAuth; authenticate with the write key")
        self.write_key = write_key
        self.host = host
        self.debug = debug
        self.max_queue_size = max_queue_size
        self.send = send
        self.on_error = on_error
        self.gzip = gzip
        self.max_retries = max_retries
        self.sync_mode = sync_mode
        self.timeout = timeout
        self.proxies = proxies
        self.max_total_backoff_duration = max_total_backoff_duration
        self.max_rate_limit_duration = max_rate_limit_duration
        self.upload_size = upload_size
        self.upload_interval = upload_interval
        self.options = self._segmentry_options(thread, segmentry_options)
        self.api_url = config.resolve(self.options).api_url  # validates them all, now
        self._queue_path = queue_path
        self._lock = threading.Lock()
        self._client: SegmentryClient | None = None
        self._joined = False  # join() stops delivery here, as analytics-python's does
        self._room = 0  # events that fit under max_queue_size before the next count
        self._counted_after_join = False
        self._recount_at = 0.0  # while full, monotonic time of the next count
        self.refused = 0  # events refused by max_queue_size
        self._next_full_log = 0.0
        self._http: Any = None  # sync_mode's HTTP client
        self.queue = QueueView(self)
        self.consumers: list[Consumer] | None = (
            None if sync_mode else [Consumer(self) for _ in range(thread)])
        _configure_logging(debug, log_handler)
        if send and not sync_mode:  # the durable queue now: an unusable one must show at once
            self._client = self._open()

    def _segmentry_options(self, thread: int, extra: dict[str, Any]) -> dict[str, Any]:
        """segmentry.Client's options for these settings; ``extra`` (segmentry's own) wins."""
        requests_options: dict[str, Any] = {"adapter": WriteKeyInBody(self.write_key)}
        if self.timeout is not None:  # None would be no timeout: keep segmentry's
            requests_options["timeout"] = self.timeout
        if self.proxies:
            requests_options["proxies"] = self.proxies
        options: dict[str, Any] = {
            "send_to_http": bool(self.send),
            "on_error": _given_up(self.on_error) if self.on_error else None,
            "gzip": bool(self.gzip),
            "retry_attempts": max(0, min(int(self.max_retries), MAX_RETRIES)),
            "max_batch_size": max(1, min(int(self.upload_size), MAX_UPLOAD_SIZE)),
            "batch_every_ms": round(self.upload_interval * 1000),
            "requests_options": {**requests_options, **extra.pop("requests_options", {})},
        }
        if self.host:
            options["api_url"] = self.host.rstrip("/") + "/v1/"
        if thread:
            options["max_in_flight"] = min(int(thread), MAX_THREADS)
        else:  # analytics-python starts no consumer: leave delivery to a flusher process
            options["flusher"] = None
        return {**options, **extra}

    # -- the six calls, in analytics-python's positional order ----------------------------

    def identify(self, user_id: Any = None, traits: Any = None, context: Any = None,
                 timestamp: Any = None, anonymous_id: Any = None, integrations: Any = None,
                 message_id: Any = None) -> Result:
        traits = traits or {}
        _require_someone(user_id, anonymous_id)
        require("traits", traits, dict)
        return self._enqueue({
            "integrations": integrations or {}, "anonymousId": anonymous_id,
            "timestamp": timestamp, "context": _context(context), "type": "identify",
            "userId": user_id, "traits": traits, "messageId": message_id})

    def track(self, user_id: Any = None, event: Any = None, properties: Any = None,
              context: Any = None, timestamp: Any = None, anonymous_id: Any = None,
              integrations: Any = None, message_id: Any = None) -> Result:
        properties = properties or {}
        _require_someone(user_id, anonymous_id)
        require("properties", properties, dict)
        require("event", event, str)
        return self._enqueue({
            "integrations": integrations or {}, "anonymousId": anonymous_id,
            "properties": properties, "timestamp": timestamp, "context": _context(context),
            "userId": user_id, "type": "track", "event": event, "messageId": message_id})

    def alias(self, previous_id: Any = None, user_id: Any = None, context: Any = None,
              timestamp: Any = None, integrations: Any = None,
              message_id: Any = None) -> Result:
        require("previous_id", previous_id, ID_TYPES)
        require("user_id", user_id, ID_TYPES)
        return self._enqueue({
            "integrations": integrations or {}, "previousId": previous_id,
            "timestamp": timestamp, "context": _context(context), "userId": user_id,
            "type": "alias", "messageId": message_id})

    def group(self, user_id: Any = None, group_id: Any = None, traits: Any = None,
              context: Any = None, timestamp: Any = None, anonymous_id: Any = None,
              integrations: Any = None, message_id: Any = None) -> Result:
        traits = traits or {}
        _require_someone(user_id, anonymous_id)
        require("group_id", group_id, ID_TYPES)
        require("traits", traits, dict)
        return self._enqueue({
            "integrations": integrations or {}, "anonymousId": anonymous_id,
            "timestamp": timestamp, "groupId": group_id, "context": _context(context),
            "userId": user_id, "traits": traits, "type": "group", "messageId": message_id})

    def page(self, user_id: Any = None, category: Any = None, name: Any = None,
             properties: Any = None, context: Any = None, timestamp: Any = None,
             anonymous_id: Any = None, integrations: Any = None,
             message_id: Any = None) -> Result:
        return self._page("page", user_id, category, name, properties, context, timestamp,
                          anonymous_id, integrations, message_id)

    def screen(self, user_id: Any = None, category: Any = None, name: Any = None,
               properties: Any = None, context: Any = None, timestamp: Any = None,
               anonymous_id: Any = None, integrations: Any = None,
               message_id: Any = None) -> Result:
        return self._page("screen", user_id, category, name, properties, context, timestamp,
                          anonymous_id, integrations, message_id)

    def _page(self, type_: str, user_id: Any, category: Any, name: Any, properties: Any,
              context: Any, timestamp: Any, anonymous_id: Any, integrations: Any,
              message_id: Any) -> Result:
        properties = properties or {}
        _require_someone(user_id, anonymous_id)
        require("properties", properties, dict)
        if name:
            require("name", name, str)
        if category:
            require("category", category, str)
        return self._enqueue({
            "integrations": integrations or {}, "anonymousId": anonymous_id,
            "properties": properties, "timestamp": timestamp, "category": category,
            "context": _context(context), "userId": user_id, "type": type_, "name": name,
            "messageId": message_id})

    # -- delivery control ---------------------------------------------------------------

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
        """Wait until what this client queued is delivered, at most ``timeout`` seconds
        (None: no limit); return whether it was. What is not stays queued."""
        client = self._client
        if client is None or self._joined:  # nothing queued here, or nothing delivers it
            return self.queue.empty()
        delivered = client.flush(timeout)
        log.debug("flushed: %s.", "all delivered" if delivered else "not all delivered yet")
        return delivered

    def join(self) -> None:
        """Stop delivery here, after a bounded final flush. Later calls still store their
        events: the next client of this destination (or a flusher process) sends them."""
        with self._lock:
            client, self._client = self._client, None
            self._joined = True
            self._room, self._counted_after_join = 0, False
            sync_http, self._http = self._http, None
        if client is not None:
            client.close(CLOSE_TIMEOUT_S)
        if sync_http is not None:
            sync_http.close()

    def shutdown(self) -> None:
        """Flush (bounded), then stop delivery here."""
        self.flush()
        self.join()

    # -- plumbing -------------------------------------------------------------------------

    def _enqueue(self, msg: dict[str, Any]) -> Result:
        """analytics-python's ``_enqueue``: complete, clean, check size, then store."""
        msg = _complete(msg)
        log.debug("queueing a %s event.", msg["type"])  # never the event: it is user data
        body = m.encode(msg)
        if not self.send:
            return True, msg
        if self.sync_mode:
            self._post_now(body)
            return True, msg
        if self._full():
            self._refused()
            return False, msg
        # Stored as analytics-python encodes it, not as segmentry.messages would: the
        # Client has no public call yet for an event encoded elsewhere.
        stored = self.segmentry_client._store(Encoded(msg["messageId"], msg["type"], body),
                                              time.time())
        return stored is not None, msg

    @property
    def segmentry_client(self) -> SegmentryClient:
        """The segmentry.Client underneath; after ``join()`` one that only stores."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._open()
                client = self._client
        return client

    def _open(self) -> SegmentryClient:
        options = dict(self.options)
        if self._joined:
            options["flusher"] = None
        if self._queue_path is None:
            path = queue_path_for(self.write_key, self.api_url, self.send)
            if path is not None:
                options["queue_path"] = path
        else:
            options["queue_path"] = self._queue_path
        return SegmentryClient(self.write_key, **options)

    def _full(self) -> bool:
        """max_queue_size against the events waiting in the queue file, counted again
        only once as many events as fitted at the last count have been stored. An
        estimate while other clients of the destination store and deliver too."""
        if self.max_queue_size <= 0:  # queue.Queue(0): no bound
            return False
        if (self._room <= 0 and not self._counted_after_join
                and time.monotonic() >= self._recount_at):
            self._room = self.max_queue_size - self.queue.qsize()
            # After join() nothing here delivers: count once, then only what is added.
            self._counted_after_join = self._joined
            if self._room <= 0:  # full: a count per call would cost a scan of the file
                self._recount_at = time.monotonic() + FULL_RECOUNT_S
        if self._room <= 0:
            return True
        self._room -= 1
        return False

    def _refused(self) -> None:
        """analytics-python's warning for a full queue, at most once per FULL_LOG_EVERY_S
        with a count: one a call would flood the logs exactly when things go wrong."""
        self.refused += 1
        now = time.monotonic()
        if now >= self._next_full_log:
            self._next_full_log = now + FULL_LOG_EVERY_S
            log.warning("analytics-python queue is full (%d events refused so far)",
                        self.refused)

    def _post_now(self, body: str) -> None:
        """sync_mode: one POST in the caller's thread, as analytics-python makes it; a
        failure raises (segmentry.NetworkError or HTTPStatusError) and nothing is kept."""
        with self._lock:
            if self._http is None:
                self._http = http.client(
                    self.write_key, self.api_url, retry_attempts=0,
                    gzip=self.options["gzip"], **self.options["requests_options"])
            sender = self._http
        response = http.post_batch(sender, [body])
        if not 200 <= response.status_code < 300:
            raise HTTPStatusError(response.status_code, http.classify(response.status_code)
                                  == "retry", response.text[:500])
        log.debug("enqueued with blocking a %s event.", json.loads(body)["type"])


class QueueView:
    """``client.queue``: the events waiting in this client's queue file (analytics-python's
    in-memory queue.Queue, whose ``maxsize`` was max_queue_size)."""

    def __init__(self, owner: Client) -> None:
        self._owner = owner

    @property
    def maxsize(self) -> int:
        return self._owner.max_queue_size

    def qsize(self) -> int:
        owner = self._owner
        if not owner.send or owner.sync_mode:  # nothing is ever stored
            return 0
        return int(owner.segmentry_client.queue.stats(time.time()).depth)

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return 0 < self.maxsize <= self.qsize()


class Consumer:
    """An item of ``client.consumers``: the settings analytics-python's Consumer thread
    had, and whether this client's delivery is running."""

    def __init__(self, owner: Client) -> None:
        self._owner = owner
        self.timeout = owner.timeout
        self.retries = owner.max_retries
        self.upload_size = owner.upload_size
        self.upload_interval = owner.upload_interval
        self.max_total_backoff_duration = owner.max_total_backoff_duration
        self.max_rate_limit_duration = owner.max_rate_limit_duration

    def is_alive(self) -> bool:
        client = self._owner._client
        return (client is not None and not client.closed and bool(self._owner.send)
                and client.options.flusher == "thread")


class WriteKeyInBody(Transport):
    """segmentry's transport, adding ``"writeKey"`` to each request body as
    analytics-python does (a receiver or proxy may read it there, not in the header)."""

    def __init__(self, write_key: str) -> None:
        super().__init__()
        self._member = (',"writeKey":' + json.dumps(write_key) + "}").encode()

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        body = request.body
        if isinstance(body, bytes):
            zipped = request.headers.get("Content-Encoding") == "gzip"
            text = gzip_module.decompress(body) if zipped else body
            if text.endswith(b"}"):
                text = text[:-1] + self._member
                request.prepare_body(
                    gzip_module.compress(text, compresslevel=6, mtime=0) if zipped else text,
                    None)
        return super().send(request, *args, **kwargs)


def queue_path_for(write_key: str, api_url: str, send: bool) -> str | None:
    """The default queue file of one destination, so that two never share one (whichever
    held a shared file would send the other's events under its own key and URL). Its
    directory is segmentry's default; if that cannot be written (a read-only HOME: AWS
    Lambda, read-only containers), the temporary directory, with a warning. None when
    $SEGMENTRY_QUEUE names the file."""
    if os.environ.get("SEGMENTRY_QUEUE"):
        return None
    digest = hashlib.sha256(f"{write_key}\n{api_url}\n{bool(send)}".encode()).hexdigest()
    name = f"compat-{digest[:16]}.db"
    preferred = os.path.dirname(default_queue_path())
    problem = _unwritable(os.path.join(preferred, name))
    if problem is None:
        return os.path.join(preferred, name)
    fallback = os.path.join(tempfile.gettempdir(), f"segmentry-{_user()}")
    second = _unwritable(os.path.join(fallback, name))
    if second is not None:
        raise StorageError(
            f"segmentry.compat has no writable place for its queue file: {preferred} "
            f"({problem}) nor {fallback} ({second}); pass queue_path= (or set "
            "SEGMENTRY_QUEUE) to a writable file")
    log.warning("segmentry.compat cannot write its queue file in %s (%s); it uses %s "
                "instead, which may not survive a reboot: pass queue_path= to choose",
                preferred, problem, fallback)
    return os.path.join(fallback, name)


def _unwritable(path: str) -> str | None:
    """Why the file cannot be created or written, or None if it can."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def _check_budget(name: str, value: Any) -> None:
    if value is None or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative number")


def _require_someone(user_id: Any, anonymous_id: Any) -> None:
    require("user_id or anonymous_id", user_id or anonymous_id, ID_TYPES)


def _context(context: Any) -> Any:
    """analytics-python: ``context or {}``. Its library is added to this very dict."""
    return context or {}


def _complete(msg: dict[str, Any]) -> dict[str, Any]:
    """The common fields as analytics-python's ``_enqueue`` fills them, then cleaned."""
    timestamp = msg["timestamp"]
    if timestamp is None:
        timestamp = dt.datetime.now(dt.timezone.utc)
    message_id = msg["messageId"]
    if message_id is None:
        message_id = m.new_message_id()
    require("integrations", msg["integrations"], dict)
    require("timestamp", timestamp, dt.datetime)
    require("context", msg["context"], dict)
    msg["timestamp"] = m.timestamp_text(m.guess_timezone(timestamp))
    msg["messageId"] = m.stringify_id(message_id)
    msg["context"]["library"] = dict(LIBRARY)
    msg["userId"] = m.stringify_id(msg.get("userId"))
    msg["anonymousId"] = m.stringify_id(msg.get("anonymousId"))
    cleaned: dict[str, Any] = m.clean(msg)
    return cleaned


def _given_up(callback: Callable[[BaseException, list[Any]], Any]
              ) -> Callable[[BaseException, list[Any]], None]:
    """on_error only for events the receiver refused (4xx, dead-lettered or kept until
    the key or host is fixed), never for a transient failure: those events stay queued
    and are delivered, and a callback that replayed them would send them twice."""
    def on_error(error: BaseException, events: list[Any]) -> None:
        if isinstance(error, HTTPStatusError) and http.classify(error.status_code) in (
                "reject", "misconfigured"):
            callback(error, events)
        else:
            log.debug("delivery failed (%s); the events stay queued", type(error).__name__)
    return on_error


_handlers_added: set[int] = set()


def _configure_logging(debug: bool, log_handler: logging.Handler | None) -> None:
    """analytics-python's logging: the ``segment`` logger, a handler printing it when
    ``debug`` is set (once, not once a client), and segmentry's records shown there."""
    if log_handler is not None and log_handler not in log.handlers:
        log.addHandler(log_handler)
    if debug:
        log.setLevel(logging.DEBUG)
        if log_handler is None and not any(
                isinstance(h, _DebugHandler) for h in log.handlers):
            log.addHandler(_DebugHandler())
    segmentry_logger = logging.getLogger("segmentry")
    if not any(isinstance(h, ToSegmentLogger) for h in segmentry_logger.handlers):
        segmentry_logger.addHandler(ToSegmentLogger())
    if debug and segmentry_logger.getEffectiveLevel() > logging.DEBUG:
        segmentry_logger.setLevel(logging.DEBUG)


class _DebugHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """What analytics-python adds for debug=True: stderr."""


class ToSegmentLogger(logging.Handler):
    """Shows segmentry's records through the ``segment`` logger's handlers, where
    analytics-python's users look. With no handler anywhere (segment's, or the root's,
    which segmentry's records reach by themselves), warnings go to stderr as Python's
    last resort shows analytics-python's."""

    def emit(self, record: logging.LogRecord) -> None:
        if not log.isEnabledFor(record.levelno):
            return
        if log.handlers:
            for handler in log.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        elif not logging.getLogger().handlers and logging.lastResort is not None:
            if record.levelno >= logging.lastResort.level:
                logging.lastResort.handle(record)
