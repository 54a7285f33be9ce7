"""The one exception tree of segmentry. Imports nothing foreign.

    SegmentryError
    ├── ConfigurationError (ValueError)   bad options; the CLI exits 2. Fix the code, never retry.
    ├── InvalidMessage (ValueError)       bad event at the call, names the field. Never retry.
    │   └── MessageTooLarge               one event over 32 KB of JSON.
    ├── QueueFull                         disk cap reached (on_full="raise"). Retry later.
    ├── StorageError                      the queue file cannot be used, and why. Retry only
    │                                     after the cause (disk, permissions, file) is fixed.
    └── DeliveryError                     from the low-level HTTP API.
        ├── NetworkError                  no response at all. Safe to retry.
        └── HTTPStatusError               a response; .status_code, .retryable.
"""

from __future__ import annotations


class SegmentryError(Exception):
    """Root of every error segmentry raises on purpose."""


class ConfigurationError(SegmentryError, ValueError):
    """An option has a bad value, or a required one (the write key) is missing."""


class InvalidMessage(SegmentryError, ValueError):
    """An event cannot be queued; the message names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MessageTooLarge(InvalidMessage):
    """An event's JSON encoding is over Segment's 32 KB per-event limit."""


class QueueFull(SegmentryError):
    """The queue file reached max_queue_bytes and on_full="raise"."""


class StorageError(SegmentryError):
    """The queue file cannot be used: corrupt, unwritable, full disk, foreign, newer schema."""


class DeliveryError(SegmentryError):
    """A request to the receiver did not succeed."""


class NetworkError(DeliveryError):
    """No response came at all (connection refused or reset, timeout, TLS failure)."""

    retryable = True


class HTTPStatusError(DeliveryError):
    """The receiver answered with a status that is not a 2xx."""

    def __init__(self, status_code: int, retryable: bool, body: str = "") -> None:
        super().__init__(f"receiver answered HTTP {status_code}")
        self.status_code = status_code
        self.retryable = retryable
        self.body = body


__all__ = [
    "SegmentryError",
    "ConfigurationError",
    "InvalidMessage",
    "MessageTooLarge",
    "QueueFull",
    "StorageError",
    "DeliveryError",
    "NetworkError",
    "HTTPStatusError",
]
