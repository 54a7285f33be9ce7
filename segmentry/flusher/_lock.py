"""The one-flusher-per-queue lock: an flock on ``<queue>.lock``, and the holder's pid in
``<queue>.flusher`` for ``segmentry status``. Standard library only."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time

from ..exceptions import StorageError

logger = logging.getLogger("segmentry.flusher")  # the package's name: one logger for users


class Lock:
    """One active flusher per queue file: an ``flock`` on ``<queue>.lock`` (never the
    database, -wal or -shm: closing a descriptor of those drops SQLite's own locks), and
    the holder's pid in ``<queue>.flusher`` for ``segmentry status``. The directory may be
    group-writable (the shared layout), so neither file is opened through a symbolic link
    nor truncated in place: a group member cannot aim them at a file the flusher's user
    can write."""

    def __init__(self, queue_path: str) -> None:
        self.path = queue_path + ".lock"
        self.pid_path = queue_path + ".flusher"
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the lock, polling for up to ``timeout`` seconds; return whether we hold it."""
        fd = self._open()
        end = time.monotonic() + timeout
        while not _try_flock(fd):
            if time.monotonic() >= end:
                os.close(fd)
                return False
            time.sleep(min(LOCK_RETRY_S, max(0.0, end - time.monotonic())))
        self._fd = fd
        try:  # best effort: a pid file we cannot write must not cost us the lock
            _write_pid(self.pid_path)
        except OSError as exc:  # e.g. a directory we may not write
            logger.warning("cannot write %s (%s): `segmentry status` will not name this "
                           "flusher", self.pid_path, exc.strerror)
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.pid_path)
            except OSError:  # gone, or one we could not write either (see acquire)
                pass
            os.close(self._fd)  # closing the descriptor ends the flock
            self._fd = None

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking, which
        would free the parent's lock (an flock belongs to the shared descriptor)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        """The lock file, created 0660 (the apps of a host that share the queue's group
        may stand by too), never through a link and never truncated."""
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o660)
                os.fchmod(fd, 0o660)  # the umask must not take the group's write bit
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR | _NOFOLLOW)
        except OSError as exc:  # ELOOP: a symbolic link where the lock file should be
            raise StorageError(f"cannot open the flusher lock file {self.path}: "
                               f"{exc.strerror}") from exc
        return fd


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
LOCK_RETRY_S = 0.05  # how often a waiting acquire() tries the lock again


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_pid(path: str) -> None:
    """Our pid, and our start time where /proc tells it (see holder_pid): written to a
    new file of our own, then renamed over the old one (a rename replaces a link, it
    does not follow it)."""
    pid = os.getpid()
    start = _started(pid)
    temporary = f"{path}.{pid}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # a crashed flusher's of the same pid
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:  # a pid is no secret
        f.write(f"{pid}\n" if start is None else f"{pid} {start}\n")
    os.replace(temporary, path)


def holder_pid(queue_path: str) -> int | None:
    """The pid of the process holding the queue's flusher lock, or None. Read from the
    pid file, never by probing the lock: a probe could make a starting flusher think
    another holds it. A pid file left by a SIGKILLed flusher names a dead process, or,
    after a reboot or enough forks, another one: the start time tells them apart."""
    try:
        with open(queue_path + ".flusher") as f:
            fields = [int(v) for v in f.read().split()]
    except (OSError, ValueError):
        return None
    if not fields or fields[0] <= 0:
        return None
    pid = fields[0]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's process
    if len(fields) > 1 and _started(pid) not in (None, fields[1]):
        return None  # the pid was reused
    return pid


def _started(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot: /proc/<pid>/stat's field 22), or None
    where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_line = f.read()
        return int(stat_line[stat_line.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None

