"""The receiver behind the real servers of the conformance suite (tests/test_conformance.py):
one WSGI app (gunicorn, and the upstream nginx proxies to) and one ASGI app (uvicorn) that
accept Segment batches as fake_segment checks them and append each accepted messageId to a
record file, one line each. The record is a file, not memory, because a server's workers
are processes that come and go (gunicorn's --max-requests restarts them): each request's
ids are one O_APPEND write, so workers never interleave. Standard library only.

gunicorn: ``CONFORMANCE_RECORD=/tmp/ids gunicorn --pythonpath tools conformance_app:wsgi``
uvicorn:  ``CONFORMANCE_RECORD=/tmp/ids uvicorn --app-dir tools conformance_app:asgi``
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from fake_segment import ENDPOINTS, OK_BODY, Reply, gunzip, parse_body

RECORD_ENV = "CONFORMANCE_RECORD"
Answer = tuple[int, bytes]


class Recorder:
    """Appends accepted messageIds to a file ($CONFORMANCE_RECORD unless given), opened on
    first use so that each forked worker has its own descriptor."""

    def __init__(self, path: str | None = None) -> None:
        self._path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def add(self, ids: Iterable[str]) -> None:
        data = "".join(f"{message_id}\n" for message_id in ids).encode()
        with self._lock:
            if self._fd is None:
                path = self._path or os.environ[RECORD_ENV]
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, data)  # one write: O_APPEND keeps it whole among workers


def read_record(path: str) -> list[str]:
    """The messageIds recorded, in arrival order, repeats included."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def answer(path: str, headers: dict[str, str], body: bytes, recorder: Recorder) -> Answer:
    """Status and JSON body for one request; only an accepted batch is recorded."""
    kind = ENDPOINTS.get(path)
    try:
        if kind is None:
            raise Reply(404, f"no endpoint {path}")
        if not headers.get("authorization", "").startswith("Basic "):
            raise Reply(401, "no write key")
        if headers.get("content-encoding", "").lower() == "gzip":
            body = gunzip(body)
        ids = parse_body(kind, body).ids
    except Reply as reply:
        return reply.status, json.dumps(reply.payload).encode()
    recorder.add(ids)
    return 200, OK_BODY


def make_wsgi(recorder: Recorder) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        headers = {"authorization": environ.get("HTTP_AUTHORIZATION", ""),
                   "content-encoding": environ.get("HTTP_CONTENT_ENCODING", "")}
        status, payload = answer(environ.get("PATH_INFO", ""), headers, body, recorder)
        start_response(f"{status} {'OK' if status == 200 else 'Refused'}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]
    return app


def make_asgi(recorder: Recorder) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Callable[..., Any],
                  send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                   for name, value in scope["headers"]}
        status, payload = answer(scope["path"], headers, body, recorder)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
    return app


async def _lifespan(receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


wsgi = make_wsgi(Recorder())
asgi = make_asgi(Recorder())


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on stderr would drown the test's output


def serve(record_path: str) -> WSGIServer:
    """A threaded HTTP/1.0 wsgiref server of the WSGI app on a free port of 127.0.0.1
    (the caller runs serve_forever() in a thread, then shutdown())."""
    return make_server("127.0.0.1", 0, make_wsgi(Recorder(record_path)),
                       server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
