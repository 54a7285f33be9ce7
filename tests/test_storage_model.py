"""The storage contract as a state machine: Hypothesis drives ``SQLiteQueue`` through
random put / claim / delete / release / bury / reset_leases / requeue / purge / reopen
steps and moving time, and checks every step against a plain Python model. Events carry
one of three destinations (none, or one of two write keys): a batch holds one
destination's, and a claim skips the destinations it is told to (paused ones).

The model tracks each put body by a unique label, so the invariant "no row is ever lost
or duplicated" is exact: every label is in exactly one of queue, dead letters, deleted,
purged; and the file's rows must equal the model's, field by field, after every step.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from segmentry import storage
from segmentry.storage import Claim, SQLiteQueue

START = 1_800_000_000.0  # epoch seconds; time is an argument, never the wall clock
STATUS = 400
URL = "http://127.0.0.1:9"
DESTINATIONS = [None, ("key-a", URL), ("key-b", URL)]  # None: the flusher's own


@dataclasses.dataclass
class Row:
    """One queued event as the model sees it."""

    seq: int  # enqueue order (ids may be reused once the queue empties past them)
    label: str
    body: str
    attempts: int = 0
    not_before: float = 0.0
    lease: int = 0
    lease_until: float = 0.0
    dest: tuple[str, str] | None = None


@dataclasses.dataclass
class Letter:
    label: str
    body: str
    attempts: int
    status: int | None
    response: str
    dest: tuple[str, str] | None = None


@dataclasses.dataclass
class Lease:
    """A claim as its flusher remembers it: the token and the ids it was given."""

    token: int
    ids: list[int]
    until: float


def _label(body: str) -> str:
    return body.split('"', 4)[3]  # bodies look like {"label":"b7","pad":"..."}


class QueueModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="segmentry-model-")
        self.path = f"{self.dir}/q.db"
        self.queue = SQLiteQueue(self.path)
        self.now = START
        self.seq = 0
        self.rows: dict[int, Row] = {}  # by id
        self.letters: dict[int, Letter] = {}  # by dead-letter id
        self.deleted: set[str] = set()
        self.purged: set[str] = set()
        self.labels: set[str] = set()  # every label ever put
        self.leases: list[Lease] = []

    def teardown(self) -> None:
        self.queue.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def _scan(self) -> list[tuple[int, Row, bool]]:
        """Every row in enqueue order, and whether a claim may take it."""
        rows = sorted(self.rows.items(), key=lambda item: item[1].seq)
        return [(i, r, r.lease_until <= self.now and r.not_before <= self.now)
                for i, r in rows]

    def _expire(self) -> None:
        """A claim ends the expired leases first: their tokens hold nothing any more."""
        for row in self.rows.values():
            if row.lease and row.lease_until <= self.now:
                row.lease, row.lease_until = 0, 0.0

    def _by_token(self, lease: Lease, ids: list[int]) -> list[int]:
        """The ids a by-token statement must touch: those given that this token holds."""
        return [i for i in ids if i in self.rows and self.rows[i].lease == lease.token]

    def _add(self, row_id: int, row: Row) -> None:
        assert row_id not in self.rows, f"id {row_id} given to two queued rows"
        assert all(row.seq > r.seq for i, r in self.rows.items() if i > row_id), \
            "a new row's id sorts before an older row: claim order would not be enqueue order"
        assert all(row_id > i for i in self.rows), "new id is not past every queued id"
        self.rows[row_id] = row

    # -- rules ------------------------------------------------------------------------------

    def _ids(self) -> dict[tuple[str, str] | None, int]:
        """The file's id of each destination (0: none)."""
        return {None: 0, **{d: i for i, d in self.queue.destinations().items()}}

    def _dest(self, dest_id: int) -> tuple[str, str] | None:
        return {i: d for d, i in self._ids().items()}[dest_id]

    @rule(pad=st.sampled_from([0, 1, 5, 30, 300]), dest=st.sampled_from(DESTINATIONS))
    def put(self, pad: int, dest: tuple[str, str] | None) -> None:
        self.seq += 1
        label = f"b{self.seq}"
        body = f'{{"label":"{label}","pad":"{"x" * pad}"}}'
        row_id = self.queue.put(body, self.now, dest)
        self.labels.add(label)
        self._add(row_id, Row(self.seq, label, body, dest=dest))

    @rule(limit=st.integers(1, 6), max_bytes=st.sampled_from([1, 26, 50, 80, 130, 400, 10**6]),
          lease_s=st.sampled_from([5.0, 30.0, 600.0]))
    def claim(self, limit: int, max_bytes: int, lease_s: float) -> None:
        claim = self.queue.claim(limit, max_bytes, self.now, lease_s)
        self._expire()
        expected = self._expected_claim(limit, max_bytes)
        assert [(r.id, r.body) for r in claim.rows] == \
            [(i, self.rows[i].body) for i in expected], "claim is not the oldest ready rows"
        assert [r.attempts for r in claim.rows] == [self.rows[i].attempts for i in expected]
        if expected:
            assert self._dest(claim.dest) == self.rows[expected[0]].dest
        self._lease(claim, expected, self.now + lease_s)

    @rule(data=st.data(), count=st.integers(1, 3), limit=st.integers(1, 4),
          max_bytes=st.sampled_from([1, 50, 130, 10**6]), lease_s=st.sampled_from([5.0, 600.0]),
          partial=st.booleans(),
          skip=st.lists(st.sampled_from(DESTINATIONS), max_size=2, unique=True))
    def claim_batches(self, data: st.DataObject, count: int, limit: int, max_bytes: int,
                      lease_s: float, partial: bool, skip: list[tuple[str, str] | None]) -> None:
        """The flusher's hot path: delete what was delivered, then lease several batches."""
        pairs = [self._slice(data) for _ in range(data.draw(st.integers(0, 2)))] \
            if self.leases else []
        hit = list(dict.fromkeys(i for lease, ids in pairs for i in self._by_token(lease, ids)))
        ids_of = self._ids()
        claims = self.queue.claim_batches(count, limit, max_bytes, self.now, lease_s,
                                          [(lease.token, ids) for lease, ids in pairs], partial,
                                          [ids_of[d] for d in skip if d in ids_of])
        assert claims.deleted == len(hit)
        for row_id in hit:
            self.deleted.add(self.rows.pop(row_id).label)
        self._expire()
        expected = self._expected_batches(count, limit, max_bytes, partial, skip)
        assert [[r.id for r in c.rows] for c in claims.batches] == expected
        assert len({c.token for c in claims.batches}) == len(expected), "a token a batch"
        for claim, batch in zip(claims.batches, expected):
            assert {self.rows[i].dest for i in batch} == {self._dest(claim.dest)}, \
                "a batch of one destination, the claim's"
            self._lease(claim, batch, self.now + lease_s)

    def _expected_batches(self, count: int, limit: int, max_bytes: int, partial: bool,
                          skip: list[tuple[str, str] | None] | None = None) -> list[list[int]]:
        """Greedy, each destination on its own (but those skipped): its batch closes when
        its next row cannot go (leased, or in a backoff), or when it would pass limit or
        max_bytes. The batches still open at the end follow, oldest first."""
        closed: list[list[int]] = []
        open_: dict[tuple[str, str] | None, list[int]] = {}
        for row_id, row, ready in self._scan():
            if row.dest in (skip or []):
                continue
            batch = open_.setdefault(row.dest, [])
            size = sum(len(self.rows[i].body) + 1 for i in batch) + len(row.body) + 1
            if batch and (not ready or len(batch) == limit or size > max_bytes):
                closed.append(batch)
                batch = open_[row.dest] = []
                if len(closed) == count:
                    return closed
            if ready:
                batch.append(row_id)
        left = sorted((b for b in open_.values() if b and (partial or len(b) == limit)),
                      key=lambda b: b[0])
        return closed + left[:count - len(closed)]

    def _expected_claim(self, limit: int, max_bytes: int) -> list[int]:
        batches = self._expected_batches(1, limit, max_bytes, True)
        return batches[0] if batches else []

    def _lease(self, claim: Claim, ids: list[int], until: float) -> None:
        assert all(lease.token != claim.token for lease in self.leases)
        for row_id in ids:
            self.rows[row_id].lease, self.rows[row_id].lease_until = claim.token, until
        if ids:
            self.leases.append(Lease(claim.token, ids, until))

    def _slice(self, data: st.DataObject) -> tuple[Lease, list[int]]:
        """A claim (maybe stale) and a contiguous slice of its ids, as the flusher gives,
        or any subset of them: a method acts on exactly the ids it is given."""
        lease = data.draw(st.sampled_from(self.leases))
        if data.draw(st.booleans()):
            ids = data.draw(st.lists(st.sampled_from(lease.ids), min_size=1, unique=True))
            return lease, sorted(ids)
        start = data.draw(st.integers(0, len(lease.ids) - 1))
        end = data.draw(st.integers(start + 1, len(lease.ids)))
        return lease, lease.ids[start:end]

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        lease, ids = self._slice(data)
        hit = self._by_token(lease, ids)
        assert self.queue.delete(lease.token, ids) == len(hit)
        for row_id in hit:
            self.deleted.add(self.rows.pop(row_id).label)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), delay=st.sampled_from([0.0, 1.0, 50.0]))
    def release(self, data: st.DataObject, delay: float) -> None:
        lease, ids = self._slice(data)
        hit = self._by_token(lease, ids)
        assert self.queue.release(lease.token, ids, self.now + delay) == len(hit)
        for row_id in hit:
            row = self.rows[row_id]
            row.lease, row.lease_until = 0, 0.0
            row.attempts += 1
            row.not_before = self.now + delay

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def bury(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        ids = data.draw(st.lists(st.sampled_from(lease.ids), min_size=1, unique=True))
        hit = [i for i in ids if i in self.rows and self.rows[i].lease == lease.token]
        response = f'{{"error":"{len(hit)}"}}'
        assert self.queue.bury(lease.token, ids, STATUS, response, self.now) == len(hit)
        letters = self.queue.dead_letters(limit=10**6)
        new = [d for d in letters if d.id not in self.letters]
        assert sorted(_label(d.body) for d in new) == sorted(self.rows[i].label for i in hit)
        for letter in new:
            row = next(r for i, r in self.rows.items() if r.label == _label(letter.body))
            self.letters[letter.id] = Letter(row.label, row.body, row.attempts + 1,
                                             STATUS, response, row.dest)
        for row_id in hit:
            del self.rows[row_id]

    @rule()
    def reset_leases(self) -> None:
        held = [r for r in self.rows.values() if r.lease != 0]
        assert self.queue.reset_leases() == len(held)
        for row in held:
            row.lease, row.lease_until = 0, 0.0

    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        ids = self._letter_ids(data)
        chosen = sorted(self.letters if ids is None else set(ids) & set(self.letters))
        assert self.queue.requeue(ids) == len(chosen)
        fresh = self._new_rows(len(chosen))
        for letter_id, row_id in zip(chosen, fresh):
            letter = self.letters.pop(letter_id)
            self.seq += 1
            self._add(row_id, Row(self.seq, letter.label, letter.body, dest=letter.dest))

    def _new_rows(self, count: int) -> list[int]:
        """The ids requeue gave: the rows the model does not know yet, in id order."""
        if not count:
            return []
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            ids = [i for (i,) in conn.execute("SELECT id FROM events ORDER BY id")]
        conn.close()
        fresh = [i for i in ids if i not in self.rows]
        assert len(fresh) == count
        return fresh

    @rule(data=st.data())
    def purge(self, data: st.DataObject) -> None:
        ids = self._letter_ids(data)
        chosen = list(self.letters if ids is None else set(ids) & set(self.letters))
        assert self.queue.purge(ids) == len(chosen)
        for letter_id in chosen:
            self.purged.add(self.letters.pop(letter_id).label)

    def _letter_ids(self, data: st.DataObject) -> list[int] | None:
        """None (all), or some known dead-letter ids plus maybe one that does not exist."""
        if data.draw(st.booleans()):
            return None
        known = st.sampled_from(sorted(self.letters)) if self.letters else st.nothing()
        return data.draw(st.lists(known | st.integers(10**6, 10**6 + 5), max_size=4))

    @rule(seconds=st.sampled_from([0.5, 1.0, 5.0, 30.0, 50.0, 600.0]))
    def advance_time(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def reopen(self) -> None:
        """A restart: the file alone carries the state (backoff, attempts, leases)."""
        self.queue.close()
        self.queue = SQLiteQueue(self.path)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def counts_match(self) -> None:
        stats = self.queue.stats(self.now)
        flying = sum(r.lease_until > self.now for r in self.rows.values())
        size = sum(len(r.body) for r in self.rows.values())
        assert (stats.depth, stats.in_flight, stats.dead_letters, stats.bytes) == \
            (len(self.rows), flying, len(self.letters), size)

    @invariant()
    def next_ready_at_is_the_earliest_backoff(self) -> None:
        free = [r.not_before for r in self.rows.values() if r.lease_until <= self.now]
        assert self.queue.next_ready_at(self.now) == (min(free) if free else None)

    @invariant()
    def file_holds_exactly_the_model(self) -> None:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            events = conn.execute(  # a row under two leases would be listed twice
                "SELECT e.id, e.body, e.attempts, e.not_before, COALESCE(l.token, 0), "
                "COALESCE(l.until, 0.0), e.dest FROM events e "
                "LEFT JOIN leases l ON e.id BETWEEN l.lo AND l.hi AND l.dest = e.dest"
            ).fetchall()
            orphans = conn.execute(  # a lease's ends are its destination's events (so ids
                # are never reused inside it), it is not empty, and it counts them right
                "SELECT COUNT(*) FROM leases WHERE lo NOT IN (SELECT id FROM events "
                "WHERE dest = leases.dest) OR hi NOT IN (SELECT id FROM events WHERE "
                "dest = leases.dest) OR hi < lo OR n != (SELECT COUNT(*) FROM events "
                "WHERE id BETWEEN lo AND hi AND dest = leases.dest)").fetchone()[0]
            letters = conn.execute("SELECT id, body, attempts, status, response, dest "
                                   "FROM dead_letters").fetchall()
        conn.close()
        ids = self._ids()
        assert orphans == 0, "a lease's range does not start and end at its own events, " \
            "or miscounts them"
        assert sorted(events) == sorted(
            (i, r.body, r.attempts, r.not_before, r.lease, r.lease_until, ids[r.dest])
            for i, r in self.rows.items())
        assert sorted(letters) == sorted(
            (i, d.body, d.attempts, d.status, d.response, ids[d.dest])
            for i, d in self.letters.items())

    @invariant()
    def counts_per_destination_match(self) -> None:
        expected: dict[str, tuple[int, int]] = {}
        for name, events, letters in (
                (storage.destination(d[1], d[0]) if d else storage.NO_DESTINATION,
                 sum(r.dest == d for r in self.rows.values()),
                 sum(x.dest == d for x in self.letters.values())) for d in DESTINATIONS):
            if events or letters:
                expected[name] = (events, letters)
        found = {s.name: (s.depth, s.dead_letters) for s in self.queue.destination_stats(self.now)
                 if s.depth or s.dead_letters}
        assert found == expected

    @invariant()
    def every_row_is_in_exactly_one_place(self) -> None:
        places = [[r.label for r in self.rows.values()],
                  [d.label for d in self.letters.values()],
                  list(self.deleted), list(self.purged)]
        everywhere = [label for place in places for label in place]
        assert len(everywhere) == len(set(everywhere)), "a row is in two places"
        assert set(everywhere) == self.labels, "a row was lost"


QueueModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestQueueModel = QueueModel.TestCase
