"""analytics-python 2.4's public surface over segmentry's durable queue, so that
``import segmentry.compat as analytics`` is the whole migration: the same functions,
settings, ``Client`` (also as ``segmentry.compat.client.Client``), checks and exceptions,
cleaning, logger, return values and wire payload; every event is stored in a queue
file before the call returns. The README's "Migrating from analytics-python" lists
what still differs, and why.

    import segmentry.compat as analytics

    analytics.write_key = "WRITE_KEY"
    analytics.track("user-1", "Signed Up", {"plan": "pro"})
    analytics.alias("anon-42", "user-1")                # previous_id first
    analytics.page("user-1", "Docs", "Install")         # category, then name
    analytics.shutdown()

Settings are module attributes, read once when the first call (``flush()``, ``join()``
and ``shutdown()`` included) creates ``default_client``, as analytics-python's
``_proxy`` does. ``queue_path`` is segmentry's own: by default each destination (write
key, host, send) has its own file in segmentry's state directory.
"""

from __future__ import annotations

import logging
from typing import Any

from .._forksafe import ForkSafeLock
from .client import FLUSH_TIMEOUT_S, VERSION, Client, DefaultConfig, MissingWriteKey
from .message import InvalidArgument, MessageTooLarge

__version__ = VERSION

# -- module-level settings, as in analytics-python -------------------------------------------

write_key: str | None = DefaultConfig.write_key
host: str | None = DefaultConfig.host
on_error: Any = DefaultConfig.on_error
debug: bool = DefaultConfig.debug
log_handler: logging.Handler | None = DefaultConfig.log_handler
send: bool = DefaultConfig.send
sync_mode: bool = DefaultConfig.sync_mode
max_queue_size: int = DefaultConfig.max_queue_size
gzip: bool = DefaultConfig.gzip
timeout: Any = DefaultConfig.timeout
max_retries: int = DefaultConfig.max_retries
oauth_client_id: str | None = DefaultConfig.oauth_client_id
oauth_client_key: str | None = DefaultConfig.oauth_client_key
oauth_key_id: str | None = DefaultConfig.oauth_key_id
oauth_auth_server: str = DefaultConfig.oauth_auth_server
oauth_scope: str = DefaultConfig.oauth_scope
queue_path: str | None = None  # segmentry's: None is one file per destination

default_client: Client | None = None
_default_lock = ForkSafeLock()  # a thread inside _default() does not come along in a fork


def track(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Send a track call."""
    return _default().track(*args, **kwargs)


def identify(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Send an identify call."""
    return _default().identify(*args, **kwargs)


def group(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Send a group call."""
    return _default().group(*args, **kwargs)


def alias(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Send an alias call: ``alias(previous_id, user_id)``."""
    return _default().alias(*args, **kwargs)


def page(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Send a page call: ``page(user_id, category, name, properties)``."""
    return _default().page(*args, **kwargs)


def screen(*args: Any, **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Send a screen call: ``screen(user_id, category, name, properties)``."""
    return _default().screen(*args, **kwargs)


def flush(timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
    """Wait (bounded) until what the default client queued is delivered."""
    return _default().flush(timeout)


def join() -> None:
    """Stop the default client's delivery after a bounded final flush."""
    _default().join()


def shutdown() -> None:
    """Flush (bounded), then stop the default client's delivery."""
    client = _default()
    client.flush()
    client.join()


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
    """Stop and forget the default client, so the next call reads the settings again
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
    "flush", "join", "shutdown", "VERSION", "__version__", "InvalidArgument",
    "MessageTooLarge", "MissingWriteKey",
]
