"""The flusher process of a ``Client(flusher="process")``: ``python -m segmentry.flusher
--from-client PID``, started at the client's first event and stopped by its close(), so
that delivery takes none of the caller's process: no GIL, no CPU, no lock shared with
its calls. This is the client's side of it, with the flusher thread's interface
(flusher/_background.py); the flusher's side is service.py's --from-client.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import site
import socket
import subprocess
import sys
import time
from typing import Callable

from . import config
from .config import Options
from .exceptions import ConfigurationError

CHECK_EVERY_S = 1.0  # how often a producer's call looks whether the process still runs
# A process that failed by itself (could not start, exited with an error) is started
# again after RESTART_S, doubling to RESTART_MAX_S while it keeps failing; one that was
# killed (OOM, by hand) or stopped is started again at once.
RESTART_S = 5.0
RESTART_MAX_S = 300.0
# The parent's systemd unit is not the flusher's: its sd_notify socket and watchdog stay.
NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class FlusherProcess:
    """A Client's flusher in a child process: it stands by for the queue's lock like the
    thread, sends with the client's key and options (handed over on its stdin, never in
    argv or the environment), stops on SIGTERM or once this process is gone, and is
    started again if it dies while the client is in use."""

    def __init__(self, write_key: str, queue_path: str, options: Options,
                 say: Callable[[str], None]) -> None:
        self._settings = {
            "write_key": write_key,
            "options": config.to_settings(dataclasses.replace(options, queue_path=queue_path))}
        self._say = say  # a warning nobody may miss (Client's _say)
        self._popen: subprocess.Popen[bytes] | None = None
        self._not_started: str | None = None  # why the last start failed
        self._checked_at = 0.0
        self._restart_s = RESTART_S  # the next wait after a failure
        self._restart_at: float | None = None  # set once it is found gone
        # What the process reports (service.ClientLink): nothing until it holds the queue.
        self._link: socket.socket | None = None
        self._state: dict[str, str | None] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> None:
        self._checked_at = time.monotonic()
        self._restart_at = None
        self._close_link()
        argv = [sys.executable, "-m", "segmentry.flusher", "--from-client", str(os.getpid()),
                "--log-level", "WARNING"]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        fd = theirs.fileno()  # the same number in the process (pass_fds)
        try:
            # Its own session: a Ctrl-C of the terminal stops the caller, whose close()
            # then flushes through the flusher before stopping it.
            popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     env=_environment(), start_new_session=True,
                                     pass_fds=(fd,))
        except OSError as exc:  # no fork (memory, process limit): tried again later
            ours.close()
            self._popen = None
            self._not_started = f"the flusher process could not be started ({exc})"
            self._say(self._not_started)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._link, self._popen, self._not_started = ours, popen, None
        settings = {**self._settings, "status_fd": fd}
        try:
            if popen.stdin is not None:  # always (stdin=PIPE): for the type checker
                popen.stdin.write(json.dumps(settings).encode())
                popen.stdin.close()
        except OSError:  # it died at once (e.g. no segmentry there): gone() says how
            pass

    def enqueued(self) -> None:
        """A producer stored one event: at most every CHECK_EVERY_S, look whether the
        process still runs (see revive)."""
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY_S:
            self._checked_at = now
            self.revive()

    def revive(self) -> None:
        """Start the process again if it is gone and its wait (see RESTART_S) is over."""
        gone = self.gone()
        if gone is None:
            return
        now = time.monotonic()
        if self._restart_at is None:  # found gone just now
            code = self._popen.returncode if self._popen is not None else None
            failed = self._not_started is not None or (code or 0) > 0
            self._restart_at = now + (self._restart_s if failed else 0.0)
            self._restart_s = min(self._restart_s * 2, RESTART_MAX_S) if failed else RESTART_S
        if now >= self._restart_at:
            self._say(f"{gone}; starting another")
            self.start()

    def restart_in(self) -> float:
        """Seconds until a gone process may be started again (0: at the next chance)."""
        if self._restart_at is None:
            return 0.0
        return max(0.0, self._restart_at - time.monotonic())

    def gone(self) -> str | None:
        """Why the process is not delivering, if it exited: "the flusher process (pid N)
        exited with code C"; its own error line is on stderr."""
        if self._not_started is not None:
            return self._not_started
        if self._popen is None or self._popen.poll() is None:
            return None
        code = self._popen.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"the flusher process (pid {self._popen.pid}) {how}"

    def wake(self) -> None:
        """flush(): SIGUSR1 makes it send what is queued now, once it holds the queue
        (its handler is set by then; before, the signal would kill it). A standby has
        nothing to send."""
        pid = self.pid
        if pid is not None and self._reported() is not None and self.gone() is None:
            os.kill(pid, signal.SIGUSR1)

    def wait_cycle(self, timeout: float) -> None:
        time.sleep(timeout)  # it settles in another process: poll

    def blocked(self) -> str | None:
        """What it reported wrong with the key, URL or CA bundle, while it lasts."""
        return (self._reported() or {}).get("misconfigured")

    def failing(self) -> str | None:
        """What it reported failing (an outage), while it lasts."""
        return (self._reported() or {}).get("failing")

    def _reported(self) -> dict[str, str | None] | None:
        """Its last report, reading what came since (None: it does not hold the queue)."""
        while self._link is not None:
            try:
                data = self._link.recv(65536)
            except OSError:  # nothing more (BlockingIOError), or it is gone: gone() says
                break
            try:
                self._state = json.loads(data)
            except ValueError:  # not one of ours: the next may be
                continue
        return self._state

    def _close_link(self) -> None:
        if self._link is not None:
            self._link.close()
        self._link, self._state = None, None

    def stop(self, timeout: float) -> None:
        """SIGTERM, and wait up to ``timeout`` s: it lets its batches in flight settle
        for its grace period, then exits; one still busy then ends on its own."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            self._close_link()
            return
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:  # it ends on its own within its grace period
            pass
        self._close_link()

    def abandon(self) -> None:
        """In a forked child: the process is the parent's, which goes on using it."""
        self._popen = None
        self._close_link()


def check_interpreter(executable: str | None = None) -> None:
    """The flusher process is ``sys.executable -m segmentry.flusher``: under a server that
    embeds Python (uWSGI, mod_wsgi) that is the server's binary, which must not be started
    with our arguments."""
    executable = sys.executable if executable is None else executable
    name = os.path.basename(executable or "").lower()
    if not name.startswith(("python", "pypy")):
        raise ConfigurationError(
            f"flusher='process' starts `sys.executable -m segmentry.flusher`, and "
            f"sys.executable is {executable!r}, not a Python interpreter (a server that "
            f"embeds Python?): use flusher='thread', or flusher=None and a flusher service")


def _environment() -> dict[str, str]:
    """The caller's environment, so that the process imports this same segmentry: from
    where it was imported, put first on PYTHONPATH unless it is a site-packages directory
    (first there, it would shadow the standard library), and not from the working
    directory (PYTHONSAFEPATH, Python 3.11+: ``-m`` would put it first)."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = {os.path.abspath(p) for p in getattr(site, "getsitepackages", list)() if p}
    if home not in installed and home != os.path.abspath(site.getusersitepackages()):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (home, env.get("PYTHONPATH"))))
    env["PYTHONSAFEPATH"] = "1"
    return env
