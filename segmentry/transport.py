"""The adapter mounted on the requests session an HTTPClient makes itself. What a Segment
client sends — a POST with its whole body in hand, to an http or https URL, reached
directly, the server's certificate checked against a CA bundle — goes over the standard
library's ``http.client`` on kept-alive connections; anything else (a proxy, a client
certificate, ``verify=False``) goes through requests' own HTTPAdapter and urllib3.
urllib3's layers (its pool, Retry and Timeout objects, response wrappers) were a fifth
of a batch POST's CPU: 366 -> 294 us (loopback, 100 events, paired runs), and a replay
took 12.3 -> 11.3 us of CPU an event. Errors are requests' own, as HTTPAdapter raises
them, and answers are decoded as it decodes them.
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import os
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

Timeout = Union[None, float, tuple[Union[float, None], Union[float, None]]]
Connection = Union[http.client.HTTPConnection, http.client.HTTPSConnection]


class Transport(HTTPAdapter):
    """Sends each request over a Pool of its origin, or through HTTPAdapter (see above)."""

    def __init__(self) -> None:
        super().__init__(pool_maxsize=POOL_MAXSIZE)
        self._lock = threading.Lock()
        self._pools: dict[tuple[str, str, int, Any], Pool] = {}

    def exchange(self, request: requests.PreparedRequest,
                 options: dict[str, Any]) -> requests.Response:
        """``session.send(request, **options)`` less its upkeep, for requests that carry
        no hooks or cookies (timing, hooks, the cookie jar, the redirect generator)."""
        start = time.perf_counter()
        response = self.send(request, **options)
        response.elapsed = dt.timedelta(seconds=time.perf_counter() - start)
        return response

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
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._context: ssl.SSLContext | None = None

    def exchange(self, request: requests.PreparedRequest, timeout: Timeout,
                 adapter: Transport) -> requests.Response:
        connect_s, read_s = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        conn, reply = self._take(), None
        try:
            if conn.sock is None:
                conn.timeout = connect_s
                _connect(conn, request)
            conn.sock.settimeout(read_s)
            try:
                conn.request(str(request.method), request.path_url, request.body,
                             dict(request.headers))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it may have answered before reading it all (a 413), then closed
            reply = conn.getresponse()
            body = reply.read()
        except BaseException as exc:
            conn.close()
            if reply is not None:
                reply.close()  # a will_close reply holds the socket, not conn
            if isinstance(exc, (OSError, http.client.HTTPException)):
                raise _error(exc, request) from exc
            raise
        self._give_back(conn)
        return _response(request, reply, body, adapter)

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> Connection:
        with self._lock:
            while self._idle:
                idle = self._idle.pop()
                if not _dropped(idle.sock):
                    return idle
                idle.close()  # the receiver closed it while it was idle
        if self.scheme == "http":
            conn: Connection = http.client.HTTPConnection(self.host, self.port)
        else:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self._tls())
        conn.response_class = _Reply
        return conn

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if conn.sock is not None and not self._closed and len(self._idle) < POOL_MAXSIZE:
                self._idle.append(conn)
                return
        conn.close()  # closed by the reply (Connection: close), by close(), or one too many

    def _tls(self) -> ssl.SSLContext:
        """Made once (loading a CA bundle takes milliseconds); the hostname is checked."""
        if self._context is None:
            where = self.verify if isinstance(self.verify, str) else \
                extract_zipped_paths(DEFAULT_CA_BUNDLE_PATH)  # type: ignore[no-untyped-call]
            try:
                if os.path.isdir(where):
                    self._context = ssl.create_default_context(capath=where)
                else:
                    self._context = ssl.create_default_context(cafile=where)
            except (OSError, ssl.SSLError) as exc:  # as requests words a missing bundle
                raise OSError("Could not find a suitable TLS CA certificate bundle, "
                              f"invalid path: {where} ({exc})") from exc
        return self._context


class _Reply(http.client.HTTPResponse):
    """http.client skips 100 Continue only; any other interim answer (102, 103 Early
    Hints) would be taken for the final one, and the final one left on the connection."""

    def _read_status(self) -> tuple[str, int, str]:
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]
            if not 100 < status < 200 or status == 101:
                return version, status, reason
            http.client.parse_headers(self.fp)  # the interim answer's headers: dropped


def _connect(conn: Connection, request: requests.PreparedRequest) -> None:
    try:
        conn.connect()
    except socket.timeout as exc:  # TimeoutError from 3.10; not a subclass of it on 3.9
        raise rex.ConnectTimeout(exc, request=request) from exc


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


def _response(request: requests.PreparedRequest, reply: http.client.HTTPResponse,
              body: bytes, adapter: Transport) -> requests.Response:
    response = requests.Response()
    response.status_code = reply.status
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    for name, value in reply.getheaders():  # repeated ones joined, as urllib3 does
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    response.headers = headers
    response.encoding = get_encoding_from_headers(headers)
    response._content = _decoded(body, headers.get("Content-Encoding", ""), request)
    response._content_consumed = True  # type: ignore[attr-defined]
    response.reason, response.url = reply.reason, str(request.url)
    response.request, response.connection = request, adapter
    return response


def _decoded(body: bytes, encoding: str, request: requests.PreparedRequest) -> bytes:
    """The body as requests would hand it over: urllib3's decoders (an empty body, gzip
    members, "gzip, br", brotli/zstd when installed), only when it is encoded."""
    encoding = encoding.strip().lower()
    if not body or encoding in ("", "identity"):
        return body
    reply = urllib3.HTTPResponse(body=io.BytesIO(body), headers={"Content-Encoding": encoding},
                                 preload_content=False, decode_content=True)
    try:
        return bytes(reply.read())
    except urllib3.exceptions.DecodeError as exc:
        raise rex.ContentDecodingError(exc, request=request) from exc
