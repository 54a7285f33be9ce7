"""Conformance: the real flusher process against real servers written by others, started
here on 127.0.0.1 — nginx (TLS, short keep-alive, gzip answers, 413 before the body,
HTTP/1.0 to its upstream, no keep-alive, certificates that fail verification), gunicorn
(sync and gthread workers restarted every 5 requests), uvicorn (h11 and httptools),
hypercorn and Python's http.server — over both of segmentry's transports: its own
HTTP/1.1 exchange, and requests + urllib3 (taken with a client certificate). Each run
accounts for every event at the receiver, counts duplicates and checks the queue.
The receiver app is tools/conformance_app.py; it records accepted messageIds in a file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import trustme
from conformance_app import RECORD_ENV, read_record, serve
from helpers import FAST, enqueue, wait_until

import segmentry.http
from segmentry.storage import SQLiteQueue

pytestmark = pytest.mark.slow

KEY = "test-key"
TOOLS = str(Path(__file__).resolve().parent.parent / "tools")
EVENTS = 2000  # per run: enough batches to cross many connection closes and restarts
# Well-behaved servers answer every request they took, so a duplicate needs a lost answer;
# none was seen, but one batch's worth is tolerated rather than fail on a rare close race.
MAX_DUPLICATES = 100
NGINX_HINT = "nginx not found: apt-get install nginx (.ci/run installs it in CI)"


# --- servers ------------------------------------------------------------------------------

def free_ports(count):
    """Ports free now (another process may take one before the server binds it: Server
    tries again with new ones)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Server:
    """A server process whose output goes to a log file; stop() ends it, then kills it."""

    def __init__(self, name, directory, argv_for, ports=1, env=None):
        self.name, self.log = name, Path(directory) / f"{name}.out"
        for _ in range(3):  # a port taken between free_ports() and the bind: new ports
            self.ports = free_ports(ports)
            with open(self.log, "w") as out:
                self.proc = subprocess.Popen(
                    argv_for(*self.ports), stdout=out, stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})}, cwd=directory)
            up = wait_until(lambda: self.proc.poll() is not None
                            or all(listening(p) for p in self.ports), timeout=60)
            if up and self.proc.poll() is None:
                return
            self.stop()
        pytest.fail(f"{name} did not start: {self.log.read_text()[-2000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A CA, nginx's certificate for 127.0.0.1 and a client certificate, as PEM files."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    paths = {name: str(directory / f"{name}.pem") for name in ("ca", "server", "client")}
    ca.cert_pem.write_to_path(paths["ca"])
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(paths["server"])
    ca.issue_cert("segmentry-client").private_key_and_cert_chain_pem.write_to_path(
        paths["client"])
    return paths


@pytest.fixture(params=["exchange", "requests"])
def transport(request, tls):
    """Flusher flags for each transport: a client certificate makes segmentry hand the
    request to requests + urllib3 (test_a_client_certificate_takes_the_requests_path)."""
    return [] if request.param == "exchange" else ["--cert", tls["client"]]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """The WSGI receiver on wsgiref's threaded HTTP/1.0 server, in this process."""
    record = str(tmp_path_factory.mktemp("upstream") / "ids")
    server = serve(record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], record
    server.shutdown()
    server.server_close()


NGINX_CONF = """
daemon off;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format counts '$status $connection $connection_requests "$sent_http_content_encoding"';
    client_body_buffer_size 1m;  # bodies in memory, not in temporary files
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream receiver {{ server 127.0.0.1:{upstream}; }}
    proxy_http_version 1.0;
    server {{
        listen 127.0.0.1:{tls} ssl;
        ssl_certificate {server_pem};
        ssl_certificate_key {server_pem};
        keepalive_requests 3;
        keepalive_timeout 1s;
        gzip on;
        gzip_types application/json;
        gzip_min_length 1;
        access_log {dir}/tls.log counts;
        location / {{ proxy_pass http://receiver; }}
    }}
    server {{
        listen 127.0.0.1:{small};
        client_max_body_size 2k;
        access_log {dir}/small.log counts;
        location / {{ proxy_pass http://receiver; }}
    }}
    server {{
        listen 127.0.0.1:{close};
        keepalive_timeout 0;
        access_log {dir}/close.log counts;
        location / {{ proxy_pass http://receiver; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, tls, upstream):
    """One nginx, not a daemon, all its files in a temporary directory; a server block per
    setting, each proxying to the upstream. Root runs it in CI: its workers stay root, as
    the temporary directory is closed to others."""
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if binary is None:
        pytest.skip(NGINX_HINT)
    directory = tmp_path_factory.mktemp("nginx")
    conf = directory / "nginx.conf"

    def argv(tls_port, small_port, close_port):
        conf.write_text(NGINX_CONF.format(
            dir=directory, user="user root;" if os.geteuid() == 0 else "",
            upstream=upstream[0], server_pem=tls["server"],
            tls=tls_port, small=small_port, close=close_port))
        return [binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")]

    server = Server("nginx", directory, argv, ports=3)
    ports = dict(zip(("tls", "small", "close"), server.ports))
    yield {"urls": {name: f"{'https' if name == 'tls' else 'http'}://127.0.0.1:{port}/v1/"
                    for name, port in ports.items()},
           "record": upstream[1], "logs": directory}
    server.stop()


def python_server(name, directory, argv_tail):
    record = str(directory / "ids")
    path = os.pathsep.join(p for p in (TOOLS, os.environ.get("PYTHONPATH")) if p)
    server = Server(name, directory, lambda port: [sys.executable, "-m", *argv_tail(port)],
                    env={RECORD_ENV: record, "PYTHONPATH": path})
    return server, {"url": f"http://127.0.0.1:{server.ports[0]}/v1/", "record": record}


@pytest.fixture(scope="module", params=["sync", "gthread"])
def gunicorn(request, tmp_path_factory):
    pytest.importorskip("gunicorn", reason="pip install -e '.[test]' (it has gunicorn)")
    # --threads only for gthread: with more than one, gunicorn swaps sync for gthread.
    threads = ["--threads", "4"] if request.param == "gthread" else []
    server, where = python_server(
        f"gunicorn-{request.param}", tmp_path_factory.mktemp("gunicorn"),
        lambda port: ["gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                      "--worker-class", request.param, *threads, "--max-requests", "5",
                      "--no-control-socket",  # else a socket in ~/.gunicorn, shared
                      "--pythonpath", TOOLS, "conformance_app:wsgi"])
    yield {**where, "log": server.log}
    server.stop()


ASGI_SERVERS = {  # name: the modules it needs
    "uvicorn-h11": ("uvicorn", "h11"),
    "uvicorn-httptools": ("uvicorn", "httptools"),
    "hypercorn": ("hypercorn",),
}


def asgi_argv(name, port):
    if name == "hypercorn":  # it has no --app-dir: the module comes from PYTHONPATH
        return ["hypercorn", "--bind", f"127.0.0.1:{port}", "conformance_app:asgi"]
    return ["uvicorn", "--http", ASGI_SERVERS[name][1], "--host", "127.0.0.1", "--port",
            str(port), "--app-dir", TOOLS, "--no-access-log", "--log-level", "warning",
            "conformance_app:asgi"]


@pytest.fixture(scope="module", params=list(ASGI_SERVERS))
def asgi(request, tmp_path_factory):
    for module in ASGI_SERVERS[request.param]:
        pytest.importorskip(module, reason="pip install -e '.[test]' (it has it)")
    server, where = python_server(
        request.param, tmp_path_factory.mktemp("asgi"),
        lambda port: asgi_argv(request.param, port))
    yield where
    server.stop()


# --- one run ------------------------------------------------------------------------------

class Run:
    """The flusher as a service over a queue filled in waves while it runs (each wave
    delivered before the next), then stopped with SIGTERM; what the receiver recorded."""

    def __init__(self, url, record, queue_path, flags):
        self.url, self.record, self.queue_path, self.flags = url, record, queue_path, flags
        Path(record).write_text("")  # this run's record only: the server outlives it
        self.ids: list[str] = []

    def deliver(self, waves, gap_s=0.0, extra=None):
        """``waves``: event counts; ``extra``: a function that enqueues more in the first
        wave and returns their ids (kept apart from self.ids)."""
        extra_ids = []
        log = open(Path(self.queue_path).with_suffix(".log"), "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "segmentry.flusher", "--queue", self.queue_path,
             "--api-url", self.url, *FAST, *self.flags],
            env={**os.environ, "SEGMENT_WRITE_KEY": KEY}, stdout=log, stderr=log)
        try:
            for index, count in enumerate(waves):
                if index:
                    time.sleep(gap_s)  # idle past the server's keep-alive timeout
                self.ids += enqueue(self.queue_path, count, properties={"wave": index})
                if extra and not index:
                    extra_ids = extra()
                assert wait_until(lambda: self.stats().depth == 0, timeout=60), self.stats()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, Path(log.name).read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        return extra_ids

    def stats(self):
        return SQLiteQueue(self.queue_path).stats(time.time())

    def check_every_event_arrived(self):
        """Exactly the enqueued ids arrived, duplicates within the bound; none left."""
        arrived = Counter(read_record(self.record))
        assert set(arrived) == set(self.ids)
        duplicates = sum(arrived.values()) - len(arrived)
        print(f"{len(arrived)} events arrived, {duplicates} duplicates")  # shown with -s
        assert duplicates <= MAX_DUPLICATES
        assert self.stats().depth == 0
        return duplicates


def access_log(nginx, name):
    """(status, connection, its request number, content encoding) for each request."""
    lines = (nginx["logs"] / f"{name}.log").read_text().splitlines()
    return [(int(s), c, int(n), e.strip('"')) for s, c, n, e in (ln.split() for ln in lines)]


# --- the tests ----------------------------------------------------------------------------

def test_nginx_tls_with_short_keep_alive_and_gzip_answers_loses_nothing(
        nginx, tls, transport, queue_path):
    """TLS verified with --ca-bundle, at most 3 requests a connection, idle ones closed
    after 1 s (the queue is filled in waves 1.5 s apart), answers gzipped and chunked,
    HTTP/1.0 from nginx to the receiver. Batches of 10 make 50 requests a wave."""
    before = len(access_log(nginx, "tls")) if (nginx["logs"] / "tls.log").exists() else 0
    run = Run(nginx["urls"]["tls"], nginx["record"], queue_path,
              ["--ca-bundle", tls["ca"], "--max-batch-size", "10", *transport])
    run.deliver([EVENTS // 4] * 4, gap_s=1.5)
    run.check_every_event_arrived()
    requests_ = access_log(nginx, "tls")[before:]
    assert {status for status, *_ in requests_} == {200}
    assert max(number for _, _, number, _ in requests_) == 3
    assert {encoding for *_, encoding in requests_} == {"gzip"}
    assert run.stats().dead_letters == 0


def test_nginx_refusing_bodies_over_2k_dead_letters_exactly_the_oversized_events(
        nginx, transport, queue_path):
    """client_max_body_size 2k: nginx answers 413 from the Content-Length, before reading
    the body. Batches are split until each of the five oversized events (2 to 30 KB) is
    alone, then dead-lettered."""
    run = Run(nginx["urls"]["small"], nginx["record"], queue_path, transport)
    oversized = run.deliver([EVENTS], extra=lambda: [
        message_id for size in (2100, 3000, 8000, 20_000, 30_000)  # a blob in each event
        for message_id in enqueue(queue_path, 1, event="Oversized", properties={"b": "x" * size})])
    run.check_every_event_arrived()
    letters = SQLiteQueue(queue_path).dead_letters()
    assert sorted(letter.status for letter in letters) == [413] * 5
    assert {next(i for i in oversized if i in letter.body) for letter in letters} \
        == set(oversized)


def test_nginx_closing_after_every_answer_loses_nothing(nginx, transport, queue_path):
    """keepalive_timeout 0: "Connection: close" on every answer."""
    before = len(access_log(nginx, "close")) if (nginx["logs"] / "close.log").exists() else 0
    run = Run(nginx["urls"]["close"], nginx["record"], queue_path, transport)
    run.deliver([EVENTS])
    run.check_every_event_arrived()
    assert {number for _, _, number, _ in access_log(nginx, "close")[before:]} == {1}


def test_gunicorn_restarting_its_workers_every_5_requests_loses_nothing(
        gunicorn, transport, queue_path):
    """Batches of 20: 100 requests, a worker restarted every 5 (sync workers close each
    connection; gthread ones keep it alive until the worker goes)."""
    boots = gunicorn["log"].read_text().count("Booting worker")
    run = Run(gunicorn["url"], gunicorn["record"], queue_path,
              ["--max-batch-size", "20", *transport])
    run.deliver([EVENTS])
    run.check_every_event_arrived()
    assert run.stats().dead_letters == 0
    assert gunicorn["log"].read_text().count("Booting worker") - boots >= 5


def test_uvicorn_and_hypercorn_lose_nothing(asgi, transport, queue_path):
    run = Run(asgi["url"], asgi["record"], queue_path, transport)
    run.deliver([EVENTS])
    run.check_every_event_arrived()
    assert run.stats().dead_letters == 0


def test_python_http_server_answering_in_http_1_0_loses_nothing(
        upstream, transport, queue_path):
    """wsgiref on http.server: HTTP/1.0 answers, each connection closed after one."""
    run = Run(f"http://127.0.0.1:{upstream[0]}/v1/", upstream[1], queue_path, transport)
    run.deliver([EVENTS])
    run.check_every_event_arrived()
    assert run.stats().dead_letters == 0


@pytest.mark.parametrize("host, trusted", [("127.0.0.1", False), ("localhost", True)],
                         ids=["unknown-CA", "hostname-mismatch"])
def test_nginx_whose_certificate_fails_verification_gets_nothing_and_nothing_is_deleted(
        nginx, tls, transport, queue_path, host, trusted):
    """Without our CA (certifi's bundle), or through a name the certificate does not hold
    (it is for 127.0.0.1), every request is refused before it is sent."""
    url = nginx["urls"]["tls"].replace("127.0.0.1", host)
    ca = ["--ca-bundle", tls["ca"]] if trusted else []
    Path(nginx["record"]).write_text("")
    enqueue(queue_path, 200)
    proc = subprocess.run(
        [sys.executable, "-m", "segmentry.flusher", "--queue", queue_path, "--api-url", url,
         *FAST, *ca, *transport, "--drain", "--drain-timeout", "2"],
        env={**os.environ, "SEGMENT_WRITE_KEY": KEY}, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert read_record(nginx["record"]) == []
    stats = SQLiteQueue(queue_path).stats(time.time())
    assert (stats.depth, stats.dead_letters) == (200, 0)


def test_a_client_certificate_takes_the_requests_path(upstream, tls, monkeypatch):
    """What makes the "requests" runs above go through requests + urllib3: with a client
    certificate the request reaches HTTPAdapter.send; without, it never does."""
    calls = []
    send = requests.adapters.HTTPAdapter.send

    def counted(self, *args, **kwargs):
        calls.append(1)
        return send(self, *args, **kwargs)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", counted)
    url = f"http://127.0.0.1:{upstream[0]}/v1/"
    event = {"type": "track", "event": "E", "userId": "u", "messageId": "m-1"}
    for options, expected in (({}, 0), ({"cert": tls["client"]}, 1)):
        with segmentry.http.client(KEY, url, **options) as http:
            assert segmentry.http.batch(http, [event]).status_code == 200
        assert len(calls) == expected
