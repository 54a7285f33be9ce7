"""Helpers shared by the subprocess tests (test_cli, test_e2e, the fork and harness
tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import segmentry

# Flusher flags that keep retries and cycles short in tests.
FAST = ["--retry-start", "1", "--retry-expiry", "20", "--batch-every-ms", "20"]


def enqueue(path, n, event="E", properties=None):
    """Store ``n`` track events in the queue file, without a flusher; return their ids."""
    with segmentry.Client(queue_path=path, flusher=None) as client:
        return [client.track(f"user-{i}", event, properties or {"i": i}) for i in range(n)]


def wait_until(predicate, timeout=30.0):
    """Poll a condition that only another process can make true (no race is won by it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def refused_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released): every
    connection to it is refused, as to a mistyped URL or a receiver that is down."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def refused_url() -> str:
    return f"http://127.0.0.1:{refused_port()}/v1/"


ROOT = Path(__file__).resolve().parent.parent


def fork_holding(lock: Any, child: Callable[[], bool]) -> int:
    """Fork while this thread holds ``lock`` (as another thread of the parent would), run
    ``child`` in the copy, which must neither hang (SIGALRM after 10 s) nor fail; return
    the copy's exit code: 0 when ``child()`` returned True."""
    with lock:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang dies of SIGALRM
                signal.alarm(10)
                code = 0 if child() else 1
            finally:
                os._exit(code)  # never return into pytest in the forked copy
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_harness(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run one of tools/'s harnesses with ``--json``: the finished process, and its report
    (empty when it printed none)."""
    done = subprocess.run([sys.executable, *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    return done, json.loads(done.stdout) if done.stdout.strip() else {}
