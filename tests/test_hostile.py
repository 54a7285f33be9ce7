"""What a hostile server cannot make segmentry do: each mode of tools/hostile_server.py
against one cycle of the real flusher, through our exchange ("ours") and through
requests + urllib3 (a caller's session: the path of proxies, client certificates and
verify=False). Each case says what becomes of the events, bounds the time the cycle
takes, and, for the bodies a server could make us hold, the memory."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import sys
import threading
import time
import tracemalloc

import pytest
import requests

import segmentry
import segmentry.http as sh
from segmentry.config import Options
from segmentry.exceptions import NetworkError
from segmentry.flusher import Flusher, make_http
from segmentry.storage import SQLiteQueue

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from hostile_server import HostileServer  # noqa: E402

TIMEOUT_S = 1.5
SLACK_S = 2.0  # generous: two cores shared by many test runs
INTERVAL_S = 0.5  # between the trickled bytes: each read comes well within the timeout
EVENTS = 2
MEMORY_CAP = 8 << 20  # bytes allocated at the peak of a cycle: the answers claim 64-256 MiB

DELETED, KEPT, DEAD = "deleted", "kept", "dead-lettered"
# mode: what becomes of the events through ours, and through requests + urllib3 (None:
# beyond what requests lets us bound; see the README's limits).
CASES = {
    "ok": (DELETED, DELETED),
    # 1. nothing outlasts the timeout
    "trickle_head": (KEPT, None),
    "trickle_body": (KEPT, KEPT),
    "trickle_chunks": (KEPT, KEPT),
    "endless_continue": (KEPT, None),
    "endless_trailers": (KEPT, None),
    "silent": (KEPT, KEPT),
    # 2. no informational answer, no status out of range, is taken for the final one
    "early_hints": (DELETED, KEPT),  # ours skips the 103 and reads the 200
    "switching": (KEPT, KEPT),
    "status_600": (KEPT, KEPT),
    "status_plus": (KEPT, None),  # http.client reads int("+200")
    "status_zero": (KEPT, None),
    "status_underscore": (KEPT, None),
    # 3. bodies (memory: see below)
    "huge_error": (KEPT, KEPT),
    "huge_ok": (DELETED, DELETED),
    "gzip_bomb": (DEAD, DEAD),
    # 4. an unfinished answer is no answer (http.client takes a head cut short for one)
    "truncated_status": (KEPT, None),
    "half_header": (KEPT, None),
    "no_empty_line": (KEPT, None),
    # 6. framing
    "two_lengths": (KEPT, KEPT),
    "xchunked": (KEPT, None),
    "no_colon": (KEPT, None),
    "space_colon": (KEPT, None),
    # 7. control characters (see also test_the_servers_bytes_reach_on_error_escaped)
    "escapes_status": (KEPT, KEPT),
    "escapes_body": (DEAD, DEAD),
    # 9. the rest
    "random": (KEPT, KEPT),
    "oversized_header": (KEPT, KEPT),
    "many_headers": (KEPT, KEPT),
    "bad_chunk_size": (KEPT, KEPT),
    "huge_chunk_size": (KEPT, KEPT),
    "redirect_301": (KEPT, KEPT),  # a misconfiguration: requests would GET the new place
    "redirect_302": (KEPT, KEPT),
    "redirect_303": (KEPT, KEPT),
    "redirect_307": (DELETED, DELETED),  # same origin, same body
    "redirect_loop": (KEPT, KEPT),
    "early_answer": (DEAD, DEAD),  # a 413 before the body was read: each event refused
}
PATHS = ("ours", "requests")


def enqueue(path: str, n: int = EVENTS) -> list[str]:
    with segmentry.Client(queue_path=path, flusher=None) as client:
        return [client.track("u", "E", {"i": i}) for i in range(n)]


def flusher_for(path: str, url: str, via: str, **options):
    requests_options = {"timeout": TIMEOUT_S}
    if via == "requests":
        requests_options["session"] = requests.Session()
    opts = Options(queue_path=path, api_url=url, retry_attempts=options.pop("retry_attempts", 0),
                   retry_start=1, retry_expiry=5, requests_options=requests_options, **options)
    queue = SQLiteQueue(path)
    return Flusher(queue, make_http("K", opts), opts), queue


def fate(queue: SQLiteQueue) -> str:
    stats = queue.stats(time.time())
    assert stats.in_flight == 0
    if stats.depth == EVENTS and stats.dead_letters == 0:
        return KEPT
    if stats.depth == 0 and stats.dead_letters == 0:
        return DELETED
    if stats.depth == 0 and stats.dead_letters == EVENTS:
        return DEAD
    return f"mixed: {stats}"


def cycle(path: str, mode: str, via: str, **options) -> tuple[str, float, Flusher]:
    """One flusher cycle against the mode: the events' fate, and how long it took."""
    enqueue(path)
    with HostileServer(mode, interval=INTERVAL_S) as server:
        flusher, queue = flusher_for(path, server.url, via, **options)
        start = time.monotonic()
        flusher.run_once()
        elapsed = time.monotonic() - start
        flusher.http_client.close()
    return fate(queue), elapsed, flusher


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "q.db")


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("mode", sorted(CASES))
def test_what_a_hostile_server_can_make_of_the_events(path, mode, via):
    expected = CASES[mode][PATHS.index(via)]
    if expected is None:
        pytest.skip("requests + urllib3 cannot be held to this (see the README's limits)")
    outcome, elapsed, _ = cycle(path, mode, via)
    assert outcome == expected
    # Every attempt within its timeout: one, or one per event when a refusal splits it.
    assert elapsed < (TIMEOUT_S * (1 + EVENTS) if expected == DEAD else TIMEOUT_S) + SLACK_S


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("mode", ["huge_error", "huge_ok", "gzip_bomb"])
def test_a_huge_or_inflating_answer_is_read_only_up_to_the_cap(path, mode, via):
    tracemalloc.start()
    try:
        outcome, _, _ = cycle(path, mode, via)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == CASES[mode][PATHS.index(via)]
    assert peak < MEMORY_CAP, f"{peak / 1e6:.1f} MB at the peak"


@pytest.mark.parametrize("via", PATHS)
def test_a_stray_200_after_a_503_never_answers_the_retry(path, via):
    """The server answers 503, keeps the connection, and sends a 200 nobody asked for a
    moment later: a retry sent on that connection would take it for its answer."""
    outcome, _, flusher = cycle(path, "stray_200", via, retry_attempts=3)
    assert outcome == KEPT and flusher.counts.sent == 0


@pytest.mark.parametrize("via", PATHS)
def test_the_servers_bytes_reach_on_error_escaped(path, via):
    errors: list[str] = []

    def on_error(error, events):
        errors.append(f"{error} {getattr(error, 'body', '')}")

    enqueue(path)
    for mode in ("escapes_status", "escapes_body"):
        with HostileServer(mode) as server:
            flusher, queue = flusher_for(path, server.url, via, on_error=on_error)
            flusher.run_once()
            flusher.http_client.close()
            # The first mode's failure released the events for a few ms: ready them now,
            # rather than count on the next server taking longer than that to start.
            queue.resume(time.time())
    assert len(errors) == 1 + EVENTS and "FORGED" in "".join(errors)
    assert not any(c in text for text in errors for c in "\x1b\r\n\x07\x00")
    assert "\\x1b" in errors[0]


def test_a_header_value_with_a_line_break_is_refused_not_sent():
    with HostileServer("ok") as server:
        with sh.client("K", server.url, retry_attempts=0) as http:
            request = http._prepared(http.api_url + "batch").copy()
            request.headers["X-Injected"] = "a\r\nX-Forged: 1"
            request.prepare_body(b"{}", None)
            with pytest.raises(requests.exceptions.InvalidHeader, match="X-Injected"):
                http.session.get_adapter(http.api_url).send(request, timeout=TIMEOUT_S)
            request.headers["X-Injected"] = "a\rb"
            with pytest.raises(requests.exceptions.InvalidHeader):
                http.session.get_adapter(http.api_url).send(request, timeout=TIMEOUT_S)
        assert server.requests == 0


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path):
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def tls_receiver(ca, context: ssl.SSLContext | None = None, **issue):
    """A TLS server on 127.0.0.1 that answers 200 to anything, with a certificate ``ca``
    issues (for ``issue``'s identities and dates)."""
    context = context or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    identities = issue.pop("identities", ("127.0.0.1",))
    ca.issue_cert(*identities, **issue).configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=answer, args=(sock,), daemon=True).start()

    def answer(sock: socket.socket) -> None:
        try:
            with context.wrap_socket(sock, server_side=True) as tls:
                tls.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    return f"https://127.0.0.1:{listener.getsockname()[1]}/v1/", stop


def tls_cases():
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "hostname mismatch": ({"identities": ("elsewhere.test",)}, "mismatch"),
        "expired": ({"not_before": now - dt.timedelta(days=30),
                     "not_after": now - dt.timedelta(days=1)}, "expired"),
        "unknown CA": ({"trusted": False}, "unable to get local issuer certificate"),
    }


@pytest.mark.parametrize("via", PATHS)
@pytest.mark.parametrize("case", sorted(tls_cases()))
def test_a_refused_certificate_says_why_and_is_not_retried(ca, tmp_path, case, via):
    issue, why = tls_cases()[case]
    trusted = issue.pop("trusted", True)
    url, stop = tls_receiver(ca, **issue)
    ca_file = tmp_path / "ca.pem"
    (ca.cert_pem if trusted else pytest.importorskip("trustme").CA().cert_pem) \
        .write_to_path(str(ca_file))
    options = {"session": requests.Session()} if via == "requests" else {}
    sleeps: list[float] = []
    try:
        with sh.client("K", url, verify=str(ca_file), retry_attempts=3, **options) as http:
            http.sleep = sleeps.append
            with pytest.raises(NetworkError) as excinfo:
                sh.batch(http, [{"type": "track", "event": "E", "userId": "u"}])
    finally:
        stop.set()
    assert "certificate verify failed: " in str(excinfo.value) and why in str(excinfo.value)
    assert not excinfo.value.retryable and sleeps == []  # no retry: it would fail the same


def test_no_protocol_version_in_common_says_so(ca, tmp_path):
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.minimum_version = server_context.maximum_version = ssl.TLSVersion.TLSv1_3
    url, stop = tls_receiver(ca, server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        with sh.client("K", url, verify=str(ca_file), retry_attempts=0) as http:
            transport = http.session.get_adapter(url)
            pool = transport._pool(http._prepared(url + "batch"), str(ca_file), None, None)
            pool._tls().maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises(NetworkError) as excinfo:
                sh.batch(http, [{"type": "track", "event": "E", "userId": "u"}])
    finally:
        stop.set()
    assert "PROTOCOL_VERSION" in str(excinfo.value) and not excinfo.value.retryable


def test_a_rotated_ca_bundle_is_read_again_for_new_connections(ca, tmp_path):
    trustme = pytest.importorskip("trustme")
    new_ca = trustme.CA()
    url, stop = tls_receiver(new_ca)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))  # the old CA: refused
    try:
        with sh.client("K", url, verify=str(ca_file), retry_attempts=0) as http:
            with pytest.raises(NetworkError):
                sh.batch(http, [{"type": "track", "event": "E", "userId": "u"}])
            new_ca.cert_pem.write_to_path(str(ca_file))  # rotated in place, no restart
            response = sh.batch(http, [{"type": "track", "event": "E", "userId": "u"}])
    finally:
        stop.set()
    assert response.status_code == 200


def test_the_flusher_logs_why_a_certificate_was_refused(ca, tmp_path, path, caplog):
    url, stop = tls_receiver(ca, identities=("elsewhere.test",))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    enqueue(path)
    opts = Options(queue_path=path, api_url=url, retry_attempts=3,
                   requests_options={"verify": str(ca_file)})
    flusher = Flusher(SQLiteQueue(path), make_http("K", opts), opts)
    try:
        flusher.run_once()
    finally:
        flusher.http_client.close()
        stop.set()
    assert fate(flusher.queue) == KEPT
    assert "certificate verify failed: IP address mismatch" in caplog.text
    # a misconfiguration, as a 401: flush() gives up at once, a drain exits 1
    assert "certificate verify failed" in (flusher.counts.misconfigured or "")
