"""The test seam shipped to users, in the spirit of Elixir's Req.Test: a ``requests``
adapter that answers from a plain function of the request, and a recorder of what the
receiver was sent. Nothing here touches the network.

    stub = segmentry.testing.Stub()                      # answers 200 and records
    http = segmentry.http.client("KEY", adapter=stub)    # or requests_options={"adapter": stub}
    segmentry.http.batch(http, [Track(user_id="u", event="E")])
    assert stub.events[0]["event"] == "E"

    stub = segmentry.testing.Stub(lambda request: 503)   # a handler: the status to answer
    stub = segmentry.testing.Stub(segmentry.testing.sequence(503, 200))  # one answer per request
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from typing import Any, Callable, Union

import requests
from requests.structures import CaseInsensitiveDict

from .http import LocalAdapter, make_response, request_json

Body = Union[str, bytes, Mapping[str, Any], list[Any]]
Reply = Union[int, tuple[int, Body], tuple[int, Body, Mapping[str, str]]]
"""A status, ``(status, body)`` or ``(status, body, headers)``. A dict or list body is
sent as JSON; a bare 2xx status answers ``{"success": true}``, any other an empty body."""
Handler = Callable[[requests.PreparedRequest], Reply]
"""A function from the prepared request to its reply; it may raise
``requests.ConnectionError`` or ``requests.Timeout`` to play a network failure."""

SUCCESS_BODY = {"success": True}  # what Segment answers to a good request
SUCCESS: Reply = (200, SUCCESS_BODY)


def ok(request: requests.PreparedRequest) -> Reply:
    """The default handler: every request succeeds."""
    return SUCCESS


def sequence(*answers: Reply | BaseException | type[BaseException]) -> Handler:
    """A handler giving one reply per request in order, then repeating the last; an
    exception (class or instance) in the list is raised: ``sequence(503, Timeout, 200)``."""
    if not answers:
        raise ValueError("sequence() needs at least one answer")
    pending = list(answers)
    lock = threading.Lock()

    def handler(request: requests.PreparedRequest) -> Reply:
        with lock:
            answer = pending.pop(0) if len(pending) > 1 else pending[0]
        if isinstance(answer, BaseException):  # the same instance each time: without this
            raise answer.with_traceback(None)  # its traceback would grow at every raise
        if isinstance(answer, type) and issubclass(answer, BaseException):
            raise answer
        return answer

    return handler


class StubAdapter(LocalAdapter):
    """A ``requests`` adapter that answers every request with ``handler(request)``.

    Mount it with ``client(..., adapter=stub)``. Thread-safe as long as the handler is.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        super().__init__()
        self.handler: Handler = handler or ok

    def respond(self, request: requests.PreparedRequest) -> requests.Response:
        try:
            answer = self.handler(request)
        except BaseException:
            self.answered(request, None)
            raise
        status, body, headers = _unpack(answer)
        self.answered(request, status)
        return make_response(request, status, body, headers)

    def answered(self, request: requests.PreparedRequest, status: int | None) -> None:
        """Called after each request with the status given (None when the handler raised)."""


def _unpack(answer: Reply) -> tuple[int, bytes, dict[str, str]]:
    """A handler's answer as (status, body bytes, headers)."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 200 <= answer < 300:
            return _status(answer), b"", {}
        answer = (answer, SUCCESS_BODY)  # a bare 2xx answers what Segment answers
    if not isinstance(answer, tuple) or len(answer) not in (2, 3):
        raise TypeError(
            f"a stub handler returns a status, (status, body) or (status, body, headers), "
            f"not {answer!r}")
    headers = dict(answer[2]) if len(answer) == 3 else {}  # type: ignore[misc]
    body = answer[1]
    if not isinstance(body, (str, bytes, Mapping, list)):
        raise TypeError(f"a stub handler's body must be str, bytes, a dict or a list, not "
                        f"{type(body).__name__}")
    if isinstance(body, (Mapping, list)):
        headers.setdefault("Content-Type", "application/json")
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    return _status(answer[0]), body, headers


def _status(status: object) -> int:
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise TypeError(f"a stub handler's status must be an int from 100 to 599, not {status!r}")
    return status


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the receiver got it; ``body`` is its JSON, gunzipped (None if none)."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    status: int | None  # what was answered; None when the handler raised

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events it carried: a batch's list, or the one event of /v1/<type>."""
        if isinstance(self.body, dict) and isinstance(self.body.get("batch"), list):
            return list(self.body["batch"])
        return [self.body] if isinstance(self.body, dict) else []


class Recorder:
    """What a receiver was sent. ``requests`` holds every request; ``batches`` and
    ``events`` only those it accepted (2xx), so a batch retried after a 503 appears once.

    A fake receiver of your own (say a local HTTP server) can feed it with ``add``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []

    def add(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def batches(self) -> list[list[dict[str, Any]]]:
        """The events of each accepted request, in arrival order."""
        return [r.events for r in self.requests if r.status is not None and 200 <= r.status < 300]

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every accepted event, in arrival order."""
        return [event for batch in self.batches for event in batch]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()


class Stub(StubAdapter, Recorder):
    """A stub adapter that records what it receives: the one-liner for most tests."""

    def answered(self, request: requests.PreparedRequest, status: int | None) -> None:
        self.add(RecordedRequest(
            method=request.method or "",
            path=request.path_url,
            headers=CaseInsensitiveDict(request.headers),
            body=request_json(request),
            status=status,
        ))


__all__ = [
    "Reply", "Handler", "SUCCESS", "ok", "sequence",
    "StubAdapter", "RecordedRequest", "Recorder", "Stub",
]
