"""Telling systemd how the flusher service is (``Type=notify``): one datagram per state
to ``$NOTIFY_SOCKET`` (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1), as sd_notify(3)
does. Imports nothing foreign; a no-op where the variable is unset (not under systemd).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Callable

logger = logging.getLogger(__name__)


class Notifier:
    """Sends the service's states. STATUS= only when it changes; WATCHDOG=1 at most every
    half of WatchdogSec, from whoever calls ``alive()`` (the delivery loop: a loop that
    stops turning stops the pings, and systemd restarts the service)."""

    def __init__(self, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_s(env)
        self.clock = clock
        self._status = ""
        self._pinged = -float("inf")
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        self._status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")

    def alive(self) -> None:
        if self.watchdog_s and self.clock() - self._pinged >= self.watchdog_s / 2:
            self._pinged = self.clock()
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:  # once: a service must not fail for its status line
            if not self._failed:
                self._failed = True
                logger.warning("cannot notify systemd at %s: %s", self.address, exc)


def _address(value: str) -> str | None:
    """The socket's address; a leading @ is Linux's abstract namespace (a NUL byte)."""
    if not value:
        return None
    return "\0" + value[1:] if value.startswith("@") else value


def _watchdog_s(environ: Mapping[str, str]) -> float:
    """WatchdogSec in seconds, 0 when off; only for the process systemd means (a child
    that inherited the variables must not ping for its parent)."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0.0
    try:
        return max(0, int(environ.get("WATCHDOG_USEC", "0"))) / 1e6
    except ValueError:
        return 0.0
