"""The cutting of a claim's batches: which of the oldest rows go together, read from the
queue file in as few sqlite3 steps as possible. Private to storage, which runs it inside
the claim's write transaction."""

from __future__ import annotations

import itertools
import operator
import sqlite3
from collections.abc import Iterable
from typing import Any, NamedTuple

from ._schema import COVERED


class Row(NamedTuple):
    id: int
    body: str
    attempts: int



# Every row past :start, oldest first, with its body only when it can be claimed: a row
# that cannot (leased, or waiting out a backoff) ends the batch before it, so that a
# batch's id range holds its own rows only. Claims delete expired leases first, so every
# lease left is live; :hi is the highest id under one (no row past it is leased).
_READY = f"not_before <= :now AND (id > :hi OR NOT EXISTS ({COVERED}))"
_SCAN = (f"SELECT id, CASE WHEN {_READY} THEN body END, size, attempts FROM events "
         f"WHERE id > :start ORDER BY id")
# The same rows but their bodies, the first :n of them, in one aggregate row: one
# sqlite3 step instead of one per row (see _window). Then one step per batch for its
# bodies: a batch's id range holds its own rows only.
_WINDOW = (f"SELECT COUNT(*), group_concat(id), group_concat(size), group_concat(attempts), "
           f"group_concat(ok, '') FROM (SELECT id, size, attempts, {_READY} AS ok "
           f"FROM events WHERE id > :start ORDER BY id LIMIT :n)")
# The window's shape in one aggregate row, without per-row text: when its rows are
# consecutive ids, all ready, never tried and small enough that no batch is cut by bytes
# (the usual case while producers run), the batches follow by arithmetic (see _plain).
_PLAIN = (f"SELECT COUNT(*), MIN(id), MAX(id), MAX(size), MIN(ok), MAX(attempts) FROM "
          f"(SELECT id, size, attempts, {_READY} AS ok FROM events WHERE id > :start "
          f"ORDER BY id LIMIT :n)")
_BODIES = ("SELECT group_concat(id), group_concat(body, char(30)) FROM "
           "(SELECT id, body FROM events WHERE id BETWEEN ? AND ? ORDER BY id)")
# The ranges of ``token``'s leases that meet [:a, :b] (a settle's ids).


def read(conn: sqlite3.Connection, args: dict[str, float], count: int, limit: int,
         max_bytes: int, partial: bool) -> list[list[Row]]:
    """Up to ``count`` batches of the ready rows past ``args["start"]``, cut as
    ``_batches`` says; a window read in a few steps when it can tell, else row by row."""
    batches = _window(conn, args, count, limit, max_bytes, partial)
    if batches is not None:
        return batches
    cur = conn.execute(_SCAN, args)
    try:
        return [[Row(i, body, tries) for i, body, _, tries in batch]
                for batch in _batches(cur, count, limit, max_bytes, partial)]
    finally:
        cur.close()


def _batches(rows: Iterable[tuple[Any, ...]], count: int, limit: int, max_bytes: int,
             partial: bool = True) -> list[list[tuple[Any, ...]]]:
    """Up to ``count`` batches of consecutive rows (id, body, size, attempts), each of at
    most ``limit`` rows whose sizes plus a comma each fit in max_bytes (at least one row);
    a row whose body is None (it cannot go) ends a batch and is skipped. Without
    ``partial``, a last batch that is not full is left out."""
    batches: list[list[tuple[Any, ...]]] = []
    batch: list[tuple[Any, ...]] = []
    total = 0
    for row in rows:
        if batch and (row[1] is None or len(batch) == limit or total + row[2] + 1 > max_bytes):
            batches.append(batch)  # full, or the next row cannot join it
            if len(batches) == count:
                return batches
            batch, total = [], 0
        if row[1] is not None:
            batch.append(row)
            total += row[2] + 1
    if batch and (partial or len(batch) == limit):
        batches.append(batch)
    return batches


def _window(conn: sqlite3.Connection, args: dict[str, float], count: int, limit: int,
            max_bytes: int, partial: bool) -> list[list[Row]] | None:
    """The claim's batches: a plain window's (see _plain), else read in two sqlite3 steps
    (or count + 2); None when the next count * limit + 1 rows do not settle them (rows
    that cannot go used the window up) or what was read is not as it must be (never
    seen; checked, because SQLite does not promise group_concat's order before 3.44).
    Read row by row, each step gave the GIL away, and with eight sender threads taking
    it the claim loop spent 1.6 ms a batch (cProfile of a 200 k drain) on work that
    takes 0.3 ms alone."""
    n = count * limit + 1  # a row past the last batch tells whether that one is full
    plain = _plain(conn, {**args, "n": n}, count, limit, max_bytes, partial)
    if plain is not None:
        return plain
    (rows, ids, sizes, attempts, ready), = conn.execute(_WINDOW, {**args, "n": n})
    if not rows:
        return []
    id_list = list(map(int, ids.split(",")))
    if not all(map(operator.lt, id_list, itertools.islice(id_list, 1, None))):
        return None
    cuts = _cuts(list(map(int, sizes.split(","))), ready, count, limit, max_bytes,
                 partial if rows < n else False)
    if rows == n and len(cuts) < count:
        return None  # the last batch may go on past the window
    if not cuts:
        return []
    first, last = cuts[0][0], cuts[-1][1]
    if all(a[1] == b[0] for a, b in zip(cuts, cuts[1:])):  # nothing lies between them
        whole = _bodies(conn, id_list[first:last])
        parts = [whole and whole[s - first:e - first] for s, e in cuts]
    else:
        parts = [_bodies(conn, id_list[s:e]) for s, e in cuts]
    if any(part is None for part in parts):
        return None
    tries = attempts.split(",")
    return [_rows(id_list[s:e], part or (), map(int, tries[s:e]))
            for (s, e), part in zip(cuts, parts)]


def _plain(conn: sqlite3.Connection, args: dict[str, float], count: int, limit: int,
           max_bytes: int, partial: bool) -> list[list[Row]] | None:
    """``_window``'s batches when the window is plain (see _PLAIN), else None. Reading
    the window as text and parsing it took half of a 500-row claim."""
    rows, lo, hi, biggest, ok, tried = conn.execute(_PLAIN, args).fetchone()
    if not rows:
        return []
    # (Ids that are not consecutive would fail _bodies' check too: this saves the query.)
    if hi - lo + 1 != rows or not ok or tried or (biggest + 1) * limit > max_bytes:
        return None
    full, rest = divmod(rows, limit)
    sizes = [limit] * min(full, count)
    if len(sizes) < count and rest and partial:  # a window that is not full: the end
        sizes.append(rest)
    if not sizes:
        return []
    ids = list(range(lo, lo + sum(sizes)))
    bodies = _bodies(conn, ids)
    if bodies is None:
        return None
    ends = list(itertools.accumulate(sizes, initial=0))
    return [_rows(ids[s:e], bodies[s:e], itertools.repeat(0)) for s, e in zip(ends, ends[1:])]


def _rows(ids: Iterable[int], bodies: Iterable[str], attempts: Iterable[int]) -> list[Row]:
    # tuple.__new__ makes each Row in C; Row(...) runs a Python __new__ (140 vs 350 ns).
    return list(map(tuple.__new__, itertools.repeat(Row), zip(ids, bodies, attempts)))


def _cuts(sizes: list[int], ready: str, count: int, limit: int, max_bytes: int,
          partial: bool) -> list[tuple[int, int]]:
    """``_batches`` on a window, as index ranges [s, e): ``ready`` has a "1" for each row
    that can go. A batch is a slice, summed in C, unless the byte cap cuts it: a Python
    loop over 100 k rows was a fifth of the claim loop's CPU."""
    cuts: list[tuple[int, int]] = []
    n = len(sizes)
    s = ready.find("1")
    while s != -1 and len(cuts) < count:
        e = min(s + limit, n)
        blocked = ready.find("0", s, e)
        e = e if blocked == -1 else blocked
        if sum(sizes[s:e]) + e - s > max_bytes:  # keep the rows that fit, at least one
            total, k = sizes[s] + 1, s + 1
            while k < e and total + sizes[k] + 1 <= max_bytes:
                total, k = total + sizes[k] + 1, k + 1
            e = k
        if e == n and not partial and e - s < limit:
            break  # it may go on past what was read
        cuts.append((s, e))
        s = ready.find("1", e)
    return cuts


def _bodies(conn: sqlite3.Connection, ids: list[int]) -> list[str] | None:
    """The bodies of rows ``ids``, in order; None unless the id range from the first
    to the last holds exactly those rows, in that order."""
    found, bodies = conn.execute(_BODIES, (ids[0], ids[-1])).fetchone()
    if found != ",".join(map(str, ids)):
        return None
    parts = bodies.split("\x1e")  # JSON text escapes every control character
    return parts if len(parts) == len(ids) else None

