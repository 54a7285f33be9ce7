"""Helpers shared by the subprocess tests (test_cli, test_e2e)."""

from __future__ import annotations

import time

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
