"""The storage contract: put / claim / delete / release / bury by lease token, the
file's identity and modes, and what is refused without touching the file."""

from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest

from segmentry import storage
from segmentry.exceptions import ConfigurationError, StorageError
from segmentry.storage import (
    APPLICATION_ID,
    NO_DESTINATION,
    SCHEMA_VERSION,
    SHRINK_EVERY_S,
    TAIL_FRAMES,
    WAL_KEEP_BYTES,
    SQLiteQueue,
    Upkeep,
    Wal,
    destination,
    inspect,
)

NOW = 1_800_000_000.0
BIG = 10**9  # a byte budget that never limits


@pytest.fixture
def queue(tmp_path):
    q = SQLiteQueue(str(tmp_path / "q.db"))
    yield q
    q.close()


def fill(queue, n, size=10):
    return [queue.put(f'{{"i":{i},"pad":"{"x" * size}"}}', NOW) for i in range(n)]


def test_put_returns_increasing_ids_in_enqueue_order(queue):
    ids = fill(queue, 5)
    assert ids == sorted(ids) and len(set(ids)) == 5


def test_claim_takes_the_oldest_rows_first_up_to_the_limit(queue):
    ids = fill(queue, 10)
    claim = queue.claim(4, BIG, NOW, 60)
    assert [r.id for r in claim.rows] == ids[:4]
    assert claim.rows[0].body.startswith('{"i":0')


def test_claimed_rows_are_not_claimed_twice_while_leased(queue):
    ids = fill(queue, 6)
    first = queue.claim(3, BIG, NOW, 60)
    second = queue.claim(10, BIG, NOW, 60)
    assert [r.id for r in second.rows] == ids[3:]
    assert first.token != second.token


def test_claim_respects_the_byte_budget_but_always_takes_one_row(queue):
    fill(queue, 5, size=100)
    size = len('{"i":0,"pad":""}') + 100
    assert len(queue.claim(10, 2 * (size + 1), NOW, 60).rows) == 2
    queue.put('{"big":"%s"}' % ("x" * 5000), NOW)
    other = SQLiteQueue(queue.path)
    assert len(other.claim(10, 10, NOW, 60).rows) == 1


def test_delete_by_token_removes_only_that_lease(queue):
    fill(queue, 4)
    a = queue.claim(2, BIG, NOW, 60)
    b = queue.claim(2, BIG, NOW, 60)
    assert queue.delete(a.token, [r.id for r in b.rows]) == 0
    assert queue.delete(a.token, [r.id for r in a.rows]) == 2
    assert queue.stats(NOW).depth == 2


@pytest.mark.parametrize("act", ["delete", "release", "delete_many"])
def test_settling_acts_on_exactly_the_ids_given_not_their_range(queue, act):
    """delete(token, [1, 3]) on a claim of rows 1-3 must leave row 2 (never delivered)."""
    ids = fill(queue, 3)
    claim = queue.claim(3, BIG, NOW, 60)
    ends = [ids[0], ids[2]]
    if act == "delete":
        assert queue.delete(claim.token, ends) == 2
    elif act == "delete_many":
        assert queue.delete_many([(claim.token, ends)]) == 2
    else:
        assert queue.release(claim.token, ends, NOW) == 2
    left = queue.stats(NOW)
    assert left.depth == (1 if act != "release" else 3)
    assert left.in_flight == 1  # row 2 is still the claim's, untouched
    assert queue.delete(claim.token, [ids[1]]) == 1


def test_expired_lease_is_claimable_again_and_the_old_token_is_powerless(queue):
    fill(queue, 3)
    old = queue.claim(3, BIG, NOW, 10)
    new = queue.claim(3, BIG, NOW + 11, 10)
    assert [r.id for r in new.rows] == [r.id for r in old.rows]
    assert queue.delete(old.token, [r.id for r in old.rows]) == 0
    assert queue.release(old.token, [r.id for r in old.rows], 0) == 0
    assert queue.delete(new.token, [r.id for r in new.rows]) == 3


def test_release_counts_the_attempt_and_delays_the_rows(queue):
    fill(queue, 2)
    claim = queue.claim(2, BIG, NOW, 60)
    assert queue.release(claim.token, [r.id for r in claim.rows], NOW + 30) == 2
    assert queue.claim(2, BIG, NOW + 29, 60).rows == []
    assert queue.next_ready_at(NOW) == NOW + 30
    again = queue.claim(2, BIG, NOW + 30, 60)
    assert [r.attempts for r in again.rows] == [1, 1]


def test_claim_batches_cuts_several_batches_each_under_a_token_of_its_own(queue):
    ids = fill(queue, 7, size=0)
    size = len('{"i":0,"pad":""}') + 1
    claims = queue.claim_batches(3, 2, BIG, NOW, 60)
    assert [[r.id for r in c.rows] for c in claims.batches] == [ids[0:2], ids[2:4], ids[4:6]]
    assert len({c.token for c in claims.batches}) == 3 and claims.deleted == 0
    # bytes cut a batch as claim() does; the rows after the last batch stay ready
    by_bytes = SQLiteQueue(queue.path).claim_batches(2, 10, size, NOW, 60)
    assert [[r.id for r in c.rows] for c in by_bytes.batches] == [ids[6:7]]


def test_a_claim_reads_its_rows_without_holding_the_write_lock(queue, monkeypatch):
    # Producers of other processes wait for a claim's lease only, not for its scan: a
    # producer commits while the claim reads (timeout=0: a held write lock would refuse
    # it at once). The claim reads one state of the file: the new row is not in it.
    from segmentry import _batching

    for _ in range(3):
        queue.put("{}", NOW)
    scan = _batching.read

    def read_while_a_producer_commits(conn, *args):
        producer = sqlite3.connect(queue.path, timeout=0, isolation_level=None)
        try:
            producer.execute("INSERT INTO events (body, size, created) VALUES ('{}', 2, 0)")
        finally:
            producer.close()
        return scan(conn, *args)

    monkeypatch.setattr(_batching, "read", read_while_a_producer_commits)
    claims = queue.claim_batches(4, 10, 10_000, NOW, 60.0)
    assert [[r.id for r in c.rows] for c in claims.batches] == [[1, 2, 3]]
    monkeypatch.setattr(_batching, "read", scan)
    assert [r.id for r in queue.claim(10, 10_000, NOW, 60.0).rows] == [4]


def test_claim_batches_deletes_what_was_delivered_first_and_only_that(queue):
    ids = fill(queue, 6)
    a, b = queue.claim_batches(2, 2, BIG, NOW, 60).batches
    delivered = [(a.token, [r.id for r in a.rows]), (b.token, [b.rows[0].id]),
                 (999, [b.rows[1].id])]  # a token that does not hold the row: no effect
    claims = queue.claim_batches(1, 10, BIG, NOW, 60, delivered)
    assert claims.deleted == 3
    assert [r.id for r in claims.batches[0].rows] == ids[4:]
    assert queue.delete(b.token, [b.rows[1].id]) == 1  # still b's
    assert queue.stats(NOW).depth == 2


def test_a_row_that_cannot_go_ends_the_batch_before_it(queue):
    """A batch's lease is its id range, so a batch never spans a row it does not take."""
    ids = fill(queue, 4)
    a = queue.claim(1, BIG, NOW, 60)
    queue.claim(1, BIG, NOW, 60)  # ids[1] stays leased, in the middle
    queue.release(a.token, [ids[0]], NOW)
    claims = queue.claim_batches(3, 10, BIG, NOW, 60)
    assert [[r.id for r in c.rows] for c in claims.batches] == [[ids[0]], ids[2:]]
    assert queue.stats(NOW).in_flight == 4


def test_a_leased_row_ends_the_batch_before_it_when_nothing_was_retried(queue):
    """As above with every row fresh: the rows of an expired lease are ready again, the
    live lease after them is not."""
    ids = fill(queue, 6)
    queue.claim(2, BIG, NOW, 5)  # expires
    queue.claim(2, BIG, NOW, 600)  # ids[2:4] stay leased
    claims = queue.claim_batches(3, 10, BIG, NOW + 10, 60)
    assert [[r.id for r in c.rows] for c in claims.batches] == [ids[0:2], ids[4:6]]
    assert [r.attempts for c in claims.batches for r in c.rows] == [0] * 4


@pytest.mark.parametrize("partial", [True, False])
def test_claim_batches_takes_at_most_count_batches_of_a_longer_queue(queue, partial):
    ids = fill(queue, 7)
    claims = queue.claim_batches(3, 2, BIG, NOW, 60, partial=partial)
    assert [[r.id for r in c.rows] for c in claims.batches] == [ids[0:2], ids[2:4], ids[4:6]]


def test_an_id_reused_where_a_lease_was_settled_is_not_held_by_it(queue):
    """Ids restart at max(id) + 1: what is left of a lease after a partial settle must
    shrink to its own rows, or a new event could fall inside it and be held there."""
    ids = fill(queue, 3)
    a = queue.claim(1, BIG, NOW, 60)
    b = queue.claim(1, BIG, NOW, 60)
    queue.delete(b.token, [ids[1]])  # a hole: ids[0], ids[2] are left
    queue.release(a.token, [ids[0]], NOW)
    c = queue.claim(10, BIG, NOW, 60)
    assert [r.id for r in c.rows] == [ids[0], ids[2]]
    assert queue.delete(c.token, [ids[2]]) == 1  # the right half, as a bisection does
    new = queue.put('{"new":1}', NOW)
    assert new == ids[1]  # reused: inside the old range ids[0]..ids[2]
    assert [r.id for r in queue.claim(10, BIG, NOW, 60).rows] == [new]
    assert queue.delete(c.token, [ids[0], new]) == 1  # c still holds ids[0], not new


def test_delete_many_deletes_several_leases_in_one_call(queue):
    fill(queue, 4)
    a = queue.claim(2, BIG, NOW, 60)
    b = queue.claim(2, BIG, NOW, 60)
    pairs = [(c.token, [r.id for r in c.rows]) for c in (a, b)]
    assert queue.delete_many(pairs) == 4 and queue.delete_many(pairs) == 0
    assert queue.delete_many([]) == 0 and queue.stats(NOW).depth == 0


def test_reset_leases_makes_a_dead_flushers_rows_ready(queue):
    fill(queue, 3)
    queue.claim(3, BIG, NOW, 600)
    assert queue.claim(3, BIG, NOW, 600).rows == []
    assert queue.reset_leases() == 3
    assert len(queue.claim(3, BIG, NOW, 600).rows) == 3


def test_bury_moves_rows_to_dead_letters_with_the_response(queue):
    ids = fill(queue, 3)
    claim = queue.claim(3, BIG, NOW, 60)
    assert queue.bury(claim.token, [ids[1]], 400, '{"error":"bad"}', NOW) == 1
    letters = queue.dead_letters()
    assert [(d.status, d.response) for d in letters] == [(400, '{"error":"bad"}')]
    assert letters[0].body.startswith('{"i":1')
    stats = queue.stats(NOW)
    assert (stats.depth, stats.dead_letters) == (2, 1)


def test_bury_with_a_stale_token_moves_nothing(queue):
    ids = fill(queue, 1)
    queue.claim(1, BIG, NOW, 60)
    assert queue.bury(12345, ids, 400, "", NOW) == 0
    assert queue.stats(NOW).dead_letters == 0


def test_requeue_puts_dead_letters_back_at_the_tail_unchanged(queue):
    ids = fill(queue, 3)
    claim = queue.claim(1, BIG, NOW, 60)
    body = claim.rows[0].body
    queue.bury(claim.token, [ids[0]], 400, "", NOW)
    assert queue.requeue() == 1
    rows = queue.claim(10, BIG, NOW, 60).rows
    assert rows[-1].body == body and rows[-1].id > ids[-1]
    assert queue.stats(NOW).dead_letters == 0


def test_purge_deletes_chosen_dead_letters(queue):
    fill(queue, 2)
    claim = queue.claim(2, BIG, NOW, 60)
    queue.bury(claim.token, [r.id for r in claim.rows], 400, "", NOW)
    first = queue.dead_letters()[0].id
    assert queue.purge([first]) == 1
    assert queue.purge() == 1
    assert queue.dead_letters() == []


def test_stats_report_depth_bytes_age_and_in_flight(queue):
    fill(queue, 3, size=0)
    queue.claim(1, BIG, NOW, 60)
    stats = queue.stats(NOW)
    assert stats.depth == 3
    assert stats.bytes == 3 * len('{"i":0,"pad":""}')
    assert stats.oldest_created == NOW
    assert stats.in_flight == 1


def test_pending_sees_only_the_given_id_range(queue):
    ids = fill(queue, 4)
    claim = queue.claim(2, BIG, NOW, 60)
    queue.delete(claim.token, ids[:2])
    assert not queue.pending(ids[0], ids[1])
    assert queue.pending(ids[0], ids[2])


def test_queue_file_and_wal_are_created_0600(tmp_path):
    q = SQLiteQueue(str(tmp_path / "sub" / "q.db"))
    q.put("{}", NOW)
    for suffix in ("", "-wal", "-shm"):
        mode = stat.S_IMODE(os.stat(q.path + suffix).st_mode)
        assert mode == 0o600, (suffix, oct(mode))
    q.close()


def test_queue_file_is_in_wal_mode_and_marked_as_a_segmentry_queue(queue):
    queue.put("{}", NOW)
    conn = sqlite3.connect(queue.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_random_bytes_are_refused_and_left_untouched(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(8192))
    before = _bytes(path)
    with pytest.raises(StorageError, match="corrupt or not a SQLite database"):
        SQLiteQueue(str(path)).put("{}", NOW)
    assert _bytes(path) == before


def test_another_applications_database_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    before = _bytes(path)
    with pytest.raises(StorageError, match="not a segmentry queue"):
        SQLiteQueue(str(path)).put("{}", NOW)
    assert _bytes(path) == before


def test_a_file_that_cannot_be_opened_is_refused_saying_why(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(StorageError, match="dir.db: it is a directory"):
        SQLiteQueue(str(tmp_path / "dir.db")).put("{}", NOW)
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="file is not a directory"):
        SQLiteQueue(str(tmp_path / "file" / "q.db")).put("{}", NOW)


def test_a_newer_schema_is_refused(tmp_path):
    q = SQLiteQueue(str(tmp_path / "q.db"))
    q.put("{}", NOW)
    q.close()
    conn = sqlite3.connect(q.path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer than this segmentry"):
        SQLiteQueue(q.path).put("{}", NOW)


_SCHEMA_1 = """
CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL, size INTEGER NOT NULL,
    created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0, lease INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0);
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id INTEGER NOT NULL,
    body TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL,
    attempts INTEGER NOT NULL, buried_at REAL NOT NULL, status INTEGER,
    response TEXT NOT NULL);
"""


def test_a_schema_1_file_is_upgraded_in_place_and_keeps_every_event(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA_1 + f"PRAGMA application_id={APPLICATION_ID}; "
                       "PRAGMA user_version=1;")
    conn.executemany("INSERT INTO events (body, size, created, attempts, lease, lease_until) "
                     "VALUES (?, 2, ?, ?, ?, ?)",
                     [("{}", NOW, 0, 0, 0), ("[]", NOW, 2, 77, NOW + 600)])  # one leased
    conn.commit()
    conn.close()
    queue = SQLiteQueue(path)
    claim = queue.claim(10, BIG, NOW, 60)  # the old lease is a dead flusher's: dropped
    assert [(r.body, r.attempts) for r in claim.rows] == [("{}", 0), ("[]", 2)]
    assert queue.delete(claim.token, [r.id for r in claim.rows]) == 2
    assert queue._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    assert queue.integrity_check() == "ok"
    queue.close()
    assert SQLiteQueue(path).stats(NOW).depth == 0  # reopening an upgraded file is a no-op


def test_a_schema_2_file_is_upgraded_in_place_and_its_leases_dropped(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA_1 + "CREATE TABLE leases (id INTEGER PRIMARY KEY, "
                       "token INTEGER NOT NULL, until REAL NOT NULL); "
                       f"PRAGMA application_id={APPLICATION_ID}; PRAGMA user_version=2;")
    conn.executemany("INSERT INTO events (body, size, created, attempts) VALUES (?, 2, ?, ?)",
                     [("{}", NOW, 0), ("[]", NOW, 2)])
    conn.execute("INSERT INTO leases VALUES (2, 77, ?)", (NOW + 600,))  # a dead flusher's
    conn.commit()
    conn.close()
    queue = SQLiteQueue(path)
    claim = queue.claim(10, BIG, NOW, 60)
    assert [(r.body, r.attempts) for r in claim.rows] == [("{}", 0), ("[]", 2)]
    assert queue.stats(NOW).in_flight == 2
    assert queue.delete(claim.token, [r.id for r in claim.rows]) == 2
    assert queue._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    assert queue.integrity_check() == "ok"


_LEASES_3 = ("CREATE TABLE leases (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL, "
             "token INTEGER NOT NULL, until REAL NOT NULL);")


def test_a_schema_3_file_is_upgraded_in_place_its_events_and_letters_carrying_no_destination(
        tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA_1 + _LEASES_3 + f"PRAGMA application_id={APPLICATION_ID}; "
                       "PRAGMA user_version=3;")
    conn.executemany("INSERT INTO events (body, size, created, attempts) VALUES (?, 2, ?, ?)",
                     [("{}", NOW, 0), ("[]", NOW, 2)])
    conn.execute("INSERT INTO leases VALUES (1, 2, 77, ?)", (NOW + 600,))  # a dead flusher's
    conn.execute("INSERT INTO dead_letters (event_id, body, size, created, attempts, "
                 "buried_at, status, response) VALUES (9, '{}', 2, ?, 1, ?, 400, 'no')",
                 (NOW, NOW))
    conn.commit()
    conn.close()
    before = inspect(path, NOW)  # read as it is, before any upgrade
    assert before is not None and [(d.name, d.depth, d.dead_letters)
                                   for d in before.destinations] == [(NO_DESTINATION, 2, 1)]
    queue = SQLiteQueue(path)
    mine = queue.put("{}", NOW, ("KEY", "http://127.0.0.1:9/v1/"))
    claim = queue.claim(10, BIG, NOW, 60)  # the old ones first, with no destination
    assert [(r.body, r.attempts, claim.dest) for r in claim.rows] == [("{}", 0, 0), ("[]", 2, 0)]
    assert [r.id for r in queue.claim(10, BIG, NOW, 60).rows] == [mine]
    assert queue._run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION
    assert [(d.name, d.depth, d.dead_letters) for d in queue.destination_stats(NOW)] == [
        (NO_DESTINATION, 2, 1), (destination("http://127.0.0.1:9/v1/", "KEY"), 1, 0)]
    assert queue.dead_letters()[0].destination == NO_DESTINATION
    assert queue.integrity_check() == "ok"


A = ("KEY-A", "http://127.0.0.1:9/v1/")
B = ("KEY-B", "http://127.0.0.1:9/v1/")


def interleave(queue, n, *dests):
    """``n`` events a destination, put in turn: a1 b1 a2 b2 ...; their ids by destination."""
    ids = {d: [] for d in dests}
    for i in range(n):
        for d in dests:
            ids[d].append(queue.put(f'{{"i":{i}}}', NOW, d))
    return ids


def test_a_batch_holds_one_destination_even_when_their_events_interleave(queue):
    ids = interleave(queue, 5, A, B, None)
    names = {i: d for i, d in queue.destinations().items()}
    claims = queue.claim_batches(10, 3, BIG, NOW, 60).batches
    by_dest = [(names.get(c.dest), [r.id for r in c.rows]) for c in claims]
    assert by_dest == [(A, ids[A][:3]), (B, ids[B][:3]), (None, ids[None][:3]),
                       (A, ids[A][3:]), (B, ids[B][3:]), (None, ids[None][3:])]
    assert all(r.dest == c.dest for c in claims for r in c.rows)
    # each batch settles its own rows only, though the others' ids lie inside its range
    first = claims[0]
    assert queue.release(first.token, [r.id for r in first.rows], NOW) == 3
    assert queue.delete(claims[1].token, [r.id for r in claims[1].rows]) == 3
    assert queue.stats(NOW).depth == 12 and queue.stats(NOW).in_flight == 9


def test_a_claim_skips_the_rows_of_paused_destinations_and_leaves_them_ready(queue):
    ids = interleave(queue, 4, A, B)
    paused = [i for i, d in queue.destinations().items() if d == A]
    claims = queue.claim_batches(5, 10, BIG, NOW, 60, skip=paused).batches
    assert [[r.id for r in c.rows] for c in claims] == [ids[B]]
    assert [r.id for r in queue.claim(10, BIG, NOW, 60).rows] == ids[A]


def test_a_destination_is_recorded_once_and_resumed_on_its_own(queue):
    interleave(queue, 3, A, B)
    assert sorted(queue.destinations().values()) == [A, B]
    a, b = (queue.claim_batches(2, 10, BIG, NOW, 60).batches)
    queue.release(a.token, [r.id for r in a.rows], NOW + 100)
    queue.release(b.token, [r.id for r in b.rows], NOW + 100)
    assert queue.resume(NOW, a.dest) == 3
    assert queue.next_ready_at(NOW, a.dest) == 0 and queue.next_ready_at(NOW, b.dest) == NOW + 100


def test_an_unwritable_directory_is_a_storage_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/segmentry-cannot-exist/q.db"  # even root cannot create here
    else:
        os.chmod(tmp_path, 0o500)
        target = str(tmp_path / "q.db")
    with pytest.raises(StorageError, match="cannot create (queue file|directory)"):
        SQLiteQueue(target).put("{}", NOW)


def test_durability_must_be_normal_or_full(tmp_path):
    with pytest.raises(ConfigurationError, match="durability"):
        SQLiteQueue(str(tmp_path / "q.db"), durability="off")


def test_full_durability_sets_synchronous_full(tmp_path):
    q = SQLiteQueue(str(tmp_path / "q.db"), durability="full")
    q.put("{}", NOW)
    assert q._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    q.close()


def test_space_is_given_back_after_a_backlog_drains(queue):
    fill(queue, 30_000, size=200)  # ~7 MB
    queue.maintain(empty=False)  # checkpointed into the database file
    grown = os.stat(queue.path).st_size
    while True:
        claim = queue.claim(2500, BIG, NOW, 60)
        if not claim.rows:
            break
        queue.delete(claim.token, [r.id for r in claim.rows])
    queue.maintain(empty=True)
    queue.put("{}", NOW)  # the first write after the checkpoint resets the WAL
    assert os.stat(queue.path).st_size < grown / 4
    assert os.stat(queue.path + "-wal").st_size <= WAL_KEEP_BYTES
    assert queue.integrity_check() == "ok"


def test_resume_makes_rows_in_backoff_ready_but_leaves_leases_alone(queue):
    fill(queue, 3)
    first = queue.claim(2, BIG, NOW, 60)
    queue.release(first.token, [r.id for r in first.rows], NOW + 600)
    leased = queue.claim(1, BIG, NOW, 60)
    assert queue.resume(NOW) == 2
    assert [r.id for r in queue.claim(10, BIG, NOW, 60).rows] == [r.id for r in first.rows]
    assert queue.delete(leased.token, [r.id for r in leased.rows]) == 1


_OPENER = """
import sys
from segmentry.storage import SQLiteQueue
queue = SQLiteQueue(sys.argv[1])  # lazy: nothing is opened before the go line
print("ready", flush=True)
sys.stdin.readline()
try:
    queue.put('{"n": 1}', 0.0)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
    raise SystemExit(1)
"""


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path):
    # Regression: one process read the header field by field while another was creating
    # the schema, saw application_id 0 next to existing tables, and refused the file.
    # Several rounds, because each round is one roll of the scheduler's dice.
    import subprocess
    import sys

    for round_ in range(12):
        path = str(tmp_path / f"q{round_}.db")
        procs = [subprocess.Popen([sys.executable, "-c", _OPENER, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for _ in range(6)]
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:  # released together: they race to create the schema
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * 6, outputs
        assert SQLiteQueue(path).stats(0.0).depth == 6


def test_a_failed_commit_leaves_no_transaction_open(tmp_path):
    # The connection is shared by producers' autocommit INSERTs: a transaction left open
    # after a failed COMMIT would swallow them uncommitted.
    from segmentry.storage import _write

    conn = sqlite3.connect(str(tmp_path / "fk.db"), isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (parent_id INTEGER REFERENCES parent(id) "
                 "DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError):
        with _write(conn):
            conn.execute("INSERT INTO child VALUES (42)")  # checked only at COMMIT
    assert not conn.in_transaction
    assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0


def test_claim_batches_without_partial_leaves_a_batch_that_is_not_full(queue):
    ids = fill(queue, 5)
    claims = queue.claim_batches(3, 2, BIG, NOW, 60, partial=False)
    assert [[r.id for r in c.rows] for c in claims.batches] == [ids[0:2], ids[2:4]]
    assert [r.id for r in queue.claim(10, BIG, NOW, 60).rows] == ids[4:]


def test_a_reset_wal_is_written_over_in_place_and_given_back_once_the_queue_is_empty(queue):
    for _ in range(1500):  # a page written per commit: ~6 MB of WAL
        queue.put("{}", NOW)
    queue.maintain(empty=False)
    queue.put("{}", NOW)  # the WAL starts over, in the file it had
    assert os.stat(queue.path + "-wal").st_size > WAL_KEEP_BYTES
    claim = queue.claim(2500, BIG, NOW, 60)
    queue.delete(claim.token, [r.id for r in claim.rows])
    queue.maintain(empty=True)
    assert os.stat(queue.path + "-wal").st_size <= WAL_KEEP_BYTES
    for _ in range(1500):  # grown again: given back at most once a SHRINK_EVERY_S
        queue.put("{}", NOW)
    claim = queue.claim(2500, BIG, NOW, 60)
    queue.delete(claim.token, [r.id for r in claim.rows])
    queue.maintain(empty=True)
    assert os.stat(queue.path + "-wal").st_size > WAL_KEEP_BYTES
    queue._shrunk_at -= SHRINK_EVERY_S
    queue.maintain(empty=True)
    assert os.stat(queue.path + "-wal").st_size <= WAL_KEEP_BYTES
    queue.put("{}", NOW)
    assert queue.integrity_check() == "ok"


# -- the open path: refused at once, saying why ---------------------------------------------


def test_open_refuses_a_missing_directory_unless_asked_to_create_it(tmp_path):
    target = tmp_path / "typo" / "q.db"
    with pytest.raises(StorageError, match=r"directory .*typo does not exist; create it"):
        SQLiteQueue(str(target), create_dirs=False).open()
    assert not (tmp_path / "typo").exists()
    SQLiteQueue(str(target)).open()  # the default: created 0700
    assert stat.S_IMODE(os.stat(tmp_path / "typo").st_mode) == 0o700


def test_a_directory_that_cannot_be_created_is_named_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="file is not a directory"):
        SQLiteQueue(str(tmp_path / "file" / "a" / "q.db")).open()
    with pytest.raises(StorageError, match="cannot create directory /proc/segmentry-x for "
                       "queue file .*; create it for this user, or choose another queue path"):
        SQLiteQueue("/proc/segmentry-x/q.db").open()  # even root cannot create here


def test_the_backoff_owner_is_recorded_and_read_back(queue):
    queue.put("{}", NOW)
    assert queue.backoff_owner() is None
    queue.set_backoff_owner("https://a.example/v1/ key sha256:0123")
    queue.set_backoff_owner("https://b.example/v1/ key sha256:4567")
    assert queue.backoff_owner() == "https://b.example/v1/ key sha256:4567"
    assert queue.integrity_check() == "ok"


def test_reading_the_backoff_owner_never_writes_the_file(tmp_path):
    path = str(tmp_path / "q.db")
    SQLiteQueue(path).put("{}", NOW)
    before = (os.stat(path).st_mtime_ns, os.stat(path + "-wal").st_size)
    assert SQLiteQueue(path).backoff_owner() is None
    assert (os.stat(path).st_mtime_ns, os.stat(path + "-wal").st_size) == before


# -- WAL upkeep by the flusher ------------------------------------------------------------


def test_the_wal_starts_over_although_producers_committed_during_the_checkpoint(tmp_path):
    path = str(tmp_path / "q.db")
    # Beside the flusher thread the checkpoint runs on a connection of its own while this
    # process's producers commit on theirs: it never reaches the WAL's end, so the WAL
    # grew until a producer's commit checkpointed it (a 75 ms stall at 64 MB). The frames
    # added meanwhile are then checkpointed under the producers' lock.
    producers, checkpoints = SQLiteQueue(path), SQLiteQueue(path)
    upkeep = Upkeep(producers, checkpoints)
    for _ in range(500):
        producers.put("{}", 0.0)
    alone = checkpoints.maintain

    def producers_commit_meanwhile(empty: bool) -> Wal:
        wal = alone(empty)
        for _ in range(100):
            producers.put("{}", 0.0)
        return Wal(wal.frames + 100, wal.left + 100)  # what they added during it

    checkpoints.maintain = producers_commit_meanwhile
    upkeep.run(empty=False, now=time.time())
    producers.put("{}", 0.0)  # the first write after: the WAL starts over
    assert wal_frames(path) < 10
    producers.close()
    checkpoints.close()


def test_a_flusher_process_starts_the_wal_over_beside_producers_of_other_processes(
        tmp_path, monkeypatch):
    # A flusher process has no lock its producers share: it holds them with SQLite's write
    # lock while a connection of its own checkpoints the frames they added during the
    # passes beside them; until then a producer's own checkpoint at 64 MB (30-60 ms).
    monkeypatch.setattr(storage, "RESTART_FRAMES", 300)
    path = str(tmp_path / "q.db")
    producers, flusher = SQLiteQueue(path), SQLiteQueue(path)
    upkeep = Upkeep(flusher)
    for _ in range(500):
        producers.put("{}", 0.0)
    real = SQLiteQueue.maintain

    def producers_commit_meanwhile(queue: SQLiteQueue, empty: bool) -> Wal | None:
        wal = real(queue, empty)
        for _ in range(50):  # beside every pass, none while they are held
            producers.put("{}", 0.0)
        return None if wal is None else Wal(wal.frames + 50, wal.left + 50)

    monkeypatch.setattr(SQLiteQueue, "maintain", producers_commit_meanwhile)
    upkeep.run(empty=False, now=time.time())
    producers.put("{}", 0.0)  # the first write after: the WAL starts over
    assert wal_frames(path) < 10
    upkeep.close()
    producers.close()
    flusher.close()


@pytest.mark.parametrize("left", [None, TAIL_FRAMES + 1])
def test_no_checkpoint_holds_the_producers_when_the_one_beside_them_was_busy_or_far_behind(
        tmp_path, left):
    path = str(tmp_path / "q.db")
    producers, checkpoints = SQLiteQueue(path), SQLiteQueue(path)
    upkeep = Upkeep(producers, checkpoints)
    held = []
    checkpoints.maintain = lambda empty: None if left is None else Wal(left + 9, left)
    producers.checkpoint = lambda: held.append(1)
    upkeep.run(empty=False, now=time.time())
    assert held == []  # it would checkpoint the whole WAL with the producers' lock held
    for done in (0, 5):  # all it saw checkpointed, or nearly: the rest under the lock
        checkpoints.maintain = lambda empty, done=done: Wal(done + 9, done)
        upkeep.last = 0.0
        upkeep.run(empty=False, now=time.time())
    assert held == [1, 1]


def wal_frames(path):
    """The frames in the WAL now, read on a connection of its own."""
    queue = SQLiteQueue(path)
    try:
        return queue._run(lambda c: c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])
    finally:
        queue.close()
