"""The queue file's schema, its header (application id, version) and its upgrades: how
a file is recognised, created, and brought to SCHEMA_VERSION. Private to storage."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

APPLICATION_ID = 0x53474D54  # "SGMT" in the file header: marks a segmentry queue
SCHEMA_VERSION = 4  # 4: events carry their destination; 3: a lease per batch (2: a lease
# row per event; 1: in the events rows)

# A claim adds one row here per batch: the id range [lo, hi] of its rows. The events'
# rows (their bodies' pages) are not rewritten between their insert and their delete
# (schema 1 did: claim + delete 7.1 µs an event), nor is a row added per event (schema
# 2: 4.3 µs; now 2.9, against 2.5 for the bare read and delete). An event is leased
# while a lease with a future ``until`` covers its id. Invariants, kept by claim and by
# _settle, among the events of one destination (a batch holds one destination's, and
# the destinations' events interleave): its live ranges never overlap, every event of it
# inside a range is one the claim took, and the events at lo and hi exist; so a new
# event's id (max(id) + 1) never falls inside a range; ``n`` counts those events.
# Schema 1 kept lease columns in events; an upgraded file keeps them, unused.
LEASES_SCHEMA = """
CREATE TABLE leases (
    lo INTEGER PRIMARY KEY,                 -- the batch's first event id
    hi INTEGER NOT NULL,                    -- and its last
    token INTEGER NOT NULL,
    until REAL NOT NULL,
    dest INTEGER NOT NULL,                  -- the destination of the events it covers
    n INTEGER NOT NULL                      -- how many they are
);
"""

# Where an event goes: the write key and api_url of the client that enqueued it (the
# queue file holds write keys, hence its 0600/0660 mode). An event's dest 0 names none
# (a key-less producer's, or a file older than schema 4): the flusher's own key and URL.
DESTINATIONS_SCHEMA = """
CREATE TABLE destinations (
    id INTEGER PRIMARY KEY,
    write_key TEXT NOT NULL,
    api_url TEXT NOT NULL,
    UNIQUE (write_key, api_url)
);
"""

SCHEMA = """
CREATE TABLE events (
    -- enqueue order. Not AUTOINCREMENT (+6 µs a commit): an id is reused only after
    -- the queue emptied up to it, and leases are checked by token, not by id alone.
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL,                     -- the event's final JSON text
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,     -- backoff survives restarts
    dest INTEGER NOT NULL DEFAULT 0         -- destinations.id, or 0: the flusher's own
);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL,
    buried_at REAL NOT NULL,
    status INTEGER,
    response TEXT NOT NULL,
    dest INTEGER NOT NULL DEFAULT 0
);
""" + LEASES_SCHEMA + DESTINATIONS_SCHEMA


# The condition "a lease covers this event" (live or not: claims delete expired ones).
COVERED = ("SELECT 1 FROM leases WHERE lo <= events.id AND hi >= events.id "
           "AND leases.dest = events.dest")


def header(conn: sqlite3.Connection) -> tuple[int, int, int]:
    # One statement, so one snapshot: read one by one, a file another process is
    # initializing could show application_id 0 (before its commit) and tables (after).
    row = conn.execute("SELECT (SELECT application_id FROM pragma_application_id), "
                       "(SELECT user_version FROM pragma_user_version), "
                       "(SELECT COUNT(*) FROM sqlite_master)").fetchone()
    return row[0], row[1], row[2]


def initialize(conn: sqlite3.Connection) -> None:
    # auto_vacuum must be set before the first table exists; WAL outside a transaction.
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    with write(conn):
        if header(conn) != (0, 0, 0):
            return  # another process initialized it first
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def upgrade(conn: sqlite3.Connection) -> None:
    """Schema 1, 2 or 3 -> 4: a lease per batch of one destination, in a table of its
    own; events and dead letters carry a destination (0, none, for those already there:
    they go with the flusher's own key, as before). The leases a file holds are dropped:
    they are a dead flusher's, which the next one would reset anyway (a running older
    flusher fails on the new tables: every process sharing a queue is upgraded together,
    as the README says). ADD COLUMN with a constant default rewrites no row."""
    with write(conn):
        version = header(conn)[1]
        if version >= SCHEMA_VERSION:
            return  # another process upgraded it first
        conn.execute("DROP TABLE IF EXISTS leases")
        conn.execute(LEASES_SCHEMA)
        conn.execute(DESTINATIONS_SCHEMA)
        for table in ("events", "dead_letters"):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN dest INTEGER NOT NULL DEFAULT 0")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[None]:
    """An explicit BEGIN IMMEDIATE: the write lock is taken up front (a busy file is
    retried by SQLiteQueue._run), instead of a deferred read that cannot upgrade when
    another wrote."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Never leave a transaction open, even after a failed COMMIT: the producers'
        # autocommit INSERTs on this connection would silently join it.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: the statements inside see one state of the file, and take no
    write lock (in WAL mode, writers go on beside it)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")  # a read transaction: ending it writes nothing
