"""analytics-python 2.4's public surface over segmentry's durable queue, so that
``import segmentry.compat as analytics`` is the whole migration. A thin layer over
:class:`segmentry.Client`: it owns analytics-python's argument orders, settings and
``(success, message)`` return values, and maps them onto segmentry; nothing else.

    import segmentry.compat as analytics

    analytics.write_key = "WRITE_KEY"
    analytics.queue_path = "/var/lib/app/segment.db"    # segmentry's own; default as Client's
    analytics.track("user-1", "Signed Up", {"plan": "pro"})
    analytics.alias("anon-42", "user-1")                # previous_id first, as in analytics-python
    analytics.page("user-1", "Docs", "Install")         # category, then name
    analytics.shutdown()

Settings are module attributes, read once when the first call creates ``default_client``
(as analytics-python's ``_proxy`` does). ``Client`` takes analytics-python's constructor
arguments, plus keyword-only ``queue_path`` and any other segmentry option.

How analytics-python's settings map (see ``Client._segmentry_options``):

- ``host`` -> ``api_url`` host + "/v1/"; ``send=False``: as in analytics-python, an event
  is validated and returned, never stored nor sent (so a dry run never touches a queue
  file that other processes share); ``gzip``, ``on_error`` as is (it is also called when
  a cycle's retries run out, though the events stay queued and go later);
  ``max_retries`` -> ``retry_attempts``; ``timeout``, ``proxies`` -> ``requests_options``;
  ``upload_size`` -> ``max_batch_size``; ``upload_interval`` -> ``batch_every_ms``;
  ``thread`` -> ``max_in_flight`` (0: no flusher thread here, ``python -m segmentry.flusher``
  delivers); ``debug`` -> the "segmentry" logger at DEBUG (no handler is added: pass
  ``log_handler`` or configure logging); ``log_handler`` -> added to that logger.
- ``max_queue_size`` is kept but unused: the durable queue is bounded by bytes on disk
  (``max_queue_bytes``, 1 GiB by default), not by a count of events in memory.
- ``max_total_backoff_duration`` and ``max_rate_limit_duration`` are accepted and ignored:
  segmentry never gives an event up for a transient failure, so there is no budget to spend.
- OAuth (``oauth_client_id``, ``oauth_client_key`` and ``oauth_key_id`` all set) is not
  supported: ``ConfigurationError``. The other oauth settings are accepted and ignored.

Differences from analytics-python, on purpose:

- Bad input raises ``segmentry.InvalidMessage`` (a ``ValueError`` naming the field) where
  analytics-python raises ``AssertionError``; an event over 32 KB raises ``MessageTooLarge``
  (also an ``InvalidMessage``) instead of ``RuntimeError``; a missing write key raises
  ``ConfigurationError`` (a ``ValueError``), and only when this client would send. Ids are
  strings, ints or UUIDs: floats and bools are refused, not stringified. A value that
  cannot become JSON (bytes, a model object, a timedelta) is refused, naming its path,
  where analytics-python drops it (or decodes bytes) and sends the rest: decode or convert
  it first.
- ``success`` means the event is in the queue file. ``(False, msg)`` means it was dropped:
  the queue file is over ``max_queue_bytes`` or unusable (``on_full="drop"``).
- ``sync_mode``: the event is stored, then the call waits up to ``timeout`` seconds for its
  delivery. Delivery errors go to ``on_error`` instead of raising; ``success`` is False when
  the event is not delivered by then. It stays queued and will be delivered: a retry would
  duplicate it unless it passes ``message_id=msg["messageId"]``.
- ``flush()`` waits at most ``FLUSH_TIMEOUT_S`` (or its ``timeout``) and returns whether
  everything was delivered; what is not stays on disk. ``join()`` closes the segmentry client
  after a bounded final flush; a later call reopens it.
- The returned ``msg`` holds ``messageId`` and ``timestamp`` exactly as stored (ISO-8601 UTC
  with milliseconds, "Z"), ``context.library`` is segmentry's, and the caller's ``context``
  dict is not modified. Naive datetimes are read as analytics-python reads them (local time
  when within 5 s of now, else UTC), where segmentry's own API refuses them; an ISO-8601
  string (which analytics-python refuses) must carry its offset.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from . import config, messages
from .client import CLOSE_TIMEOUT_S
from .client import Client as SegmentryClient
from .exceptions import ConfigurationError
from .messages import Alias, Context, Group, Identify, Message, Page, Screen, Track
from .version import __version__

Result = tuple[bool, dict[str, Any]]  # analytics-python's (success, message)

FLUSH_TIMEOUT_S = 60.0  # flush() never hangs: what is not delivered by then stays on disk
GUESS_LOCAL_WITHIN_S = 5.0  # analytics-python: a naive datetime this recent is local time
VERSION = __version__


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
    """analytics-python's ``Client``, storing every event in segmentry's durable queue."""

    DefaultConfig = DefaultConfig

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
        max_total_backoff_duration: float = DefaultConfig.max_total_backoff_duration,  # ignored
        max_rate_limit_duration: float = DefaultConfig.max_rate_limit_duration,  # ignored
        *,
        queue_path: str | None = None,
        **segmentry_options: Any,
    ) -> None:
        if oauth_client_id and oauth_client_key and oauth_key_id:
            raise ConfigurationError(
                "segmentry.compat does not support OAuth; authenticate with the write key")
        self.write_key = write_key
        self.host = host
        self.debug = debug
        self.max_queue_size = max_queue_size  # unused: the queue is bounded by bytes
        self.send = send
        self.on_error = on_error
        self.gzip = gzip
        self.max_retries = max_retries
        self.sync_mode = sync_mode
        self.timeout = timeout
        self.proxies = proxies
        self.options = self._segmentry_options(
            thread, upload_size, upload_interval, queue_path, segmentry_options)
        self._lock = threading.Lock()
        # send=False stores nothing: no segmentry client, which opens its queue file when
        # made (the options are checked all the same).
        self._client: SegmentryClient | None = (
            SegmentryClient(write_key, **self.options) if self.send else None)
        if not self.send:
            config.resolve(self.options)
        _configure_logging(debug, log_handler)  # only once the options proved valid

    def _segmentry_options(self, thread: int, upload_size: int, upload_interval: float,
                           queue_path: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        """segmentry.Client's options for these settings; ``extra`` (segmentry's own) wins."""
        requests_options: dict[str, Any] = {}
        if self.timeout is not None:  # None would be no timeout: keep segmentry's
            requests_options["timeout"] = self.timeout
        if self.proxies:
            requests_options["proxies"] = self.proxies
        options: dict[str, Any] = {
            "send_to_http": bool(self.send),
            "on_error": self.on_error or None,  # analytics-python tests pass on_error=False
            "gzip": bool(self.gzip),
            "retry_attempts": self.max_retries,
            "max_batch_size": upload_size,
            "batch_every_ms": round(upload_interval * 1000),
            "requests_options": {**requests_options, **extra.pop("requests_options", {})},
        }
        if self.host:
            options["api_url"] = self.host.rstrip("/") + "/v1/"
        if thread:
            options["max_in_flight"] = thread
        else:  # analytics-python starts no consumer: leave delivery to a flusher process
            options["flusher"] = None
        if queue_path is not None:
            options["queue_path"] = queue_path
        return {**options, **extra}

    @property
    def segmentry_client(self) -> SegmentryClient:
        """The segmentry.Client underneath (reopened on demand after ``join()``)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = SegmentryClient(self.write_key, **self.options)
                client = self._client
        return client

    # -- the six calls, in analytics-python's positional order ----------------------------

    def identify(self, user_id: Any = None, traits: dict[str, Any] | None = None,
                 context: Any = None, timestamp: Any = None, anonymous_id: Any = None,
                 integrations: dict[str, Any] | None = None,
                 message_id: str | None = None) -> Result:
        traits = traits or {}
        common = _common(context, timestamp, anonymous_id, integrations, message_id)
        message = Identify(user_id=user_id, traits=traits, **common)
        return self._record(message, {"traits": traits})

    def track(self, user_id: Any = None, event: str | None = None,
              properties: dict[str, Any] | None = None, context: Any = None,
              timestamp: Any = None, anonymous_id: Any = None,
              integrations: dict[str, Any] | None = None,
              message_id: str | None = None) -> Result:
        properties = properties or {}
        common = _common(context, timestamp, anonymous_id, integrations, message_id)
        message = Track(user_id=user_id, event=event, properties=properties, **common)
        return self._record(message, {"event": event, "properties": properties})

    def alias(self, previous_id: Any = None, user_id: Any = None, context: Any = None,
              timestamp: Any = None, integrations: dict[str, Any] | None = None,
              message_id: str | None = None) -> Result:
        common = _common(context, timestamp, None, integrations, message_id)
        message = Alias(user_id=user_id, previous_id=previous_id, **common)
        return self._record(message, {"previousId": _text(previous_id)})

    def group(self, user_id: Any = None, group_id: Any = None,
              traits: dict[str, Any] | None = None, context: Any = None,
              timestamp: Any = None, anonymous_id: Any = None,
              integrations: dict[str, Any] | None = None,
              message_id: str | None = None) -> Result:
        traits = traits or {}
        common = _common(context, timestamp, anonymous_id, integrations, message_id)
        message = Group(user_id=user_id, group_id=group_id, traits=traits, **common)
        return self._record(message, {"groupId": _text(group_id), "traits": traits})

    def page(self, user_id: Any = None, category: str | None = None,
             name: str | None = None, properties: dict[str, Any] | None = None,
             context: Any = None, timestamp: Any = None, anonymous_id: Any = None,
             integrations: dict[str, Any] | None = None,
             message_id: str | None = None) -> Result:
        properties = properties or {}
        common = _common(context, timestamp, anonymous_id, integrations, message_id)
        message = Page(user_id=user_id, name=name, properties=properties, category=category,
                       **common)
        return self._record(message, _page_fields(category, name, properties))

    def screen(self, user_id: Any = None, category: str | None = None,
               name: str | None = None, properties: dict[str, Any] | None = None,
               context: Any = None, timestamp: Any = None, anonymous_id: Any = None,
               integrations: dict[str, Any] | None = None,
               message_id: str | None = None) -> Result:
        properties = properties or {}
        common = _common(context, timestamp, anonymous_id, integrations, message_id)
        message = Screen(user_id=user_id, name=name, properties=properties, category=category,
                         **common)
        return self._record(message, _page_fields(category, name, properties))

    # -- delivery control ---------------------------------------------------------------

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
        """Wait until what this client queued is delivered, at most ``timeout`` seconds
        (None: no limit); return whether it was. What is not stays queued."""
        client = self._client
        return True if client is None else client.flush(timeout)

    def join(self) -> None:
        """Close the segmentry client after a bounded final flush; a later call reopens it."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close(CLOSE_TIMEOUT_S)

    def shutdown(self) -> None:
        """Flush (bounded), then close."""
        self.flush()
        self.join()

    # -- plumbing -------------------------------------------------------------------------

    def _record(self, message: Message, fields: dict[str, Any]) -> Result:
        if not self.send:  # validated, never stored nor sent
            encoded = messages.encode_message(message, time.time())
            return True, _returned(message, fields, encoded.message_id)
        stored = self.segmentry_client.send(message)
        success = stored is not None and (not self.sync_mode or self._deliver_now())
        return success, _returned(message, fields, stored)

    def _deliver_now(self) -> bool:
        """sync_mode: wait for delivery, bounded by the request timeout."""
        timeout = self.timeout
        if isinstance(timeout, tuple):  # requests' (connect, read)
            timeout = sum(timeout)
        return self.segmentry_client.flush(timeout or FLUSH_TIMEOUT_S)


def _common(context: Any, timestamp: Any, anonymous_id: Any, integrations: Any,
            message_id: Any) -> dict[str, Any]:
    """The fields every type shares; the timestamp and messageId are fixed here so the
    returned message carries exactly what segmentry stores."""
    return {
        "context": context or None,  # analytics-python: context or {}
        "timestamp": _when(timestamp, time.time()),
        "anonymous_id": anonymous_id,
        "integrations": integrations or None,
        "message_id": message_id if message_id not in (None, "") else messages.new_message_id(),
    }


def _page_fields(category: Any, name: Any, properties: dict[str, Any]) -> dict[str, Any]:
    return {"category": category, "name": name, "properties": properties}


def _when(timestamp: Any, now: float) -> Any:
    """The event time: now (epoch seconds) when absent, a naive datetime made aware as
    analytics-python makes it; anything else goes to segmentry unchanged, whose
    InvalidMessage then names the field."""
    if timestamp is None:
        return now
    if isinstance(timestamp, dt.datetime):
        return _aware(timestamp)
    return timestamp


def _aware(value: dt.datetime) -> dt.datetime:
    """analytics-python's guess for a naive datetime: made by datetime.now() if recent,
    so local time, else UTC."""
    if value.tzinfo is not None and value.utcoffset() is not None:
        return value
    if (dt.datetime.now() - value).total_seconds() < GUESS_LOCAL_WITHIN_S:
        return value.astimezone()
    return value.replace(tzinfo=dt.timezone.utc)


def _returned(message: Message, fields: dict[str, Any], stored: str | None) -> dict[str, Any]:
    """The message analytics-python returns, with the messageId and timestamp segmentry
    stored (the values of ``fields`` are as the caller gave them)."""
    return {
        "integrations": dict(message.integrations or {}),
        "anonymousId": _text(message.anonymous_id),
        **fields,
        "timestamp": _timestamp_text(message.timestamp),
        "context": {**_context(message.context), "library": dict(messages.LIBRARY)},
        "userId": _text(message.user_id),
        "type": messages.MESSAGE_TYPES[type(message)],
        "messageId": stored if stored is not None else str(message.message_id),
    }


def _timestamp_text(when: Any) -> str:
    """As segmentry stores it (by then encoding has validated it)."""
    return messages.timestamp_text(when)


def _context(context: Any) -> dict[str, Any]:
    if isinstance(context, Context):
        return context.to_dict()
    return dict(context) if isinstance(context, Mapping) else {}


def _text(value: Any) -> str | None:
    """analytics-python's stringify_id."""
    return value if value is None or isinstance(value, str) else str(value)


def _configure_logging(debug: bool, log_handler: logging.Handler | None) -> None:
    """Only when asked: the library never configures logging on its own."""
    logger = logging.getLogger("segmentry")
    if log_handler is not None and log_handler not in logger.handlers:
        logger.addHandler(log_handler)
    if debug:
        logger.setLevel(logging.DEBUG)


# -- module-level settings and the default client, as in analytics-python ----------------

write_key: str | None = DefaultConfig.write_key
host: str | None = DefaultConfig.host
on_error: Any = DefaultConfig.on_error
debug: bool = DefaultConfig.debug
log_handler: logging.Handler | None = DefaultConfig.log_handler
send: bool = DefaultConfig.send
sync_mode: bool = DefaultConfig.sync_mode
max_queue_size: int = DefaultConfig.max_queue_size  # unused: the queue is bounded by bytes
gzip: bool = DefaultConfig.gzip
timeout: Any = DefaultConfig.timeout
max_retries: int = DefaultConfig.max_retries
oauth_client_id: str | None = DefaultConfig.oauth_client_id
oauth_client_key: str | None = DefaultConfig.oauth_client_key
oauth_key_id: str | None = DefaultConfig.oauth_key_id
oauth_auth_server: str = DefaultConfig.oauth_auth_server
oauth_scope: str = DefaultConfig.oauth_scope
queue_path: str | None = None  # segmentry's: None is $SEGMENTRY_QUEUE or its default

default_client: Client | None = None
_default_lock = threading.Lock()


def track(*args: Any, **kwargs: Any) -> Result:
    """Send a track call."""
    return _default().track(*args, **kwargs)


def identify(*args: Any, **kwargs: Any) -> Result:
    """Send an identify call."""
    return _default().identify(*args, **kwargs)


def group(*args: Any, **kwargs: Any) -> Result:
    """Send a group call."""
    return _default().group(*args, **kwargs)


def alias(*args: Any, **kwargs: Any) -> Result:
    """Send an alias call: ``alias(previous_id, user_id)``."""
    return _default().alias(*args, **kwargs)


def page(*args: Any, **kwargs: Any) -> Result:
    """Send a page call: ``page(user_id, category, name, properties)``."""
    return _default().page(*args, **kwargs)


def screen(*args: Any, **kwargs: Any) -> Result:
    """Send a screen call: ``screen(user_id, category, name, properties)``."""
    return _default().screen(*args, **kwargs)


def flush(timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
    """Wait (bounded) until what the default client queued is delivered."""
    client = default_client
    return True if client is None else client.flush(timeout)


def join() -> None:
    """Close the default client after a bounded final flush."""
    if default_client is not None:
        default_client.join()


def shutdown() -> None:
    """Flush all messages (bounded) and close the default client."""
    if default_client is not None:
        default_client.shutdown()


def _default() -> Client:
    """The default client, built from the module settings at the first call."""
    global default_client
    client = default_client
    if client is None:
        with _default_lock:
            if default_client is None:
                default_client = Client(
                    write_key, host=host, debug=debug, max_queue_size=max_queue_size,
                    send=send, on_error=on_error, gzip=gzip, max_retries=max_retries,
                    sync_mode=sync_mode, timeout=timeout, log_handler=log_handler,
                    oauth_client_id=oauth_client_id, oauth_client_key=oauth_client_key,
                    oauth_key_id=oauth_key_id, oauth_auth_server=oauth_auth_server,
                    oauth_scope=oauth_scope, queue_path=queue_path)
            client = default_client
    return client


def _reset() -> None:
    """Close and forget the default client, so the next call reads the settings again
    (tests; or after changing settings at run time)."""
    global default_client
    with _default_lock:
        client, default_client = default_client, None
    if client is not None:
        client.join()


# Settings are left out on purpose: a star import would copy them, and setting the copy
# changes nothing. Set them on the module: ``analytics.write_key = ...``.
__all__ = [
    "Client", "DefaultConfig", "track", "identify", "group", "alias", "page", "screen",
    "flush", "join", "shutdown", "VERSION", "__version__",
]
