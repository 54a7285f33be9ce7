"""Client(flusher="process"): the client starts ``python -m segmentry.flusher --from-client``
and delivers through it, against a real receiver on 127.0.0.1. Crashes are real SIGKILLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fake_segment import FakeSegment
from helpers import refused_url, wait_until

import segmentry
from segmentry import _process, config
from segmentry.exceptions import ConfigurationError
from segmentry.flusher import Lock, holder_pid
from segmentry.storage import SQLiteQueue

pytestmark = pytest.mark.slow

KEY = "process-key"
FAST = {"retry_start": 1, "retry_expiry": 20, "batch_every_ms": 20}


@pytest.fixture
def receiver():
    with FakeSegment(write_key=KEY, record=True) as srv:
        yield srv


def client(path, url, **options):
    return segmentry.Client(KEY, queue_path=path, api_url=url, flusher="process",
                            **{**FAST, **options})


def test_events_go_through_a_flusher_process_that_close_stops(receiver, queue_path):
    with client(queue_path, receiver.url, max_batch_size=7, gzip=True) as c:
        ids = [c.track(f"user-{i}", "E", {"i": i}) for i in range(100)]
        pid = c._flusher.pid
        assert pid not in (None, os.getpid())
        assert c.flush(30) is True
        assert holder_pid(queue_path) == pid  # the process holds the queue, not us
        popen = c._flusher._popen
    assert popen.returncode == 0  # close() stopped it, and it exited cleanly
    assert {e["messageId"] for e in receiver.events()} == set(ids)
    batches = receiver.batches()
    assert max(b["events"] for b in batches) <= 7  # the client's options reached it
    assert all(b["gzip"] and b["write_key"] == KEY for b in batches)


def test_flush_makes_the_process_send_a_partial_batch_now(receiver, queue_path):
    # A batch that is not full waits batch_every_ms (here a minute) unless flush() asks:
    # through SIGUSR1, which must not kill a process still starting.
    with client(queue_path, receiver.url, batch_every_ms=60_000) as c:
        c.track("u", "first")  # starts the process
        assert wait_until(lambda: holder_pid(queue_path) == c._flusher.pid)
        assert c.flush(20)  # the first claim after the start may go at once
        c.track("u", "second")
        start = time.monotonic()
        assert c.flush(30) is True
        assert time.monotonic() - start < 30
        assert c._flusher.gone() is None
    assert receiver.stats()["unique"] == 2


def test_the_key_is_neither_in_argv_nor_in_the_environment(receiver, queue_path,
                                                           monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # the caller's unit's
    with client(queue_path, receiver.url) as c:
        c.track("u", "E")
        assert c.flush(30)
        pid = c._flusher.pid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    assert b"--from-client" in argv and str(os.getpid()).encode() in argv
    assert not any(KEY.encode() in item for item in argv + environ)
    assert not any(item.startswith(b"NOTIFY_SOCKET=") for item in environ)


def test_the_process_lets_go_of_the_queue_when_its_client_is_sigkilled(receiver,
                                                                        queue_path):
    script = textwrap.dedent(f"""
        import sys, time, segmentry
        c = segmentry.Client({KEY!r}, queue_path={queue_path!r}, api_url={receiver.url!r},
                             flusher="process", batch_every_ms=20)
        c.track("u", "E")
        assert c.flush(30)
        print(c._flusher.pid, flush=True)
        time.sleep(120)
        """)
    producer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True)
    try:
        child = int(producer.stdout.readline())
        assert holder_pid(queue_path) == child
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
        # Without its parent it stops, and the queue is free for the next flusher.
        lock = Lock(queue_path)
        assert lock.acquire(timeout=15)
        lock.release()
    finally:
        producer.kill()
        producer.wait()
    assert receiver.stats()["unique"] == 1


def test_a_flusher_process_that_is_killed_is_started_again_at_once(receiver, queue_path,
                                                                   monkeypatch, caplog):
    monkeypatch.setattr(_process, "CHECK_EVERY_S", 0.0)
    with client(queue_path, receiver.url, batch_every_ms=60_000) as c:
        c.track("u", "one")
        assert c.flush(30)
        first = c._flusher.pid
        os.kill(first, signal.SIGKILL)  # as the OOM killer would
        assert wait_until(lambda: c._flusher.gone() is not None)
        c.track("u", "two")  # finds it gone: starts another
        second = c._flusher.pid
        assert second != first and c._flusher.gone() is None
        assert wait_until(lambda: holder_pid(queue_path) == second)
        os.kill(second, signal.SIGKILL)
        assert wait_until(lambda: c._flusher.gone() is not None)
        monkeypatch.setattr(_process, "CHECK_EVERY_S", 3600.0)
        c.track("u", "three")  # queued, and this call does not look
        assert c.flush(30) is True  # flush() starts the next one itself
        assert c._flusher.pid not in (first, second)
    assert receiver.stats()["unique"] == 3
    started = [r.getMessage() for r in caplog.records if "starting another" in r.getMessage()]
    assert len(started) == 2 and "killed by signal 9" in started[0]


def test_flush_gives_up_at_once_when_the_receiver_refuses_the_key(receiver, queue_path,
                                                                   caplog):
    with segmentry.Client("wrong-key", queue_path=queue_path, api_url=receiver.url,
                          flusher="process", **FAST) as c:
        c.track("u", "E")
        start = time.monotonic()
        assert c.flush(60) is False  # what the process reported, as a thread would
        assert time.monotonic() - start < 60
    said = [r.getMessage() for r in caplog.records if "flush() gives up" in r.getMessage()]
    assert len(said) == 1 and "the receiver answered HTTP 401" in said[0]
    assert receiver.stats()["unique"] == 0


def test_a_flush_that_times_out_in_an_outage_says_what_fails(queue_path, caplog):
    c = client(queue_path, refused_url())
    try:
        c.track("u", "E")
        assert c.flush(3) is False
    finally:
        c.close(timeout=0.5)
    said = [r.getMessage() for r in caplog.records if "flush() timed out" in r.getMessage()]
    assert len(said) == 1 and "connection refused" in said[0]


@pytest.mark.parametrize("how, said", [
    ("exits", "the flusher process (pid"), ("missing", "could not be started")])
def test_flush_gives_up_at_once_when_the_process_cannot_run(receiver, queue_path, tmp_path,
                                                           monkeypatch, caplog, how, said):
    broken = tmp_path / "python-broken"  # a Python that fails at start, or none at all
    if how == "exits":
        broken.write_text("#!/bin/sh\nexit 3\n")
        broken.chmod(0o755)
    with client(queue_path, receiver.url) as c:
        monkeypatch.setattr(_process.sys, "executable", str(broken))
        c.track("u", "E")
        c.track("u", "E")  # a start that failed is not tried again at every call
        start = time.monotonic()
        assert c.flush(60) is False
        assert time.monotonic() - start < 60
    gave_up = [r.getMessage() for r in caplog.records if "flush() gives up" in r.getMessage()]
    assert len(gave_up) == 1 and said in gave_up[0]  # once: close() does not repeat it
    if how == "exits":
        assert "exited with code 3" in gave_up[0]
    else:
        assert sum("could not be started" in r.getMessage() for r in caplog.records) == 2
    assert receiver.stats()["unique"] == 0  # still queued, for the next flusher
    assert SQLiteQueue(queue_path).stats(time.time()).depth == 2


@pytest.mark.parametrize("executable", ["/usr/bin/uwsgi", "", "/usr/sbin/apache2"])
def test_a_server_that_embeds_python_is_not_started_as_the_flusher(queue_path, monkeypatch,
                                                                   executable):
    monkeypatch.setattr(_process.sys, "executable", executable)
    with pytest.raises(ConfigurationError, match="sys.executable is .*not a Python"):
        segmentry.Client(KEY, queue_path=queue_path, flusher="process")


def test_the_process_imports_this_segmentry_and_never_from_the_working_directory(
        monkeypatch):
    home = os.path.dirname(os.path.dirname(os.path.abspath(segmentry.__file__)))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = _process._environment()
    assert env["PYTHONPATH"].split(os.pathsep) == [home, "/elsewhere"]
    assert env["PYTHONSAFEPATH"] == "1"
    # Installed: its site-packages is on the path already, and first it would shadow the
    # standard library.
    monkeypatch.setattr(_process.site, "getsitepackages", lambda: [home])
    assert _process._environment()["PYTHONPATH"] == "/elsewhere"


def test_what_lives_only_in_this_process_is_refused(queue_path):
    import requests

    for option, name in ((dict(on_error=print), "on_error"),
                         (dict(requests_options={"session": requests.Session()}), "session"),
                         (dict(requests_options={"adapter": requests.adapters.HTTPAdapter()}),
                          "adapter")):
        with pytest.raises(ConfigurationError, match=f"{name}.*flusher='process'"):
            segmentry.Client(KEY, queue_path=queue_path, flusher="process", **option)


def test_the_options_cross_to_the_process_unchanged(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    options = config.Options(
        flusher="process", max_batch_size=9, batch_every_ms=5, max_in_flight=3,
        retry_attempts=4, retry_start=7, retry_expiry=70, send_to_http=False, gzip=True,
        api_url="http://127.0.0.1:9/v1", queue_path=str(tmp_path / "q.db"),
        durability="full", max_queue_bytes=1 << 20, on_full="raise", sender="immediate",
        requests_options={"timeout": (1.5, 7), "verify": str(ca), "cert": (str(ca), str(ca)),
                          "proxies": {"https": "http://proxy:3128", "http": None},
                          "headers": {b"X-Bytes": b"v", "X-Text": "w"}})
    import json

    crossed = config.from_settings(json.loads(json.dumps(config.to_settings(options))))
    assert crossed.requests_options["headers"] == {"X-Bytes": "v", "X-Text": "w"}
    crossed.requests_options["headers"] = options.requests_options["headers"]
    assert crossed == options


def test_the_service_refuses_unreadable_settings_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "segmentry.flusher", "--from-client",
                           str(os.getpid())], input="{not json", capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("segmentry: configuration error: --from-client: ")
    assert "Traceback" not in proc.stderr


def test_a_forked_child_leaves_the_parents_flusher_process_alone(receiver, queue_path):
    with client(queue_path, receiver.url) as c:
        c.track("parent", "E")
        assert c.flush(30)
        flusher = c._flusher.pid
        pid = os.fork()
        if pid == 0:  # the child: its events go through whichever flusher holds the queue
            ok = False
            try:
                ok = c.track("child", "E") is not None and c.flush(timeout=30)
                c.close()  # stops the child's own flusher process, not the parent's
            finally:
                os._exit(0 if ok else 1)  # never return into pytest in the forked copy
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert c._flusher.pid == flusher and c._flusher.gone() is None
        assert holder_pid(queue_path) == flusher
        c.track("parent", "after")
        assert c.flush(30)
    assert sorted(e["userId"] for e in receiver.events()) == ["child", "parent", "parent"]
