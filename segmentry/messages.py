"""Messages: the dataclasses users may pass, and pure functions that build, validate
and JSON-encode one event into the exact text the queue stores and the wire carries.
Size limits live here. Imports nothing foreign.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

from .exceptions import InvalidMessage, MessageTooLarge
from .version import __version__

MAX_EVENT_BYTES = 32 * 1024  # Segment's per-event limit, on the JSON encoding
MAX_BATCH_BYTES = 500_000  # Segment's per-request limit
MAX_BATCH_EVENTS = 2_500
MAX_MESSAGE_ID_CHARS = 100

LIBRARY = {"name": "segmentry", "version": __version__}
TYPES = ("track", "identify", "page", "screen", "group", "alias")

Timestamp = Union[dt.datetime, dt.date, str, int, float, None]


@dataclasses.dataclass
class Context:
    """Segment's context object; ``extra`` holds any key not listed here."""

    active: bool | None = None
    ip: str | None = None
    locale: str | None = None
    timezone: str | None = None
    user_agent: str | None = None
    app: dict[str, Any] | None = None
    campaign: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    location: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    os: dict[str, Any] | None = None
    page: dict[str, Any] | None = None
    referrer: dict[str, Any] | None = None
    screen: dict[str, Any] | None = None
    traits: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra or {})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out["userAgent" if f.name == "user_agent" else f.name] = value
        return out


ContextLike = Union[Context, Mapping[str, Any], None]


@dataclasses.dataclass
class _Common:
    context: ContextLike = None
    anonymous_id: str | None = None
    timestamp: Timestamp = None
    integrations: dict[str, Any] | None = None
    message_id: str | None = None


@dataclasses.dataclass
class Track(_Common):
    user_id: str | None = None
    event: str | None = None
    properties: dict[str, Any] | None = None


@dataclasses.dataclass
class Identify(_Common):
    user_id: str | None = None
    traits: dict[str, Any] | None = None


@dataclasses.dataclass
class Page(_Common):
    user_id: str | None = None
    name: str | None = None
    properties: dict[str, Any] | None = None
    category: str | None = None


@dataclasses.dataclass
class Screen(Page):
    pass


@dataclasses.dataclass
class Group(_Common):
    user_id: str | None = None
    group_id: str | None = None
    traits: dict[str, Any] | None = None


@dataclasses.dataclass
class Alias(_Common):
    user_id: str | None = None
    previous_id: str | None = None


Message = Union[Track, Identify, Page, Screen, Group, Alias]
MESSAGE_TYPES: dict[type, str] = {
    Track: "track", Identify: "identify", Page: "page",
    Screen: "screen", Group: "group", Alias: "alias",
}


class Encoded(NamedTuple):
    """One validated event: its id, its type and its final JSON text (ASCII, so
    len(body) is its size in bytes)."""

    message_id: str
    type: str
    body: str


def encode_message(msg: Message, now: float) -> Encoded:
    """Validate and encode a message dataclass; ``now`` is the call's time.time()."""
    type_ = MESSAGE_TYPES.get(type(msg))
    if type_ is None:
        raise InvalidMessage(f"not a segmentry message: {type(msg).__name__}", "message")
    fields: dict[str, Any] = {}
    if isinstance(msg, Track):
        fields = {"event": msg.event, "properties": msg.properties}
    elif isinstance(msg, Identify):
        fields = {"traits": msg.traits}
    elif isinstance(msg, Page):  # Screen too
        fields = {"name": msg.name, "properties": msg.properties, "category": msg.category}
    elif isinstance(msg, Group):
        fields = {"groupId": msg.group_id, "traits": msg.traits}
    elif isinstance(msg, Alias):
        fields = {"previousId": msg.previous_id}
    return encode(
        type_, msg.user_id, fields, now,
        context=msg.context, anonymous_id=msg.anonymous_id, timestamp=msg.timestamp,
        integrations=msg.integrations, message_id=msg.message_id,
    )


# Fields each type requires (wire name), and those that must be objects.
_REQUIRED = {"track": ("event",), "group": ("groupId",), "alias": ("previousId",)}
_OBJECTS = ("properties", "traits")


def encode(
    type_: str,
    user_id: Any,
    fields: dict[str, Any],
    now: float,
    *,
    context: ContextLike = None,
    anonymous_id: Any = None,
    timestamp: Timestamp = None,
    integrations: Mapping[str, Any] | None = None,
    message_id: str | None = None,
) -> Encoded:
    """Validate one event and write its JSON text, member by member in wire order (type,
    userId, anonymousId, the type's fields, context, integrations, timestamp, messageId):
    building the wire dict and encoding it whole took twice as long (9.7 -> 4.7 µs)."""
    parts = ['{"type":', _string(type_)]
    if user_id is not None and user_id != "":
        user_id = user_id if type(user_id) is str else _user_id(user_id, type_)
        parts += (',"userId":', _string(user_id))
    if anonymous_id is not None and anonymous_id != "":
        parts += (',"anonymousId":', _string(_id(anonymous_id, "anonymous_id")))
    if len(parts) == 2:
        raise InvalidMessage(f"{type_}: user_id or anonymous_id is required", "user_id")
    required = _REQUIRED.get(type_, ())
    given = {}
    for key, value in fields.items():
        if value is None:
            continue
        if key in _OBJECTS:
            if type(value) is not dict and not isinstance(value, Mapping):
                raise InvalidMessage(f"{key} must be a dict, not {type(value).__name__}", key)
            text = dumps(dict(value), key)
        elif key in ("groupId", "previousId"):
            value = _id(value, _snake(key))
            text = _string(value)
        elif isinstance(value, str):
            text = _string(value)
        else:
            raise InvalidMessage(f"{key} must be a string, not {type(value).__name__}", key)
        if key in required:
            given[key] = value
        parts += (',"', key, '":', text)
    for key in required:
        if not given.get(key):
            raise InvalidMessage(f"{type_}: {_snake(key)} is required", _snake(key))
    if context is None:
        parts.append(_CONTEXT)
    else:
        parts += (',"context":', dumps(_context(context), "context"))
    if integrations is not None:
        if not isinstance(integrations, Mapping):
            raise InvalidMessage("integrations must be a dict", "integrations")
        parts += (',"integrations":', dumps(dict(integrations), "integrations"))
    message_id = _message_id(message_id)
    parts += (',"timestamp":"',
              format_timestamp(now) if timestamp is None else timestamp_text(timestamp),
              '","messageId":', _string(message_id), "}")
    body = "".join(parts)
    if "\\ud" in body:  # a surrogate escape, most often half of a valid pair (an emoji)
        _refuse_lone_surrogates(body)
    if len(body) > MAX_EVENT_BYTES:
        raise MessageTooLarge(
            f"{type_} event is {len(body)} bytes of JSON, over Segment's "
            f"{MAX_EVENT_BYTES}-byte limit per event", "message")
    return Encoded(message_id, type_, body)


def dumps(value: Any, path: str = "") -> str:
    """Compact ASCII JSON; on a value that cannot become JSON, name its path (``path``
    is the value's own, if it is a member of something)."""
    try:
        if _C_ENCODER is None:
            return str(_ENCODER.encode(value))
        return "".join(_C_ENCODER(value, 0))
    except (TypeError, ValueError, RecursionError) as exc:
        cycle = _find_cycle(value, path)
        if cycle is not None:
            raise InvalidMessage(
                f"{cycle or 'message'}: circular reference (a container that contains "
                f"itself) cannot be encoded as JSON", cycle or "message") from None
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        try:
            path = _find_bad(value, path) or path or "message"
        except RecursionError:  # nested deeper than this search goes, too
            path = path or "message"
        raise InvalidMessage(f"{path}: cannot be encoded as JSON ({reason})", path) from None


# Formatting a datetime costs 1-3 µs: format each second once. One tuple, read once and
# replaced whole, so that a thread never pairs one second with another's text.
_last_second: tuple[Any, str] = (None, "")


def format_timestamp(epoch: float) -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-11-26T22:42:27.123Z."""
    global _last_second
    whole, ms = divmod(round(epoch * 1000), 1000)  # nearest ms: no float truncation
    second, prefix = _last_second
    if second != whole:
        # isoformat, not strftime("%Y"): that writes year 1 as "1", which no parser reads
        prefix = dt.datetime.fromtimestamp(whole, dt.timezone.utc).isoformat()[:19]
        _last_second = (whole, prefix)
    return f"{prefix}.{ms:03d}Z"


def new_message_id() -> str:
    """A random (version 4) UUID string, three times cheaper than str(uuid.uuid4())."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def timestamp_text(value: Timestamp) -> str:
    """A given event time as stored: ISO-8601 UTC with milliseconds; InvalidMessage
    names the field when it is not an aware time in years 1-9999."""
    try:
        return _timestamp(value)
    except (ValueError, OverflowError, OSError) as exc:  # out of datetime's range
        if isinstance(exc, InvalidMessage):
            raise
        raise InvalidMessage(f"timestamp {value!r} is out of range ({exc})",
                             "timestamp") from None


def _timestamp(value: Timestamp) -> str:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidMessage(f"timestamp {value!r} is not ISO-8601", "timestamp") from None
    if isinstance(value, bool):
        raise InvalidMessage("timestamp must be a datetime, not a bool", "timestamp")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise InvalidMessage(f"timestamp {value!r} is not a valid epoch", "timestamp")
        return format_timestamp(float(value))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidMessage(
                "timestamp is a naive datetime: give it a timezone (e.g. tzinfo=timezone.utc)",
                "timestamp")
        return format_timestamp(value.timestamp())
    raise InvalidMessage(
        f"timestamp must be an aware datetime, ISO-8601 string or epoch seconds, "
        f"not {type(value).__name__}", "timestamp")


def _message_id(value: Any) -> str:
    if value is None or value == "":  # "" as for the ids: absent, not one id for all
        return new_message_id()
    text = _id(value, "message_id")
    if len(text) >= MAX_MESSAGE_ID_CHARS:
        raise InvalidMessage(
            f"message_id is {len(text)} characters; it must be under {MAX_MESSAGE_ID_CHARS}",
            "message_id")
    return text


def _user_id(value: Any, type_: str) -> str:
    """A user_id that is not a str: an int or UUID, or a mistake to name."""
    kind = MESSAGE_TYPES.get(type(value))
    if kind is not None:
        name = type(value).__name__
        article = "an" if name[0] in "AEIOU" else "a"
        raise InvalidMessage(
            f"{type_}() was given {article} {name} message: send it with "
            f"client.{kind}(msg) or client.send(msg)", "user_id")
    return _id(value, "user_id")


def _id(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool):
        return str(value)
    raise InvalidMessage(f"{field} must be a string or int, not {type(value).__name__}", field)


def _context(context: ContextLike) -> dict[str, Any]:
    ctx: dict[str, Any]
    if type(context) is dict:
        ctx = context.copy()
    elif context is None:
        ctx = {}
    elif isinstance(context, Context):
        ctx = context.to_dict()
    elif isinstance(context, Mapping):
        ctx = dict(context)
    else:
        raise InvalidMessage(
            f"context must be a Context or a dict, not {type(context).__name__}", "context")
    ctx["library"] = LIBRARY
    return ctx


def _to_json(value: Any) -> Any:
    """json's default hook: the usual conversions, anything else is refused."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError(f"Decimal {value} is not finite")
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _refuse_lone_surrogates(body: str) -> None:
    """Refuse an event whose text holds half of a surrogate pair: not Unicode, so the
    receiver refuses or alters it. Read on the text, a few escapes: decoding the event
    to look would triple the cost of every event holding an emoji. (Two halves in a row
    are one character to the receiver, whether Python held them as one or two.)"""
    if not _has_lone_surrogate(body):
        return
    path = _find_surrogate(json.loads(body), "") or "message"
    raise InvalidMessage(
        f"{path}: contains a lone surrogate (half of a UTF-16 pair), which is not valid "
        f"Unicode and which the receiver refuses or alters; fix the text (e.g. "
        f"text.encode('utf-8', 'replace').decode())", path)


def _has_lone_surrogate(body: str) -> bool:
    """Whether an escape of a surrogate half is not directly followed by (for a high
    half) or preceded by (for a low one) its other half. str.find, not a regular
    expression: a pattern that cannot start with its literal scans 3 µs a body."""
    high_end = -1  # where the escape of a high half ended, awaiting its low half there
    at = body.find("\\ud")
    while at >= 0:
        run = at  # after an odd number of backslashes this one is escaped: text "\\ud"
        while run and body[run - 1] == "\\":
            run -= 1
        half = body[at + 3:at + 4]  # the encoder writes hex in lowercase
        escape = (at - run) % 2 == 0 and half in _SURROGATE_HALVES
        if high_end >= 0:
            if not (escape and at == high_end and half in "cdef"):
                return True
            high_end = -1
        elif escape:
            if half in "cdef":
                return True
            high_end = at + 6
        at = body.find("\\ud", at + 1)
    return high_end >= 0


_SURROGATE_HALVES = frozenset("89abcdef")  # \ud800-\udbff high, \udc00-\udfff low


def _find_surrogate(value: Any, path: str) -> str | None:
    """The path of the first key or string of a decoded event that is not Unicode."""
    if isinstance(value, str):
        return None if _is_unicode(value) else path
    if isinstance(value, list):
        items: Any = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        items = ((_member(path, key), item) for key, item in value.items())
    else:
        return None
    for where, item in items:
        if not _is_unicode(where):  # the key itself
            return ascii(where)[1:-1]
        bad = _find_surrogate(item, where)
        if bad:
            return bad
    return None


def _member(path: str, key: str) -> str:
    return f"{path}.{key}" if path else _SNAKE.get(key, key)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_cycle(value: Any, path: str) -> str | None:
    """The path of the first container found inside itself, without recursion (the
    encoder already ran out of stack on it). Each member carries its trail, a link to
    its container's: a path built at every level would be quadratic in the depth."""
    inside: set[int] = set()  # ids of the containers on the trail walked
    stack: list[tuple[Any, Any, bool]] = [(value, None, False)]
    while stack:
        item, trail, leaving = stack.pop()
        if leaving:
            inside.discard(id(item))
            continue
        if isinstance(item, Mapping):
            members = [(v, (trail, f".{k}")) for k, v in item.items()]
        elif isinstance(item, (list, tuple)):
            members = [(v, (trail, f"[{i}]")) for i, v in enumerate(item)]
        else:
            continue
        if id(item) in inside:
            return _trail_path(path, trail)
        inside.add(id(item))
        stack.append((item, trail, True))
        stack.extend((v, member_trail, False) for v, member_trail in reversed(members))
    return None


def _trail_path(path: str, trail: Any) -> str:
    steps = []
    while trail is not None:
        trail, step = trail
        steps.append(step)
    text = path + "".join(reversed(steps))
    return text[1:] if text.startswith(".") else text  # no container path: a bare key


def _find_bad(value: Any, path: str) -> str | None:
    """Depth-first search for the first value that cannot become JSON."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                return f"{path}.{key!r}" if path else repr(key)
            bad = _find_bad(item, f"{path}.{key}" if path else str(key))
            if bad:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            bad = _find_bad(item, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    try:
        converted = _to_json(value)
    except (TypeError, ValueError):
        return path
    return _find_bad(converted, path)


_SNAKE = {"userId": "user_id", "anonymousId": "anonymous_id", "groupId": "group_id",
          "previousId": "previous_id", "messageId": "message_id"}


def _snake(wire: str) -> str:
    return _SNAKE.get(wire, wire)


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_to_json, allow_nan=False)
# The C encoder that _ENCODER.encode() builds on every call, built once (0.7 of 3.4 µs a
# track event). Without circular-reference markers: a markers dict would be shared by
# threads (one encoding a shared dict would see another's mark), and a container that
# contains itself still fails, with the RecursionError dumps() names it by.
_string = json.encoder.encode_basestring_ascii  # a str as JSON text, as the encoder writes it
_make_encoder = getattr(json.encoder, "c_make_encoder", None)  # None without the C module
_C_ENCODER = _make_encoder and _make_encoder(
    None, _to_json, _string, None, ":", ",", False, False, False)


# The context member when the call gives none: only the library.
_CONTEXT = ',"context":' + dumps({"library": LIBRARY})


def type_of(body: str) -> str:
    """The type of a stored event, read without decoding: encode() writes it first."""
    if not body.startswith('{"type":"'):
        raise ValueError("not an event encoded by segmentry")
    return body[9:body.index('"', 9)]


def splice_batch(bodies: list[str], sent_at: str) -> str:
    """The /v1/batch request body from stored event texts, without decoding them."""
    return '{"batch":[' + ",".join(bodies) + '],"sentAt":"' + sent_at + '"}'


BATCH_OVERHEAD = len(splice_batch([], format_timestamp(0.0)))
