"""segmentry: a Segment analytics client whose events survive crashes.

Every call appends the event to a local SQLite queue and returns its messageId; a
flusher (a thread here, or ``python -m segmentry.flusher``) delivers it in batches.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._forksafe import ForkSafeLock
from .client import Client
from .exceptions import (
    ConfigurationError,
    DeliveryError,
    HTTPStatusError,
    InvalidMessage,
    MessageTooLarge,
    NetworkError,
    QueueFull,
    SegmentryError,
    StorageError,
)
from .messages import Alias, Context, Group, Identify, Page, Screen, Track
from .version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

_default: Client | None = None
_default_lock = ForkSafeLock()  # a thread inside start() does not come along in a fork


def start(write_key: str | None = None, **options: Any) -> Client:
    """Start the module-level default client (the write key from SEGMENT_WRITE_KEY when
    omitted); then ``segmentry.track(...)`` etc. use it. Returns the client."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = Client(write_key, **options)  # Client falls back on SEGMENT_WRITE_KEY
        return _default


def default_client() -> Client:
    """The client ``start()`` made. One found closed may be a ``start()`` under way
    replacing it (closing the old client takes up to its final flush): wait for the
    new one, so that a call from another thread meanwhile is stored, not dropped."""
    client = _default
    if client is not None and client.closed:
        with _default_lock:
            client = _default
    if client is None:
        raise ConfigurationError("call segmentry.start(write_key, ...) first")
    return client


def track(*args: Any, **kwargs: Any) -> str | None:
    return default_client().track(*args, **kwargs)


def identify(*args: Any, **kwargs: Any) -> str | None:
    return default_client().identify(*args, **kwargs)


def page(*args: Any, **kwargs: Any) -> str | None:
    return default_client().page(*args, **kwargs)


def screen(*args: Any, **kwargs: Any) -> str | None:
    return default_client().screen(*args, **kwargs)


def group(*args: Any, **kwargs: Any) -> str | None:
    return default_client().group(*args, **kwargs)


def alias(*args: Any, **kwargs: Any) -> str | None:
    return default_client().alias(*args, **kwargs)


def flush(timeout: float | None = None) -> bool:
    return default_client().flush(timeout)


def stop(timeout: float = 5.0) -> None:
    """Close the default client (a bounded final flush)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close(timeout)
            _default = None


# Submodules that import requests (some 50 ms): loaded on first use, so that a producer,
# which never sends, does not pay for them.
_LAZY_SUBMODULES = ("http", "testing")


def __getattr__(name: str) -> Any:
    """``segmentry.http`` and ``segmentry.testing`` after a bare ``import segmentry``
    (PEP 562)."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # also sets the attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})


__all__ = [
    "Client", "start", "stop", "default_client",
    "track", "identify", "page", "screen", "group", "alias", "flush",
    "Track", "Identify", "Page", "Screen", "Group", "Alias", "Context",
    "SegmentryError", "ConfigurationError", "InvalidMessage", "MessageTooLarge",
    "QueueFull", "StorageError", "DeliveryError", "NetworkError", "HTTPStatusError",
    "__version__",
]
