"""A fake Segment receiver on 127.0.0.1 for end-to-end tests, chaos runs, benchmarks and demos.

Owns the loopback HTTP server, Segment's limits and write-key check, thread-safe delivery
counts, recording of what arrived, fault injection and the control endpoints. Standard
library only: it is a tool, not part of the package.

Python:  ``with FakeSegment(write_key="K", record=True) as srv: ... srv.url ...``
Command: ``python tools/fake_segment.py [--port 0] [--write-key K ...] [--record] [--ready-file P]``
prints ``listening on http://127.0.0.1:PORT/v1/`` and serves until SIGTERM/SIGINT (exit 0).

Ingest: ``POST /v1/batch`` (or ``/v1/import``) ``{"batch": [...], "sentAt": ...}`` and
``POST /v1/<type>`` with one event; gzip bodies; 200 ``{"success": true}``. Each event needs
a ``messageId`` and a ``type``. Refusals (JSON ``{"success": false, "error": ...}``): 401 bad
write key; 400 malformed JSON, an event over 32,768 bytes (its exact text), over 2,500
events; 413 a body over 500,000 bytes on the wire or once decompressed. A request goes
through, in order: delay, drop, injected status, rate limit, write key, body checks,
rejected events, ingest, ambiguous close, 200. A refused request ingests nothing.

Control (never faulted, never counted): ``GET /__stats`` (see `Ledger.stats`),
``GET /__events?since=N[&raw=1]`` -> ``{"next", "events"}``, ``GET /__batches?since=N``,
``GET|POST|DELETE /__faults``, ``POST /__reset`` (counts, records and faults), ``POST
/__keys`` ``{"keys": ["K1", "K2"]}`` (the write keys accepted from now on; null: any).
Several write keys may be accepted (``write_key=["K1", "K2"]``, ``--write-key`` repeated);
``events_by_key`` in the stats counts the events each key delivered.
``POST /__faults`` arms the kinds it names, replacing them, all or none: ``{"status":
{"code": 503, "count": 5, "retry_after": 2}, "drop": {"count": 2}, "ambiguous": {"count":
1}, "delay_ms": 50, "reject": ["Poison"], "rate_limit": {"per_second": 50, "retry_after": 1,
"burst": 50}}``; a missing or null count lasts until cleared.

Recording (``record=True``) keeps each event's JSON text exactly as it was in the
(decompressed) body, sliced from it, never re-encoded; a single-event body is kept whole,
sentAt included. `events()` decodes those texts.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs

HOST = "127.0.0.1"
MAX_BODY_BYTES = 500_000  # Segment's per-request limit, on the wire and after gunzip
MAX_EVENT_BYTES = 32 * 1024  # Segment's per-event limit, on the event's JSON text
MAX_BATCH_EVENTS = 2_500
EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
# /v1/import is Segment's older name for /v1/batch.
ENDPOINTS = {"/v1/batch": "batch", "/v1/import": "batch", **{f"/v1/{t}": t for t in EVENT_TYPES}}
# Bodies up to this size are read (and discarded) before a 413, so the client sees the
# reply instead of a reset; anything larger is refused and the connection closed.
READ_CAP = 64 * 1024 * 1024
OK_BODY = b'{"success": true}'
Stats = dict[str, Any]


class Reply(Exception):
    """Answer the request with this status and a JSON error, ingesting nothing."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None,
                 **fields: Any) -> None:
        super().__init__(error)
        self.status = status
        self.headers = headers or {}
        self.payload = {"success": False, "error": error, **fields}


class RateLimited(Reply):
    def __init__(self, retry_after: str) -> None:
        super().__init__(429, "rate limited", headers={"Retry-After": retry_after})


class Dropped(Exception):
    """Close the connection without any reply (the request is already counted)."""


# --- body parsing -------------------------------------------------------------------------
# json.JSONDecoder.raw_decode returns where each value ends, so a batch is decoded one event
# at a time and each event's exact text is a slice of the body: no re-encoding, C speed.

_DECODER = json.JSONDecoder()


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _expect(text: str, i: int, char: str) -> int:
    i = _skip(text, i)
    if not text.startswith(char, i):
        raise ValueError(f"expected {char!r} at offset {i}")
    return i + 1


class Split(NamedTuple):
    """A "batch" array decoded one element at a time: the elements and their exact texts."""

    events: list[Any]
    texts: list[str]


def _split_array(text: str, i: int) -> tuple[Split, int]:
    """Decode the array opening at text[i], keeping each element's exact text."""
    split = Split([], [])
    i = _skip(text, i + 1)
    if text.startswith("]", i):
        return split, i + 1
    while True:
        value, end = _DECODER.raw_decode(text, i)
        split.events.append(value)
        split.texts.append(text[i:end])
        i = _skip(text, end)
        if not text.startswith(",", i):
            return split, _expect(text, i, "]")
        i = _skip(text, i + 1)


def split_object(text: str, batch: bool) -> dict[str, tuple[Any, int, int]]:
    """Decode a JSON object into {key: (value, start, end)}, the value's span in `text`.

    With `batch`, a "batch" array becomes a Split.
    """
    members: dict[str, tuple[Any, int, int]] = {}
    i = _skip(text, _expect(text, 0, "{"))
    closed = text.startswith("}", i)
    i += closed
    while not closed:
        key, i = _DECODER.raw_decode(text, i)
        if not isinstance(key, str):
            raise ValueError("object keys must be strings")
        start = _skip(text, _expect(text, i, ":"))
        if batch and key == "batch" and text.startswith("[", start):
            value, i = _split_array(text, start)
        else:
            value, i = _DECODER.raw_decode(text, start)
        members[key] = (value, start, i)
        i = _skip(text, i)
        closed = not text.startswith(",", i)
        i = _expect(text, i, "}") if closed else _skip(text, i + 1)
    if _skip(text, i) != len(text):
        raise ValueError(f"extra data at offset {i}")
    return members


@dataclass
class Body:
    """A valid request body: its events, their messageIds, their exact texts, its sentAt."""

    events: list[dict[str, Any]]
    ids: list[str]
    texts: list[str]
    sent_at: Any


def _byte_len(text: str, ascii_only: bool) -> int:
    return len(text) if ascii_only else len(text.encode("utf-8"))


def _check_event(event: Any, size: int, where: str) -> None:
    if not isinstance(event, dict):
        raise Reply(400, f"{where} is not a JSON object")
    message_id = event.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise Reply(400, f"{where} has no messageId")
    if event.get("type") not in EVENT_TYPES:
        raise Reply(400, f"{where} has no valid type", messageId=message_id)
    if size > MAX_EVENT_BYTES:
        raise Reply(400, f"{where} is {size} bytes, over the {MAX_EVENT_BYTES}-byte limit",
                    messageId=message_id)


def _batch_body(members: dict[str, tuple[Any, int, int]], ascii_only: bool) -> Body:
    split = members.get("batch", (None, 0, 0))[0]
    if not isinstance(split, Split):
        raise Reply(400, 'the body has no "batch" array')
    if len(split.events) > MAX_BATCH_EVENTS:
        raise Reply(400, f"{len(split.events)} events, over the {MAX_BATCH_EVENTS}-event limit")
    # A UTF-8 character takes at most 4 bytes: the exact size is needed only past 8 KB of text.
    width = 1 if ascii_only else 4
    ids: list[str] = []
    for index, (event, text) in enumerate(zip(split.events, split.texts)):
        # Fast path first: this runs for every event of every request.
        message_id: Any = event.get("messageId") if type(event) is dict else None
        if not (type(message_id) is str and message_id and event.get("type") in EVENT_TYPES
                and len(text) * width <= MAX_EVENT_BYTES):
            _check_event(event, _byte_len(text, ascii_only), f"batch[{index}]")
        ids.append(message_id)
    return Body(split.events, ids, split.texts, members.get("sentAt", (None,))[0])


def _single_body(kind: str, members: dict[str, tuple[Any, int, int]], text: str,
                 ascii_only: bool) -> Body:
    """The body is the event itself; its size leaves out the sentAt member (a request field)."""
    event = {key: value for key, (value, _, _) in members.items()}
    event.setdefault("type", kind)
    if event["type"] != kind:
        raise Reply(400, f"a {event['type']!r} event posted to /v1/{kind}")
    size = _byte_len(text, ascii_only)
    if "sentAt" in members:
        _, start, end = members["sentAt"]
        size -= _byte_len(text[start:end], ascii_only) + len('"sentAt":,')
    _check_event(event, size, "the event")
    return Body([event], [event["messageId"]], [text], event.get("sentAt"))


def parse_body(kind: str, data: bytes) -> Body:
    """Validate a decompressed request body for endpoint `kind` ("batch" or an event type)."""
    try:
        text = data.decode("utf-8")
        members = split_object(text, batch=kind == "batch")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Reply(400, f"malformed JSON: {exc}") from exc
    ascii_only = text.isascii()
    if kind == "batch":
        return _batch_body(members, ascii_only)
    return _single_body(kind, members, text, ascii_only)


def gunzip(data: bytes) -> bytes:
    """Decompress a gzip body, refusing one that inflates past the body limit."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise Reply(400, f"malformed gzip body: {exc}") from exc
    if len(out) > MAX_BODY_BYTES:
        raise Reply(413, f"body over {MAX_BODY_BYTES} bytes once decompressed")
    if not inflater.eof:
        raise Reply(400, "truncated gzip body")
    return out


# --- faults -------------------------------------------------------------------------------


class TokenBucket:
    """`rate` requests/s with bursts of up to `burst`; time is an argument."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class Armed:
    """A fault that fires for `remaining` more requests (None: until cleared)."""

    remaining: int | None
    code: int = 0
    retry_after: str | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.remaining}
        if self.code:
            out.update(code=self.code, retry_after=self.retry_after)
        return out


@dataclass
class RateLimit:
    bucket: TokenBucket
    retry_after: str

    def describe(self) -> dict[str, Any]:
        return {"per_second": self.bucket.rate, "burst": self.bucket.burst,
                "retry_after": self.retry_after}


def _count(count: Any) -> int | None:
    if count is not None and (type(count) is not int or count < 0):
        raise ValueError(f"count must be a non-negative integer or null, not {count!r}")
    return count


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, not {value!r}")
    return float(value)


def _retry_after(value: Any) -> str | None:
    """A Retry-After header value: whole seconds, or a string sent as given (an HTTP date)."""
    if isinstance(value, str) and value.isprintable():  # no CR/LF: one header line
        return value
    return None if value is None else str(int(_number(value, "retry_after")))


def count_fault(count: int | None = None) -> Armed:
    return Armed(_count(count))


def status_fault(code: int, count: int | None = None, retry_after: Any = None) -> Armed:
    if type(code) is not int or not 200 <= code <= 599:
        raise ValueError(f"status must be an integer in 200..599, not {code!r}")
    return Armed(_count(count), code, _retry_after(retry_after))


def rate_limit_fault(per_second: float, retry_after: Any = 1, burst: float | None = None
                     ) -> RateLimit:
    rate = _number(per_second, "per_second")
    burst = max(1.0, rate) if burst is None else _number(burst, "burst")
    return RateLimit(TokenBucket(rate, burst, time.monotonic()), _retry_after(retry_after) or "1")


def _kwargs(value: Any, kind: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{kind} takes a JSON object")
    return value


def _build_fault(kind: str, value: Any) -> Any:
    """Validate one member of a /__faults body into what Faults stores for it."""
    if kind == "status":
        return status_fault(**_kwargs(value, kind))
    if kind in ("drop", "ambiguous"):
        return count_fault(**_kwargs(value, kind))
    if kind == "delay_ms":
        return _number(value, kind)
    if kind == "reject":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("reject takes a list of event names or messageIds")
        return frozenset(value)
    if kind == "rate_limit":
        return rate_limit_fault(**_kwargs(value, kind))
    raise ValueError(f"unknown fault {kind!r}")


class Faults:
    """The armed faults, one slot per kind; a setter replaces its slot. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, Any] = {}

    def set(self, kind: str, value: Any) -> None:
        # A count of 0, a delay of 0 and an empty reject list disarm.
        disarm = not value or isinstance(value, Armed) and value.remaining == 0
        with self._lock:
            if disarm:
                self._slots.pop(kind, None)
            else:
                self._slots[kind] = value

    def apply(self, spec: Any) -> None:
        """Arm the faults of a /__faults body, all or none (ValueError names the bad one)."""
        if not isinstance(spec, dict):
            raise ValueError("the body must be a JSON object")
        try:
            built = {kind: _build_fault(kind, value) for kind, value in spec.items()}
        except TypeError as exc:  # an unexpected or missing field of a fault object
            raise ValueError(str(exc)) from exc
        for kind, value in built.items():
            self.set(kind, value)

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {kind: _describe(value) for kind, value in self._slots.items()}

    def delay_s(self) -> float:
        return float(self._slots.get("delay_ms", 0.0)) / 1000  # one dict read: atomic

    def fire(self, kind: str) -> Armed | None:
        """Spend one request of the `kind` fault if armed, and return it."""
        with self._lock:
            armed: Armed | None = self._slots.get(kind)
            if armed is not None and armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining == 0:
                    del self._slots[kind]
            return armed

    def limited(self, now: float) -> str | None:
        """The Retry-After value when the rate limit refuses this request."""
        with self._lock:
            limit = self._slots.get("rate_limit")
            return None if limit is None or limit.bucket.take(now) else limit.retry_after

    def rejected(self, events: list[dict[str, Any]]) -> Reply | None:
        names = self._slots.get("reject", frozenset())  # one dict read: atomic, no lock
        for index, event in enumerate(events if names else ()):
            for field in ("messageId", "event", "name"):
                value = event.get(field)
                if isinstance(value, str) and value in names:
                    return Reply(400, f"rejected event {value!r}", rejected=value, index=index,
                                 messageId=event["messageId"])
        return None


def _describe(value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    return value.describe() if hasattr(value, "describe") else value


# --- counts and records -------------------------------------------------------------------


class Ledger:
    """What the receiver saw: counts, seen messageIds and, when recording, every event's text.

    One Condition guards it all and is notified on every counted request, so `wait_for`
    wakes as soon as a request changes the counts.
    """

    def __init__(self, record: bool) -> None:
        self.record = record
        self._cond = threading.Condition()
        self._reset()

    def _reset(self) -> None:
        self._requests = 0
        self._by_status: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._seen: set[str] = set()
        self._texts: list[str] = []
        self._where: dict[str, list[int]] = {}
        self._batches: list[dict[str, Any]] = []
        self._by_key: Counter[str] = Counter()

    def reset(self) -> None:
        with self._cond:
            self._reset()
            self._cond.notify_all()

    def count(self, outcome: str, rate_limited: bool = False) -> None:
        """Count a request that ingested nothing."""
        with self._cond:
            self._requests += 1
            self._by_status[outcome] += 1
            self._counts["rate_limited"] += rate_limited
            self._cond.notify_all()

    def ingest(self, body: Body, outcome: str, meta: dict[str, Any]) -> None:
        with self._cond:
            self._requests += 1
            self._by_status[outcome] += 1
            self._count_events(body)
            self._by_key[meta.get("write_key") or ""] += len(body.ids)
            self._counts["batches" if ENDPOINTS[meta["path"]] == "batch" else "singles"] += 1
            self._counts["bytes"] += meta["bytes"]
            if self.record:
                self._keep(body, meta)
            self._cond.notify_all()

    def _count_events(self, body: Body) -> None:
        # Set arithmetic rather than a loop: it runs under the lock, for every event.
        before = len(self._seen)
        self._seen.update(body.ids)
        self._counts["events"] += len(body.ids)
        self._counts["duplicates"] += len(body.ids) - (len(self._seen) - before)

    def _keep(self, body: Body, meta: dict[str, Any]) -> None:
        first = len(self._texts)
        for offset, message_id in enumerate(body.ids):
            self._where.setdefault(message_id, []).append(first + offset)
        self._texts.extend(body.texts)
        self._batches.append({**meta, "index": len(self._batches), "first": first,
                              "events": len(body.events), "sentAt": body.sent_at})

    def _snapshot(self) -> Stats:
        counts = self._counts
        return {"requests": self._requests, "requests_by_status": dict(self._by_status),
                "events": counts["events"], "unique": len(self._seen),
                "duplicates": counts["duplicates"], "batches": counts["batches"],
                "singles": counts["singles"], "bytes": counts["bytes"],
                "rate_limited": counts["rate_limited"], "recorded": len(self._texts),
                "events_by_key": dict(self._by_key)}

    def stats(self) -> Stats:
        with self._cond:
            return self._snapshot()

    def wait_for(self, predicate: Callable[[Stats], bool], timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot()), timeout)

    def texts(self, since: int = 0) -> list[str]:
        self._require_record()
        with self._cond:
            return self._texts[since:]

    def texts_of(self, message_id: str) -> list[str]:
        self._require_record()
        with self._cond:
            return [self._texts[i] for i in self._where.get(message_id, ())]

    def batches(self, since: int = 0) -> list[dict[str, Any]]:
        self._require_record()
        with self._cond:
            return [dict(batch) for batch in self._batches[since:]]

    def _require_record(self) -> None:
        if not self.record:
            raise RuntimeError("events are recorded only with record=True / --record")


# --- HTTP ---------------------------------------------------------------------------------


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 460 and other non-standard codes
        return "Status"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's pooled session reuses sockets
    disable_nagle_algorithm = True  # a small reply must not wait for the client's delayed ACK
    server: Server
    body = b""  # a control request's body

    def log_message(self, format: str, *args: Any) -> None:
        pass  # thousands of requests a second: a line each would be the bottleneck

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        try:
            if path.startswith("/__"):
                self._control(method, path, parse_qs(query))
            else:
                self._ingest(method, path)
        except Reply as reply:
            self._reply_error(reply)
        except Dropped:
            pass

    # ingest

    def _ingest(self, method: str, path: str) -> None:
        ledger = self.server.fake.ledger
        try:
            self._ingest_or_refuse(method, path)
        except Reply as reply:
            ledger.count(str(reply.status), rate_limited=isinstance(reply, RateLimited))
            raise

    def _ingest_or_refuse(self, method: str, path: str) -> None:
        fake = self.server.fake
        data = self._read_body()
        kind = ENDPOINTS.get(path)
        if kind is None:
            raise Reply(404, f"no endpoint {path}")
        if method != "POST":
            raise Reply(405, f"{path} takes POST", headers={"Allow": "POST"})
        self._inject_faults(fake.faults)
        key = self._check_write_key(fake.credentials)
        body = parse_body(kind, self._decompress(data))
        rejection = fake.faults.rejected(body.events)
        if rejection:
            raise rejection
        ambiguous = fake.faults.fire("ambiguous") is not None
        fake.ledger.ingest(body, "ambiguous" if ambiguous else "200",
                           {**self._meta(path, data), "write_key": key})
        if ambiguous:
            self.close_connection = True  # ingested, yet the client never hears back
        else:
            self._send(200, OK_BODY)

    def _inject_faults(self, faults: Faults) -> None:
        delay = faults.delay_s()
        if delay:
            time.sleep(delay)  # a simulated round trip: this handler's thread only
        if faults.fire("drop"):
            self.server.fake.ledger.count("drop")
            self.close_connection = True
            raise Dropped
        status = faults.fire("status")
        if status:
            headers = {"Retry-After": status.retry_after} if status.retry_after else {}
            raise Reply(status.code, "injected failure", headers=headers)
        retry_after = faults.limited(time.monotonic())
        if retry_after is not None:
            raise RateLimited(retry_after)

    def _read_body(self) -> bytes:
        """Read the whole body first, whatever the answer, so the connection stays usable."""
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a framing this server does not read: stream lost
            raise Reply(411, "send a Content-Length, not a Transfer-Encoding")
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise Reply(400, f"bad Content-Length {length!r}")
        size = int(length)
        if size > READ_CAP:
            self.close_connection = True
            raise Reply(413, f"body over {MAX_BODY_BYTES} bytes")
        data = self.rfile.read(size)
        if len(data) < size:  # the client hung up mid-body: nobody to answer
            self.close_connection = True
            raise Dropped
        if len(data) > MAX_BODY_BYTES:
            raise Reply(413, f"body over {MAX_BODY_BYTES} bytes")
        return data

    def _check_write_key(self, credentials: frozenset[bytes] | None) -> str:
        """The write key the request carries (401 unless accepted)."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        if credentials is not None and (scheme.lower() != "basic" or given not in credentials):
            raise Reply(401, "invalid write key")
        return given.decode("utf-8", "replace").removesuffix(":")

    def _decompress(self, data: bytes) -> bytes:
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return data
        if encoding != "gzip":
            raise Reply(400, f"unsupported Content-Encoding {encoding!r}")
        return gunzip(data)

    def _meta(self, path: str, data: bytes) -> dict[str, Any]:
        return {"path": path, "bytes": len(data),
                "gzip": self.headers.get("Content-Encoding", "").strip().lower() == "gzip",
                "retry_count": self.headers.get("X-Retry-Count")}

    # control

    def _control(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        self.body = self._read_body()
        action = CONTROL.get((method, path))
        if action is None:
            raise Reply(404, f"no control endpoint {method} {path}")
        action(self, query)

    def _stats(self, query: dict[str, list[str]]) -> None:
        self._send_json(self.server.fake.stats())

    def _events(self, query: dict[str, list[str]]) -> None:
        since = _since(query)
        texts = self._recorded(lambda: self.server.fake.ledger.texts(since))
        if query.get("raw") == ["1"]:
            self._send_json({"next": since + len(texts), "events": texts})
            return
        # The recorded texts are spliced in as they are: the reply carries the exact bytes.
        head = f'{{"next": {since + len(texts)}, "events": ['.encode()
        self._send(200, head + ",".join(texts).encode("utf-8") + b"]}")

    def _batches(self, query: dict[str, list[str]]) -> None:
        since = _since(query)
        batches = self._recorded(lambda: self.server.fake.ledger.batches(since))
        self._send_json({"next": since + len(batches), "batches": batches})

    def _recorded(self, read: Callable[[], list[Any]]) -> list[Any]:
        try:
            return read()
        except RuntimeError as exc:
            raise Reply(409, str(exc)) from exc

    def _get_faults(self, query: dict[str, list[str]]) -> None:
        self._send_json(self.server.fake.active_faults())

    def _post_faults(self, query: dict[str, list[str]]) -> None:
        spec = self._read_json()
        try:
            self.server.fake.faults.apply(spec)
        except ValueError as exc:
            raise Reply(400, str(exc)) from exc
        self._send_json(self.server.fake.active_faults())

    def _delete_faults(self, query: dict[str, list[str]]) -> None:
        self.server.fake.clear_faults()
        self._send_json({})

    def _reset(self, query: dict[str, list[str]]) -> None:
        self.server.fake.reset()
        self._send(200, OK_BODY)

    def _post_keys(self, query: dict[str, list[str]]) -> None:
        keys = self._read_json().get("keys")
        if keys is not None and not (isinstance(keys, list)
                                     and all(isinstance(k, str) for k in keys)):
            raise Reply(400, '"keys" must be a list of strings, or null')
        self.server.fake.accept_keys(keys)
        self._send(200, OK_BODY)

    def _read_json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise Reply(400, f"malformed JSON: {exc}") from exc

    # replies

    def _reply_error(self, reply: Reply) -> None:
        self._send(reply.status, json.dumps(reply.payload).encode(), reply.headers)

    def _send_json(self, payload: Any) -> None:
        self._send(200, json.dumps(payload).encode())

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Write the whole reply in one call: one packet, one syscall."""
        lines = [f"HTTP/1.1 {status} {_phrase(status)}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def _since(query: dict[str, list[str]]) -> int:
    value = query.get("since", ["0"])[-1]
    if not (value.isascii() and value.isdigit()):
        raise Reply(400, f"since must be a non-negative integer, not {value!r}")
    return int(value)


CONTROL: dict[tuple[str, str], Callable[[Handler, dict[str, list[str]]], None]] = {
    ("GET", "/__stats"): Handler._stats,
    ("GET", "/__events"): Handler._events,
    ("GET", "/__batches"): Handler._batches,
    ("GET", "/__faults"): Handler._get_faults,
    ("POST", "/__faults"): Handler._post_faults,
    ("DELETE", "/__faults"): Handler._delete_faults,
    ("POST", "/__reset"): Handler._reset,
    ("POST", "/__keys"): Handler._post_keys,
}


class Server(ThreadingHTTPServer):
    """A threaded server that also closes its open keep-alive connections when stopped."""

    daemon_threads = True
    request_queue_size = 128  # the chaos harness opens many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeSegment) -> None:
        self.fake = fake
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client hanging up mid-request is routine in chaos runs
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Wake every handler thread blocked on an idle keep-alive socket."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler


# --- Python API ---------------------------------------------------------------------------


class FakeSegment:
    """The receiver, served from a background thread while started (or inside `with`)."""

    def __init__(self, port: int = 0, *, write_key: str | None = None, record: bool = False,
                 host: str = HOST) -> None:
        if host != HOST:
            raise ValueError(f"the fake Segment binds to {HOST} only, not {host!r}")
        self.address = (host, port)
        self.credentials: frozenset[bytes] | None = None
        self.accept_keys(write_key)
        self.faults = Faults()
        self.ledger = Ledger(record)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeSegment:
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = Server(self.address, self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        # close() waits up to this long for the loop
                                        kwargs={"poll_interval": 0.05},
                                        name="fake-segment", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        server, thread, self._server = self._server, self._thread, None
        if server is None or thread is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join()

    def __enter__(self) -> FakeSegment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The api_url to give a client: http://127.0.0.1:PORT/v1/."""
        return f"http://{HOST}:{self.port}/v1/"

    # faults

    def fail(self, status: int = 503, count: int | None = None, retry_after: Any = None) -> None:
        """Answer `status` without ingesting, for `count` requests (None: until cleared)."""
        self.faults.set("status", status_fault(status, count, retry_after))

    def drop(self, count: int | None = None) -> None:
        """Close the connection with no reply, ingesting nothing."""
        self.faults.set("drop", count_fault(count))

    def ambiguous(self, count: int | None = None) -> None:
        """Ingest, then close the connection with no reply."""
        self.faults.set("ambiguous", count_fault(count))

    def delay(self, ms: float) -> None:
        """Hold every ingest reply `ms` milliseconds (0 disarms)."""
        self.faults.set("delay_ms", _number(ms, "ms"))

    def reject(self, *names: str) -> None:
        """Answer 400 to any request holding an event with one of these names or messageIds."""
        self.faults.set("reject", frozenset(names))

    def rate_limit(self, per_second: float, retry_after: Any = 1,
                   burst: float | None = None) -> None:
        """Answer 429 past `per_second` requests/s (bursts up to max(1, per_second))."""
        self.faults.set("rate_limit", rate_limit_fault(per_second, retry_after, burst))

    def clear_faults(self) -> None:
        self.faults.clear()

    def active_faults(self) -> dict[str, Any]:
        """The armed faults, in the shape POST /__faults takes."""
        return self.faults.describe()

    # counts and records

    def stats(self) -> Stats:
        """requests, requests_by_status ({"200": n, "503": n, "drop": n, "ambiguous": n, ...}),
        events, unique (messageIds), duplicates, batches, singles, bytes (wire bytes of
        ingested bodies), rate_limited (429s from the rate limit), recorded."""
        return self.ledger.stats()

    def wait_for(self, predicate: Callable[[Stats], bool], timeout: float | None = 30.0) -> bool:
        """Block until predicate(stats) holds (True) or `timeout` seconds pass (False)."""
        return self.ledger.wait_for(predicate, timeout)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Recorded events in arrival order, decoded (a single-event body keeps its sentAt)."""
        return [json.loads(text) for text in self.ledger.texts(since)]

    def raw_events(self, since: int = 0) -> list[str]:
        """Each recorded event's JSON text exactly as it was in its (decompressed) body."""
        return self.ledger.texts(since)

    def raw(self, message_id: str) -> list[str]:
        """The exact text of every arrival of `message_id`, in order."""
        return self.ledger.texts_of(message_id)

    def batches(self, since: int = 0) -> list[dict[str, Any]]:
        """Each ingested request: path, bytes, gzip, retry_count, sentAt, first, events."""
        return self.ledger.batches(since)

    def accept_keys(self, keys: str | Iterable[str] | None) -> None:
        """The write keys accepted from now on (None: any key)."""
        if keys is not None:
            keys = [keys] if isinstance(keys, str) else list(keys)
        self.credentials = None if keys is None else frozenset(f"{k}:".encode() for k in keys)

    def reset(self) -> None:
        """Forget counts, records and faults: as just started."""
        self.faults.clear()
        self.ledger.reset()


# --- command line -------------------------------------------------------------------------


def _parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default=HOST, choices=[HOST], help="loopback only")
    parser.add_argument("--write-key", action="append",
                        help="answer 401 unless Basic auth carries this key (repeatable)")
    parser.add_argument("--record", action="store_true", help="keep every event's text")
    parser.add_argument("--ready-file", help="write the URL here once listening")
    return parser.parse_args(None if argv is None else list(argv))


def _write_atomically(path: str, text: str) -> None:
    """A parent polling for the file never reads it half-written."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".ready-")
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    os.replace(tmp, path)


def main(argv: Iterable[str] | None = None) -> int:
    args = _parse_args(argv)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    # Blocked before any thread starts, so every thread inherits the mask and the main
    # thread alone takes the signal, in sigwait: no handler runs in the middle of anything.
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        fake = FakeSegment(args.port, write_key=args.write_key, record=args.record).start()
    except OSError as exc:
        print(f"fake_segment: cannot listen on {HOST}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.ready_file:
            _write_atomically(args.ready_file, fake.url)
        print(f"listening on {fake.url}", flush=True)
        signal.sigwait(stop_signals)
    finally:
        fake.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
