"""The producer: Client and its six calls (track, identify, page, screen, group, alias).
Each call validates, encodes and stores one event durably, then returns its messageId;
no network here. A Client may also own the in-process flusher thread (flusher.py).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any

from . import config, messages, telemetry
from .exceptions import ConfigurationError, QueueFull, StorageError
from .messages import ContextLike, Message
from .storage import Queue, SQLiteQueue, default_queue_path, wal_reuse_bytes

if TYPE_CHECKING:  # imported when first needed: it loads requests
    from ._process import FlusherProcess
    from .flusher import Background

logger = logging.getLogger(__name__)

CAP_RESTAT_EVERY = 256  # puts between two stat() calls of the queue file's size
DROP_LOG_EVERY_S = 60.0  # drops that go on are reported once a minute, with a count
CLOSE_TIMEOUT_S = 5.0  # close()'s default bound, and the exit hook's for all clients
# How long flush() waits before it looks for a flusher holding the queue, when this
# process has no flusher thread: a service being (re)started gets that long to take it.
NO_FLUSHER_GRACE_S = 2.0

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Client:
    """Durable Segment client. ``Client("KEY", queue_path=...)``; the options are the
    README's Configuration table. Without a key, SEGMENT_WRITE_KEY's; a client with
    ``flusher=None`` needs none. A queue file that cannot be opened or created raises
    StorageError here, naming the path, the reason and the fix."""

    def __init__(self, write_key: str | None = None, **options: Any) -> None:
        self.options = config.resolve(options)
        self.write_key = write_key or os.environ.get("SEGMENT_WRITE_KEY") or None
        self.queue_path = self.options.queue_path or default_queue_path()
        if self.options.flusher and not self.write_key and self.options.send_to_http:
            raise ConfigurationError(
                "a write key is required to send (or pass flusher=None to only enqueue "
                "and let `python -m segmentry.flusher` deliver)")
        if self.options.flusher == "process":
            from ._process import check_interpreter

            check_interpreter()
        # Only the default per-user directory is created: a missing directory in a path
        # given on purpose is more likely a typo than a wish for a new queue.
        self.queue: Queue = SQLiteQueue(self.queue_path, self.options.durability,
                                        wal_reuse_bytes(self.options.max_queue_bytes),
                                        create_dirs=self.options.queue_path is None)
        # Each event carries where it goes: this client's key and URL (a flusher=None client
        # too: the per-host service sends each source's events with its own key). Without
        # a key, none: they go with the flusher's own.
        self._destination = (self.write_key, self.options.api_url) if self.write_key else None
        self.queue.open()  # a queue we cannot use is a configuration error, found now
        self.dropped = 0  # events refused (on_full="drop") since the client was made
        self._dropped_unflushed = 0  # ... since the last flush(), which then says False
        self._dropped_reported = 0  # self.dropped at the last report
        self._warned_closed = False
        self._gave_up_on: str | None = None  # what flush() last said it gave up on
        self._first_id = 0  # the range of ids this client stored: what flush() waits for
        self._last_id = 0
        self._ids_lock = threading.Lock()
        self._puts = 0  # stored events, so flush() sees one stored while it waited
        self._puts_since_stat = CAP_RESTAT_EVERY
        self._disk_bytes = 0
        self._last_drop_log = -math.inf
        self._flusher: Background | FlusherProcess | None = None  # started at the first event
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
        Return whether that happened within ``timeout`` seconds (None: no limit) with
        nothing dropped since the last flush(). False at once when the client is closed;
        False, with a warning saying why, as soon as delivery is known to be blocked: the
        receiver refuses the key or URL (401/403/404), or no flusher holds the queue
        NO_FLUSHER_GRACE_S after the call; and at the timeout during an outage, saying
        what fails (once for each cause)."""
        return not self._closed and self._flush(timeout)

    def _flush(self, timeout: float | None) -> bool:
        try:
            self._check_replaced()  # else it would wait for events no flusher can see
        except StorageError as exc:
            _say(f"flush() gives up: {exc}")
            return False
        with self._ids_lock:
            first, last, puts = self._first_id, self._last_id, self._puts
            dropped, self._dropped_unflushed = self._dropped_unflushed, 0
        if last and not self._wait_delivered(first, last, timeout):
            return False
        with self._ids_lock:  # all delivered: start a new range, unless one was added
            if self._puts == puts:
                self._first_id = self._last_id = 0
        return not dropped

    def _wait_delivered(self, first: int, last: int, timeout: float | None) -> bool:
        background = self._flusher
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        wait = 0.005
        while self.queue.pending(first, last, self._destination):  # its own events only
            if self._closed and background is not None and background is not self._flusher:
                return False  # closed meanwhile: its flusher has stopped, nothing will come
            if self._blocked(background, start):
                return False
            if background is not None:
                background.wake()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._say_why_late(background)
                return False
            # Woken at once by this process's flusher; another process's is polled.
            pause = wait if left is None else min(wait, left)
            if background is not None:
                background.wait_cycle(pause)
            else:
                time.sleep(pause)
            wait = min(wait * 2, 0.25)
        return True

    def _say_why_late(self, background: Any) -> None:
        """A flush() that timed out during an outage says so, once for each cause: with
        no logging configured, the flusher's own warning reaches nobody. Without a
        flusher of its own, it names the process whose log says why."""
        if background is not None:
            failing = background.failing()
            why = f"delivery is failing ({failing})" if failing else None
        else:
            from .flusher import holder_pid  # imports requests: only when this happens

            pid = holder_pid(self.queue_path)
            why = ("no flusher holds the queue" if pid is None else
                   f"the flusher process that holds the queue (pid {pid}) has not delivered "
                   f"them; its log says why")
        if why and why != self._gave_up_on:
            self._gave_up_on = why
            _say(f"flush() timed out: {why}; the events stay queued in {self.queue_path} "
                 f"and are retried")

    def _blocked(self, background: Any, start: float) -> bool:
        """Whether waiting is known to be in vain; if so, say why (once for each reason:
        the exit hook's final flush does not repeat what an application's flush said)."""
        if background is not None:
            background.revive()  # a flusher process that died: started again if it may
            wrong = background.blocked()
            gone = background.gone()
            if wrong and wrong != self._gave_up_on:
                self._gave_up_on = wrong
                _say(f"flush() gives up: {wrong} at {self.options.api_url}; check the write "
                     f"key, api_url and the CA bundle (verify=). The events stay queued in "
                     f"{self.queue_path}")
            elif gone and not wrong and gone != self._gave_up_on:
                self._gave_up_on = gone
                _say(f"flush() gives up: {gone}; the events stay queued in "
                     f"{self.queue_path}, and another is started by an event or flush() "
                     f"in {background.restart_in():.0f} s")
            return bool(wrong or gone)
        if time.monotonic() - start < NO_FLUSHER_GRACE_S:
            return False
        from .flusher import holder_pid  # imports requests: only once this is in doubt

        if holder_pid(self.queue_path) is not None:
            return False
        _say(f"flush() gives up: no flusher delivers {self.queue_path} (this client runs "
             "no flusher thread and no `segmentry flush` service holds the queue). The "
             "events stay queued until one does")
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop this client's flusher (thread or process) after a final flush; return within
        ``timeout`` seconds in all (the flush, then the thread's stop, share them). What
        is not delivered by then stays in the queue file for the next flusher."""
        end = time.monotonic() + timeout
        with self._flusher_lock:  # no call may start a flusher thread from now on
            if self._closed:
                return
            self._closed = True
            background = self._flusher
        if background is not None:
            # A quarter (at most 1 s) is kept to stop the flusher: to let the batches in
            # flight settle and give back the rest.
            self._flush(max(0.0, end - time.monotonic() - min(1.0, timeout / 4)))
            background.stop(max(0.0, end - time.monotonic()))
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
            row_id = self.queue.put(event.body, now, self._destination)
        except (QueueFull, StorageError) as exc:
            self._running_flusher()  # a queue found full must still drain
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
        background = self._running_flusher()
        if background is not None:
            background.enqueued()
        return event.message_id

    def _check_cap(self, size: int) -> None:
        self._puts_since_stat += 1
        self._disk_bytes += size
        cap = self.options.max_queue_bytes
        if self._puts_since_stat >= CAP_RESTAT_EVERY or self._disk_bytes >= cap:
            self._puts_since_stat = 0
            self._check_replaced()
            self._disk_bytes = self.queue.used_bytes() + size
        if self._disk_bytes > self.options.max_queue_bytes:
            raise QueueFull(f"queue file {self.queue_path} is over max_queue_bytes "
                            f"({self.options.max_queue_bytes}); is a flusher running?")

    def _check_replaced(self) -> None:
        """A queue file removed or replaced under us (by hand, by a cleanup job): the events
        stored in the old one since are moved to the new one, and that is said."""
        moved = self.queue.reopen_if_replaced()
        if moved is not None:
            with self._ids_lock:  # the moved events have new ids: wait for all of them
                if self._last_id:
                    self._first_id, self._last_id = 1, 2**62
            _say(f"queue file {self.queue_path} was removed or replaced while in use; "
                 f"{moved} event(s) still in the old file were moved to the new one")

    def _drop(self, event: messages.Encoded, exc: Exception) -> None:
        self.dropped += 1
        self._dropped_unflushed += 1
        if self._closed:
            self._warn_closed()
        else:
            self._report_drops(exc)
        telemetry.execute(("segmentry", "enqueue", "drop"), {"count": 1},
                          {"reason": type(exc).__name__, "error": str(exc), "type": event.type,
                           "queue_path": self.queue_path})

    def _report_drops(self, exc: Exception) -> None:
        """Say so at the first drop, then at most once every DROP_LOG_EVERY_S while
        drops go on, with how many since the last report."""
        now = time.monotonic()
        if now - self._last_drop_log < DROP_LOG_EVERY_S:
            return
        self._last_drop_log = now
        count, self._dropped_reported = self.dropped - self._dropped_reported, self.dropped
        _say(f"dropped {count} event(s) since the last report ({self.dropped} in all, "
             f"on_full={self.options.on_full!r}): {exc}")

    def _warn_closed(self) -> None:
        if not self._warned_closed:
            self._warned_closed = True
            warnings.warn("segmentry: an event was recorded on a closed Client and dropped "
                          "(and so will every later one); record events before close(), "
                          "or make a new Client", RuntimeWarning, stacklevel=6)

    def _running_flusher(self) -> Background | FlusherProcess | None:
        """This client's flusher (thread or process), started at the first event, stored
        or refused (a client whose queue was full from the start must still drain it);
        None without one (flusher=None, closed, or it could not start: the call must not
        fail for that)."""
        if self.options.flusher is None or self._flusher is not None:
            return self._flusher
        try:
            return self._start_flusher()
        except Exception:
            logger.exception("segmentry could not start its flusher %s", self.options.flusher)
            return None

    def _start_flusher(self) -> Background | FlusherProcess | None:
        """The flusher, started on the first event; None once closed (a call that raced
        close() stored its event, which the next flusher delivers)."""
        with self._flusher_lock:
            if self._flusher is None and not self._closed:
                self._flusher = self._new_flusher()
                self._flusher.start()
                _close_in_multiprocessing_children()
            return self._flusher

    def _new_flusher(self) -> Background | FlusherProcess:
        if self.options.flusher == "process":
            from ._process import FlusherProcess

            return FlusherProcess(self.write_key or "", self.queue_path, self.options, _say)
        from .flusher import Background  # flusher imports http and requests: load on demand

        return Background(self.write_key or "", self.queue, self.options)

    def _forget_flusher_after_fork(self) -> None:
        if self._flusher is not None:
            self._flusher.abandon()  # the thread did not survive the fork; its lock is the parent's
            self._flusher = None
        self._flusher_lock = threading.Lock()
        self._ids_lock = threading.Lock()


_COMMON = frozenset({"anonymous_id", "timestamp", "integrations", "message_id"})


def _say(message: str) -> None:
    """A warning nobody may miss: through our logger when the application gave it (or an
    ancestor) a handler, else one line on stderr, where the package's NullHandler would
    swallow it. The application's logging is never configured here."""
    if _handled(logger):
        logger.warning("%s", message)
    else:
        sys.stderr.write(f"segmentry: {message}\n")


def _handled(log: logging.Logger | None) -> bool:
    """Whether a record of ``log`` reaches a handler other than a NullHandler."""
    while log is not None:
        if any(not isinstance(h, logging.NullHandler) for h in log.handlers):
            return True
        log = log.parent if log.propagate else None
    return False


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
