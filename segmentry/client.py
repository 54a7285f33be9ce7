"""The producer: Client and its six calls (track, identify, page, screen, group, alias).
Each call validates, encodes and stores one event durably, then returns its messageId;
no network here. A Client may also own the in-process flusher thread (flusher.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any

from . import config, messages, telemetry
from .exceptions import ConfigurationError, QueueFull, StorageError
from .messages import ContextLike, Message
from .storage import SQLiteQueue, default_queue_path, wal_reuse_bytes

logger = logging.getLogger(__name__)

CAP_RESTAT_EVERY = 256  # puts between two stat() calls of the queue file's size
DROP_LOG_EVERY_S = 10.0  # at most one drop warning per interval: never flood the logs
CLOSE_TIMEOUT_S = 5.0

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Client:
    """Durable Segment client. ``Client("KEY", queue_path=...)``; see DESIGN.md for options.
    Without a key, SEGMENT_WRITE_KEY's; a client with ``flusher=None`` needs none."""

    def __init__(self, write_key: str | None = None, **options: Any) -> None:
        self.options = config.resolve(options)
        self.write_key = write_key or os.environ.get("SEGMENT_WRITE_KEY") or None
        self.queue_path = self.options.queue_path or default_queue_path()
        if self.options.flusher == "thread" and not self.write_key and self.options.send_to_http:
            raise ConfigurationError(
                "a write key is required to send (or pass flusher=None to only enqueue "
                "and let `python -m segmentry.flusher` deliver)")
        self.queue = SQLiteQueue(self.queue_path, self.options.durability,
                                 wal_reuse_bytes(self.options.max_queue_bytes))
        self._check_destination()
        self.dropped = 0
        self._first_id = 0  # the range of ids this client stored: what flush() waits for
        self._last_id = 0
        self._ids_lock = threading.Lock()
        self._puts = 0  # stored events, so flush() sees one stored while it waited
        self._puts_since_stat = CAP_RESTAT_EVERY
        self._disk_bytes = 0
        self._last_drop_log = 0.0
        self._flusher: Any = None  # flusher.Background, started on the first event
        self._flusher_lock = threading.Lock()
        self._closed = False
        _clients.add(self)

    # -- the six calls ----------------------------------------------------------------

    def track(self, user_id: Any = None, event: str | None = None,
              properties: dict[str, Any] | None = None, context: ContextLike = None,
              **common: Any) -> str | None:
        """Record that ``user_id`` did ``event``; return its messageId (None if dropped)."""
        if isinstance(user_id, messages.Track):
            return self.send(user_id)
        return self._enqueue("track", user_id, {"event": event, "properties": properties},
                             context, common)

    def identify(self, user_id: Any = None, traits: dict[str, Any] | None = None,
                 context: ContextLike = None, **common: Any) -> str | None:
        if isinstance(user_id, messages.Identify):
            return self.send(user_id)
        return self._enqueue("identify", user_id, {"traits": traits}, context, common)

    def page(self, user_id: Any = None, name: str | None = None,
             properties: dict[str, Any] | None = None, context: ContextLike = None,
             *, category: str | None = None, **common: Any) -> str | None:
        if isinstance(user_id, messages.Page) and not isinstance(user_id, messages.Screen):
            return self.send(user_id)
        fields = {"name": name, "properties": properties, "category": category}
        return self._enqueue("page", user_id, fields, context, common)

    def screen(self, user_id: Any = None, name: str | None = None,
               properties: dict[str, Any] | None = None, context: ContextLike = None,
               *, category: str | None = None, **common: Any) -> str | None:
        if isinstance(user_id, messages.Screen):
            return self.send(user_id)
        fields = {"name": name, "properties": properties, "category": category}
        return self._enqueue("screen", user_id, fields, context, common)

    def group(self, user_id: Any = None, group_id: Any = None,
              traits: dict[str, Any] | None = None, context: ContextLike = None,
              **common: Any) -> str | None:
        if isinstance(user_id, messages.Group):
            return self.send(user_id)
        return self._enqueue("group", user_id, {"groupId": group_id, "traits": traits},
                             context, common)

    def alias(self, user_id: Any = None, previous_id: Any = None, context: ContextLike = None,
              **common: Any) -> str | None:
        if isinstance(user_id, messages.Alias):
            return self.send(user_id)
        return self._enqueue("alias", user_id, {"previousId": previous_id}, context, common)

    def send(self, message: Message) -> str | None:
        """Enqueue a full message struct (Track, Identify, Page, Screen, Group, Alias)."""
        now = time.time()
        return self._store(messages.encode_message(message, now), now)

    # -- delivery control ---------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no event this client enqueued before the call is still queued,
        delivered by this process's flusher or by whichever flusher holds the queue.
        Return whether that happened within ``timeout`` seconds (None: no limit)."""
        with self._ids_lock:
            first, last, puts = self._first_id, self._last_id, self._puts
        if last == 0:
            return True
        background = self._flusher
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = 0.005
        while self.queue.pending(first, last):
            if self._closed and background is not None and background is not self._flusher:
                return False  # closed meanwhile: its flusher has stopped, nothing will come
            if background is not None:
                background.wake()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            # Woken at once by this process's flusher; another process's is polled.
            pause = wait if left is None else min(wait, left)
            if background is not None:
                background.wait_cycle(pause)
            else:
                time.sleep(pause)
            wait = min(wait * 2, 0.25)
        with self._ids_lock:  # all delivered: start a new range, unless one was added
            if self._puts == puts:
                self._first_id = self._last_id = 0
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop this client's flusher thread after a bounded final flush. What is not
        delivered by then stays in the queue file for the next flusher."""
        with self._flusher_lock:  # no call may start a flusher thread from now on
            if self._closed:
                return
            self._closed = True
            background = self._flusher
        if background is not None:
            self.flush(timeout)
            background.stop(timeout)
            self._flusher = None
        self.queue.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _enqueue(self, type_: str, user_id: Any, fields: dict[str, Any], context: ContextLike,
                 common: dict[str, Any]) -> str | None:
        if common and not _COMMON.issuperset(common):
            unknown = ", ".join(sorted(set(common) - _COMMON))
            raise TypeError(f"{type_}() got unexpected keyword(s): {unknown}")
        now = time.time()
        return self._store(messages.encode(type_, user_id, fields, now, context=context,
                                           **common), now)

    def _store(self, event: messages.Encoded, now: float) -> str | None:
        try:
            if self._closed:  # e.g. a daemon thread's call after the exit hook closed it
                raise StorageError("this client is closed")
            self._check_cap(len(event.body))
            row_id = self.queue.put(event.body, now)
        except (QueueFull, StorageError) as exc:
            self._delivery()  # a queue found full must still drain
            if self.options.on_full == "raise":
                raise
            self._drop(event, exc)
            return None
        with self._ids_lock:
            # A min/max range, not the first id: ids restart at 1 after the queue empties.
            if not self._first_id or row_id < self._first_id:
                self._first_id = row_id
            self._last_id = max(self._last_id, row_id)
            self._puts += 1
        background = self._delivery()
        if background is not None:
            background.enqueued()
        return event.message_id

    def _destination(self) -> tuple[Any, ...] | None:
        """Where this client's flusher thread sends: the key, the URL and whether it sends
        at all; None without a flusher thread."""
        if self.options.flusher != "thread":
            return None
        return (self.write_key, self.options.api_url, self.options.send_to_http)

    def _check_destination(self) -> None:
        """Refuse a second flusher thread in this process for the same queue file with
        another destination: whichever held the file would send every event its own way
        (one source's events under another's write key, or to a no-op transport)."""
        mine = self._destination()
        if mine is None:
            return
        for other in list(_clients):
            if (not other._closed and other.queue.path == self.queue.path
                    and other._destination() not in (None, mine)):
                raise ConfigurationError(
                    f"queue file {self.queue_path} is already delivered by another Client of "
                    "this process with another write key, api_url or send_to_http: one "
                    "flusher would send both clients' events its own way. Give each its own "
                    "queue_path")

    def _check_cap(self, size: int) -> None:
        self._puts_since_stat += 1
        self._disk_bytes += size
        cap = self.options.max_queue_bytes
        if self._puts_since_stat >= CAP_RESTAT_EVERY or self._disk_bytes >= cap:
            self._puts_since_stat = 0
            self._disk_bytes = self.queue.used_bytes() + size
        if self._disk_bytes > self.options.max_queue_bytes:
            raise QueueFull(f"queue file {self.queue_path} is over max_queue_bytes "
                            f"({self.options.max_queue_bytes}); is a flusher running?")

    def _drop(self, event: messages.Encoded, exc: Exception) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY_S:
            self._last_drop_log = now
            logger.warning("segmentry dropped an event (%d so far): %s", self.dropped, exc)
        telemetry.execute(("segmentry", "enqueue", "drop"), {"count": 1},
                          {"reason": type(exc).__name__, "error": str(exc), "type": event.type,
                           "queue_path": self.queue_path})

    def _delivery(self) -> Any:
        """This client's flusher thread, started at the first event, stored or refused (a
        client whose queue was full from the start must still drain it); None without one
        (flusher=None, closed, or it could not start: the call must not fail for that)."""
        if self.options.flusher != "thread" or self._flusher is not None:
            return self._flusher
        try:
            return self._start_flusher()
        except Exception:
            logger.exception("segmentry could not start its flusher thread")
            return None

    def _start_flusher(self) -> Any:
        """The flusher thread, started on the first event; None once closed (a call that
        raced close() stored its event, which the next flusher delivers)."""
        from .flusher import Background  # flusher imports http and requests: load on demand

        with self._flusher_lock:
            if self._flusher is None and not self._closed:
                self._flusher = Background(self.write_key or "", self.queue, self.options)
                self._flusher.start()
                _close_in_multiprocessing_children()
            return self._flusher

    def _forget_flusher_after_fork(self) -> None:
        if self._flusher is not None:
            self._flusher.abandon()  # the thread did not survive the fork; its lock is the parent's
            self._flusher = None
        self._flusher_lock = threading.Lock()
        self._ids_lock = threading.Lock()


_COMMON = frozenset({"anonymous_id", "timestamp", "integrations", "message_id"})


def _after_fork_child() -> None:
    for client in list(_clients):
        client._forget_flusher_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_child)


def _close_all_at_exit() -> None:
    """The exit hook: a bounded final flush, never a hang; the rest stays on disk. One
    deadline for all clients, so that exit does not take longer with more of them."""
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for client in list(_clients):
        try:
            client.close(max(0.1, deadline - time.monotonic()))
        except Exception:  # never let analytics turn a clean exit into a traceback
            logger.exception("segmentry: closing a client at exit failed")


atexit.register(_close_all_at_exit)
_finalized_pid = 0  # the process whose multiprocessing finalizer is registered


def _close_in_multiprocessing_children() -> None:
    """multiprocessing's children end with os._exit: atexit hooks never run there, its own
    finalizers do. Without this, a Pool worker left its events (and the deletes of those
    it delivered) to the next flusher: delivered twice."""
    global _finalized_pid
    mp = sys.modules.get("multiprocessing")
    if mp is None or _finalized_pid == os.getpid() or mp.parent_process() is None:
        return
    from multiprocessing import util

    _finalized_pid = os.getpid()
    util.Finalize(None, _close_all_at_exit, exitpriority=100)
