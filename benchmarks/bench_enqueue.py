"""Enqueue benchmark: segmentry's durable enqueue against analytics-python's in-memory
queue, persist-queue's ``SQLiteAckQueue.put`` and a raw one-row sqlite3 commit; then
with a 1 M-row backlog, with 1/2/4/8 producer processes on one file, and (``--profile``)
where segmentry's time per event goes.

    python benchmarks/bench_enqueue.py [--events N] [--runs 5] [--quick] [--profile]
        [--backlog 1000000] [--skip-backlog] [--skip-procs] [--json out.json]
        [--warmup 500] [--duration 3] [--skip-enqueue]

``--quick`` (a smoke test, about 20 s) runs 2 x 2,000 events, a 20,000-row backlog and
0.5 s contention runs. The full run takes about 4 minutes on 2 cores, plus about a
minute to build the 1 M-row backlog the first time.

Method. Contenders alternate run by run (A B C ... A B C ...), each run in a fresh
interpreter. A run makes ``warmup`` untimed calls, then N timed ones; its rate is N /
wall time of the timed loop only (a final flush is timed apart, as ``flush_s``). Every
call is timed with ``perf_counter_ns``; the harness (two clock reads, a closure call and
a list store) costs ``harness_ns`` per event and is inside both the rate and the
latencies, the same for every contender. Every receiver runs on 127.0.0.1 in its own
process (tools/fake_segment.py, else a built-in one), and nothing else is contacted.

Contenders of the main table (all queues start empty):

- ``segmentry``: ``Client(key, queue_path=..., api_url=receiver)``, default options, so
  durability="normal" and the in-process flusher thread delivers while we enqueue
  (flusher=None, labelled so, if ``segmentry.http`` cannot be imported);
- ``segmentry-full``: the same with ``durability="full"``;
- ``segmentry-noflusher`` / ``segmentry-full-noflusher``: the same two with flusher=None,
  the enqueue alone, nothing delivering: the gap to the two above is what the flusher
  thread costs;
- ``segmentry-process``: flusher=None while a ``python -m segmentry.flusher`` process
  (started first, holding the file; ``--batch-every-ms 100``, since producers in other
  processes cannot wake it) delivers the run's queue file: the recommended shape;
- ``analytics-python``: ``segment.analytics.Client(key, host=receiver,
  max_queue_size=N + warmup + 10)``, its consumer thread sending (send=True,
  sync_mode=False); calls refused because its queue is full count as ``drops``;
- ``persist-queue``: ``SQLiteAckQueue(dir, multithreading=True).put(event_dict)``
  (pickle, WAL, SQLite's default synchronous=FULL);
- ``sqlite-normal`` / ``sqlite-full``: the floor, one autocommit INSERT of a
  segmentry-encoded body per event, WAL, synchronous NORMAL / FULL, otherwise SQLite's
  defaults (so it checkpoints inline every 1000 pages).

All call ``track(f"user-{i}", "Signed Up", {"plan": "pro", "i": i})`` or store that
event. Backlog: segmentry with flusher=None on a fresh file vs on a copy of a file holding
``--backlog`` rows (built once, cached under /tmp keyed by version and schema); no flusher
drains the backlog while we measure. Contention: k producer processes (flusher=None,
on_full="raise") enqueue for a fixed time on one file; then 8 of them with a
``python -m segmentry.flusher`` process draining the same file (``--batch-every-ms 100``:
producers in other processes cannot wake it, and the default 2 s idle wait would leave it
asleep through most of a 3 s run). A wall-clock start time shared by all producers opens
the window; the aggregate rate is all events over the first start to the last end.

JSON (``--json``), every number raw:

    {"meta": {"segmentry", "python", "sqlite", "cpus", "events", "warmup", "runs",
              "duration", "flusher", "receiver", "loadavg_start", "loadavg_end", "argv",
              "elapsed_s", "timer_ns", "harness_ns"},
     "enqueue": {NAME: {"label": str, "runs": [RUN, ...]}},
     "backlog": {"rows": int, "runs": {"empty": [RUN, ...], "backlog": [RUN, ...]}} | null,
     "contention": [{"procs", "flusher_process", "duration_s", "events", "rate",
                     "p50_us", "p99_us", "max_us", "locked_errors", "other_errors"
                     ({type: count}), "drops", "delivered" (null when no flusher ran)}] | null,
     "profile": {"events", "components_ns": {NAME: ns/event}, "breakdown_ns": {PART: ns},
                 "instrumented": {MODE: {...}}, "wal_reuse": {STATE: {"median", "min",
                 "max"}} (events/s), "cprofile": [{"function", "calls",
                 "tottime_us_per_event"}]} | null,
     "targets": {NAME: {"value", "target", "goal" (or null), "met"}}}

    RUN = {"run", "events", "warmup", "seconds", "rate" (events/s), "p50_us", "p99_us",
           "p999_us", "max_us", "over_1ms", "over_5ms" (calls slower than that),
           "thread_cpu_s" (the calling thread's CPU over the timed loop), "process_cpu_s"
           (every thread's, user + system), "thread_vcsw", "thread_ivcsw", "process_vcsw",
           "process_ivcsw" (voluntary / involuntary context switches), "drops",
           "timer_ns" (cost of one latency sample's two clock reads),
           "harness_ns" (loop cost per event), "flush_s", "flushed" (null: no sender),
           "delivered" (events the receiver got during the run and its flush, or null)}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.common import (  # noqa: E402
    WRITE_KEY,
    fmt_spread,
    log,
    paired,
    spread,
    table,
    values,
)

MODULE = "benchmarks.bench_enqueue"
EVENT_NAME = "Signed Up"
FLUSH_TIMEOUT_S = 120.0
PROC_COUNTS = (1, 2, 4, 8)
FLUSHER_POLL_MS = 100

CONTENDERS: dict[str, dict[str, Any]] = {
    "segmentry": {"kind": "segmentry", "durability": "normal",
                  "label": "segmentry track (durability=normal)"},
    "segmentry-noflusher": {"kind": "segmentry", "durability": "normal", "flusher": None,
                            "label": "segmentry track (durability=normal)"},
    "segmentry-process": {"kind": "segmentry", "durability": "normal", "flusher": None,
                          "flusher_process": True,
                          "label": "segmentry track (durability=normal)"},
    "segmentry-full": {"kind": "segmentry", "durability": "full",
                       "label": "segmentry track (durability=full)"},
    "segmentry-full-noflusher": {"kind": "segmentry", "durability": "full", "flusher": None,
                                 "label": "segmentry track (durability=full)"},
    "analytics-python": {"kind": "analytics",
                         "label": "analytics-python track (in memory, consumer on)"},
    "persist-queue": {"kind": "persistqueue", "label": "persist-queue SQLiteAckQueue.put"},
    "sqlite-normal": {"kind": "sqlite", "synchronous": "NORMAL",
                      "label": "raw sqlite3 1-row commit, WAL, NORMAL"},
    "sqlite-full": {"kind": "sqlite", "synchronous": "FULL",
                    "label": "raw sqlite3 1-row commit, WAL, FULL"},
}
BASELINE = "analytics-python"


# =============================================================================================
# Worker side: one run of one contender, in a fresh interpreter.
# =============================================================================================

Call = Callable[[int], object]


def timed_loop(call: Call, n: int) -> tuple[int, list[int], int]:
    """Call ``call(i)`` for i in range(n), timing each call; return (wall ns, per-call ns,
    how many calls returned a falsy value: dropped events)."""
    clock = time.perf_counter_ns
    latencies = [0] * n
    failures = 0
    start = clock()
    for i in range(n):
        t0 = clock()
        ok = call(i)
        latencies[i] = clock() - t0
        if not ok:
            failures += 1
    return clock() - start, latencies, failures


def timer_overhead() -> tuple[float, float]:
    """(ns one latency sample adds to itself, ns the whole harness adds per event)."""
    clock, n = time.perf_counter_ns, 20_000
    samples = sorted(clock() - clock() for _ in range(2001))
    wall, _, _ = timed_loop(lambda i: True, n)
    return -samples[1000], wall / n


def event_properties(i: int) -> dict[str, Any]:
    return {"plan": "pro", "i": i}


def tracker(client: Any) -> Call:
    """The call every segmentry run times, bound to one client."""
    track = client.track

    def call(i: int) -> object:
        return track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})

    return call


def sample_body() -> str:
    """A segmentry-encoded track event, as the queue stores it."""
    from segmentry import messages

    fields = {"event": EVENT_NAME, "properties": event_properties(0)}
    return messages.encode("track", "user-0", fields, time.time()).body


def setup_segmentry(spec: dict[str, Any]) -> tuple[Call, Callable[[], dict[str, Any]]]:
    import segmentry

    path = spec.get("queue_path") or os.path.join(spec["dir"], "queue.db")
    client = segmentry.Client(WRITE_KEY, queue_path=path, api_url=spec.get("api_url"),
                              durability=spec.get("durability", "normal"),
                              flusher=spec.get("flusher"))
    track = client.track
    if spec.get("flusher") == "process":
        # Its flusher process starts at the first event (~0.3 s of CPU on the other core):
        # timed calls begin once it holds the queue, as they begin once a service does.
        from segmentry.flusher import holder_pid

        track("warmup", EVENT_NAME, {"plan": "pro"})
        deadline = time.monotonic() + 30
        while holder_pid(path) is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def call(i: int) -> object:
        return track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i}) is not None

    def finish() -> dict[str, Any]:
        flushed = client.flush(FLUSH_TIMEOUT_S) if spec.get("flusher") else None
        client.close()
        return {"flushed": flushed}

    return call, finish


def setup_analytics(spec: dict[str, Any]) -> tuple[Call, Callable[[], dict[str, Any]]]:
    from segment.analytics import Client

    size = spec["events"] + spec["warmup"] + 10
    consumers = spec.get("consumers", 1)  # 0: its queue fills, no thread takes from it
    client = Client(WRITE_KEY, host=spec["host"], max_queue_size=size, send=True,
                    sync_mode=False, thread=consumers)
    if not consumers:
        client.consumers = []  # thread=0 leaves it unset, and join() at exit reads it
    track = client.track

    def call(i: int) -> object:
        return track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})[0]

    def finish() -> dict[str, Any]:
        if not consumers:
            return {"flushed": None}
        client.flush()  # queue.join(): every event sent (or given up on)
        client.join()
        return {"flushed": True}

    return call, finish


def setup_persistqueue(spec: dict[str, Any]) -> tuple[Call, Callable[[], dict[str, Any]]]:
    from persistqueue import SQLiteAckQueue

    queue = SQLiteAckQueue(os.path.join(spec["dir"], "persist-queue"), multithreading=True)
    put = queue.put

    def call(i: int) -> object:
        event = {"type": "track", "userId": f"user-{i}", "event": EVENT_NAME,
                 "properties": {"plan": "pro", "i": i}}
        return put(event) is not None

    def finish() -> dict[str, Any]:
        queue.close()
        return {"flushed": None}

    return call, finish


def open_raw(path: str, synchronous: str) -> sqlite3.Connection:
    """A one-table WAL database like segmentry's events table, SQLite defaults otherwise."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, "
                 "body TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL)")
    return conn


def setup_sqlite(spec: dict[str, Any]) -> tuple[Call, Callable[[], dict[str, Any]]]:
    conn = open_raw(os.path.join(spec["dir"], "raw.db"), spec["synchronous"])
    body = sample_body()
    size, execute, now = len(body), conn.execute, time.time

    def call(i: int) -> object:
        return execute(common.INSERT, (body, size, now())).lastrowid

    def finish() -> dict[str, Any]:
        conn.close()
        return {"flushed": None}

    return call, finish


SETUPS = {"segmentry": setup_segmentry, "analytics": setup_analytics,
          "persistqueue": setup_persistqueue, "sqlite": setup_sqlite}


def enqueue_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of one contender: warm up, time N calls, then flush (timed apart)."""
    if spec.get("cpus"):  # before any thread starts: they inherit the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:spec["cpus"]])
    call, finish = SETUPS[spec["kind"]](spec)
    for i in range(spec["warmup"]):
        call(i)
    timer_ns, harness_ns = timer_overhead()
    n = spec["events"]
    before = common.cpu_snapshot()
    wall_ns, latencies, drops = timed_loop(call, n)
    cpu = common.cpu_since(before)
    start = time.perf_counter()
    finished = finish()
    return {"events": n, "warmup": spec["warmup"], "seconds": wall_ns / 1e9,
            "rate": n / (wall_ns / 1e9),
            **common.latency_summary(latencies), **cpu, "drops": drops,
            "timer_ns": timer_ns, "harness_ns": harness_ns,
            "flush_s": time.perf_counter() - start, **finished}


def producer_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One of k producer processes on a shared file: ready, wait for go, enqueue until the
    common deadline; latencies go to a binary file, errors are counted, never raised."""
    import segmentry

    client = segmentry.Client(WRITE_KEY, queue_path=spec["queue_path"], flusher=None,
                              on_full="raise")
    track, clock = client.track, time.perf_counter_ns
    track("warmup", EVENT_NAME, {"plan": "pro"})  # opens the connection (and the schema)
    print("ready", flush=True)
    start_at = float(sys.stdin.readline().split()[1])
    time.sleep(max(0.0, start_at - time.time()))
    end_ns = clock() + int((start_at + spec["duration"] - time.time()) * 1e9)
    latencies, errors, drops, i = array("q"), Counter[str](), 0, 0
    t_start = time.time()
    while True:
        t0 = clock()
        if t0 >= end_ns:
            break
        try:
            if track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i}) is None:
                drops += 1
        except Exception as exc:  # counted: the point is how many and which
            errors["locked" if "locked" in str(exc) else type(exc).__name__] += 1
        latencies.append(clock() - t0)
        i += 1
    t_end = time.time()
    with open(spec["lat_path"], "wb") as f:
        latencies.tofile(f)
    client.close()
    return {"events": i, "t_start": t_start, "t_end": t_end, "drops": drops,
            "errors": dict(errors)}


# -- profile --------------------------------------------------------------------------------


def per_call_ns(fn: Call, n: int) -> float:
    """Mean ns of fn(i) over n calls, loop overhead subtracted."""
    clock = time.perf_counter_ns
    start = clock()
    for i in range(n):
        fn(i)
    wall = clock() - start
    start = clock()
    for _ in range(n):
        pass
    return (wall - (clock() - start)) / n


class _NullCursor:
    lastrowid = 1


class _NullConnection:
    """Stands in for a sqlite3 connection, so put's own Python cost can be timed alone."""

    def execute(self, sql: str, row: tuple[Any, ...]) -> _NullCursor:
        return _NULL_CURSOR


_NULL_CURSOR = _NullCursor()


def profile_components(spec: dict[str, Any]) -> dict[str, float]:
    """Each piece of one track call alone, interleaved over rounds (median per piece).
    The Python layers are timed with SQLite stubbed out (their cost is small next to a
    commit's jitter, so subtracting two timings that both commit would drown them)."""
    import segmentry
    from segmentry import messages
    from segmentry.storage import PRODUCER_AUTOCHECKPOINT, SQLiteQueue

    workdir = spec["dir"]
    client = segmentry.Client(WRITE_KEY, queue_path=os.path.join(workdir, "p-track.db"),
                              flusher=None)
    stubbed = segmentry.Client(WRITE_KEY, queue_path=os.path.join(workdir, "p-stub.db"),
                               flusher=None)

    def stub_put(body: str, now: float) -> int:
        return 1

    setattr(stubbed.queue, "put", stub_put)  # noqa: B010 (an instance attribute, on purpose)
    queue = SQLiteQueue(os.path.join(workdir, "p-put.db"))
    null = _NullConnection()
    raw = open_raw(os.path.join(workdir, "p-raw.db"), "NORMAL")
    raw.execute(f"PRAGMA wal_autocheckpoint={PRODUCER_AUTOCHECKPOINT}")  # as producers do
    body = sample_body()
    now = time.time
    queue.put(body, now())  # opens the connection the stub then replaces
    real_conn = queue._conn  # private, for this measurement only; restored below
    setattr(queue, "_conn", null)  # noqa: B010
    pieces: dict[str, Call] = {
        "track (flusher=None)": lambda i: client.track(
            f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i}),
        "track (put stubbed)": lambda i: stubbed.track(
            f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i}),
        "stub put call": lambda i: stub_put(body, now()),
        "messages.encode": lambda i: messages.encode(
            "track", f"user-{i}", {"event": EVENT_NAME, "properties": {"plan": "pro", "i": i}},
            now()),
        "messages.dumps (properties)": lambda i: messages.dumps({"plan": "pro", "i": i},
                                                                "properties"),
        "new_message_id": lambda i: messages.new_message_id(),
        "time + format_timestamp": lambda i: messages.format_timestamp(now()),
        "SQLiteQueue.put (connection stubbed)": lambda i: queue.put(body, now()),
        "stub execute call": lambda i: null.execute(common.INSERT, (body, len(body), now())),
        "raw INSERT commit": lambda i: raw.execute(common.INSERT, (body, len(body), now())),
    }
    for fn in pieces.values():  # open files, fill caches
        per_call_ns(fn, 200)
    rounds, n = 5, max(200, spec["events"] // 5)
    samples: dict[str, list[float]] = {name: [] for name in pieces}
    for _ in range(rounds):
        for name, fn in pieces.items():
            samples[name].append(per_call_ns(fn, n))
    queue._conn = real_conn
    for closable in (client, stubbed, queue, raw):
        closable.close()
    return {name: spread(values)["median"] for name, values in samples.items()}


def breakdown(c: dict[str, float]) -> dict[str, float]:
    """Split one track call into parts: encode's pieces by difference, the Python layers
    with SQLite stubbed, the commit alone; what is left is jitter and cache effects."""
    encode = c["messages.encode"]
    if "messages.dumps (properties)" in c:  # encode() writes the members' text itself
        json_part = ("JSON of the properties (messages.dumps)", c["messages.dumps (properties)"])
        rest = "validation + the other members' text"
    else:  # runs up to 7ef69f2 timed dumps() of a whole event dict, as encode() once did
        json_part = ("JSON encoding (messages.dumps)", c["messages.dumps"])
        rest = "validation + dict building"
    parts = {
        rest: encode - json_part[1] - c["new_message_id"] - c["time + format_timestamp"],
        json_part[0]: json_part[1],
        "messageId (uuid4 text)": c["new_message_id"],
        "timestamp (time.time + format)": c["time + format_timestamp"],
        "client bookkeeping (kwargs, cap, notify)": c["track (put stubbed)"] - encode
        - c["stub put call"],
        "storage put: lock, row tuple": c["SQLiteQueue.put (connection stubbed)"]
        - c["stub execute call"],
        "SQLite INSERT + commit (raw sqlite3)": c["raw INSERT commit"],
    }
    track = c["track (flusher=None)"]
    parts["rest (difference to the measured total)"] = track - sum(parts.values())
    parts["total: track (flusher=None)"] = track
    return parts


def instrumented_track(spec: dict[str, Any], flusher: str | None) -> dict[str, Any]:
    """Time encode and put inside real track calls (wrapping them in this process only),
    to see where a running flusher thread's cost lands."""
    import segmentry
    from segmentry import messages

    name = "thread" if flusher else "none"
    client = segmentry.Client(WRITE_KEY, queue_path=os.path.join(spec["dir"], f"i-{name}.db"),
                              api_url=spec.get("api_url"), flusher=flusher)
    clock, encode, put = time.perf_counter_ns, messages.encode, client.queue.put
    enc_ns: list[int] = []
    put_ns: list[int] = []

    def timed_encode(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        out = encode(*args, **kwargs)
        enc_ns.append(clock() - t0)
        return out

    def timed_put(body: str, now: float) -> int:
        t0 = clock()
        out = put(body, now)
        put_ns.append(clock() - t0)
        return out

    messages.encode = timed_encode
    setattr(client.queue, "put", timed_put)  # noqa: B010 (this instance only)
    try:
        for i in range(spec["warmup"]):
            client.track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})
        enc_ns.clear()
        put_ns.clear()
        n = spec["events"]
        wall, total, _ = timed_loop(
            lambda i: client.track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i}), n)
    finally:
        messages.encode = encode
    client.close()
    slow = sum(1 for t in put_ns if t >= 1_000_000)
    return {"rate": n / (wall / 1e9), "track_ns": sum(total) / n, "encode_ns": sum(enc_ns) / n,
            "put_ns": sum(put_ns) / n, "put_p99_us": common.latency_summary(put_ns)["p99_us"],
            "puts_over_1ms": slow, "put_ns_in_puts_over_1ms": sum(t for t in put_ns
                                                                   if t >= 1_000_000) / n}


def cprofile_top(spec: dict[str, Any], limit: int = 12) -> list[dict[str, Any]]:
    import cProfile
    import pstats

    import segmentry

    client = segmentry.Client(WRITE_KEY, queue_path=os.path.join(spec["dir"], "cprof.db"),
                              flusher=None)
    n = spec["events"]
    client.track("warmup", EVENT_NAME)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        client.track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})
    profiler.disable()
    client.close()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:limit]
    return [{"function": f"{func[0]}:{func[1]}({func[2]})", "calls": int(data[1]),
             "tottime_us_per_event": data[2] / n * 1e6} for func, data in rows]


def wal_reuse(spec: dict[str, Any], rounds: int = 3) -> dict[str, dict[str, float]]:
    """Enqueue rate right after the idle maintenance the flusher runs on an empty queue
    (maintain(empty=True): WAL truncated, so commits grow the file again) vs after a
    PASSIVE checkpoint (the WAL file stays allocated and is overwritten in place)."""
    import segmentry
    from segmentry.storage import SQLiteQueue

    events = {"normal": max(2000, spec["events"] // 3), "full": 2000}
    rates: dict[str, list[float]] = {}
    for r in range(rounds):
        for durability, n in events.items():
            for truncated in (True, False):
                path = os.path.join(spec["dir"], f"wal-{r}-{durability}-{truncated}.db")
                client = segmentry.Client(WRITE_KEY, queue_path=path, flusher=None,
                                          durability=durability)
                for i in range(2 * n):  # WAL frames for what follows
                    client.track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})
                queue = SQLiteQueue(path, durability)
                queue.maintain(empty=truncated)
                queue.close()
                wall, _, _ = timed_loop(tracker(client), n)
                client.close()
                key = f"{durability}, after {'TRUNCATE' if truncated else 'PASSIVE'}"
                rates.setdefault(key, []).append(n / (wall / 1e9))
    return {key: spread(values) for key, values in rates.items()}


def profile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    components = profile_components(spec)
    instrumented = {"flusher=None": instrumented_track(spec, None)}
    if spec.get("flusher"):
        instrumented["flusher=thread"] = instrumented_track(spec, "thread")
    return {"events": spec["events"], "components_ns": components,
            "breakdown_ns": breakdown(components), "instrumented": instrumented,
            "wal_reuse": wal_reuse(spec), "cprofile": cprofile_top(spec)}


WORKERS = {"enqueue": enqueue_worker, "producer": producer_worker, "profile": profile_worker}


def worker_main(spec_path: str) -> int:
    spec = common.read_spec(spec_path)
    common.write_result(spec, WORKERS[spec["worker"]](spec))
    return 0


# =============================================================================================
# Parent side: alternation, fixtures, tables.
# =============================================================================================


class Bench:
    """The parent: runs each section against one receiver, in a scratch directory."""

    def __init__(self, args: argparse.Namespace, workdir: str, receiver: common.Receiver,
                 flusher: str | None) -> None:
        self.args = args
        self.workdir = workdir
        self.receiver = receiver
        self.flusher = flusher

    def run_enqueue(self, spec: dict[str, Any], run: int, sends: bool) -> dict[str, Any]:
        """One fresh-process run in its own scratch directory, deleted afterwards; with
        ``flusher_process``, a `python -m segmentry.flusher` delivers that run's queue
        file, started (and holding the file) before the run and stopped after it."""
        rundir = tempfile.mkdtemp(dir=self.workdir, prefix="run-")
        before = self.receiver.events() if sends else 0
        process = None
        spinner = common.start_spinner() if spec.get("busy_core") else None
        try:
            if spec.get("flusher_process"):
                spec = {**spec, "queue_path": os.path.join(rundir, "queue.db")}
                process = start_flusher_process(spec["queue_path"], self.receiver.url)
                wait_for_flusher(process, spec["queue_path"])
            result = common.run_worker(MODULE, {
                "worker": "enqueue", "dir": rundir, "events": self.args.events,
                "warmup": self.args.warmup, "api_url": self.receiver.url,
                "host": self.receiver.host, **spec}, self.workdir, timeout=900)
        finally:
            stop_flusher_process(process, self.receiver, before)
            common.stop_spinner(spinner)
            shutil.rmtree(rundir, ignore_errors=True)
        delivered = self.receiver.events() - before if sends else None
        return {"run": run, **result, "delivered": delivered}

    def enqueue_section(self) -> dict[str, Any]:
        log(f"enqueue: {len(CONTENDERS)} contenders x {self.args.runs} runs, "
            f"{self.args.events:,} events each")

        def one(name: str, run: int) -> dict[str, Any]:
            spec = self.spec(name)
            sends = spec["kind"] == "analytics" or bool(spec.get("flusher")) \
                or bool(spec.get("flusher_process"))
            return self.run_enqueue({"name": name, **spec}, run, sends)

        runs = common.alternate(list(CONTENDERS), self.args.runs, one, log)
        return {name: {"label": self.label(name), "runs": runs[name]} for name in CONTENDERS}

    def spec(self, name: str) -> dict[str, Any]:
        spec = {k: v for k, v in CONTENDERS[name].items() if k != "label"}
        if spec["kind"] == "segmentry":
            spec.setdefault("flusher", self.flusher)  # the default: the in-process thread
        return spec

    def label(self, name: str) -> str:
        label, spec = str(CONTENDERS[name]["label"]), self.spec(name)
        if spec["kind"] != "segmentry":
            return label
        if spec["flusher"]:
            return label + ", flusher thread on"
        if spec.get("flusher_process"):
            return (label + f", flusher=None while `python -m segmentry.flusher "
                    f"--batch-every-ms {FLUSHER_POLL_MS}` delivers")
        if "flusher" in CONTENDERS[name]:
            return label + ", flusher=None, nothing delivering"
        return label + ", flusher=None (segmentry.http missing)"

    def backlog_section(self) -> dict[str, Any]:
        rows = self.args.backlog
        cached = build_backlog(rows)
        copy = os.path.join(self.workdir, "backlog.db")
        log(f"backlog: copying {cached} ({os.path.getsize(cached) / 1e6:,.0f} MB)")
        shutil.copyfile(cached, copy)
        specs = {"empty": {"kind": "segmentry", "flusher": None},
                 "backlog": {"kind": "segmentry", "flusher": None, "queue_path": copy}}
        runs = common.alternate(list(specs), self.args.runs,
                                lambda name, run: self.run_enqueue(specs[name], run, False), log)
        os.unlink(copy)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(copy + suffix):
                os.unlink(copy + suffix)
        return {"rows": rows, "runs": runs}

    def contention_section(self) -> list[dict[str, Any]]:
        configs = [(k, False) for k in PROC_COUNTS]
        if self.flusher:
            configs.append((PROC_COUNTS[-1], True))
        out = []
        for procs, with_flusher in configs:
            log(f"contention: {procs} producer process(es)"
                + (" + a flusher process" if with_flusher else ""))
            out.append(self.contention_run(procs, with_flusher))
        return out

    def contention_run(self, procs: int, with_flusher: bool) -> dict[str, Any]:
        rundir = tempfile.mkdtemp(dir=self.workdir, prefix="procs-")
        queue_path = os.path.join(rundir, "queue.db")
        before = self.receiver.events()
        flusher = start_flusher_process(queue_path, self.receiver.url) if with_flusher else None
        try:
            results, latencies = run_producers(queue_path, procs, self.args.duration, rundir)
        finally:
            delivered = stop_flusher_process(flusher, self.receiver, before)
            shutil.rmtree(rundir, ignore_errors=True)
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r["errors"])
        window = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
        events = sum(r["events"] for r in results)
        return {"procs": procs, "flusher_process": with_flusher,
                "duration_s": window, "events": events, "rate": events / window,
                **common.latency_summary(latencies), "locked_errors": errors.pop("locked", 0),
                "other_errors": dict(errors), "drops": sum(r["drops"] for r in results),
                "delivered": delivered}

    def profile_section(self) -> dict[str, Any]:
        log("profile: component timings, instrumented track, cProfile")
        rundir = tempfile.mkdtemp(dir=self.workdir, prefix="profile-")
        try:
            return common.run_worker(MODULE, {
                "worker": "profile", "dir": rundir, "events": self.args.events,
                "warmup": self.args.warmup, "api_url": self.receiver.url,
                "flusher": self.flusher}, self.workdir, timeout=900)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)


def run_producers(queue_path: str, procs: int, duration: float,
                  rundir: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Start k producer processes, wait until all are ready, give one start time to all."""
    children: list[tuple[subprocess.Popen[str], dict[str, Any]]] = []
    for k in range(procs):
        spec_path = os.path.join(rundir, f"producer-{k}.json")
        spec: dict[str, Any] = {
            "worker": "producer", "queue_path": queue_path, "duration": duration,
            "lat_path": os.path.join(rundir, f"lat-{k}.bin"),
            "result": os.path.join(rundir, f"result-{k}.json")}
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.Popen(common.worker_command(MODULE, spec_path), cwd=common.ROOT,
                                env=common.child_env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        children.append((proc, spec))
    try:
        for proc, _ in children:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a producer process failed to start")
        start_at = time.time() + 0.3
        for proc, _ in children:
            assert proc.stdin is not None
            proc.stdin.write(f"go {start_at!r}\n")
            proc.stdin.flush()
        for proc, _ in children:
            if proc.wait(timeout=duration + 120) != 0:
                raise RuntimeError(f"a producer process exited {proc.returncode}")
    finally:
        for proc, _ in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results, latencies = [], array("q")
    for _, spec in children:
        with open(spec["result"]) as f:
            results.append(json.load(f))
        with open(spec["lat_path"], "rb") as f:
            latencies.frombytes(f.read())
    return results, list(latencies)


def start_flusher_process(queue_path: str, api_url: str) -> subprocess.Popen[bytes]:
    """``python -m segmentry.flusher`` on the producers' file. It polls every
    FLUSHER_POLL_MS instead of the default 2000: producers in other processes cannot wake
    it, and a 2 s idle wait would leave it asleep for most of a short run."""
    env = {**common.child_env(), "SEGMENT_WRITE_KEY": WRITE_KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "segmentry.flusher", "--queue", queue_path, "--api-url", api_url,
         "--batch-every-ms", str(FLUSHER_POLL_MS), "--progress", "none",
         "--log-level", "WARNING"],
        cwd=common.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_flusher(proc: subprocess.Popen[bytes], queue_path: str) -> None:
    """Until the flusher process holds the queue (its pid file is there), as a service
    started before the application would."""
    deadline = time.monotonic() + 30
    while not os.path.exists(queue_path + ".flusher"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the flusher process did not start (exit {proc.poll()})")
        time.sleep(0.01)  # polling a file another process creates; no race is won by it


def stop_flusher_process(proc: subprocess.Popen[bytes] | None, receiver: common.Receiver,
                         before: int) -> int | None:
    """SIGTERM the flusher (it finishes its batch in flight); return what it delivered."""
    if proc is None:
        return None
    if proc.poll() is not None:
        log(f"  the flusher process exited early ({proc.returncode})")
    else:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return receiver.events() - before


def build_backlog(rows: int) -> str:
    """A queue file of ``rows`` queued events, cached (see ``common.queue_file``)."""
    from segmentry import messages

    def body(i: int, created: float) -> str:
        fields = {"event": EVENT_NAME, "properties": event_properties(i)}
        return messages.encode("track", f"user-{i}", fields, created).body

    return common.queue_file("backlog", rows, body)


def segmentry_flusher_mode() -> str | None:
    """'thread' when the flusher thread can run here (segmentry.http imports), else None."""
    check = subprocess.run([sys.executable, "-c", "import segmentry.http, segmentry.flusher"],
                           cwd=common.ROOT, env=common.child_env(), capture_output=True)
    return "thread" if check.returncode == 0 else None


# -- report ------------------------------------------------------------------------------------


def runs_of(section: dict[str, Any], name: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = section[name]["runs"]
    return runs


def enqueue_table(section: dict[str, Any]) -> str:
    base = runs_of(section, BASELINE)
    rows = []
    for name in section:
        runs = runs_of(section, name)
        delivered = values(runs, "delivered")
        rows.append([
            section[name]["label"], fmt_spread(values(runs, "rate")),
            fmt_spread(paired(runs, base), "{:.2f}x"),
            fmt_spread(values(runs, "p50_us"), "{:.1f}"),
            fmt_spread(values(runs, "p99_us"), "{:.0f}"),
            f"{max(values(runs, 'max_us')) / 1e3:.1f}",
            str(sum(int(d) for d in values(runs, "drops"))),
            f"{min(delivered):,.0f}/{runs[0]['events'] + runs[0]['warmup']:,}"
            if delivered else "-",
        ])
    return table(["contender", "events/s", "vs analytics-python", "p50 us", "p99 us",
                  "max ms", "drops", "delivered"], rows)


def backlog_table(section: dict[str, Any]) -> str:
    runs = section["runs"]
    empty = runs["empty"]
    rows = []
    for name, title in (("empty", "empty queue"),
                        ("backlog", f"{section['rows']:,}-row backlog")):
        r = runs[name]
        rows.append([f"segmentry, flusher=None, {title}", fmt_spread(values(r, "rate")),
                     fmt_spread(paired(r, empty), "{:.2f}x"),
                     fmt_spread(values(r, "p50_us"), "{:.1f}"),
                     fmt_spread(values(r, "p99_us"), "{:.0f}"),
                     f"{max(values(r, 'max_us')) / 1e3:.1f}"])
    return table(["queue", "events/s", "vs empty", "p50 us", "p99 us", "max ms"], rows)


def contention_table(rows_in: list[dict[str, Any]]) -> str:
    rows = []
    for r in rows_in:
        other = ", ".join(f"{k}={v}" for k, v in r["other_errors"].items()) or "0"
        rows.append([f"{r['procs']}" + (" + flusher process" if r["flusher_process"] else ""),
                     f"{r['rate']:,.0f}", f"{r['rate'] / r['procs']:,.0f}",
                     f"{r['p50_us']:.0f}", f"{r['p99_us'] / 1e3:.2f}",
                     f"{r['max_us'] / 1e3:.1f}", str(r["locked_errors"]), other,
                     str(r["drops"]), "-" if r["delivered"] is None else f"{r['delivered']:,}"])
    return table(["producers", "total ev/s", "per proc", "p50 us", "p99 ms", "max ms",
                  "locked", "other errors", "drops", "delivered"], rows)


def profile_report(profile: dict[str, Any]) -> str:
    parts = profile["breakdown_ns"]
    total = parts["total: track (flusher=None)"]
    rows = [[name, f"{ns / 1e3:.2f}", f"{100 * ns / total:.0f}%"] for name, ns in parts.items()]
    out = [f"Where one segmentry track() goes (flusher=None, means over "
           f"{profile['events']:,} calls per piece, medians of 5 interleaved rounds; "
           "parts by difference):", table(["part", "us/event", "share"], rows), ""]
    inst_rows = []
    for mode, r in profile["instrumented"].items():
        inst_rows.append([mode, f"{r['rate']:,.0f}", f"{r['track_ns'] / 1e3:.2f}",
                          f"{r['encode_ns'] / 1e3:.2f}", f"{r['put_ns'] / 1e3:.2f}",
                          f"{r['put_p99_us']:.0f}", str(r["puts_over_1ms"]),
                          f"{r['put_ns_in_puts_over_1ms'] / 1e3:.2f}"])
    out += ["Instrumented track() (encode and put wrapped with timers, in one process):",
            table(["mode", "events/s", "track us", "encode us", "put us", "put p99 us",
                   "puts >= 1 ms", "us/event in those"], inst_rows), "",
            "Enqueue (flusher=None) after the flusher's idle maintenance: "
            "maintain(empty=True) truncates the WAL,",
            "so the next commits grow the file; after a PASSIVE checkpoint the WAL is "
            "overwritten in place:",
            table(["queue state", "events/s, median (min–max) of 3"],
                  [[key, fmt_spread([s["median"], s["min"], s["max"]])]
                   for key, s in profile["wal_reuse"].items()]), "",
            "cProfile of track(), flusher=None (tottime per event; cProfile inflates "
            "Python-level calls):",
            table(["function", "calls", "us/event"],
                  [[c["function"][-70:], f"{c['calls']:,}", f"{c['tottime_us_per_event']:.2f}"]
                   for c in profile["cprofile"]])]
    return "\n".join(out)


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float, target: float, goal: float | None = None,
            higher: bool = True) -> None:
        met = value >= target if higher else value <= target
        out[name] = {"value": value, "target": target, "goal": goal, "met": bool(met)}

    enq = results.get("enqueue")
    if enq and results["meta"].get("flusher"):  # without the thread it is not this target
        add("segmentry / analytics-python enqueue rate",
            spread(paired(runs_of(enq, "segmentry"), runs_of(enq, BASELINE)))["median"],
            1.3, 2.0)
        for name, note in (("segmentry-full", ""), ("segmentry-full-noflusher", ", flusher=None")):
            add(f"segmentry full{note} / raw sqlite FULL commit rate",
                spread(paired(runs_of(enq, name), runs_of(enq, "sqlite-full")))["median"],
                0.7)
    backlog = results.get("backlog")
    if backlog:
        add("backlog / empty enqueue rate",
            spread(paired(backlog["runs"]["backlog"], backlog["runs"]["empty"]))["median"],
            0.9)
    for r in results.get("contention") or []:
        if r["procs"] == PROC_COUNTS[-1] and not r["flusher_process"]:
            add(f"{r['procs']} producers: p99 enqueue ms", r["p99_us"] / 1e3, 25.0, higher=False)
            add(f"{r['procs']} producers: lock errors", r["locked_errors"], 0, higher=False)
    return out


def targets_table(checks: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, c in checks.items():
        op = "<=" if "p99" in name or "errors" in name else ">="
        goal = f", goal {c['goal']:g}" if c["goal"] else ""
        rows.append([name, f"{c['value']:.4g}", f"{op} {c['target']:g}{goal}",
                     "met" if c["met"] else "MISSED"])
    return table(["target (measured, not asserted)", "value", "target", ""], rows)


def report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"segmentry {meta['segmentry']} | Python {meta['python']} | SQLite {meta['sqlite']}"
           f" | {meta['cpus']} CPUs | load {meta['loadavg_start']} -> {meta['loadavg_end']}",
           f"receiver: {meta['receiver']} on 127.0.0.1 | segmentry flusher: "
           f"{meta['flusher'] or 'None (segmentry.http not importable)'} | "
           f"harness {meta['harness_ns']:.0f} ns/event (timer {meta['timer_ns']:.0f} ns/sample)"
           " included in rates and latencies", ""]
    if results.get("enqueue"):
        out += [f"Enqueue, empty queues, {meta['events']:,} events x {meta['runs']} runs "
                "(alternated, fresh process each), median (min–max); ratios paired per round:",
                enqueue_table(results["enqueue"]), ""]
    if results.get("backlog"):
        out += ["Backlog: the same enqueue on an empty queue vs a pre-filled one. flusher=None: "
                "nothing drains the backlog during the measurement.",
                backlog_table(results["backlog"]), ""]
    if results.get("contention"):
        out += [f"Producer processes on ONE queue file, {meta['duration']:g} s each, "
                "flusher=None (last row: plus `python -m segmentry.flusher`), latencies over "
                "all calls:", contention_table(results["contention"]), ""]
    if results.get("profile"):
        out += [profile_report(results["profile"]), ""]
    out += [targets_table(results["targets"])]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--events", type=int, help="timed calls per run (default 30000)")
    p.add_argument("--runs", type=int, help="runs per contender (default 5)")
    p.add_argument("--warmup", type=int, help="untimed calls before each run (default 500)")
    p.add_argument("--backlog", type=int, help="backlog rows (default 1000000)")
    p.add_argument("--duration", type=float, help="seconds per contention run (default 3)")
    p.add_argument("--quick", action="store_true", help="a smoke test, well under a minute")
    p.add_argument("--profile", action="store_true", help="add the per-event time breakdown")
    p.add_argument("--skip-backlog", action="store_true")
    p.add_argument("--skip-procs", action="store_true")
    p.add_argument("--skip-enqueue", action="store_true", help="skip the main table")
    p.add_argument("--json", help="write every raw number here")
    args = p.parse_args(argv)
    defaults = ({"events": 2000, "runs": 2, "warmup": 200, "backlog": 20_000, "duration": 0.5}
                if args.quick else
                {"events": 30_000, "runs": 5, "warmup": 500, "backlog": 1_000_000,
                 "duration": 3.0})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    from segmentry.version import __version__

    flusher = segmentry_flusher_mode()
    if not flusher:
        log("segmentry.http does not import: segmentry runs with flusher=None")
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="segmentry-bench-")
    results: dict[str, Any] = {"meta": {
        "segmentry": __version__, "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(), "events": args.events,
        "warmup": args.warmup, "runs": args.runs, "duration": args.duration,
        "flusher": flusher, "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "argv": sys.argv, "quick": args.quick}, "enqueue": None, "backlog": None,
        "contention": None, "profile": None}
    try:
        with common.Receiver(workdir) as receiver:
            results["meta"]["receiver"] = receiver.kind
            bench = Bench(args, workdir, receiver, flusher)
            if not args.skip_enqueue:
                results["enqueue"] = bench.enqueue_section()
            if not args.skip_backlog:
                results["backlog"] = bench.backlog_section()
            if not args.skip_procs:
                results["contention"] = bench.contention_section()
            if args.profile:
                results["profile"] = bench.profile_section()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = results["meta"]
    runs = [r for s in (results["enqueue"] or {}).values() for r in s["runs"]]
    meta["timer_ns"] = spread(values(runs, "timer_ns"))["median"] if runs else float("nan")
    meta["harness_ns"] = spread(values(runs, "harness_ns"))["median"] if runs else float("nan")
    results["targets"] = targets(results)
    return common.finish(results, started, lambda r: report(r) + "\n", args.json)


if __name__ == "__main__":
    raise SystemExit(main())
