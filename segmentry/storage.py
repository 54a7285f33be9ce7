"""The durable queue: its contract (the ``Queue`` protocol, written once here, that the
client, the flusher and the command line are typed against) and its implementation,
``SQLiteQueue``: one SQLite file in WAL mode. The file's schema and upgrades are in
``_schema``, the cutting of a claim's batches in ``_batching``, the file's creation and
what stands in its way in ``_files``; with those, this is the only importer of sqlite3,
and every ``sqlite3.Error`` is translated into ``StorageError`` here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import sqlite3
import stat
import threading
import time
import urllib.parse
import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Callable, Literal, NamedTuple, Protocol, TypeVar

from . import _batching
from ._batching import Row as Row  # re-exported: the type a claim carries
from ._files import create_file, identity, open_failure
from ._schema import APPLICATION_ID as APPLICATION_ID  # re-exported with the version
from ._schema import COVERED, header, initialize, upgrade
from ._schema import SCHEMA_VERSION as SCHEMA_VERSION
from ._schema import snapshot as _snapshot
from ._schema import write as _write
from .exceptions import ConfigurationError, StorageError

logger = logging.getLogger(__name__)

DURABILITY = {"normal": "NORMAL", "full": "FULL"}  # never OFF: a power loss must not corrupt
# No SQLite busy handler: its first wait is a whole millisecond, 5-10 times the write
# transaction it waits for (a producer waiting on its own process's flusher lost a third
# of its time so). We retry ourselves, from 50 µs up, doubling to 1 ms: a producer held
# out a few ms (a flusher process starting the WAL over) waits at most 1 ms past the
# hold (with 5 ms, twice the hold: 4-5 ms for a 2 ms hold).
RETRY_FIRST_S, RETRY_MAX_S = 50e-6, 1e-3
LOCKED_DEADLINE_S = 300.0  # then a "database is locked" becomes a StorageError
PRODUCER_AUTOCHECKPOINT = 16384  # pages; the flusher checkpoints long before this
FULL_AUTOCHECKPOINT = 1000  # pages, with durability="full" (SQLite's default)
# journal_size_limit: how much WAL file a reset keeps, to write over in place. Truncating
# a 35 MB WAL at each reset and growing it again cost producers ~12 % of their rate
# beside the flusher thread (17 ms a truncation here). Shrunk once the queue is empty.
WAL_REUSE_BYTES = 64 << 20  # (at most: see wal_reuse_bytes)
WAL_KEEP_BYTES = 4 << 20  # what an empty queue's WAL may keep
SHRINK_EVERY_S = 60.0  # an emptied queue's WAL is given back at most this often
VACUUM_PAGES = 1024  # free pages (4 MiB) worth giving back once the queue is empty

_INSERT = "INSERT INTO events (body, size, created, dest) VALUES (?, ?, ?, ?)"
_LEASED = f"EXISTS ({COVERED} AND until > :now)"
_HELD = ("SELECT lo, hi, until, dest FROM leases WHERE token = :token AND lo <= :b "
         "AND hi >= :a")
# How many events the leases cover: each lease counts its own (kept exact by _settle).
# Counting them in the events table took a decoded row per event in flight, per claim.
_COVERED_COUNT = "COALESCE(SUM(n), 0)"
NO_DESTINATION = "default"  # how an event without one is named: the flusher's own key


def destination(api_url: str, write_key: str) -> str:
    """A destination as it is shown and logged: the URL and a short hash of the key
    (never the key)."""
    digest = hashlib.sha256(write_key.encode("utf-8", "replace")).hexdigest()[:12]
    return f"{api_url} key sha256:{digest}"
_LEASED_COUNT = f"SELECT {_COVERED_COUNT} FROM leases"


class Claim(NamedTuple):
    token: int
    rows: list[Row]
    dest: int = 0  # the one destination of its rows (see Queue.destinations)


class Claims(NamedTuple):
    batches: list[Claim]  # oldest first, each under a lease token of its own
    deleted: int  # rows of earlier claims deleted in the same transaction


class Wal(NamedTuple):
    """What a checkpoint found: the frames in the WAL, and those it left to checkpoint."""

    frames: int
    left: int


class Stats(NamedTuple):
    depth: int  # waiting or in flight, not dead letters
    bytes: int
    oldest_created: float | None
    dead_letters: int
    in_flight: int


class DeadLetter(NamedTuple):
    id: int
    body: str
    created: float
    buried_at: float
    attempts: int
    status: int | None
    response: str
    destination: str = NO_DESTINATION  # its name (see ``destination``), never the key


class DestinationStats(NamedTuple):
    name: str  # see ``destination``; NO_DESTINATION for events that carry none
    depth: int
    bytes: int
    oldest_created: float | None
    dead_letters: int


T = TypeVar("T")
Delivered = tuple[int, Sequence[int]]  # a claim's token and the ids it delivered


class Queue(Protocol):
    """The queue's contract. Producers ``put`` one event per short write transaction. A
    flusher ``claim``s the oldest ready rows under a lease token, in a short transaction
    (never across a network call), then ``delete``s, ``release``s or ``bury``s them by
    that token: a flusher whose lease was reclaimed cannot touch rows no longer its own.
    Each of those acts on exactly the ids it is given, those the token still holds, and
    returns how many it acted on. Times are epoch seconds, passed in. Every failure is a
    StorageError. Only the holder of the queue's flusher lock claims."""

    path: str
    durability: str

    # -- producers
    def open(self) -> None: ...  # now, so that an unusable file is refused at once
    # The event's JSON and its destination, (write_key, api_url) or None; its id.
    def put(self, body: str, now: float, destination: tuple[str, str] | None = None) -> int: ...
    # Any of them (of that destination, or of any) still here.
    def pending(self, first_id: int, last_id: int,
                destination: tuple[str, str] | None | Literal["any"] = "any") -> bool: ...
    def pending_except(self, dests: Collection[int]) -> bool: ...  # of other destinations
    def used_bytes(self) -> int: ...  # what max_queue_bytes caps
    def reopen_if_replaced(self) -> int | None: ...  # events moved from a removed file
    def close(self) -> None: ...

    # -- the flusher
    def claim_batches(self, count: int, limit: int, max_bytes: int, now: float,
                      lease_s: float, delivered: Sequence[Delivered] = (),
                      partial: bool = True, skip: Collection[int] = ()) -> Claims: ...
    def destinations(self) -> dict[int, tuple[str, str]]: ...  # id: (write_key, api_url)
    def delete(self, token: int, ids: Sequence[int]) -> int: ...  # delivered
    def delete_many(self, delivered: Sequence[Delivered]) -> int: ...
    def release(self, token: int, ids: Sequence[int], not_before: float) -> int: ...
    def bury(self, token: int, ids: Sequence[int], status: int | None, response: str,
             now: float) -> int: ...  # to the dead letters
    def renew(self, tokens: Iterable[int], until: float) -> None: ...  # leases in flight
    def reset_leases(self) -> int: ...  # a new lock holder: every lease left is dead
    # Rows waiting out a backoff (of one destination, or all): ready now.
    def resume(self, now: float, dest: int | None = None) -> int: ...
    def next_ready_at(self, now: float, dest: int | None = None) -> float | None: ...
    def backoff_owner(self) -> str | None: ...  # who earned the stored backoffs
    def set_backoff_owner(self, owner: str) -> None: ...

    # -- upkeep, between claims (see Upkeep); a queue that needs none does nothing
    def set_autocheckpoint(self, pages: int) -> None: ...  # this connection's cadence
    def maintain(self, empty: bool) -> Wal | None: ...  # None: busy
    def checkpoint(self) -> None: ...  # under the lock producers of this object share
    def checkpoint_alone(self, other: Queue) -> None: ...  # writers held out meanwhile

    # -- inspection and dead letters (the command line)
    def stats(self, now: float) -> Stats: ...
    def destination_stats(self, now: float) -> list[DestinationStats]: ...
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...
    def requeue(self, ids: Sequence[int] | None = None) -> int: ...
    def purge(self, ids: Sequence[int] | None = None) -> int: ...
_queues: weakref.WeakSet[SQLiteQueue] = weakref.WeakSet()


def wal_reuse_bytes(max_queue_bytes: int) -> int:
    """The WAL a queue with this cap writes over, not counted in the cap: a quarter of a
    small cap (at least WAL_KEEP_BYTES), so that the cap still bounds the disk used."""
    return min(WAL_REUSE_BYTES, max(WAL_KEEP_BYTES, max_queue_bytes // 4))


class SQLiteQueue:
    """A queue file. Thread-safe; fork-safe (no connection ever crosses a fork)."""

    def __init__(self, path: str, durability: str = "normal",
                 wal_reuse_bytes: int = WAL_REUSE_BYTES, create_dirs: bool = True) -> None:
        """``create_dirs``: create the file's missing directories (0700); False refuses a
        missing one, so that a mistyped path is an error, not a new queue nobody reads."""
        if durability not in DURABILITY:
            raise ConfigurationError(
                f"durability must be one of {sorted(DURABILITY)}, not {durability!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.durability = durability
        self._lock = threading.Lock()  # guards this object's connection
        self._conn: sqlite3.Connection | None = None
        # In FULL mode every commit fsyncs the WAL, and fsyncing a file that keeps growing
        # cost 30-40 % more than reusing a small one: checkpoint (and reuse) it early.
        self._autocheckpoint = (FULL_AUTOCHECKPOINT if durability == "full"
                                else PRODUCER_AUTOCHECKPOINT)
        self.wal_reuse_bytes = wal_reuse_bytes
        self.create_dirs = create_dirs
        self._identity: tuple[int, int] | None = None  # the open file's (device, inode)
        self._shrunk_at = -math.inf
        self._dest_ids: dict[tuple[str, str], int] = {}  # of the open connection's file
        _queues.add(self)

    def open(self) -> None:
        """Open (or create) the file now: a queue that cannot be used is refused with a
        StorageError saying why, instead of at the first event."""
        self._run(lambda conn: None)

    # -- producer side ------------------------------------------------------------

    def put(self, body: str, now: float, destination: tuple[str, str] | None = None) -> int:
        """Store one event's JSON text durably, with its destination (write_key, api_url),
        or None: the flusher's own; return its id (enqueue order)."""
        # One autocommit INSERT is its own write transaction: it takes the write
        # lock before reading, so a busy file fails at once and _run retries it (a
        # deferred BEGIN that upgrades could not be), and it saves two statements. The
        # destination's id is looked up once per connection (see _dest_id).
        with self._lock:  # fast path: the connection is open and the file not locked
            dest = 0 if destination is None else self._dest_ids.get(destination)
            if self._conn is not None and dest is not None:
                try:
                    return self._conn.execute(_INSERT, (body, len(body), now, dest)).lastrowid or 0
                except sqlite3.Error:
                    pass  # a failed statement stored nothing: retry on the slow path

        def insert(conn: sqlite3.Connection) -> int:
            row = (body, len(body), now, self._dest_id(conn, destination))
            return conn.execute(_INSERT, row).lastrowid or 0

        return self._run(insert)

    def _dest_id(self, conn: sqlite3.Connection, destination: tuple[str, str] | None) -> int:
        """The id of a destination in this file, added if new; cached for the connection
        (a replaced file gets a new one, and its own ids)."""
        if destination is None:
            return 0
        if destination not in self._dest_ids:
            conn.execute("INSERT OR IGNORE INTO destinations (write_key, api_url) "
                         "VALUES (?, ?)", destination)
            self._dest_ids[destination] = conn.execute(
                "SELECT id FROM destinations WHERE write_key = ? AND api_url = ?",
                destination).fetchone()[0]
        return self._dest_ids[destination]

    def destinations(self) -> dict[int, tuple[str, str]]:
        """Every destination recorded in the file: id -> (write_key, api_url)."""
        sql = "SELECT id, write_key, api_url FROM destinations"
        return self._run(lambda c: {i: (k, u) for i, k, u in c.execute(sql)})

    def pending_except(self, dests: Collection[int]) -> bool:
        """Whether any event is queued for a destination other than these ids."""
        dests = [int(d) for d in dests]
        sql = f"SELECT 1 FROM events WHERE dest NOT IN ({','.join('?' * len(dests))}) LIMIT 1"
        return self._run(lambda c: c.execute(sql, dests).fetchone() is not None)

    def pending(self, first_id: int, last_id: int,
                destination: tuple[str, str] | None | Literal["any"] = "any") -> bool:
        """Whether any event with an id in [first_id, last_id] is still queued: of that
        destination (None: those that carry none), or of any. A client waits for its
        own: another source's events between them may wait out a pause of their own."""
        sql = "SELECT 1 FROM events WHERE id BETWEEN ? AND ? {}LIMIT 1"
        if destination == "any":
            return self._run(lambda c: c.execute(sql.format(""), (first_id, last_id))
                             .fetchone() is not None)
        where = ("AND dest = 0 " if destination is None else "AND dest = (SELECT id FROM "
                 "destinations WHERE write_key = ? AND api_url = ?) ")
        args = (first_id, last_id, *(destination or ()))
        return self._run(lambda c: c.execute(sql.format(where), args).fetchone() is not None)

    def used_bytes(self) -> int:
        """What max_queue_bytes caps: the pages the data uses, plus a WAL beyond the
        wal_reuse_bytes it writes over. The files' sizes would count free pages and that
        WAL, and hold a small cap full forever with nothing queued (only a write shrinks
        the WAL, and the cap refuses them)."""
        sql = ("SELECT (SELECT page_count FROM pragma_page_count) - (SELECT freelist_count "
               "FROM pragma_freelist_count), (SELECT page_size FROM pragma_page_size)")
        pages, size = self._run(lambda c: c.execute(sql).fetchone())
        return int(pages) * int(size) + max(0, self._file_bytes("-wal") - self.wal_reuse_bytes)

    def disk_bytes(self) -> int:
        """The file and its WAL on disk, as `segmentry status` reports them."""
        return self._file_bytes("") + self._file_bytes("-wal")

    def _file_bytes(self, suffix: str) -> int:
        return _file_size(self.path + suffix)

    # -- flusher side -------------------------------------------------------------

    def claim(self, limit: int, max_bytes: int, now: float, lease_s: float) -> Claim:
        """Lease up to ``limit`` ready rows, oldest first, whose sizes (plus one comma
        each) add up to at most ``max_bytes``; always at least one row if any is ready."""
        claims = self.claim_batches(1, limit, max_bytes, now, lease_s)
        return claims.batches[0] if claims.batches else Claim(0, [])

    def claim_batches(self, count: int, limit: int, max_bytes: int, now: float,
                      lease_s: float, delivered: Sequence[Delivered] = (),
                      partial: bool = True, skip: Collection[int] = ()) -> Claims:
        """Lease up to ``count`` batches at once, each as ``claim`` takes one, each of one
        destination, under a lease token of its own; each is deleted, released or buried
        by its token and ids. The rows of the destinations in ``skip`` (paused) stay. With
        ``partial`` False, only full batches: ``limit`` rows, or cut by ``max_bytes`` or by
        a row that cannot go (the rows after them stay ready). The ``delivered`` (token,
        ids) pairs are deleted, as ``delete`` does, in the lease's transaction. One
        transaction per batch for the claim and one for the delete, each taking the
        connection's lock while eight sender threads held the GIL, made claims take 2 ms
        and deletes 4 ms."""
        # The rows are read before the write lock is taken, so that producers of other
        # processes wait for the lease only, not for the scan (beside a flusher process,
        # 157 track() calls in 100,000 took over 1 ms; 46 now). Safe because only the
        # flusher holding the queue's lock deletes or leases rows: rows read as ready stay
        # so, and their ids are not reused, until it leases them.
        def read() -> list[list[Row]] | None:
            return self._run(lambda c: _ready(c, now, count, limit, max_bytes, partial, skip))

        deleted, batches = 0, read()
        if batches is None:  # a lease ran out (a sender outlived it): end it, read again
            deleted = self._run(lambda c: _in_write(c, lambda: _end_expired(c, delivered, now)))
            delivered, batches = (), read()
        claims = [Claim(random.randint(1, 2**62), b, b[0].dest) for b in batches or ()]
        until = now + lease_s
        return Claims(claims, deleted + self._run(
            lambda c: _in_write(c, lambda: _lease(c, claims, delivered, until))))

    def delete(self, token: int, ids: Sequence[int]) -> int:
        """Remove delivered rows that this lease still holds; return how many. Exactly
        ``ids``: a claim's rows, or a slice of them, go by their id range (two statements,
        not one per row); other sets range by range of consecutive ids."""
        return self.delete_many([(token, ids)])

    def delete_many(self, delivered: Sequence[Delivered]) -> int:
        """``delete`` for several (token, ids) pairs, in one write transaction."""
        if not any(ids for _, ids in delivered):
            return 0
        return self._run(lambda c: _in_write(c, lambda: _delete_all(c, delivered)))

    def release(self, token: int, ids: Sequence[int], not_before: float) -> int:
        """Give rows back after a failed attempt, counting it; they are ready again
        at ``not_before`` (epoch seconds). Exactly ``ids``, as for delete."""
        sql = ("UPDATE events SET attempts = attempts + 1, not_before = ? "
               "WHERE id BETWEEN ? AND ? AND dest = ?")

        def run(conn: sqlite3.Connection) -> int:
            with _write(conn):
                return _settle(conn, token, ids,
                               lambda x, y, d: conn.execute(sql, (not_before, x, y, d)).rowcount)

        return self._run(run)

    def bury(self, token: int, ids: Sequence[int], status: int | None, response: str,
             now: float) -> int:
        """Move rows the receiver rejects to the dead-letter table, with its answer."""
        def one(conn: sqlite3.Connection, event_id: int) -> int:
            moved = conn.execute(
                "INSERT INTO dead_letters (event_id, body, size, created, attempts, "
                "buried_at, status, response, dest) SELECT id, body, size, created, "
                "attempts + 1, ?, ?, ?, dest FROM events WHERE id = ?",
                (now, status, response[:4096], event_id)).rowcount
            conn.execute("DELETE FROM events WHERE id = ?", (event_id,))
            return int(moved)

        def move(conn: sqlite3.Connection) -> int:
            with _write(conn):  # one by one: the ids need not be contiguous
                return sum(_settle(conn, token, [i], lambda x, _, __: one(conn, x))
                           for i in ids)

        return self._run(move)

    def renew(self, tokens: Iterable[int], until: float) -> None:
        """Extend the leases of these tokens to ``until``: a sender may hold a batch
        longer than a lease lasts (retries that wait out long Retry-Afters)."""
        tokens = list(tokens)
        sql = f"UPDATE leases SET until = ? WHERE token IN ({','.join('?' * len(tokens))})"
        if tokens:
            self._run(lambda c: _in_write(c, lambda: c.execute(sql, [until, *tokens])))

    def reset_leases(self) -> int:
        """Make every claimed row ready again: called by a flusher that has just taken
        the queue's lock, so any lease left is a dead flusher's."""
        def run(conn: sqlite3.Connection) -> int:
            with _write(conn):
                leased = conn.execute(_LEASED_COUNT).fetchone()[0]
                conn.execute("DELETE FROM leases")
            return int(leased)

        return self._run(run)

    def resume(self, now: float, dest: int | None = None) -> int:
        """Make unclaimed rows (of destination ``dest``, or all) that wait out a backoff
        ready now (the receiver is back)."""
        sql = (f"UPDATE events SET not_before = 0 WHERE not_before > :now "
               f"{_of_dest(dest)}AND NOT EXISTS ({COVERED})")
        return self._run(lambda c: c.execute(sql, {"now": now, "dest": dest}).rowcount)

    def next_ready_at(self, now: float, dest: int | None = None) -> float | None:
        """When the oldest unclaimed row (of destination ``dest``, or of any) is ready
        (None if there is none)."""
        sql = (f"SELECT MIN(not_before) FROM (SELECT not_before FROM events "
               f"WHERE NOT {_LEASED} {_of_dest(dest)}ORDER BY id LIMIT 1000)")
        value = self._run(lambda c: c.execute(sql, {"now": now, "dest": dest}).fetchone()[0])
        return None if value is None else float(value)

    def backoff_owner(self) -> str | None:
        """The destination whose failures stored the backoffs now in the file on events
        that carry none (see set_backoff_owner; an event that carries its destination
        earned its own); None when none was recorded (a file of segmentry 0.1)."""
        def read(conn: sqlite3.Connection) -> str | None:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                return None  # never written: the table is made by the first owner
            row = conn.execute("SELECT value FROM meta WHERE key = 'backoff_owner'").fetchone()
            return None if row is None else str(row[0])

        return self._run(read)

    def set_backoff_owner(self, owner: str) -> None:
        """Record who earns the backoffs stored from now on: a flusher sending elsewhere
        (the key or URL fixed) must not wait out another destination's. The table is
        made here, not at open, so readers (`segmentry status`) never write the file."""
        def write(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.execute("CREATE TABLE IF NOT EXISTS meta "
                             "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('backoff_owner', ?)", (owner,))

        self._run(write)

    def maintain(self, empty: bool) -> Wal | None:
        """Checkpoint the WAL (the flusher's job, so producers see no checkpoint stalls);
        return its frames and how many are left to checkpoint, None if it was busy. When
        the queue is empty, give back to the file system the free pages a drained backlog
        left, and a WAL grown past WAL_KEEP_BYTES (at most every SHRINK_EVERY_S: a WAL
        truncated and regrown at each idle moment slowed every commit, by 40 % in FULL
        mode)."""
        def run(conn: sqlite3.Connection) -> Wal | None:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if empty:
                vacuum = conn.execute("PRAGMA freelist_count").fetchone()[0] > VACUUM_PAGES
                if vacuum:  # executescript steps it to the end; execute() frees one page
                    conn.executescript("PRAGMA incremental_vacuum;")
                if vacuum or (self._file_bytes("-wal") > WAL_KEEP_BYTES
                              and time.monotonic() - self._shrunk_at > SHRINK_EVERY_S):
                    self._shrunk_at = time.monotonic()
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return None if busy else Wal(frames, frames - done)

        return self._run(run)

    def checkpoint(self) -> None:
        """A PASSIVE checkpoint on this connection, under its lock: the producers that
        share it (a Client's calls) cannot commit meanwhile, so unless another connection
        writes it catches up with the WAL's end, and the next write starts the WAL over
        (see Upkeep.run)."""
        self._run(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    def checkpoint_alone(self, other: Queue) -> None:
        """Hold SQLite's write lock on this connection while ``other`` (a connection of
        its own) checkpoints: no producer of any process commits meanwhile, so it reaches
        the WAL's end, and the next write starts the WAL over (see Upkeep.run)."""
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                other.checkpoint()
            finally:
                conn.execute("ROLLBACK")

        self._run(run)

    # -- status and dead letters -----------------------------------------------------

    def stats(self, now: float) -> Stats:
        def read(conn: sqlite3.Connection) -> Stats:
            depth, size, oldest = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM events").fetchone()
            flying = conn.execute(f"{_LEASED_COUNT} WHERE until > ?", (now,)).fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            return Stats(depth, size, oldest, dead, flying)

        return self._run(read)

    def destination_stats(self, now: float) -> list[DestinationStats]:
        """The events and dead letters of each destination, by name (never the key)."""
        return self._run(lambda conn: _destination_stats(conn, SCHEMA_VERSION))

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self._run(lambda c: _dead_letters(c, limit, SCHEMA_VERSION))

    def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters (all, or those ids) back at the end of the queue, as they were."""
        where, args = _ids_clause(ids)

        def move(conn: sqlite3.Connection) -> int:
            with _write(conn):
                conn.execute(
                    "INSERT INTO events (body, size, created, dest) SELECT body, size, "
                    f"created, dest FROM dead_letters {where} ORDER BY id", args)
                return conn.execute(f"DELETE FROM dead_letters {where}", args).rowcount

        return self._run(move)

    def purge(self, ids: Sequence[int] | None = None) -> int:
        where, args = _ids_clause(ids)
        sql = f"DELETE FROM dead_letters {where}"
        return self._run(lambda c: _in_write(c, lambda: c.execute(sql, args).rowcount))

    def integrity_check(self) -> str:
        return str(self._run(lambda c: c.execute("PRAGMA integrity_check").fetchone()[0]))

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- plumbing -------------------------------------------------------------------

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn on this process's connection, retrying while the file is locked;
        translate every other sqlite3 error into StorageError."""
        deadline = time.monotonic() + LOCKED_DEADLINE_S
        delay = RETRY_FIRST_S
        while True:
            with self._lock:
                try:
                    conn = self._conn or self._open()
                    return fn(conn)
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc) or time.monotonic() > deadline:
                        raise self._error(exc) from exc
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
            time.sleep(random.uniform(delay / 2, delay))  # busy: let the lock holder finish
            delay = min(delay * 2, RETRY_MAX_S)

    def _error(self, exc: sqlite3.Error) -> StorageError:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            # The -wal and -shm go with it: a stale WAL would be replayed into a new file.
            p = self.path
            return StorageError(f"{p} is corrupt or not a SQLite database ({text}); stop every "
                                f"process using it and move it aside to start a new queue: "
                                f"mv {p} {p}.corrupt (and {p}-wal, {p}-shm if present)")
        if "unable to open database file" in text:
            return StorageError(f"cannot open queue file {self.path}: {open_failure(self.path)}")
        if "readonly" in text:  # opened, but SQLite could not write it or its -wal/-shm
            return StorageError(f"cannot write queue file {self.path}: "
                                f"{open_failure(self.path, text)}")
        return StorageError(f"queue file {self.path}: {text}")

    def _open(self) -> sqlite3.Connection:
        create_file(self.path, self.create_dirs)
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None,
                               check_same_thread=False)
        try:
            self._check_or_init(conn)
            conn.execute(f"PRAGMA synchronous={DURABILITY[self.durability]}")
            conn.execute(f"PRAGMA wal_autocheckpoint={self._autocheckpoint}")
            conn.execute(f"PRAGMA journal_size_limit={self.wal_reuse_bytes}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._identity = identity(self.path)
        return conn

    def reopen_if_replaced(self) -> int | None:
        """If the file open here was removed or replaced since (an open connection goes on
        writing to the old one, which no other process sees and which is gone once it is
        closed), move the events still in it into the file now at the path, created if
        need be, and return how many; None when it was not replaced. A stat() a call."""
        with self._lock:
            if self._conn is None or identity(self.path) == self._identity:
                return None
            try:
                rows = self._conn.execute(
                    "SELECT body, size, created, write_key, api_url FROM events LEFT JOIN "
                    "destinations ON destinations.id = dest ORDER BY events.id").fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            self._close()

        def move(conn: sqlite3.Connection) -> None:
            # Events of a batch in flight are moved too: sent twice at worst, never lost.
            with _write(conn):
                conn.executemany(_INSERT, [
                    (body, size, created, self._dest_id(conn, None if key is None else (key, url)))
                    for body, size, created, key, url in rows])

        self._run(move)
        return len(rows)

    def _check_or_init(self, conn: sqlite3.Connection) -> None:
        app_id, version, tables = header(conn)
        if app_id == 0 and tables == 0:
            initialize(conn)
            app_id, version, tables = header(conn)
        _refuse_foreign(self.path, app_id, version)
        if version < SCHEMA_VERSION:
            upgrade(conn)

    def _close(self) -> None:
        self._dest_ids.clear()  # ids of that file's
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def set_autocheckpoint(self, pages: int) -> None:
        """The flusher's connection checkpoints; producers' almost never do."""
        self._autocheckpoint = pages
        with self._lock:
            self._close()



# The WAL checkpoint cadence of a flusher. Producers that commit without a pause leave no
# moment at which a checkpoint beside them reaches the WAL's end, so the WAL never starts
# over by itself; at 60 k events/s they write ~230 MB of it a second (a page per commit),
# and it must start over before their own checkpoint at 64 MB (PRODUCER_AUTOCHECKPOINT):
# a 30-60 ms stall of one producer's call, copying what the flusher had not. A flusher
# process looks every 0.1 s (at 0.25 s the WAL still reached 64 MB in 2 runs of 4); a
# pass with nothing new to copy costs no fsync.
MAINTAIN_EVERY_S = 0.1
THREAD_MAINTAIN_EVERY_S = 0.25  # the flusher thread's (its producers share its lock)
TAIL_FRAMES = 2048  # what a checkpoint may leave for the one that holds the producers
# A flusher process holds the producers (SQLite's write lock) for that last checkpoint
# only when the WAL is this big: a few ms once per 8 MB, not at every upkeep (a producer
# writing a thousand events a second would see it every 250 calls).
RESTART_FRAMES = 2048
RESTART_PASSES = 3  # passes beside the producers, at most, before the one that holds them
ALONE_FRAMES = 512  # what that one may be left to copy (a few ms with its two fsyncs)
FLUSHER_AUTOCHECKPOINT = 1000  # pages: the flusher's commits checkpoint, producers' do not


class Upkeep:
    """The WAL upkeep a flusher does for its queue, so that producers see no checkpoint
    stalls. ``checkpoints``: a second connection to run them on when ``queue`` is shared
    with producers (a Client's thread); on the shared one they would stall every
    producer of the process. A flusher process opens its second connection when the WAL
    first needs to start over (see run)."""

    def __init__(self, queue: Queue, checkpoints: Queue | None = None) -> None:
        self.queue, self.checkpoints = queue, checkpoints
        self.every_s = MAINTAIN_EVERY_S if checkpoints is None else THREAD_MAINTAIN_EVERY_S
        self.last = -math.inf  # the clock's time of the last upkeep
        self._alone: Queue | None = None  # a flusher process's second connection

    def start(self) -> None:
        """The flusher has the queue: its own connection's commits checkpoint, not the
        producers' (with a checkpoints connection, that one's run() does)."""
        if self.checkpoints is None:
            self.queue.set_autocheckpoint(FLUSHER_AUTOCHECKPOINT)

    def due(self, now: float) -> bool:
        return now - self.last >= self.every_s

    def run(self, empty: bool, now: float) -> None:
        """Checkpoint the WAL if due (always when the queue is ``empty``, which also gives
        space back: see SQLiteQueue.maintain). A failure is logged: tried again later."""
        if not empty and not self.due(now):
            return
        self.last = now
        try:
            wal = (self.checkpoints or self.queue).maintain(empty)
            if wal is None:
                return  # busy: next time
            # The checkpoint above ran beside producers and does not reach the WAL's end
            # while they commit, so the WAL does not start over. The frames they added
            # meanwhile, checkpointed with them held, take a few ms; the WAL starts over
            # at the next write. The thread holds them with their connection's lock
            # (they are all in its process), a flusher process with SQLite's write lock.
            if self.checkpoints is not None and wal.left <= TAIL_FRAMES:
                self.queue.checkpoint()
            elif self.checkpoints is None and wal.frames >= RESTART_FRAMES:
                self._start_over()
        except StorageError as exc:
            logger.warning("queue maintenance failed: %s", exc)

    def _start_over(self) -> None:
        """A flusher process: checkpoint beside the producers until the rest is short
        (each pass copies what they added during the one before), then the rest with
        SQLite's write lock held, which holds producers of every process."""
        second = self._second()
        for _ in range(RESTART_PASSES):
            wal = second.maintain(False)
            if wal is None:
                return
            if wal.left <= ALONE_FRAMES:
                self.queue.checkpoint_alone(second)
                return

    def _second(self) -> Queue:
        if self._alone is None:
            self._alone = SQLiteQueue(self.queue.path, self.queue.durability)
        return self._alone

    def close(self) -> None:
        if self._alone is not None:
            self._alone.close()


def _ready(conn: sqlite3.Connection, now: float, count: int, limit: int, max_bytes: int,
           partial: bool, skip: Collection[int]) -> list[list[Row]] | None:
    """The batches a claim would lease, read in one read transaction (no write lock);
    None when a lease has run out (a sender that outlived it): the claim ends the
    expired leases and reads again, so that every lease the scan sees is live."""
    with _snapshot(conn):
        start, hi, expired = _leased_prefix(conn, now)
        if expired:
            return None
        return _batching.read(conn, {"now": now, "hi": hi, "start": start}, count, limit,
                              max_bytes, partial, skip)


def _end_expired(conn: sqlite3.Connection, delivered: Sequence[Delivered],
                 now: float) -> int:
    """End the leases that ran out, once what they delivered is deleted."""
    deleted = _delete_all(conn, delivered)
    conn.execute("DELETE FROM leases WHERE until <= ?", (now,))
    return deleted


def _lease(conn: sqlite3.Connection, claims: list[Claim], delivered: Sequence[Delivered],
           until: float) -> int:
    """Delete what was delivered, and lease the claims' rows in one statement (executemany
    steps, and gives the GIL away, per row); return how many rows were deleted."""
    deleted = _delete_all(conn, delivered)
    if claims:
        values = [(c.rows[0].id, c.rows[-1].id, c.token, until, c.dest, len(c.rows))
                  for c in claims]
        conn.execute(f"INSERT INTO leases VALUES {_tuples(len(values), 6)}",
                     [v for row in values for v in row])
    return deleted


def _leased_prefix(conn: sqlite3.Connection, now: float) -> tuple[int, int, bool]:
    """(start, hi, expired): ``hi`` is the highest id under a lease, so rows past it need
    no lease check. When every row up to ``hi`` is leased (the batches in flight at the
    head of the queue: the common case), the scan starts past them too (``start``);
    looking up 800 of them took as long as reading the rows a claim takes. ``expired``:
    a lease has run out (see _ready)."""
    sql = (f"SELECT {_COVERED_COUNT}, COALESCE(MAX(hi), 0), (SELECT COUNT(*) FROM events "
           f"WHERE id <= (SELECT MAX(hi) FROM leases)), MIN(until) <= ? FROM leases")
    leased, hi, rows, expired = conn.execute(sql, (now,)).fetchone()
    if not leased:
        return 0, 0, bool(expired)
    return (hi if rows == leased else 0), hi, bool(expired)


def _delete_all(conn: sqlite3.Connection, delivered: Sequence[Delivered]) -> int:
    """Delete each pair's rows that its token still holds, and end their leases. When
    every pair is a whole batch still leased, given whole (the common case), three
    statements do it all; else, pair by pair."""
    pairs = [(min(ids), max(ids), token) for token, ids in delivered if ids]
    if not pairs:
        return 0
    sql = "DELETE FROM events WHERE id BETWEEN ? AND ? AND dest = ?"
    if not all(_spans(conn, ids) for _, ids in delivered if ids):
        return sum(_settle(conn, token, ids,
                           lambda x, y, d: conn.execute(sql, (x, y, d)).rowcount)
                   for token, ids in delivered)
    which = f"(lo, hi, token) IN (VALUES {_tuples(len(pairs), 3)})"
    flat = [v for pair in pairs for v in pair]
    dests = dict(conn.execute(f"SELECT lo, dest FROM leases WHERE {which}", flat).fetchall())
    if len(dests) == len(pairs):
        conn.execute(f"DELETE FROM leases WHERE {which}", flat)
        ranges = " OR ".join(["(id BETWEEN ? AND ? AND dest = ?)"] * len(pairs))
        return int(conn.execute(f"DELETE FROM events WHERE {ranges}",
                                [v for lo, hi, _ in pairs for v in (lo, hi, dests[lo])]).rowcount)
    return sum(_settle(conn, token, ids, lambda x, y, d: conn.execute(sql, (x, y, d)).rowcount)
               for token, ids in delivered)


def _tuples(count: int, width: int) -> str:
    """``count`` SQL row values of ``width`` parameters: (?, ?), (?, ?)."""
    return ", ".join(["(" + ", ".join("?" * width) + ")"] * count)


def _spans(conn: sqlite3.Connection, ids: Sequence[int]) -> bool:
    """Whether the events of one destination from min(ids) to max(ids) are exactly
    ``ids``, so that a statement on the id range and the destination acts on those and
    no other (a claim's rows given whole, or a slice of them: the flusher's case)."""
    a, b = min(ids), max(ids)
    if b - a + 1 == len(ids) == len(set(ids)):
        return True  # every id in the range was given
    found = conn.execute("SELECT group_concat(id) FROM (SELECT id FROM events WHERE id "
                         "BETWEEN ? AND ? AND dest = (SELECT dest FROM events WHERE id = ?) "
                         "ORDER BY id)", (a, b, a)).fetchone()[0]
    return bool(found == ",".join(map(str, sorted(set(ids)))))


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """``ids`` as ranges of consecutive integers: a statement on one touches those only."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def _settle(conn: sqlite3.Connection, token: int, ids: Sequence[int],
            act: Callable[[int, int, int], int]) -> int:
    """``act`` on exactly the events ``ids`` that ``token`` still holds: range by range
    when they are not one span of events (see _spans)."""
    if not ids:
        return 0
    if not _spans(conn, ids):
        return sum(_settle_range(conn, token, a, b, act) for a, b in _runs(ids))
    return _settle_range(conn, token, min(ids), max(ids), act)


def _settle_range(conn: sqlite3.Connection, token: int, a: int, b: int,
                  act: Callable[[int, int, int], int]) -> int:
    """For each of ``token``'s leases that meets [a, b], ``act`` on the events of the
    overlap [x, y] of the lease's destination d (``act(x, y, d)``: return how many), then
    cut it out of the lease. A token (a batch: one destination) whose leases were reset,
    or expired and were deleted by a claim, holds nothing: its rows may be another
    claim's now."""
    exact = "DELETE FROM leases WHERE lo = ? AND hi = ? AND token = ? RETURNING dest"
    whole = conn.execute(exact, (a, b, token)).fetchall()
    if whole:  # a whole batch: the common case
        return act(a, b, whole[0][0])
    done = 0
    for lo, hi, until, dest in conn.execute(_HELD, {"token": token, "a": a, "b": b}).fetchall():
        x, y = max(lo, a), min(hi, b)
        done += act(x, y, dest)
        conn.execute("DELETE FROM leases WHERE lo = ?", (lo,))
        for left, right in ((lo, x - 1), (y + 1, hi)):  # what is left on either side,
            if left <= right:  # narrowed to its events, so that its ends exist
                first, last, count = conn.execute(
                    "SELECT MIN(id), MAX(id), COUNT(*) FROM events WHERE id BETWEEN ? AND ? "
                    "AND dest = ?", (left, right, dest)).fetchone()
                if first is not None:
                    conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?)",
                                 (first, last, token, until, dest, count))
    return done


def _of_dest(dest: int | None) -> str:
    """The condition on ``events`` for one destination (:dest), or none for all."""
    return "" if dest is None else "AND events.dest = :dest "


def _names(conn: sqlite3.Connection) -> dict[int, str]:
    """Each destination's name (see ``destination``): never the key itself."""
    sql = "SELECT id, write_key, api_url FROM destinations"
    names = {i: destination(url, key) for i, key, url in conn.execute(sql)}
    names[0] = NO_DESTINATION
    return names


def _destination_stats(conn: sqlite3.Connection, version: int) -> list[DestinationStats]:
    """Per destination: its events and dead letters; every destination recorded, and
    NO_DESTINATION when it has any (a file older than schema 4 has those only)."""
    by = "dest" if version >= 4 else "0"
    names = _names(conn) if version >= 4 else {0: NO_DESTINATION}
    counts: dict[int, list[Any]] = {}
    sql = f"SELECT {by}, COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM events GROUP BY 1"
    for dest, depth, size, oldest in conn.execute(sql):
        counts[dest] = [depth, size, oldest, 0]
    for dest, dead in conn.execute(f"SELECT {by}, COUNT(*) FROM dead_letters GROUP BY 1"):
        counts.setdefault(dest, [0, 0, None, 0])[3] = dead
    for dest in names:  # a destination recorded whose events all went: zeros
        if dest:
            counts.setdefault(dest, [0, 0, None, 0])
    return [DestinationStats(names.get(dest, f"destination {dest}"), *values)
            for dest, values in sorted(counts.items())]


def _dead_letters(conn: sqlite3.Connection, limit: int, version: int) -> list[DeadLetter]:
    names = _names(conn) if version >= 4 else {}
    dest = "dest" if version >= 4 else "0"
    sql = ("SELECT id, body, created, buried_at, attempts, status, response, "
           f"{dest} FROM dead_letters ORDER BY id LIMIT ?")
    return [DeadLetter(i, body, created, buried, tries, status, text,
                       names.get(d, NO_DESTINATION))
            for i, body, created, buried, tries, status, text, d in conn.execute(sql, (limit,))]


def _in_write(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    with _write(conn):
        return fn()


def _ids_clause(ids: Sequence[int] | None) -> tuple[str, list[Any]]:
    if ids is None:
        return "", []
    ids = [int(i) for i in ids]
    return f"WHERE id IN ({','.join('?' * len(ids))})" if ids else "WHERE 0", ids


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the file, or (SQLITE_PROTOCOL, "locking protocol") WAL
    recovery after a crashed process is racing us: both pass if we try again."""
    text = str(exc)
    return "locked" in text or "busy" in text or "locking protocol" in text


_forking: list[SQLiteQueue] = []


def _before_fork() -> None:
    _forking[:] = list(_queues)
    for queue in _forking:
        queue._lock.acquire()
        queue._close()  # the parent reopens lazily; the child never sees this connection


def _after_fork_parent() -> None:
    for queue in _forking:
        queue._lock.release()
    _forking.clear()


def _after_fork_child() -> None:
    for queue in _forking:
        queue._lock = threading.Lock()
    _forking.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                        after_in_child=_after_fork_child)


def default_queue_path() -> str:
    """A per-user state directory ($SEGMENTRY_QUEUE is read with the other options)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "segmentry", "queue.db")


# -- read-only inspection (`segmentry status`, `dead-letters list`) ---------------------------


class Inspection(NamedTuple):
    stats: Stats
    dead_letters: list[DeadLetter]  # the oldest, as many as asked for
    disk_bytes: int  # the file and its WAL
    destinations: list[DestinationStats] = []


def inspect(path: str, now: float, letters: int = 0) -> Inspection | None:
    """Read a queue file without writing to it or creating any file (not even -wal or
    -shm): None when there is no file yet. A file that cannot be read is a StorageError
    saying why (permission, corrupt, another application's file, a newer schema); a file
    that exists but was never initialized (0 bytes) is an empty queue."""
    path = os.path.abspath(path)
    if not _visible(path):
        return None
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix) and not os.access(path + suffix, os.R_OK):
            raise StorageError(f"cannot read queue file {path}{suffix}: "
                               f"{_denied(path + suffix)}")
    try:
        conn = _open_read_only(path)
        try:
            return _inspect(conn, path, now, letters)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _read_error(path, exc) from exc


def _visible(path: str) -> bool:
    """Whether the file exists; a directory we may not search is no answer (os.path.exists
    would say False, and a queue holding events would be reported empty)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise StorageError(f"cannot read queue file {path}: permission denied on "
                           f"{os.path.dirname(path)}; run as the queue's owner or a member "
                           "of its group") from None
    return True


def _denied(path: str) -> str:
    info = os.stat(path)
    return (f"permission denied (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); "
            "run as its owner or a member of its group")


def _open_read_only(path: str) -> sqlite3.Connection:
    # With no WAL file no connection is open (SQLite removes it when the last closes), so
    # the file alone is the whole queue: read it as immutable, which takes no lock and
    # creates no -shm. Otherwise read through the WAL, whose -shm exists already.
    immutable = "&immutable=1" if not os.path.exists(path + "-wal") else ""
    uri = f"file:{urllib.parse.quote(path)}?mode=ro{immutable}"
    return sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)


def _refuse_foreign(path: str, app_id: int, version: int) -> None:
    """A file that is not a segmentry queue, or one of a newer segmentry, is left alone."""
    if app_id != APPLICATION_ID:
        raise StorageError(f"{path} is not a segmentry queue (another application's "
                           "SQLite file); it was left untouched")
    if version > SCHEMA_VERSION:
        raise StorageError(f"{path} has queue schema {version}, newer than this "
                           f"segmentry's ({SCHEMA_VERSION}); upgrade segmentry")


def _inspect(conn: sqlite3.Connection, path: str, now: float, letters: int) -> Inspection:
    disk = _file_size(path) + _file_size(path + "-wal")
    conn.execute("BEGIN")  # one snapshot for every count
    app_id, version, tables = header(conn)
    if app_id == 0 and tables == 0:
        return Inspection(Stats(0, 0, None, 0, 0), [], disk, [])
    _refuse_foreign(path, app_id, version)
    depth, size, oldest = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM events").fetchone()
    # Older schemas kept leases elsewhere; their leases are a stopped flusher's anyway.
    flying = conn.execute(f"{_LEASED_COUNT} WHERE until > ?", (now,)).fetchone()[0] \
        if version == SCHEMA_VERSION else 0
    dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    listed = _dead_letters(conn, letters, version)
    return Inspection(Stats(depth, size, oldest, dead, flying), listed, disk,
                      _destination_stats(conn, version))


def _file_size(path: str) -> int:
    """stat() only, never open(): closing a descriptor of the file would drop SQLite's
    locks. 0 for a file that is not there, or no longer: SQLite removes the WAL when the
    last connection closes, also between an exists() and a stat() (a scrape got a 500)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_error(path: str, exc: sqlite3.Error) -> StorageError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return StorageError(f"{path} is corrupt or not a SQLite database ({text}); stop every "
                            f"process using it and move it aside to start a new queue: "
                            f"mv {path} {path}.corrupt (and {path}-wal, {path}-shm if present)")
    if "unable to open" in text:
        return StorageError(f"cannot read queue file {path}: {text} (its -wal or -shm "
                            "beside it may be missing or unreadable)")
    return StorageError(f"queue file {path}: {text}")
