"""The adapter mounted on the requests session an HTTPClient makes itself. What a Segment
client sends — a POST with its whole body in hand, to an http or https URL, reached
directly, the server's certificate checked against a CA bundle — goes over our own
HTTP/1.1 exchange (Connection) on kept-alive sockets; anything else (a proxy, a client
certificate, ``verify=False``) goes through requests' own HTTPAdapter and urllib3.
urllib3's layers (its pool, Retry and Timeout objects, response wrappers) were a fifth
of a batch POST's CPU (366 -> 294 µs, loopback, 100 events), http.client's half of
what was left (415 -> 190 µs of CPU a POST, user and system). Errors are requests' own,
as HTTPAdapter raises them, and answers are decoded as it decodes them. It also owns
``build_response``, the one place a ``requests.Response`` is made.

What a server cannot make the exchange do: last past one deadline (connect, send and the
whole answer within the timeout, a (connect, read) pair adding up), take a head without
its closing empty line, a length given twice or a malformed header line for an answer,
hand more than MAX_BODY bytes of a body (read or inflated) to its caller, or answer the
next request on a connection after anything but a clean 2xx.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import select
import socket
import ssl
import threading
import time
from typing import Any, Union
from urllib.parse import urlsplit

import requests
import urllib3
from requests import exceptions as rex
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import (
    DEFAULT_CA_BUNDLE_PATH,
    extract_zipped_paths,
    get_encoding_from_headers,
    select_proxy,
)

POOL_MAXSIZE = 64  # kept-alive connections per origin: max_in_flight's upper bound
MAX_LINE = 65536  # http.client's limits on an answer's lines and headers
MAX_HEADERS = 100
READ_SIZE = 65536
MAX_BODY = 65536  # of an answer, read or inflated; segmentry uses 500 bytes of an error's
DEADLINE_SLACK_S = 0.1  # how far a read may outlast the deadline, to spare settimeout() calls

_STATUS_LINE = re.compile(rb"(HTTP/[0-9]\.[0-9])[ \t]+([0-9]{3})(?:[ \t]([^\r\n]*))?\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110)
_DIGITS = re.compile(r"[0-9]+")

Timeout = Union[None, float, tuple[Union[float, None], Union[float, None]]]


class Transport(HTTPAdapter):
    """Sends each request over a Pool of its origin, or through HTTPAdapter (see above)."""

    def __init__(self) -> None:
        super().__init__(pool_maxsize=POOL_MAXSIZE)
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str, int, Any], Pool] = {}

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        pool = self._pool(request, verify, cert, proxies)
        if pool is None:
            return super().send(request, stream, timeout, verify, cert, proxies)
        return pool.exchange(request, timeout, self)

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        super().close()

    def _pool(self, request: requests.PreparedRequest, verify: Any, cert: Any,
              proxies: Any) -> Pool | None:
        """The pool for this request's origin, or None when it is not ours to send."""
        url = str(request.url)
        if cert or not isinstance(request.body, (bytes, type(None))) \
                or (proxies and select_proxy(url, proxies)):
            return None
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
        if scheme not in ("http", "https") or not host \
                or (scheme == "https" and not (verify is True or isinstance(verify, str))):
            return None
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port, verify if scheme == "https" else None)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = Pool(*key)
            return pool


class Pool:
    """Idle kept-alive connections to one origin; a request takes one or opens one."""

    def __init__(self, scheme: str, host: str, port: int, verify: Any) -> None:
        self.scheme, self.host, self.port, self.verify = scheme, host, port, verify
        name = f"[{host}]" if ":" in host else host  # the Host header, as http.client writes it
        default_port = 443 if scheme == "https" else 80
        self.host_header = name if port == default_port else f"{name}:{port}"
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._context: ssl.SSLContext | None = None
        self._where = ""  # the CA bundle's path, and its _stamp when it was loaded
        self._stamp: tuple[int, int, int] | None = None

    def exchange(self, request: requests.PreparedRequest, timeout: Timeout,
                 adapter: Transport) -> requests.Response:
        connect_s, read_s = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        deadline = deadline_of(timeout)
        head = _head(request, self.host_header)
        if self.scheme == "https":
            self._tls()  # a missing CA bundle stays an OSError: not a connection to retry
        conn = self._take()
        try:
            if conn is None:
                conn = self._open(connect_s, deadline, request)
            conn.send(head, request.body if isinstance(request.body, bytes) else b"", read_s,
                      deadline)
            status, reason, headers, body, keep = conn.reply()
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, (OSError, http.client.HTTPException)):
                raise _error(exc, request) from exc
            raise
        if keep and 200 <= status < 300:
            self._give_back(conn)
        else:  # "Connection: close", a body cut short, or an answer that may hide another
            conn.close()
        return _response(request, status, reason, headers, body, adapter)

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> Connection | None:
        with self._lock:
            while self._idle:
                idle = self._idle.pop()
                if not _dropped(idle.sock):
                    return idle
                idle.close()  # the receiver closed it while it was idle
        return None

    def _open(self, connect_s: float | None, deadline: float | None,
              request: requests.PreparedRequest) -> Connection:
        """A new connection within the connect timeout, the TLS handshake included (as
        http.client's connect())."""
        sock = None
        if deadline is not None:
            connect_s = _left(deadline, connect_s)
        try:
            sock = socket.create_connection((self.host, self.port), connect_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.scheme == "https":
                sock = self._tls(fresh=True).wrap_socket(sock, server_hostname=self.host)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, socket.timeout):  # TimeoutError from 3.10; not a subclass on 3.9
                raise rex.ConnectTimeout(exc, request=request) from exc
            raise
        return Connection(sock, connect_s)

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < POOL_MAXSIZE:
                self._idle.append(conn)
                return
        conn.close()  # closed by close(), or one too many

    def _tls(self, fresh: bool = False) -> ssl.SSLContext:
        """Made once (loading a CA bundle takes milliseconds), and again for a new
        connection when the bundle's file changed (a rotated CA); the hostname is checked."""
        if fresh and self._context is not None and _stamp(self._where) != self._stamp:
            self._context = None
        if self._context is None:
            where = self._where = self.verify if isinstance(self.verify, str) else \
                extract_zipped_paths(DEFAULT_CA_BUNDLE_PATH)  # type: ignore[no-untyped-call]
            self._stamp = _stamp(where)
            try:
                if os.path.isdir(where):
                    self._context = ssl.create_default_context(capath=where)
                else:
                    self._context = ssl.create_default_context(cafile=where)
            except (OSError, ssl.SSLError) as exc:  # as requests words a missing bundle
                raise OSError("Could not find a suitable TLS CA certificate bundle, "
                              f"invalid path: {where} ({exc})") from exc
        return self._context


# status, reason, headers in order, body, and whether the connection may be used again
RawResponse = tuple[int, str, list[tuple[str, str]], bytes, bool]


class Connection:
    """One kept-alive HTTP/1.1 connection, and what was read from it but not used yet.
    It reads an answer as http.client does (its exceptions, limits and keep-alive rule)
    without what made http.client half of a batch POST's CPU: a file object per
    answer, headers parsed by the email package, the head and the body in two writes.
    Stricter than http.client where a lenient reading would take a broken answer for a
    2xx (see the module's docstring), and bounded by the exchange's deadline."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self.sock: socket.socket | None = sock
        self._timeout = timeout  # the socket's
        self._read_s = timeout  # the longest wait for one read
        self._deadline: float | None = None  # time.monotonic()'s, for the whole exchange
        self._buffer = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, head: bytes, body: bytes, timeout: float | None,
             deadline: float | None = None) -> None:
        assert self.sock is not None
        self._read_s, self._deadline = timeout, deadline
        self._bound()
        try:
            self.sock.sendall(head + body)  # bounded as a whole (Python >= 3.5)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may have answered before reading it all (a 413), then closed

    def reply(self) -> RawResponse:
        """The final answer. Informational ones are skipped: http.client skips 100 only,
        and a 103 taken for the answer left the real one to the next request. A 101
        is final (the caller refuses it). The connection may be kept only when the
        whole answer was read and nothing follows it."""
        while True:
            version, status, reason = self._status()
            headers = self._headers()
            if not 100 <= status < 200 or status == 101:
                break
        fields: dict[str, str] = {}
        lengths: set[str] = set()
        for name, value in headers:  # the first of repeated ones, as http.client reads them
            key = name.lower()
            if key == "content-length":
                lengths.update(v.strip() for v in value.split(","))
            fields.setdefault(key, value.lower())
        keep = _keeps_alive(version, fields)
        if status < 200 or status in (204, 304):
            body, whole = b"", True
        elif "transfer-encoding" in fields:
            if lengths:  # a length and a coding: framed two ways (RFC 9112 6.3)
                raise http.client.HTTPException("both Transfer-Encoding and Content-Length")
            if _chunked(fields["transfer-encoding"]):
                body, whole = self._chunked()
            else:  # a coding we do not know: the body ends with the connection (RFC 9112)
                body, whole = self._until_closed(), False
        else:
            length = _length(lengths)
            if length is None:  # the body ends when the receiver closes
                body, whole = self._until_closed(), False
            else:
                body, whole = self._exactly(min(length, MAX_BODY)), length <= MAX_BODY
        return status, reason, headers, body, keep and whole and not self._buffer

    def _status(self) -> tuple[int, int, str]:
        """(version, status, reason): three digits, a head line ended by its LF."""
        line = self._line(first=True)
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            if not line.endswith(b"\n"):
                raise http.client.IncompleteRead(line)  # closed inside the status line
            raise http.client.BadStatusLine(line.decode("iso-8859-1"))
        version = match.group(1)
        reason = (match.group(3) or b"").decode("iso-8859-1").strip()
        if version in (b"HTTP/1.0", b"HTTP/0.9"):
            return 10, int(match.group(2)), reason
        if not version.startswith(b"HTTP/1."):
            raise http.client.UnknownProtocol(version.decode("iso-8859-1"))
        return 11, int(match.group(2)), reason

    def _headers(self) -> list[tuple[str, str]]:
        """Header lines up to the empty one that ends the head: an answer cut before it
        is incomplete, whatever it said so far (RFC 9112)."""
        headers: list[tuple[str, str]] = []
        for _ in range(MAX_HEADERS + 1):
            line = self._line().decode("iso-8859-1")
            if line in ("\r\n", "\n"):
                return headers
            if not line.endswith("\n"):
                raise http.client.IncompleteRead(line.encode("iso-8859-1"))
            if line[0] in " \t" and headers:  # an obsolete folded line continues the last
                name, value = headers.pop()
                headers.append((name, f"{value} {line.strip()}"))
                continue
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):  # "a b: c", "a : b", "no colon"
                raise http.client.HTTPException(f"malformed header line {line!r}")
            headers.append((name, value.strip()))
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")

    def _line(self, first: bool = False) -> bytes:
        """The next line, its end included; the rest of the data when the receiver closed
        the connection in the middle of one (b"" at its start)."""
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", 0, MAX_LINE)
            if end >= 0:
                line = bytes(buffer[:end + 1])
                del buffer[:end + 1]
                return line
            if len(buffer) > MAX_LINE:
                raise http.client.LineTooLong("status line" if first else "header line")
            if not self._fill():
                if first and not buffer:
                    raise http.client.RemoteDisconnected(
                        "Remote end closed connection without response")
                line = bytes(buffer)
                buffer.clear()
                return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not self._fill():
                raise http.client.IncompleteRead(bytes(self._buffer[:MAX_BODY]),
                                                 size - len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def _chunked(self) -> tuple[bytes, bool]:
        """The chunks' data, and False when it went past MAX_BODY (the rest unread)."""
        parts: list[bytes] = []
        room = MAX_BODY
        while True:
            line = self._line().split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", line):
                raise http.client.IncompleteRead(b"".join(parts))
            size = int(line, 16)
            if size == 0:
                break
            if size > room:
                parts.append(self._exactly(room))
                return b"".join(parts), False
            parts.append(self._exactly(size))
            room -= size
            if self._line() not in (b"\r\n", b"\n"):  # each chunk ends with a CRLF
                raise http.client.IncompleteRead(b"".join(parts))
        for _ in range(MAX_HEADERS + 1):  # trailers, up to the empty line: dropped
            line = self._line()
            if line in (b"\r\n", b"\n"):
                return b"".join(parts), True
            if not line.endswith(b"\n"):
                raise http.client.IncompleteRead(b"".join(parts))
        raise http.client.HTTPException(f"got more than {MAX_HEADERS} trailer lines")

    def _until_closed(self) -> bytes:
        """Up to MAX_BODY bytes, or what came before the receiver closed."""
        while len(self._buffer) < MAX_BODY and self._fill():
            pass
        data = bytes(self._buffer[:MAX_BODY])
        self._buffer.clear()
        return data

    def _fill(self) -> bool:
        """Add what has arrived (waiting up to the timeout, never past the deadline);
        False when the receiver has closed the connection."""
        assert self.sock is not None
        self._bound()
        data = self.sock.recv(READ_SIZE)
        self._buffer += data
        return bool(data)

    def _bound(self) -> None:
        """Set the socket's timeout to the shorter of one read's and what is left until
        the deadline; settimeout() is a system call, so only when it moved by more than
        DEADLINE_SLACK_S."""
        wait = self._read_s
        if self._deadline is not None:
            wait = _left(self._deadline, wait)
        now = self._timeout
        if wait != now and (wait is None or now is None or abs(wait - now) > DEADLINE_SLACK_S):
            assert self.sock is not None
            self.sock.settimeout(wait)
            self._timeout = wait


def deadline_of(timeout: Timeout) -> float | None:
    """When the whole exchange must be over: the timeout from now (a pair's sum)."""
    if isinstance(timeout, tuple):
        if None in timeout:
            return None
        timeout = sum(timeout)  # type: ignore[arg-type]
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float, wait: float | None) -> float:
    """The longest wait that ends by the deadline; a timeout when it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out: the exchange outlived its timeout")
    return left if wait is None else min(wait, left)


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten; None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _head(request: requests.PreparedRequest, host: str) -> bytes:
    """The request line and headers, with what http.client's request() adds."""
    lines = [f"{request.method} {request.path_url} HTTP/1.1"]
    names = {name.lower() for name in request.headers}
    if "host" not in names:
        lines.append(f"Host: {host}")
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: identity")
    if "content-length" not in names:
        lines.append(f"Content-Length: {len(request.body or b'')}")
    head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
    for name, value in request.headers.items():  # one by one: an error shows one header only
        head += name.encode("latin-1") + b": " + \
            (value if isinstance(value, bytes) else value.encode("latin-1")) + b"\r\n"
    breaks = head.count(b"\n")
    if breaks != len(lines) + len(request.headers) or head.count(b"\r") != breaks:
        _refuse_line_breaks(request)  # two counts spare a scan of each header
    return head + b"\r\n"


def _refuse_line_breaks(request: requests.PreparedRequest) -> None:
    """A CR or LF in a header or the path would end the line there: what follows would
    be a header (or a request) of its own. The value is never shown: it may be a secret."""
    parts = [("the path", request.path_url)]
    parts += [(f"header {_text(name)!r}", _text(name) + _text(value))
              for name, value in request.headers.items()]
    for where, text in parts:
        if "\r" in text or "\n" in text:
            raise rex.InvalidHeader(f"a line break in {where}: refused")


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _keeps_alive(version: int, fields: dict[str, str]) -> bool:
    """http.client's rule: HTTP/1.1 unless "Connection: close"; 1.0 only when asked."""
    if version == 11:
        return "close" not in fields.get("connection", "")
    return bool(fields.get("keep-alive")) or "keep-alive" in fields.get("connection", "") \
        or "keep-alive" in fields.get("proxy-connection", "")


def _length(values: set[str]) -> int | None:
    """The one Content-Length, or None (the body ends with the connection) without one.
    Two different values, or one that is not digits ("+5", "0x5", "5_0"), frame the answer
    two ways: an error, not a guess."""
    if not values:
        return None
    if len(values) > 1:
        raise http.client.HTTPException(f"two Content-Length values: {sorted(values)}")
    value = next(iter(values))
    if not _DIGITS.fullmatch(value):
        raise http.client.HTTPException(f"bad Content-Length {value!r}")
    return int(value)


def _chunked(coding: str) -> bool:
    """Whether the last transfer coding is chunked ("gzip, chunked"; not "xchunked")."""
    return coding.rsplit(",", 1)[-1].strip() == "chunked"


def _error(exc: BaseException, request: requests.PreparedRequest) -> requests.RequestException:
    """The exception requests' HTTPAdapter raises for the same failure."""
    if isinstance(exc, requests.RequestException):
        return exc
    if isinstance(exc, ssl.SSLError):
        return rex.SSLError(exc, request=request)
    if isinstance(exc, socket.timeout):
        return rex.ReadTimeout(exc, request=request)
    return rex.ConnectionError(exc, request=request)


def _dropped(sock: socket.socket | None) -> bool:
    """Whether an idle kept-alive socket is readable: closed by the receiver (or holding
    bytes nobody asked for). poll(), not select(): select fails past 1,024 descriptors."""
    if sock is None:
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _response(request: requests.PreparedRequest, status: int, reason: str,
              fields: list[tuple[str, str]], body: bytes,
              adapter: Transport) -> requests.Response:
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    for name, value in fields:  # repeated ones joined, as urllib3 does
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body = _decoded(body, headers.get("Content-Encoding", ""), request)
    return build_response(request, status, reason, headers, body,
                          get_encoding_from_headers(headers), adapter)


def build_response(request: requests.PreparedRequest, status: int, reason: str,
                   headers: CaseInsensitiveDict[str], body: bytes, encoding: str | None,
                   adapter: HTTPAdapter | None = None) -> requests.Response:
    """The one place segmentry makes a ``requests.Response``: for our exchange's answers
    and for the ones adapters make in this process (http.make_response). The body is
    already read, so there is no raw stream left to read or close; requests keeps it in
    private fields, written only here and by http._read."""
    response = requests.Response()
    response.status_code = status
    response.headers = headers
    response.encoding = encoding
    response._content = body
    response._content_consumed = True  # type: ignore[attr-defined]
    response.reason, response.url = reason, request.url or ""
    response.request = request
    if adapter is not None:
        response.connection = adapter
    return response


def _decoded(body: bytes, encoding: str, request: requests.PreparedRequest) -> bytes:
    """The body as requests would hand it over: urllib3's decoders (an empty body, gzip
    members, "gzip, br", brotli/zstd when installed), only when it is encoded; at most
    MAX_BODY bytes of it."""
    encoding = encoding.strip().lower()
    if not body or encoding in ("", "identity"):
        return body
    reply = urllib3.HTTPResponse(body=io.BytesIO(body), headers={"Content-Encoding": encoding},
                                 preload_content=False, decode_content=True)
    try:
        return bytes(reply.read(MAX_BODY))  # never inflated further: a gzip bomb stays small
    except urllib3.exceptions.DecodeError as exc:
        raise rex.ContentDecodingError(exc, request=request) from exc
