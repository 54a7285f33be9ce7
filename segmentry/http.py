"""The HTTP seam over ``requests``: a client, one-event and batch POSTs, the status rules
and the retry policy over ``backoff``. Besides testing.py and _transport.py (the adapter
under our own session) it is the only importer of ``requests``, ``urllib3`` and
``backoff``; their errors never leave it: they become ``NetworkError`` (``raise ... from
exc``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import gzip as gzip_module
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Callable, NamedTuple, Union, cast
from urllib.parse import urljoin

import backoff
import requests
import urllib3
from requests.adapters import BaseAdapter
from requests.auth import HTTPBasicAuth
from requests.hooks import dispatch_hook
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers, requote_uri

from . import config, messages, telemetry
from ._pacing import Pacer
from ._transport import MAX_BODY, Transport, build_response, deadline_of
from .exceptions import (
    ConfigurationError,
    HTTPStatusError,
    InvalidMessage,
    MessageTooLarge,
    NetworkError,
)
from .version import __version__

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.segment.io/v1/"
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_RETRY_START_MS = 100
DEFAULT_RETRY_EXPIRY_MS = 10_000
RETRY_AFTER_CAP_S = 300.0  # the receiver's word wins over retry_expiry, up to this
TEXT_BYTES = 2000  # of an error's body, kept in an Answer: for logs and dead letters
# Redirects that keep the method and the body. requests follows the others (301, 302,
# 303) as a GET without the body, whose 2xx would count the batch as delivered.
_KEEP_BODY = frozenset({307, 308})

# classify() verdicts.
OK = "ok"
RETRY = "retry"
MISCONFIGURED = "misconfigured"
REJECT = "reject"

_RETRY_4XX = frozenset({408, 410, 429, 460})
_NO_RETRY_5XX = frozenset({501, 505})  # not implemented / bad HTTP version: never transient
_MISCONFIGURED = frozenset({401, 403, 404})

_REQUEST_OPTIONS = ("timeout", "proxies", "verify", "cert")  # passed to each request as is

# What a send can raise instead of answering. requests wraps most transport errors, but
# some urllib3 ones and OSErrors (a custom adapter, a missing CA bundle) slip through.
_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
# The ones worth another attempt; the rest (a bad URL or header...) fail the same way again.
_TRANSIENT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)

# TLS failures that no retry mends: the certificate, or no protocol version in common.
_TLS_MISCONFIGURED = frozenset({
    "CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
    "WRONG_VERSION_NUMBER", "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV1_ALERT_BAD_CERTIFICATE"})
# Control characters (C0, DEL, C1) a server could put into our logs through an error text.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))}

MessageLike = Union[messages.Message, Mapping[str, Any], messages.Encoded]


def classify(status: int) -> str:
    """What a status means for delivery: "ok", "retry", "misconfigured" or "reject".
    A redirect left unfollowed (any but 307/308) says the api_url is wrong, as a 404 does."""
    if 200 <= status < 300:
        return OK
    if status in _RETRY_4XX or (500 <= status < 600 and status not in _NO_RETRY_5XX):
        return RETRY
    if status in _MISCONFIGURED or 300 <= status < 400:
        return MISCONFIGURED
    return REJECT


_DELAY_SECONDS = re.compile(r"\d+(\.\d+)?")


def retry_after_s(response: requests.Response) -> float | None:
    """The response's Retry-After (delay-seconds or HTTP-date) in seconds, capped at
    RETRY_AFTER_CAP_S; None when absent or unreadable."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if _DELAY_SECONDS.fullmatch(value):
        return min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # Python < 3.10 returns None on some bad dates
        return None
    if when.tzinfo is None:  # "-0000": RFC 5322's "UTC, origin unknown"
        when = when.replace(tzinfo=dt.timezone.utc)
    seconds = (when - dt.datetime.now(dt.timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


class Answer(NamedTuple):
    """What one request came back with, classified once, by ``answer``, the one place an
    Answer is made: the status and its verdict (OK, RETRY, MISCONFIGURED, REJECT), a
    RETRY's Retry-After in seconds (None when absent or unreadable), the start of the
    body of an answer that is not a 2xx (printable: a server's bytes, for logs) and the
    response; or, when no answer came, the NetworkError that stands for it (status None;
    RETRY, or MISCONFIGURED when no retry can help, as a certificate refused)."""

    status: int | None
    verdict: str
    retry_after_s: float | None = None
    text: str = ""
    error: NetworkError | None = None
    response: requests.Response | None = None


def answer(outcome: requests.Response | NetworkError) -> Answer:
    """The Answer for a response (its status classified once, its Retry-After read once)
    or for the NetworkError raised instead of one."""
    if isinstance(outcome, NetworkError):
        return Answer(None, RETRY if outcome.retryable else MISCONFIGURED, error=outcome)
    status = outcome.status_code
    verdict = classify(status)
    if verdict == OK:
        return Answer(status, OK, response=outcome)
    after = retry_after_s(outcome) if verdict == RETRY else None
    return Answer(status, verdict, after, _text(outcome), response=outcome)


def _text(response: requests.Response) -> str:
    """The first TEXT_BYTES of a body, decoded: not ``response.text``, whose charset
    detection may read all of it."""
    head = response.content[:TEXT_BYTES]
    try:
        text = head.decode(response.encoding or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        text = head.decode("utf-8", "replace")
    return printable(text)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of one request: ``attempts`` retries after the first try, waiting
    exponentially from ``start_ms``, doubling, capped at ``expiry_ms``, jittered."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS
    start_ms: float = DEFAULT_RETRY_START_MS
    expiry_ms: float = DEFAULT_RETRY_EXPIRY_MS

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) \
                or self.attempts < 0:
            raise ConfigurationError(f"retry_attempts must be an int >= 0, not {self.attempts!r}")
        if not _is_number(self.start_ms) or not self.start_ms > 0:
            raise ConfigurationError(f"retry_start must be a number of ms > 0, not "
                                     f"{self.start_ms!r}")
        if not _is_number(self.expiry_ms) or not self.expiry_ms >= self.start_ms:
            raise ConfigurationError(f"retry_expiry must be a number of ms >= retry_start "
                                     f"({self.start_ms}), not {self.expiry_ms!r}")

    def delays(self, jitter: Callable[[float], float] = backoff.full_jitter) -> Iterator[float]:
        """Seconds to wait before each retry, from backoff's exponential series."""
        series = backoff.expo(base=2, factor=self.start_ms / 1000, max_value=self.expiry_ms / 1000)
        next(series)  # backoff's wait generators yield None once before the first value
        for seconds in series:
            yield jitter(seconds)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class HTTPClient:
    """One receiver: its URL, write key, keep-alive session, retry policy and the
    shared pause ("gate") that a Retry-After or an outage puts on every request.

    Build it with ``client()``. It is safe to share between threads. ``clock`` (monotonic),
    ``now`` (wall clock, for sentAt), ``sleep`` and ``jitter`` are arguments so tests can
    drive time; ``sleep`` must advance ``clock``. The default sleep ends early on close(),
    after which a call still makes its first attempt but never a retry.
    """

    def __init__(
        self,
        write_key: str,
        api_url: str = DEFAULT_API_URL,
        *,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        retry_start: float = DEFAULT_RETRY_START_MS,
        retry_expiry: float = DEFAULT_RETRY_EXPIRY_MS,
        gzip: bool = False,
        send_to_http: bool = True,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
        sleep: Callable[[float], object] | None = None,
        jitter: Callable[[float], float] = backoff.full_jitter,
        **requests_options: Any,
    ) -> None:
        if not isinstance(write_key, str) or not write_key:
            raise ConfigurationError("write_key must be a non-empty string")
        try:
            write_key.encode("latin-1")  # what HTTP Basic auth can carry
        except UnicodeEncodeError:
            raise ConfigurationError("write_key must be latin-1 text: check it was copied "
                                     "whole, without typographic quotes") from None
        _check_options(requests_options)
        self.write_key = write_key
        self.api_url = _normalize_url(api_url)
        self.retry = RetryPolicy(retry_attempts, retry_start, retry_expiry)
        self.gzip = bool(gzip)
        self.send_to_http = bool(send_to_http)
        self.session, self._owns_session, self._adapter = _session(
            requests_options, self.send_to_http)
        self.headers = {
            "Content-Type": "application/json",
            "User-Agent": f"segmentry/{__version__}",
            **requests_options.get("headers", {}),
        }
        self.request_options: dict[str, Any] = {"timeout": DEFAULT_TIMEOUT_S}
        self.request_options.update(
            (k, v) for k, v in requests_options.items() if k in _REQUEST_OPTIONS)
        self._settle_environment()
        self.auth = HTTPBasicAuth(write_key, "")  # also keeps ~/.netrc from replacing it
        self.closing = threading.Event()
        self._templates: dict[str, requests.PreparedRequest] = {}
        self.clock, self.now, self.jitter = clock, now, jitter
        self.sleep: Callable[[float], object] = sleep or self.closing.wait
        self._gate = clock()
        self._gate_lock = threading.Lock()
        self.pacer = Pacer(clock)

    def _settle_environment(self) -> None:
        """Merge the session's and the environment's proxy and CA-bundle settings into the
        request options, as ``Session.request`` does, but once: it scans os.environ on
        every call (0.35 ms a request, measured here: a fifth of a batch). An adapter's
        ``send``, which we call, never reads them: without this, a caller's session would
        ignore REQUESTS_CA_BUNDLE."""
        opts = self.request_options
        merged = self.session.merge_environment_settings(
            self.api_url, opts.get("proxies") or {}, None, opts.get("verify"), opts.get("cert"))
        if self._owns_session:
            self.session.trust_env = False  # our explicit auth already ignores ~/.netrc
        opts.update(proxies=merged["proxies"], verify=merged["verify"], cert=merged["cert"])

    def __repr__(self) -> str:  # never show the write key
        return f"<HTTPClient {self.api_url}>"

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def paused_until(self) -> float:
        """The ``clock()`` time before which no request starts (past when not paused)."""
        with self._gate_lock:
            return self._gate

    def pause(self, seconds: float) -> None:
        """Hold every request of this client for ``seconds`` from now; never shortens a pause."""
        with self._gate_lock:
            self._gate = max(self._gate, self.clock() + seconds)

    def wait_open(self) -> bool:
        """Wait until the pause is over, then for this request's slot when the receiver
        has rate-limited us (see _pacing.py); return False at once when closing."""
        paced = False
        while not self.closing.is_set():
            remaining = self.paused_until() - self.clock()
            if remaining > 0:  # again after the slot: a 429 may have paused us meanwhile
                self.sleep(remaining)
            elif paced:
                return True
            else:
                paced = True
                delay = self.pacer.delay()
                if delay > 0:
                    self.sleep(delay)
        return False

    def close(self) -> None:
        """End every wait now, forbid further retries, close the session if it is ours."""
        self.closing.set()
        if self._owns_session:
            self.session.close()

    def post(self, url: str, body: str, retry_count: int = 0) -> requests.Response:
        """One attempt, no retry: POST ``body``; NetworkError when no response came."""
        data = body.encode("utf-8")
        request = self._prepared(url).copy()
        if retry_count:
            request.headers["X-Retry-Count"] = str(retry_count)
        if self.gzip:
            data = gzip_module.compress(data, compresslevel=6, mtime=0)
            request.headers["Content-Encoding"] = "gzip"
        request.prepare_body(data, None)
        try:
            return _final(self._send(request))
        except _TRANSPORT_ERRORS as exc:
            raise _network_error(exc) from exc
        finally:
            if self.closing.is_set() and self._owns_session:
                self.session.close()  # a request made after close() leaves no socket open

    def _send(self, request: requests.PreparedRequest) -> requests.Response:
        """The one way a request goes: through ``_exchange``, again for each 307 or 308
        (same method and body), up to the session's ``max_redirects`` (requests' 30).
        Any other redirect is the answer: requests would follow 301, 302 and 303 as a GET
        without the body, whose 2xx would count the batch as delivered; classify() calls
        it a misconfiguration."""
        response = self._exchange(request)
        history: list[requests.Response] = []
        while response.status_code in _KEEP_BODY and response.is_redirect:
            if len(history) >= self.session.max_redirects:
                raise requests.TooManyRedirects(
                    f"exceeded {self.session.max_redirects} redirects", response=response)
            history.append(response)
            request = self._redirected(request, response)
            response = self._exchange(request)
        response.history = history
        return response

    def _exchange(self, request: requests.PreparedRequest) -> requests.Response:
        """One request and its answer, read within the timeout's deadline (see _read),
        through the adapter for its URL: the one mounted on the session (our Transport,
        or a caller's ``adapter=`` on our session; whatever a caller's ``session=`` has
        mounted), or a caller's ``adapter=`` given with their session, which we do not
        change. Not ``session.send``: its upkeep on every request (the cookie jar, the
        redirect generator, settings merged again) is work we need none of; a caller's
        response hooks still run."""
        options = self.request_options
        adapter = self._adapter or self.session.get_adapter(str(request.url))
        deadline = deadline_of(options.get("timeout"))
        start = time.perf_counter()
        response = _read(adapter.send(request, stream=True, **options), deadline)
        response.elapsed = dt.timedelta(seconds=time.perf_counter() - start)
        hooked = dispatch_hook(  # type: ignore[no-untyped-call]
            "response", request.hooks, response, **options)
        return cast(requests.Response, hooked)

    def _redirected(self, request: requests.PreparedRequest,
                    response: requests.Response) -> requests.PreparedRequest:
        """The request again, to where a 307/308 points. Its Authorization (the write key)
        and any Cookie go to another host only where requests would send them
        (Session.should_strip_auth: same host, or http to https on default ports)."""
        target = self.session.get_redirect_target(response) or ""
        url = urljoin(str(response.url or request.url), requote_uri(target))
        again = request.copy()
        if self.session.should_strip_auth(str(request.url), url):  # type: ignore[no-untyped-call]
            again.headers.pop("Authorization", None)
            again.headers.pop("Cookie", None)
        again.url = url
        return again

    def _prepared(self, url: str) -> requests.PreparedRequest:
        """The request as requests prepares it (headers, auth, hooks), made once per URL
        and copied per attempt: preparing it each time was a third of a request's CPU.
        Session cookies are read then; Segment sets none."""
        template = self._templates.get(url)
        if template is None:
            template = self.session.prepare_request(
                requests.Request("POST", url, headers=self.headers, auth=self.auth))
            self._templates[url] = template
        return template


def client(
    write_key: str,
    api_url: str = DEFAULT_API_URL,
    *,
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
    retry_start: int = DEFAULT_RETRY_START_MS,
    retry_expiry: int = DEFAULT_RETRY_EXPIRY_MS,
    gzip: bool = False,
    send_to_http: bool = True,
    **requests_options: Any,
) -> HTTPClient:
    """Build a client once; ``requests_options``: timeout, proxies, verify, cert,
    headers, session, adapter. Raises ConfigurationError on a bad value or name."""
    return HTTPClient(
        write_key, api_url, retry_attempts=retry_attempts, retry_start=retry_start,
        retry_expiry=retry_expiry, gzip=gzip, send_to_http=send_to_http, **requests_options)


def send(http: HTTPClient, message: MessageLike) -> requests.Response:
    """POST one event to ``{api_url}<type>``, with retries; the final response."""
    encoded = _encode(message, http.now())
    return post_event(http, encoded.type, encoded.body)


def batch(http: HTTPClient, messages_: Sequence[MessageLike]) -> requests.Response:
    """POST events as one batch to ``{api_url}batch``, with retries; the final response.
    Over 2,500 events or 500,000 bytes of body: InvalidMessage, nothing is sent."""
    now = http.now()
    return post_batch(http, [_encode(message, now).body for message in messages_])


def post_batch(http: HTTPClient, bodies: Sequence[str]) -> requests.Response:
    """POST stored event texts as one batch; the texts are spliced, never decoded."""
    return _response(_batch(http, bodies))


def post_event(http: HTTPClient, type_: str, body: str) -> requests.Response:
    """POST one stored event text to ``{api_url}<type_>`` with sentAt spliced in."""
    return _response(_event(http, type_, body))


def deliver_batch(http: HTTPClient, bodies: Sequence[str]) -> Answer:
    """post_batch for the flusher: the final Answer, never an exception (see _unraised)."""
    return _unraised(lambda: _batch(http, bodies))


def deliver_event(http: HTTPClient, type_: str, body: str) -> Answer:
    """post_event for the flusher: the final Answer, never an exception (see _unraised)."""
    return _unraised(lambda: _event(http, type_, body))


def _batch(http: HTTPClient, bodies: Sequence[str]) -> Answer:
    bodies = list(bodies)
    _check_batch(bodies)
    events = [json.loads(body) for body in bodies] if _observed("batch") else []
    return _with_retries(
        http, "batch", "batch", lambda sent_at: messages.splice_batch(bodies, sent_at),
        {"events": events})


def _event(http: HTTPClient, type_: str, body: str) -> Answer:
    _check_type(type_)
    event = json.loads(body) if _observed("send") else {}
    return _with_retries(
        http, "send", type_, lambda sent_at: body[:-1] + ',"sentAt":"' + sent_at + '"}',
        {"event": event})


def _response(final: Answer) -> requests.Response:
    """What the public calls return: the response, or the NetworkError raised instead."""
    if final.error is not None:
        raise final.error
    return cast(requests.Response, final.response)  # an Answer holds one or the other


def _unraised(ask: Callable[[], Answer]) -> Answer:
    """``ask()``, or, when it fails unexpectedly (a custom adapter's bug), a retryable
    NetworkError's Answer, the traceback logged: the flusher then releases the rows and
    retries them like a network failure's, rather than leave them leased until the lease
    runs out."""
    try:
        return ask()
    except Exception as exc:
        logger.exception("sending failed unexpectedly; the events are kept")
        return answer(NetworkError(f"sending failed: {type(exc).__name__}"))


def _with_retries(
    http: HTTPClient, kind: str, path: str, render: Callable[[str], str],
    metadata: dict[str, Any],
) -> Answer:
    """Attempt until an answer that is final, the retries run out or close() is called."""
    url = http.api_url + path
    delays = http.retry.delays(http.jitter)
    http.wait_open()
    attempt = 0
    while True:
        body = render(messages.format_timestamp(http.now()))  # sentAt is per attempt
        answered = _attempt(http, kind, url, body, attempt, metadata)
        delay = _retry_delay(http, answered, attempt, delays)
        if delay is None:
            return answered
        attempt += 1
        _pause_for_retry(http, kind, answered, attempt, delay)
        if not http.wait_open():  # closing: no further retry
            return answered


def _attempt(
    http: HTTPClient, kind: str, url: str, body: str, attempt: int, metadata: dict[str, Any],
) -> Answer:
    """One attempt inside its telemetry span, and its Answer. A Retry-After pauses every
    request of ``http``, whether or not this one is tried again: the batches in flight in
    other threads must not retry inside it."""
    try:
        with telemetry.span(("segmentry", kind), metadata) as span:
            response = http.post(url, body, attempt)
            answered = answer(response)
            span.set(**_stop_metadata(answered))
    except NetworkError as exc:  # the span has reported it as an exception event
        return answer(exc)
    http.pacer.observe(response.status_code)
    if answered.retry_after_s:
        http.pause(answered.retry_after_s)
    return answered


def _retry_delay(
    http: HTTPClient, answered: Answer, attempt: int, delays: Iterator[float],
) -> float | None:
    """Seconds before the next attempt, or None when this answer is final."""
    if attempt >= http.retry.attempts or http.closing.is_set() or answered.verdict != RETRY:
        return None
    return next(delays) if answered.retry_after_s is None else answered.retry_after_s


def _pause_for_retry(
    http: HTTPClient, kind: str, answered: Answer, attempt: int, delay: float,
) -> None:
    """Pause every request of ``http`` (not only this one), then report the retry."""
    status = answered.status
    http.pause(delay)
    telemetry.execute(
        ("segmentry", kind, "retry"), {"delay_s": delay},
        {"attempt": attempt, "status_code": status})
    logger.info("%s: %s; retry %d of %d in %.3f s", kind,
                f"HTTP {status}" if status else "no response", attempt, http.retry.attempts,
                delay)


def _stop_metadata(answered: Answer) -> dict[str, Any]:
    if answered.verdict == OK:
        return {"status": "ok", "result": answered.response}
    error = HTTPStatusError(answered.status or 0, answered.verdict == RETRY,
                            answered.text[:500])
    return {"status": "error", "result": answered.response, "error": error}


def _network_error(exc: BaseException) -> NetworkError:
    """No answer, and why; not retryable when retrying cannot help (a TLS certificate
    refused, a bad header, a redirect loop, a missing CA bundle)."""
    tls = _tls_error(exc)
    if tls is not None:
        why = f"certificate verify failed: {tls.verify_message}" \
            if isinstance(tls, ssl.SSLCertVerificationError) else tls.reason or str(tls)
        error = NetworkError(printable(
            f"TLS failed, {why}: check api_url and the CA bundle (verify=)"))
        error.retryable = tls.reason not in _TLS_MISCONFIGURED \
            and not isinstance(tls, ssl.SSLCertVerificationError)
        return error
    error = NetworkError(printable(f"no response from the receiver: {type(exc).__name__}: {exc}"))
    if not isinstance(exc, _TRANSIENT_ERRORS):
        error.retryable = False
    return error


def _tls_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The ssl error under what requests and urllib3 wrapped it in (args, reason, cause)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 8:
        if isinstance(exc, ssl.SSLError):
            return exc
        seen.append(exc)
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in exc.args if isinstance(a, BaseException)), None)
        exc = inner if inner is not None else exc.__cause__ or exc.__context__
    return None


def printable(text: str) -> str:
    """``text`` with control characters (ESC, CR, LF, NUL...) escaped as \\xNN: what a
    server wrote must not move a terminal's cursor or forge a log line."""
    return text.translate(_ESCAPES)


def _final(response: requests.Response) -> requests.Response:
    """The answer, if it is one: a status below 200 (an informational answer taken for
    the final one, as http.client takes a 103) or past 599 says the exchange went wrong;
    its connection has been closed (see _read)."""
    if not 200 <= response.status_code <= 599:
        raise requests.exceptions.ConnectionError(
            f"HTTP {response.status_code} is not a final answer")
    return response


_PHASES = ("start", "stop", "exception")


def _observed(kind: str) -> bool:
    """Whether a handler would read this span's metadata (decoding events costs time)."""
    return any(telemetry.attached(("segmentry", kind, phase)) for phase in _PHASES)


def _encode(message: MessageLike, now: float) -> messages.Encoded:
    if isinstance(message, messages.Encoded):
        _check_type(message.type)
        return message
    if isinstance(message, Mapping):
        return _encode_dict(message)
    return messages.encode_message(message, now)


def _encode_dict(message: Mapping[str, Any]) -> messages.Encoded:
    """An already built event: sent as is, but sentAt belongs to each attempt."""
    type_ = _check_type(message.get("type"))
    event = {key: value for key, value in message.items() if key != "sentAt"}
    body = messages.dumps(event)
    if len(body) > messages.MAX_EVENT_BYTES:
        raise MessageTooLarge(
            f"{type_} event is {len(body)} bytes of JSON, over Segment's "
            f"{messages.MAX_EVENT_BYTES}-byte limit per event", "message")
    return messages.Encoded(str(event.get("messageId", "")), type_, body)


def _check_type(type_: object) -> str:
    if not isinstance(type_, str) or type_ not in messages.TYPES:
        raise InvalidMessage(
            f"type must be one of {', '.join(messages.TYPES)}, not {type_!r}", "type")
    return type_


def _check_batch(bodies: list[str]) -> None:
    if not bodies:
        raise InvalidMessage("a batch needs at least one event", "batch")
    if len(bodies) > messages.MAX_BATCH_EVENTS:
        raise InvalidMessage(
            f"a batch holds at most {messages.MAX_BATCH_EVENTS} events, not {len(bodies)}",
            "batch")
    # The exact length of splice_batch(bodies, sentAt): bodies, commas and the envelope.
    size = messages.BATCH_OVERHEAD + sum(map(len, bodies)) + len(bodies) - 1
    if size > messages.MAX_BATCH_BYTES:
        raise InvalidMessage(
            f"the batch body would be {size} bytes, over Segment's "
            f"{messages.MAX_BATCH_BYTES}-byte limit per request", "batch")


def _normalize_url(api_url: str) -> str:
    return config.normalize_url(api_url)  # the one place URLs are checked


def _check_options(options: Mapping[str, Any]) -> None:
    """Names, types and values, as a Client checks them (not the files: see config)."""
    config.check_requests_options(options)


def _session(options: Mapping[str, Any], send_to_http: bool
             ) -> tuple[requests.Session, bool, BaseAdapter | None]:
    """The session to use, whether it is ours (to close, and to mount adapters on), and
    the one adapter for every URL when the session is a caller's and an adapter is given
    too (``adapter=``, or send_to_http=False's): a caller's session is never changed, the
    application may send its own requests through it."""
    adapter = options.get("adapter") if send_to_http else NoopAdapter()
    session = options.get("session")
    if session is not None:
        return session, False, adapter
    session = requests.Session()
    _mount(session, adapter or Transport())
    return session, True, None


def _mount(session: requests.Session, adapter: BaseAdapter) -> None:
    session.mount("http://", adapter)
    session.mount("https://", adapter)


def _read(response: requests.Response, deadline: float | None = None) -> requests.Response:
    """The body, read now: at most MAX_BODY bytes of it, inflated, by the deadline (each
    read of urllib3's is bounded by the timeout only). The connection goes back to the
    pool only after a clean 2xx read whole: after anything else, bytes the server left
    could answer the next request. (Ours read and closed it already: _content is set.)"""
    if getattr(response, "_content_consumed", False):
        if response._content and len(response._content) > MAX_BODY:
            response._content = response._content[:MAX_BODY]
        return response
    raw = response.raw
    if not isinstance(raw, urllib3.HTTPResponse):
        _ = response.content  # a caller's adapter's own stream: read as requests reads it
        return response
    # urllib3 hands a connection back as soon as its body is read: keep it out of the pool.
    detached = None
    if not 200 <= response.status_code < 300:
        detached, raw._connection = raw._connection, None
    try:
        response._content, whole = _read_raw(raw, deadline)
        response._content_consumed = True  # type: ignore[attr-defined]
    finally:
        if detached is not None:
            detached.close()
    if not whole:
        raw.close()  # the connection too, when it is still attached
    return response


def _read_raw(raw: urllib3.HTTPResponse, deadline: float | None) -> tuple[bytes, bool]:
    """Up to MAX_BODY bytes of a body, inflated, and whether that was all of it."""
    parts: list[bytes] = []
    room = MAX_BODY
    try:
        while room > 0:
            if deadline is not None and time.monotonic() > deadline:
                raise requests.exceptions.ReadTimeout("the answer outlived its timeout")
            chunk = raw.read1(room, decode_content=True)
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            room -= len(chunk)
    except BaseException:
        raw.close()
        raise
    return b"".join(parts), False


class LocalAdapter(BaseAdapter):
    """A ``requests`` adapter that answers in this process and never opens a socket:
    subclasses build the answer in ``respond`` (NoopAdapter; testing.StubAdapter)."""

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        return self.respond(request)

    def respond(self, request: requests.PreparedRequest) -> requests.Response:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoopAdapter(LocalAdapter):
    """send_to_http=False: answers 200 {"success": true} to every request, sends nothing."""

    def respond(self, request: requests.PreparedRequest) -> requests.Response:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("send_to_http=False: not sending %d event(s) to %s",
                         _count_events(request_json(request)), request.path_url)
        return make_response(request, 200, b'{"success":true}',
                             {"Content-Type": "application/json"})


def _count_events(body: Any) -> int:
    if isinstance(body, dict) and isinstance(body.get("batch"), list):
        return len(body["batch"])
    return 1 if body is not None else 0


def request_json(request: requests.PreparedRequest) -> Any:
    """The JSON a prepared request carries (gunzipped), or None when it carries none."""
    raw = request.body or b""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    if request.headers.get("Content-Encoding") == "gzip":
        raw = gzip_module.decompress(raw)
    try:
        return json.loads(raw)
    except ValueError:
        return None


def make_response(
    request: requests.PreparedRequest,
    status: int,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> requests.Response:
    """A real ``requests.Response`` for an adapter that answers without a network."""
    fields = CaseInsensitiveDict(headers or {})
    encoding = get_encoding_from_headers(fields) or "utf-8"
    return build_response(request, status, _reason(status), fields, body, encoding)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 460 and other private codes
        return ""
