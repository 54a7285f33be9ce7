"""analytics-python 2.4's message rules, kept apart from segmentry's stricter ones: its
argument checks (``AssertionError``), its cleaning of values, its id and timestamp
texts, and the event's JSON text as analytics-python puts it on the wire. Pure
functions; imports nothing foreign.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import logging
import numbers
from typing import Any

from .. import messages
from ..exceptions import InvalidMessage
from ..exceptions import MessageTooLarge as _SegmentryTooLarge

log = logging.getLogger("segment")  # analytics-python's logger, read by its users

ID_TYPES = (numbers.Number, str)  # analytics-python stringifies any number
GUESS_LOCAL_WITHIN_S = 5.0  # a naive datetime this recent was made by now(): local time
UTC = dt.timezone.utc


class InvalidArgument(InvalidMessage, AssertionError):
    """Bad input to a call. An ``AssertionError`` as analytics-python raises it, and a
    ``segmentry.InvalidMessage`` (so a ``ValueError``) naming the field."""


class MessageTooLarge(_SegmentryTooLarge, RuntimeError):
    """An event over 32 KB of JSON: a ``RuntimeError`` as in analytics-python."""


def require(name: str, value: Any, types: Any) -> None:
    """analytics-python's ``require``: the same test and the same exception type."""
    if not isinstance(value, types):
        raise InvalidArgument(f"{name} must have {types}, got: {value!r}", name)


def stringify_id(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def guess_timezone(value: dt.datetime, now: dt.datetime | None = None) -> dt.datetime:
    """A naive datetime made by ``datetime.now()`` moments ago is local time; any other
    naive one is taken as UTC. ``now``: the naive local time (default: now)."""
    if value.tzinfo is not None and value.tzinfo.utcoffset(value) is not None:
        return value
    if now is None:
        now = dt.datetime.now()
    if (now - value).total_seconds() < GUESS_LOCAL_WITHIN_S:
        return value.astimezone()  # the local offset at that time
    return value.replace(tzinfo=UTC)


def clean(item: Any) -> Any:
    """analytics-python's ``clean``: Decimal to float, sets and tuples to lists, enums to
    their value, bytes decoded; a value that cannot be sent is dropped from its dict with
    a warning (its key and type only: never the value, which is user data)."""
    if type(item) in _PLAIN:  # most values: skips the slow isinstance() of the ABCs
        return item
    if type(item) is dict:
        return _clean_dict(item)
    if isinstance(item, decimal.Decimal):
        return float(item)
    if isinstance(item, (str, bool, numbers.Number, dt.datetime, dt.date, type(None))):
        return item
    if isinstance(item, (set, frozenset, list, tuple)):
        return [clean(value) for value in item]
    if isinstance(item, dict):
        return _clean_dict(item)
    if isinstance(item, enum.Enum):
        return clean(item.value)
    if isinstance(item, (bytes, bytearray)):
        try:
            return item.decode("utf-8", "strict")
        except UnicodeDecodeError:  # analytics-python raised here, out of the call
            raise TypeError("bytes that are not UTF-8") from None
    raise TypeError(f"{type(item).__name__} is not JSON serializable")


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _clean_dict(items: dict[Any, Any]) -> dict[Any, Any]:
    data = {}
    for key, value in items.items():
        if type(value) in _PLAIN:
            data[key] = value
            continue
        try:
            data[key] = clean(value)
        except TypeError as exc:
            log.warning('Dictionary values must be serializeable to JSON "%s" value of type '
                        "%s is unsupported (%s); it is dropped.", key, type(value).__name__, exc)
    return data


def timestamp_text(value: dt.datetime) -> str:
    """ISO-8601 with the given offset, truncated to milliseconds, as analytics-python."""
    return value.isoformat(timespec="milliseconds")


new_message_id = messages.new_message_id  # a random (version 4) UUID, as uuid4()


def _to_json(value: Any) -> Any:
    """What analytics-python's DatetimeSerializer writes, and numbers that are not
    Python's own (numpy's int64 from pandas: any numbers.Integral or Real) as numbers."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_to_json, allow_nan=False)


def encode(msg: dict[str, Any]) -> str:
    """The event's JSON text: the type first (segmentry's queue reads it there), then
    analytics-python's members. NaN and infinities are refused: Segment refuses them."""
    try:
        body = _ENCODER.encode({"type": msg["type"], **msg})
    except ValueError as exc:
        raise InvalidArgument(f"{msg['type']}: cannot be sent as JSON ({exc})",
                              "message") from None
    if len(body) > messages.MAX_EVENT_BYTES:
        raise MessageTooLarge(
            f"Message exceeds {messages.MAX_EVENT_BYTES // 1024}kb limit "
            f"({len(body)} bytes of JSON)", "message")
    return body
