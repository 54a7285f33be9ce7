"""Where a queue file lives: the file and its directories, created with the modes they
need, and why one cannot be opened, in words that name the fix (SQLite says only
"unable to open database file"). Private to storage; standard library only."""

from __future__ import annotations

import os
import stat

from .exceptions import StorageError


def create_file(path: str, create_dirs: bool) -> None:
    """Create the file 0600 ourselves (SQLite gives -wal and -shm the same mode), and
    with ``create_dirs`` its missing directories (0700)."""
    directory = os.path.dirname(path)
    if create_dirs:
        _create_dirs(path, directory)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except FileExistsError:
        return  # the file (or, see open_failure, a file where a directory should be)
    except OSError as exc:
        # "create" only for a file known to be missing: one in a directory we cannot
        # search may exist (lexists() cannot tell), and is not one we failed to create.
        known_missing = os.access(directory, os.X_OK) and not os.path.lexists(path)
        verb = "create" if known_missing else "open"
        reason = open_failure(path, exc.strerror or str(exc))
        raise StorageError(f"cannot {verb} queue file {path}: {reason}") from exc
    os.close(fd)  # safe: nobody can hold a connection to a file that did not exist


def _create_dirs(path: str, directory: str) -> None:
    missing = _missing_ancestor(directory)
    if missing is None:
        return  # there, or a file in the way (which the open then names)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create directory {missing} for queue file {path}: "
            f"{exc.strerror}; create it for this user, or choose another queue path "
            "(queue_path, SEGMENTRY_QUEUE or XDG_STATE_HOME)") from exc


def open_failure(path: str, fallback: str = "unable to open database file") -> str:
    """Why ``path`` cannot be opened or created, and the fix, as far as the file system
    tells (SQLite says only "unable to open database file")."""
    directory = os.path.dirname(path)
    missing = _missing_ancestor(directory)
    if os.path.isdir(path):
        return f"it is a directory; give a file name inside it, e.g. {path}/queue.db"
    if missing is not None:
        return (f"directory {missing} does not exist; create it (mkdir -p {directory}) "
                "or fix the queue path")
    if not os.path.isdir(directory):
        return f"{_first_file(directory)} is not a directory; fix the queue path"
    if not os.access(directory, os.X_OK):
        return (f"permission denied: cannot search directory {directory}; run as a user "
                "who can, or choose another queue path")
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        info = os.stat(path)
        return (f"permission denied (owner uid {info.st_uid}, mode "
                f"{stat.S_IMODE(info.st_mode):o}); run as its owner or a member of its group")
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"permission denied on {directory}, where SQLite creates the -wal and -shm "
                "files beside the queue; make it writable or choose another queue path")
    return fallback


def _missing_ancestor(directory: str) -> str | None:
    """The topmost missing directory on the way to ``directory`` (None: it exists, or a
    file stands in the way)."""
    missing = None
    while directory and not os.path.lexists(directory):
        missing, directory = directory, os.path.dirname(directory)
        if directory == missing:
            break
    return missing if directory and os.path.isdir(directory) else None


def identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _first_file(directory: str) -> str:
    """The ancestor of ``directory`` that exists but is not a directory."""
    path = directory
    while (parent := os.path.dirname(path)) != path and not os.path.isdir(parent):
        path = parent
    return path
