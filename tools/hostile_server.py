"""A hostile HTTP/1.1 receiver on 127.0.0.1: one mode per way a server can misbehave
(trickled answers, endless informational answers or trailers, huge or compressed bodies,
unfinished heads, framing given two ways, stray answers, control characters, random
bytes, redirects, an answer before the body is read, no answer at all), for the tests
that check what such a server can make segmentry do. Standard library only: it is a
tool, not part of the package. It never accepts an event unless its mode says "ok".

Python:  ``with HostileServer("trickle_body", interval=0.5) as srv: ... srv.url ...``
Command: ``python tools/hostile_server.py MODE [--port 0] [--interval S]`` prints
``listening on http://127.0.0.1:PORT/v1/`` and serves until SIGTERM/SIGINT.

Requests to ``/v1/ok/...`` are answered 200 in every mode (where the redirects point).
``srv.requests`` counts the requests read, ``srv.connections`` the connections accepted.
"""

from __future__ import annotations

import argparse
import gzip
import random
import signal
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

HOST = "127.0.0.1"
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n' \
     b'{"success":true}'
CLOSE = b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HUGE = 256 << 20  # bytes a "huge" answer claims, and sends for as long as it is read
BOMB = 64 << 20  # bytes of zeros behind the gzip bomb (64 KiB compressed)
ESCAPES = b"\x1b[2J\x1b[31mFORGED\r\nWARNING fake log line\x07\x00"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Conn:
    """One accepted connection: what was read but not used, and the server's stop flag."""

    sock: socket.socket
    stopping: threading.Event
    buffer: bytes = b""
    closed: bool = False

    def read_head(self) -> Request | None:
        while b"\r\n\r\n" not in self.buffer:
            if not self._recv():
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (line.split(" ") + ["", ""])[:3]
        headers = {}
        for text in lines:
            name, _, value = text.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Request(method, path, headers)

    def read_body(self, request: Request) -> bool:
        size = int(request.headers.get("content-length", "0") or 0)
        while len(self.buffer) < size:
            if not self._recv():
                return False
        request.body, self.buffer = self.buffer[:size], self.buffer[size:]
        return True

    def send(self, data: bytes) -> bool:
        """False once the client has gone."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def trickle(self, data: bytes, interval: float) -> bool:
        """One byte per interval, while the client listens."""
        for i in range(len(data)):
            if not self.send(data[i:i + 1]) or self.stopping.wait(interval):
                return False
        return True

    def repeat(self, data: bytes, interval: float) -> None:
        """``data`` again and again, until the client goes or the server stops."""
        while self.send(data) and not self.stopping.wait(interval):
            pass

    def hold(self) -> None:
        """Say nothing until the client goes or the server stops."""
        self.sock.settimeout(0.05)
        while not self.stopping.is_set():
            try:
                if not self.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    def _recv(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        self.buffer += data
        return bool(data)


# A mode answers one request whose head (and, unless EARLY, body) was read; it returns
# whether to read another request on the connection.
Mode = Callable[[Conn, Request, float], bool]


def _ok(conn: Conn, request: Request, interval: float) -> bool:
    return conn.send(OK)


def _raw(data: bytes, keep: bool = False) -> Mode:
    """Write these bytes, then close (or wait for another request)."""
    return lambda conn, request, interval: conn.send(data) and keep


def _trickle(head: bytes, tail: bytes) -> Mode:
    """Write ``head`` at once, then ``tail`` one byte per interval."""
    return lambda conn, request, interval: conn.send(head) and conn.trickle(tail, interval)


def _repeat(head: bytes, line: bytes) -> Mode:
    def mode(conn: Conn, request: Request, interval: float) -> bool:
        if conn.send(head):
            conn.repeat(line, interval / 20)
        return False
    return mode


def _trickle_chunks(conn: Conn, request: Request, interval: float) -> bool:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    if conn.send(head):
        conn.repeat(b"1\r\n{\r\n", interval)
    return False


def _huge(status: int, encoding: bytes = b"") -> Mode:
    """A body of HUGE bytes (zeros), sent for as long as the client reads it."""
    def mode(conn: Conn, request: Request, interval: float) -> bool:
        head = b"HTTP/1.1 %d Huge\r\nContent-Length: %d\r\n%s\r\n" % (status, HUGE, encoding)
        block = bytes(1 << 20)
        if conn.send(head):
            for _ in range(HUGE >> 20):
                if not conn.send(block):
                    break
        return False
    return mode


_bomb: list[bytes] = []


def _gzip_bomb(conn: Conn, request: Request, interval: float) -> bool:
    """A 400 whose 64 KiB gzip body inflates to 64 MiB."""
    if not _bomb:
        _bomb.append(gzip.compress(bytes(BOMB), compresslevel=9, mtime=0))
    head = b"HTTP/1.1 400 Bad\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" \
        % len(_bomb[0])
    conn.send(head + _bomb[0])
    return False


def _stray(conn: Conn, request: Request, interval: float) -> bool:
    """A 503 kept alive, then, a moment later, a 200 nobody asked for: a retry sent on
    the same connection in between would take it for its answer."""
    if conn.send(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"):
        conn.stopping.wait(interval / 10)
        conn.send(OK)
    return True


def _random(conn: Conn, request: Request, interval: float) -> bool:
    conn.send(random.Random(request.path + str(len(request.body))).randbytes(4096))
    return False


def _redirect(status: int, location: str) -> Mode:
    head = b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (
        status, location.encode())
    return _raw(head, keep=True)


def _silent(conn: Conn, request: Request, interval: float) -> bool:
    conn.hold()
    return False


def _early(conn: Conn, request: Request, interval: float) -> bool:
    """A 413 before the body is read, then the body read (as nginx does), then close."""
    conn.send(CLOSE % 413)
    conn.read_body(request)
    return False


MODES: dict[str, Mode] = {
    "ok": _ok,
    # 1. held past the timeout
    "trickle_head": _trickle(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"s" * 1000 + b"\r\n\r\n"),
    "trickle_body": _trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"{" * 1000),
    "trickle_chunks": _trickle_chunks,
    "endless_continue": _repeat(b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
    "endless_trailers": _repeat(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
                                b"X-Trailer: 1\r\n"),
    "silent": _silent,
    # 2. informational answers, statuses out of range or not three digits
    "early_hints": _raw(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, keep=True),
    "switching": _raw(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
    "status_600": _raw(b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n"),
    "status_plus": _raw(b"HTTP/1.1 +200 OK\r\nContent-Length: 0\r\n\r\n"),
    "status_zero": _raw(b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n"),
    "status_underscore": _raw(b"HTTP/1.1 2_00 OK\r\nContent-Length: 0\r\n\r\n"),
    # 3. bodies to hold
    "huge_error": _huge(503),
    "huge_ok": _huge(200),
    "gzip_bomb": _gzip_bomb,
    # 4. unfinished answers
    "truncated_status": _raw(b"HTTP/1.1 200"),
    "half_header": _raw(b"HTTP/1.1 200 OK\r\nContent-Le"),
    "no_empty_line": _raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"),
    # 5. a stray answer
    "stray_200": _stray,
    # 6. framed two ways, malformed header lines
    "two_lengths": _raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 16\r\n\r\n"
                        b'{"success":true}'),
    "xchunked": _raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: xchunked"
                     b"\r\n\r\n{}"),
    "no_colon": _raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Bad\r\n\r\n{}"),
    "space_colon": _raw(b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}"),
    # 7. bytes for our logs
    "escapes_status": _raw(b"HTTP/1.1 2" + ESCAPES + b" OK\r\n\r\n"),
    "escapes_body": _raw(b"HTTP/1.1 400 Bad\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(ESCAPES) + ESCAPES),
    # 9. and the rest
    "random": _random,
    "oversized_header": _raw(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 100_000 + b"\r\n\r\n"),
    "many_headers": _raw(b"HTTP/1.1 200 OK\r\n" + b"X-H: 1\r\n" * 1000 + b"\r\n"),
    "bad_chunk_size": _raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    "huge_chunk_size": _raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"ffffffffffffffffffff\r\n{}"),
    "redirect_301": _redirect(301, "/v1/ok/batch"),
    "redirect_302": _redirect(302, "/v1/ok/batch"),
    "redirect_303": _redirect(303, "/v1/ok/batch"),
    "redirect_307": _redirect(307, "/v1/ok/batch"),
    "redirect_loop": _redirect(307, "/v1/batch"),
    "early_answer": _early,
}
EARLY = frozenset({"early_answer"})  # modes that answer before reading the body


@dataclass
class Counts:
    requests: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class HostileServer:
    """Serves one mode (see MODES) on 127.0.0.1 in background threads."""

    def __init__(self, mode: str, port: int = 0, interval: float = 1.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(sorted(MODES))}")
        self.mode, self.interval = mode, interval
        self.counts = Counts()
        self.stopping = threading.Event()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._serve(Conn(self.request, owner.stopping))

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((HOST, port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{HOST}:{self._server.server_address[1]}/v1/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def requests(self) -> int:
        return self.counts.requests

    @property
    def connections(self) -> int:
        return self.counts.connections

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, conn: Conn) -> None:
        with self.counts.lock:
            self.counts.connections += 1
        keep = True
        while keep and not self.stopping.is_set():
            request = conn.read_head()
            if request is None:
                return
            with self.counts.lock:
                self.counts.requests += 1
            if self.mode not in EARLY and not conn.read_body(request):
                return
            mode = _ok if request.path.startswith("/v1/ok/") else MODES[self.mode]
            keep = mode(conn, request, self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with HostileServer(args.mode, args.port, args.interval) as server:
        print(f"listening on {server.url}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
