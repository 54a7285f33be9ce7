"""Delivery benchmarks: segmentry end to end against analytics-python, a 1 M-event backlog
replay against the raw ``requests`` POST limit, a 50 ms round trip, what a SIGKILL costs
each client, and how enqueue and claim costs grow with the backlog.

    python benchmarks/bench_delivery.py [--quick] [--runs 5] [--json out.json]
        [--only e2e,replay,rtt,sigkill,growth,profile] [--backlog 1000000] [--e2e-events N]

Method. Every receiver is ``tools/fake_segment.py`` in its own process on 127.0.0.1 (its
counts reset before each run, faults armed over HTTP); nothing else is contacted.
Contenders alternate within each section (A B C A B C ...), each run in a fresh process, and
every table shows the median (min–max) of the runs; ratios are paired within a round.

- e2e: one fresh process per run enqueues N events with ``track()`` and waits until the
  receiver has N unique messageIds. segmentry: ``Client(KEY, queue_path=..., api_url=...)``
  (default flusher thread), N tracks, ``flush()``. analytics-python: ``Client(KEY, host=...,
  max_queue_size=N + 10, upload_size=100)``, N tracks, ``flush()``. Drops = N - unique.
  Also reported, not used for the target: segmentry with ``flusher=None`` while a
  ``python -m segmentry.flusher --batch-every-ms 50`` process, started beforehand, delivers
  (the service deployment the README describes for operators); its CPU is ``flusher_cpu_s``.
  And ``flusher="process"`` (``segmentry-own-process``): the client starts its own flusher
  process, reaped by ``close()``; its CPU is ``flusher_cpu_s`` too (RUSAGE_CHILDREN).
- replay: ``python -m segmentry.flusher --drain --max-in-flight 8`` on a copy of a cached
  queue file of ``--backlog`` real event bodies (made by ``segmentry.messages.encode``),
  timed from spawn to exit; ``rate`` subtracts the start-up cost measured in the same round
  (a drain of an empty queue), ``rate_wall`` does not. Against it, the raw limit: a fresh
  process POSTs pre-built bodies of 100 events (the same rows of the same file, spliced
  exactly as the flusher does) over keep-alive ``requests.Session``s from 8 threads and from
  1 thread; the better of the two is "the limit". Peak RSS of the flusher comes from
  ``wait4`` (the kernel's max RSS, what ``/usr/bin/time -v`` prints) and psutil sampling;
  drains of a ~0 (1,000-event) and a 100 k backlog show whether it stays flat. Database and
  WAL sizes are read before and after each drain; CPU seconds of the flusher (rusage), of the
  raw loop (its own process time) and of the receiver (psutil) are recorded too.
- rtt: the receiver answers every ingest after ``delay_ms`` (50): the flusher drains a backlog
  with max_in_flight 8 and 1, and analytics-python sends the same number of events.
- sigkill: a producer process enqueues as fast as it can and writes each returned messageId
  to a pipe; the parent SIGKILLs it once K ids have come back. segmentry's queue is then
  drained by ``python -m segmentry.flusher --drain``; analytics-python's memory queue died
  with it. Lost = returned ids the receiver (``--record``) never got.
- growth: in a fresh process, ``track()`` (flusher=None) on a queue file already holding
  0 / 100 k / 1 M rows, then ``SQLiteQueue.claim(100, 499_000, now, 600)`` + ``delete`` per
  batch on the same file (flusher autocheckpoint, as the flusher does); then claims with 7
  more outstanding, as max_in_flight=8 keeps them (each claim skips the leased rows).
- profile (full runs, or ``--only profile``): ``py-spy record`` of one flusher drain.

JSON (``--json``), every number raw::

    {"bench": "delivery", "meta": {...}, "targets": {NAME: TARGET},
     "e2e": {"events", "runs": {"segmentry"|"analytics-python": [E2E, ...]}} | null,
     "replay": {"rows", "raw_batches", "startup": [RUN], "memory": {ROWS: [DRAIN]},
                "runs": {"flusher": [DRAIN], "raw-8": [RAW], "raw-1": [RAW]}} | null,
     "rtt": {"delay_ms", "rows", "runs": {"segmentry-mif8"|"segmentry-mif1": [DRAIN],
                                          "analytics-python": [E2E]}} | null,
     "sigkill": {"k", "runs": {"segmentry"|"analytics-python": [KILL]}} | null,
     "growth": {"sizes", "events", "batches", "runs": {SIZE: [GROWTH]}} | null,
     "profile": {"rows", "seconds", "samples", "categories": [[name, share]],
                 "self": [[frame, share]], "threads": {kind: share}} | null}
    TARGET = {"value", "target", "op" (">=" or "<"), "met", "issue", "detail"}

Each run object carries ``rate`` (events/s) plus what the tables show; see the functions
that build them (``e2e_worker``, ``drain``, ``raw_worker``, ``sigkill_run``, ``growth_worker``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import logging
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.common import (  # noqa: E402
    WRITE_KEY,
    Receiver,
    http_json,
    log,
    med,
    paired,
    spread,
    values,
)

MODULE = "benchmarks.bench_delivery"
EVENT_NAME = "Signed Up"
BATCH = 100  # events per request, for every contender
CLAIM_BYTES = 499_000  # the claim limit the brief fixes (just under 500 KB minus the envelope)
LEASE_S = 600.0
FLUSHER_AUTOCHECKPOINT = 1000  # pages, as segmentry.flusher sets on its connection
FLUSHER_START_S = 15.0  # until a flusher process holds its queue's lock
FLUSHER_PROCESS = "segmentry-flusher-process"  # e2e: flusher=None, a flusher process delivers
OWN_PROCESS = "segmentry-own-process"  # e2e: flusher="process", the client's own flusher process
SECTIONS = ("e2e", "replay", "rtt", "sigkill", "growth", "profile")


# =============================================================================================
# The receiver (common.Receiver), as a worker sees it: only its host URL.
# =============================================================================================


def wait_unique(host: str, count: int, timeout: float) -> dict[str, Any]:
    """Poll the receiver until it has ``count`` unique messageIds (or timeout); its stats."""
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        stats: dict[str, Any] = http_json(host + "/__stats")
        if stats["unique"] >= count or time.monotonic() > deadline:
            return stats
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


# =============================================================================================
# Fixtures: cached queue files of real event bodies.
# =============================================================================================


def event_body(i: int, created: float) -> str:
    from segmentry import messages

    fields = {"event": EVENT_NAME, "properties": {"plan": "pro", "i": i}}
    return messages.encode("track", f"user-{i}", fields, created).body


def build_backlog(rows: int) -> str:
    """A queue file of ``rows`` track events, cached (see ``common.queue_file``)."""
    return common.queue_file("delivery", rows, event_body)


def copy_queue(source: str | None, target: str) -> str:
    """A private copy of a cached backlog (or a new empty queue file when source is None),
    on disk before it is used: the writeback of a fresh 300 MB copy would otherwise compete
    with the I/O being measured (it cut enqueue rates on a 1 M copy by a quarter here)."""
    from segmentry.storage import SQLiteQueue

    if source is None:
        queue = SQLiteQueue(target)
        queue.stats(time.time())  # creates the file and its schema
        queue.close()
    else:
        shutil.copyfile(source, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)  # no connection to this file exists yet in this process
    return target


def file_sizes(path: str) -> dict[str, int]:
    """Bytes of the database and of its WAL (stat only)."""
    sizes = {}
    for name, suffix in (("db", ""), ("wal", "-wal")):
        try:
            sizes[name] = os.stat(path + suffix).st_size
        except FileNotFoundError:
            sizes[name] = 0
    return sizes


# =============================================================================================
# Worker side: one run, in a fresh interpreter (common.run_worker).
# =============================================================================================


def _segmentry_client(spec: dict[str, Any]) -> tuple[Callable[[int], bool], Callable[[], bool],
                                                     Callable[[], None]]:
    import segmentry
    import segmentry.flusher  # noqa: F401  (loaded now: the import is not what we time)

    client = segmentry.Client(WRITE_KEY, api_url=spec["api_url"],
                              queue_path=spec.get("queue_path")
                              or os.path.join(spec["dir"], "queue.db"),
                              flusher=spec.get("flusher", "thread"))
    track = client.track

    def call(i: int) -> bool:
        return track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i}) is not None

    return call, lambda: client.flush(spec["timeout"]), client.close


def _analytics_client(spec: dict[str, Any]) -> tuple[Callable[[int], bool], Callable[[], bool],
                                                     Callable[[], None]]:
    from segment.analytics import Client

    client = Client(WRITE_KEY, host=spec["host"], max_queue_size=spec["events"] + 10,
                    upload_size=BATCH)
    track = client.track

    def call(i: int) -> bool:
        return bool(track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})[0])

    def flush() -> bool:
        client.flush()  # queue.join(): every event sent or given up on
        return True

    return call, flush, client.join


class LogCapture(logging.Handler):
    """Keeps the first WARNING+ records of the libraries under test, for the run's result
    (a flusher thread that dies logs why, and the benchmark should say so)."""

    def __init__(self, limit: int = 10) -> None:
        super().__init__(logging.WARNING)
        self.limit = limit
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < self.limit:
            text = f"{record.levelname} {record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
            self.lines.append(text[:500])

    @classmethod
    def install(cls) -> LogCapture:
        handler = cls()
        for name in ("segmentry", "segment"):
            logging.getLogger(name).addHandler(handler)
        return handler


def e2e_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """N tracks, flush, then wait until the receiver holds every returned event."""
    captured = LogCapture.install()
    setup = _analytics_client if spec["contender"] == "analytics-python" else _segmentry_client
    call, flush, close = setup(spec)
    n = spec["events"]
    cpu0, t0 = time.process_time(), time.perf_counter()
    caller0 = common.cpu_snapshot()
    returned = sum(1 for i in range(n) if call(i))
    t_enqueued = time.perf_counter()
    caller = common.cpu_since(caller0)  # the enqueue loop: the caller's own thread
    flushed = flush()
    t_flushed = time.perf_counter()
    stats = wait_unique(spec["host"], returned, 30 if flushed else 1)
    t_end = time.perf_counter()
    cpu = time.process_time() - cpu0
    close()
    # flusher="process": close() reaped the client's flusher process, whose CPU is here.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = t_end - t0
    return {"events": n, "returned": returned, "flushed": flushed, "seconds": seconds,
            "rate": stats["unique"] / seconds, "enqueue_s": t_enqueued - t0,
            "flush_s": t_flushed - t_enqueued, "settle_s": t_end - t_flushed,
            "cpu_s": cpu, "caller_cpu_s": caller["thread_cpu_s"],
            "loop_process_cpu_s": caller["process_cpu_s"], "unique": stats["unique"],
            "duplicates": stats["duplicates"],
            "requests": stats["requests"], "drops": n - stats["unique"], "log": captured.lines,
            "flusher_cpu_s": children.ru_utime + children.ru_stime}


def load_bodies(path: str, batches: int) -> list[bytes]:
    """``batches`` request bodies of BATCH stored events each, spliced as the flusher does."""
    from segmentry import messages

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = [r[0] for r in conn.execute("SELECT body FROM events ORDER BY id LIMIT ?",
                                       (batches * BATCH,))]
    conn.close()
    sent_at = messages.format_timestamp(time.time())
    return [messages.splice_batch(rows[i:i + BATCH], sent_at).encode()
            for i in range(0, len(rows), BATCH)]


def raw_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The raw limit: pre-built bodies POSTed over keep-alive sessions, one per thread."""
    import requests

    bodies = load_bodies(spec["backlog"], spec["batches"])
    url = spec["api_url"] + "batch"
    token = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {token}"}
    threads = spec["threads"]
    parts = [bodies[k::threads] for k in range(threads)]
    failures = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def loop(k: int) -> None:
        session = requests.Session()
        session.trust_env = False  # no proxy look-up per request (segmentry skips it too)
        barrier.wait()
        for body in parts[k]:
            if session.post(url, data=body, headers=headers, timeout=60).status_code != 200:
                failures[k] += 1
        session.close()

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - t0
    events = sum(len(p) for p in parts) * BATCH
    return {"threads": threads, "events": events, "seconds": seconds, "rate": events / seconds,
            "cpu_s": time.process_time() - cpu0, "failures": sum(failures)}


def growth_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Enqueue cost, then claim + delete cost, on a queue file holding ``size`` rows."""
    import segmentry
    from segmentry.storage import SQLiteQueue

    path = copy_queue(spec["backlog"], os.path.join(spec["dir"], "queue.db"))
    client = segmentry.Client(WRITE_KEY, queue_path=path, flusher=None)
    track, clock = client.track, time.perf_counter_ns
    for i in range(spec["warmup"]):
        track(f"warm-{i}", EVENT_NAME, {"plan": "pro", "i": i})
    n = spec["events"]
    lat = [0] * n
    t0 = clock()
    for i in range(n):
        s = clock()
        track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})
        lat[i] = clock() - s
    enqueue_s = (clock() - t0) / 1e9
    client.close()
    queue = SQLiteQueue(path)
    queue.set_autocheckpoint(FLUSHER_AUTOCHECKPOINT)
    queue.claim(1, CLAIM_BYTES, time.time(), LEASE_S)  # opens the connection, warms the cache
    claim_ns, delete_ns, claimed = [], [], 0
    for _ in range(spec["batches"]):
        s = clock()
        claim = queue.claim(BATCH, CLAIM_BYTES, time.time(), LEASE_S)
        m = clock()
        queue.delete(claim.token, [r.id for r in claim.rows])
        claim_ns.append(m - s)
        delete_ns.append(clock() - m)
        claimed += len(claim.rows)
    # Again with 7 more claims outstanding, as a flusher with max_in_flight=8 has: each
    # claim then skips the leased rows at the head of the queue.
    flying: collections.deque[Any] = collections.deque()
    inflight_ns = []
    for _ in range(spec["batches"]):
        s = clock()
        claim = queue.claim(BATCH, CLAIM_BYTES, time.time(), LEASE_S)
        inflight_ns.append(clock() - s)
        flying.append(claim)
        if len(flying) >= 8:
            oldest = flying.popleft()
            queue.delete(oldest.token, [r.id for r in oldest.rows])
    queue.close()
    enq = common.latency_summary(lat)
    per_batch = [c + d for c, d in zip(claim_ns, delete_ns)]
    return {"size": spec["size"], "events": n, "enqueue_rate": n / enqueue_s,
            "enqueue_p50_us": enq["p50_us"], "enqueue_p99_us": enq["p99_us"],
            "claimed": claimed, "claim_rate": claimed / (sum(per_batch) / 1e9),
            "claim_p50_us": common.latency_summary(claim_ns)["p50_us"],
            "delete_p50_us": common.latency_summary(delete_ns)["p50_us"],
            "batch_p99_us": common.latency_summary(per_batch)["p99_us"],
            "claim_inflight_p50_us": common.latency_summary(inflight_ns)["p50_us"],
            "rate": n / enqueue_s}


WORKERS = {"e2e": e2e_worker, "raw": raw_worker, "growth": growth_worker}


def worker_main(spec_path: str) -> int:
    spec = common.read_spec(spec_path)
    common.write_result(spec, WORKERS[spec["worker"]](spec))
    return 0


def producer_main(spec_path: str) -> int:
    """The SIGKILL victim: enqueue as fast as possible, one returned messageId per line on
    stdout (a raw write per event, so every id written is in the pipe when the kill lands)."""
    spec = common.read_spec(spec_path)
    if spec["contender"] == "segmentry":
        import segmentry
        import segmentry.flusher  # noqa: F401

        client: Any = segmentry.Client(WRITE_KEY, queue_path=spec["queue_path"],
                                       api_url=spec["api_url"])

        def call(i: int) -> str | None:
            result: str | None = client.track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})
            return result
    else:
        from segment.analytics import Client

        client = Client(WRITE_KEY, host=spec["host"], max_queue_size=spec["limit"] + 10,
                        upload_size=BATCH)

        def call(i: int) -> str | None:
            ok, message = client.track(f"user-{i}", EVENT_NAME, {"plan": "pro", "i": i})
            return str(message["messageId"]) if ok else None

    write = os.write
    write(1, b"go\n")  # the parent times the run from here, start-up excluded
    for i in range(spec["limit"]):
        message_id = call(i)
        if message_id is not None:
            write(1, message_id.encode() + b"\n")
    time.sleep(3600)  # never reached in a normal run: the parent kills us long before
    return 0


# =============================================================================================
# Parent side.
# =============================================================================================


class RssSampler:
    """Samples a process's RSS (psutil) and its kernel high-water mark (VmHWM) until it
    exits; keeps a coarse timeline for the report."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.peak_hwm = 0
        self.io: dict[str, int] = {}  # /proc/PID/io as last read: bytes written so far
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        t0, last = time.perf_counter(), -1.0
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                with open(f"/proc/{self.pid}/status") as f:
                    hwm = next((int(line.split()[1]) * 1024 for line in f
                                if line.startswith("VmHWM:")), 0)
                with open(f"/proc/{self.pid}/io") as f:
                    self.io = {k: int(v) for k, v in (line.split(": ") for line in f)}
            except (psutil.Error, OSError, StopIteration, ValueError):
                return
            self.peak_rss, self.peak_hwm = max(self.peak_rss, rss), max(self.peak_hwm, hwm)
            now = time.perf_counter() - t0
            if now - last >= 0.5:
                self.timeline.append((round(now, 2), rss))
                last = now
            self._stop.wait(self.interval)


def flusher_env() -> dict[str, str]:
    return {**common.child_env(), "SEGMENT_WRITE_KEY": WRITE_KEY}


def flusher_command(queue: str, api_url: str, max_in_flight: int,
                    extra: list[str] | None = None, drain: bool = True) -> list[str]:
    return [sys.executable, "-m", "segmentry.flusher", "--queue", queue, "--api-url", api_url,
            *(["--drain"] if drain else []), "--max-in-flight", str(max_in_flight),
            "--progress", "none", "--log-level", "WARNING", *(extra or [])]


def drain(rx: Receiver, source: str | None, rundir: str, max_in_flight: int = 8,
          prefix: list[str] | None = None, faults: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """One ``python -m segmentry.flusher --drain`` of a private copy of ``source`` (a
    ``prefix`` such as py-spy may wrap it; ``faults`` are armed after the receiver's reset):
    wall time, peak RSS, CPU, file sizes before/after, what the receiver got."""
    queue = copy_queue(source, os.path.join(rundir, "queue.db"))
    before = file_sizes(queue)
    rx.reset()
    if faults:
        rx.faults(faults)
    rx_cpu0 = rx.cpu_s()
    with open(os.path.join(rundir, "flusher.log"), "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*(prefix or []),
                                 *flusher_command(queue, rx.url, max_in_flight)],
                                cwd=common.ROOT, env=flusher_env(), stdout=subprocess.DEVNULL,
                                stderr=err)
        sampler = RssSampler(proc.pid).start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    sampler.stop()
    stats = rx.stats()
    after = file_sizes(queue)
    with open(os.path.join(rundir, "flusher.log"), "rb") as f:
        stderr = f.read().decode(errors="replace")[-2000:]
    for suffix in ("", "-wal", "-shm", ".lock", ".flusher"):
        if os.path.exists(queue + suffix):
            os.unlink(queue + suffix)
    return {"exit": proc.returncode, "seconds": seconds, "unique": stats["unique"],
            "events": stats["events"], "duplicates": stats["duplicates"],
            "requests": stats["requests"], "by_status": stats["requests_by_status"],
            "max_rss_mb": usage.ru_maxrss / 1024, "sampled_rss_mb": sampler.peak_rss / 2**20,
            "rss_timeline": sampler.timeline[::max(1, len(sampler.timeline) // 40)],
            "cpu_s": usage.ru_utime + usage.ru_stime, "rx_cpu_s": rx.cpu_s() - rx_cpu0,
            "wchar": sampler.io.get("wchar"), "write_bytes": sampler.io.get("write_bytes"),
            "db_before": before["db"], "wal_before": before["wal"],
            "db_after": after["db"], "wal_after": after["wal"], "stderr": stderr}


class Bench:
    """The sections, sharing one work directory and the receivers."""

    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.workdir = workdir

    def rundir(self) -> str:
        return tempfile.mkdtemp(dir=self.workdir, prefix="run-")

    def worker(self, spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        rundir = self.rundir()
        try:
            return common.run_worker(MODULE, {**spec, "dir": rundir}, self.workdir, timeout)
        finally:
            shutil.rmtree(rundir, ignore_errors=True)

    # -- e2e ----------------------------------------------------------------------------------

    def e2e(self, rx: Receiver, events: int, delay_ms: float = 0.0) -> Callable[[str, int],
                                                                                dict[str, Any]]:
        def run_one(contender: str, run: int) -> dict[str, Any]:
            spec = {"worker": "e2e", "contender": contender, "events": events,
                    "api_url": rx.url, "host": rx.host, "timeout": max(60.0, events / 500)}
            rx.reset()
            if delay_ms:
                rx.faults({"delay_ms": delay_ms})
            cpu0 = rx.cpu_s()
            if contender == FLUSHER_PROCESS:
                result = self.with_flusher_process(rx, spec)
            elif contender == OWN_PROCESS:
                result = self.worker({**spec, "flusher": "process"})
            else:
                result = self.worker(spec)
            for line in result["log"]:
                log(f"    {contender} logged: {line}")
            return {"run": run, **result, "rx_cpu_s": rx.cpu_s() - cpu0}

        return run_one

    def with_flusher_process(self, rx: Receiver, spec: dict[str, Any]) -> dict[str, Any]:
        """The e2e worker with flusher=None while a ``python -m segmentry.flusher`` process
        (started and holding the queue's lock beforehand) delivers the same file."""
        qdir = self.rundir()
        queue = os.path.join(qdir, "queue.db")
        command = flusher_command(queue, rx.url, 8, ["--batch-every-ms", "50"], drain=False)
        with open(os.path.join(qdir, "flusher.log"), "wb") as err:
            proc = subprocess.Popen(command, cwd=common.ROOT, env=flusher_env(),
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + FLUSHER_START_S
            while not os.path.exists(queue + ".flusher"):  # its pid file: it holds the lock
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the flusher process did not start")
                time.sleep(0.02)
            result = self.worker({**spec, "queue_path": queue, "flusher": None})
        finally:
            usage = None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here
            shutil.rmtree(qdir, ignore_errors=True)
        return {**result, "flusher_cpu_s": usage.ru_utime + usage.ru_stime if usage else None}

    def e2e_section(self, rx: Receiver) -> dict[str, Any]:
        n = self.args.e2e_events
        log(f"e2e: {n:,} events, segmentry vs analytics-python x {self.args.runs}")
        runs = common.alternate(["segmentry", "analytics-python", FLUSHER_PROCESS, OWN_PROCESS],
                                self.args.runs, self.e2e(rx, n), log)
        return {"events": n, "runs": runs}

    # -- replay -------------------------------------------------------------------------------

    def raw(self, rx: Receiver, backlog: str, threads: int, run: int) -> dict[str, Any]:
        rx.reset()
        cpu0 = rx.cpu_s()
        result = self.worker({"worker": "raw", "backlog": backlog, "api_url": rx.url,
                              "threads": threads, "batches": self.args.raw_batches})
        stats = rx.stats()
        return {"run": run, **result, "unique": stats["unique"], "requests": stats["requests"],
                "rx_cpu_s": rx.cpu_s() - cpu0}

    def drain_run(self, rx: Receiver, source: str | None, run: int, max_in_flight: int = 8,
                  faults: dict[str, Any] | None = None) -> dict[str, Any]:
        rundir = self.rundir()
        try:
            return {"run": run, **drain(rx, source, rundir, max_in_flight, faults=faults)}
        finally:
            shutil.rmtree(rundir, ignore_errors=True)

    def replay_section(self, rx: Receiver) -> dict[str, Any]:
        rows = self.args.backlog
        small, mid = self.args.memory_sizes
        paths = {n: build_backlog(n) for n in (small, mid, rows)}
        raw_source = paths[rows] if self.args.raw_batches * BATCH <= rows else \
            build_backlog(self.args.raw_batches * BATCH)
        log(f"replay: {rows:,}-event backlog, flusher --drain vs raw requests x {self.args.runs}")
        out: dict[str, Any] = {"rows": rows, "raw_batches": self.args.raw_batches,
                               "startup": [], "memory": {str(small): [], str(mid): []},
                               "runs": {"flusher": [], "raw-8": [], "raw-1": []}}
        for run in range(self.args.runs):
            startup = self.drain_run(rx, None, run)
            out["startup"].append(startup)
            for n in (small, mid):
                out["memory"][str(n)].append(self.drain_run(rx, paths[n], run))
            result = self.drain_run(rx, paths[rows], run)
            result["rate_wall"] = result["unique"] / result["seconds"]
            result["rate"] = result["unique"] / max(1e-3, result["seconds"] - startup["seconds"])
            result["cpu_net_s"] = result["cpu_s"] - startup["cpu_s"]
            out["runs"]["flusher"].append(result)
            log(f"  run {run + 1}/{self.args.runs} flusher --drain {result['rate']:>10,.0f} ev/s"
                f"  (wall {result['rate_wall']:,.0f}, max RSS {result['max_rss_mb']:.1f} MB,"
                f" exit {result['exit']})")
            for threads in (8, 1):
                raw = self.raw(rx, raw_source, threads, run)
                out["runs"][f"raw-{threads}"].append(raw)
                log(f"  run {run + 1}/{self.args.runs} raw requests x{threads}"
                    f"      {raw['rate']:>10,.0f} ev/s")
        return out

    # -- rtt ----------------------------------------------------------------------------------

    def rtt_section(self, rx: Receiver) -> dict[str, Any]:
        rows, delay = self.args.rtt_events, self.args.delay_ms
        path = build_backlog(rows)
        log(f"rtt: receiver delay {delay:g} ms, {rows:,} events x {self.args.runs}")
        analytics = self.e2e(rx, rows, delay)

        def run_one(name: str, run: int) -> dict[str, Any]:
            if name == "analytics-python":
                return analytics(name, run)
            startup = self.drain_run(rx, None, run)  # nothing to send: no delay either
            result = self.drain_run(rx, path, run, int(name[-1]), {"delay_ms": delay})
            result.update(startup_s=startup["seconds"],
                          rate_wall=result["unique"] / result["seconds"],
                          rate=result["unique"] / max(1e-3, result["seconds"]
                                                      - startup["seconds"]))
            return result

        runs = common.alternate(["segmentry-mif8", "segmentry-mif1", "analytics-python"],
                                self.args.runs, run_one, log)
        return {"delay_ms": delay, "rows": rows, "runs": runs}

    # -- sigkill ------------------------------------------------------------------------------

    def sigkill_run(self, rx: Receiver, contender: str, run: int) -> dict[str, Any]:
        """Kill a producer after K returned ids; count which returned ids never arrive."""
        k = self.args.kill_after
        rundir = self.rundir()
        try:
            rx.reset()
            queue = os.path.join(rundir, "queue.db")
            spec_path = os.path.join(rundir, "producer.json")
            with open(spec_path, "w") as f:
                json.dump({"contender": contender, "queue_path": queue, "api_url": rx.url,
                           "host": rx.host, "limit": 20 * k}, f)
            with open(os.path.join(rundir, "producer.log"), "wb") as err:
                proc = subprocess.Popen([sys.executable, "-m", MODULE, "--producer", spec_path],
                                        cwd=common.ROOT, env=common.child_env(),
                                        stdout=subprocess.PIPE, stderr=err)
                assert proc.stdout is not None
                returned: list[str] = []
                t0 = time.perf_counter()
                killed_at = None
                for line in proc.stdout:
                    if line == b"go\n":
                        t0 = time.perf_counter()
                        continue
                    returned.append(line.decode().strip())
                    if killed_at is None and len(returned) >= k:
                        os.kill(proc.pid, signal.SIGKILL)
                        killed_at = time.perf_counter() - t0
                proc.wait()
            at_kill = rx.stats()["unique"]
            drained = None
            if contender == "segmentry":
                drain_proc = subprocess.run(
                    flusher_command(queue, rx.url, 8, ["--drain-timeout", "120"]),
                    cwd=common.ROOT, env=flusher_env(), capture_output=True, timeout=300)
                drained = drain_proc.returncode
            else:
                time.sleep(0.5)  # nothing is left to send: the queue died with the process
            stats = rx.stats()
            received = set(rx.message_ids())
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        mine = set(returned)
        lost = len(mine - received)
        return {"run": run, "returned": len(mine), "killed_at_s": killed_at,
                "delivered_before_kill": at_kill, "delivered": len(mine & received),
                "lost": lost, "lost_pct": 100.0 * lost / max(1, len(mine)),
                "extra": len(received - mine), "duplicates": stats["duplicates"],
                "drain_exit": drained, "rate": len(mine) / killed_at if killed_at else 0.0}

    def sigkill_section(self) -> dict[str, Any]:
        log(f"sigkill: kill the producer after {self.args.kill_after:,} returned events "
            f"x {self.args.runs}")
        with Receiver(self.workdir, record=True) as rx:
            runs = common.alternate(["segmentry", "analytics-python"], self.args.runs,
                                    lambda name, run: self.sigkill_run(rx, name, run), log)
        for name, results in runs.items():
            log(f"  {name}: lost {[round(r['lost_pct'], 2) for r in results]} %")
        return {"k": self.args.kill_after, "runs": runs}

    # -- growth -------------------------------------------------------------------------------

    def growth_section(self) -> dict[str, Any]:
        sizes = self.args.growth_sizes
        paths = {n: build_backlog(n) if n else None for n in sizes}
        log(f"growth: enqueue and claim at backlogs {sizes} x {self.args.runs}")
        spec = {"worker": "growth", "events": self.args.growth_events, "warmup": 200,
                "batches": self.args.growth_events // (2 * BATCH)}  # two passes
        runs = common.alternate(
            [str(n) for n in sizes], self.args.runs,
            lambda name, run: {"run": run, **self.worker({**spec, "size": int(name),
                                                          "backlog": paths[int(name)]})}, log)
        return {"sizes": sizes, "events": spec["events"], "batches": spec["batches"],
                "runs": runs}

    # -- profile ------------------------------------------------------------------------------

    def profile_section(self, rx: Receiver) -> dict[str, Any] | None:
        """py-spy (when installed) over one flusher drain: where its CPU time goes."""
        pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                        "py-spy")
        if not os.path.exists(pyspy):
            log("profile: py-spy not found, skipped")
            return None
        rows = self.args.profile_rows
        path = build_backlog(rows)
        log(f"profile: py-spy over a {rows:,}-event drain")
        rundir = self.rundir()
        try:
            raw = os.path.join(rundir, "profile.txt")
            result = drain(rx, path, rundir, 8, [pyspy, "record", "--nonblocking", "-r", "1000",
                                                 "-f", "raw", "-o", raw, "--"])
            with open(raw) as f:
                profile = summarize_profile(f.read())
        finally:
            shutil.rmtree(rundir, ignore_errors=True)
        return {"rows": rows, "seconds": result["seconds"], "exit": result["exit"], **profile}


# Where a sample's time goes, by the first marker found anywhere in its stack (most
# specific first): what the flusher does for each batch, and what is start-up or waiting.
PROFILE_CATEGORIES = (
    ("start-up: imports", ("importlib",)),
    ("waiting (a blocked thread py-spy counts as active)", ("Condition.wait", "Event.wait")),
    ("SQLite: claim (select + lease)", ("SQLiteQueue.claim",)),
    ("SQLite: delete after 2xx", ("SQLiteQueue.delete",)),
    ("SQLite: checkpoint / vacuum", ("SQLiteQueue.maintain",)),
    ("SQLite: other", ("storage.py",)),
    ("HTTP: HTTPClient.post (requests' session, segmentry/_transport.py)",
     ("HTTPClient.post", "Session.post")),
    ("batch body: check + splice", ("splice_batch", "_check_batch")),
    ("telemetry", ("telemetry.py",)),
    ("flusher loop and senders' bookkeeping", ("flusher.py",)),
)


def summarize_profile(collapsed: str, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the share of samples per category (see
    PROFILE_CATEGORIES), per thread kind, and the top frames by self time."""
    self_time: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [frame.strip() for frame in stack.split(";")]
        self_time[_frame_name(frames[-1])] += count
        if frames[-1].startswith("Senders._serve "):  # SimpleQueue.get: waiting for work
            categories[PROFILE_CATEGORIES[1][0]] += count
        else:
            categories[next((name for name, markers in PROFILE_CATEGORIES
                              if any(m in frame for frame in frames for m in markers)),
                             "other")] += count
        kind = "senders" if any("Senders._serve" in f for f in frames) else \
            "claim loop" if any("Flusher._loop" in f for f in frames) else "other"
        threads[kind] += count
    share = 1.0 / max(1, total)
    return {"samples": total,
            "categories": [(name, n * share) for name, n in categories.most_common()],
            "self": [(name, n * share) for name, n in self_time.most_common(top)],
            "threads": {name: n * share for name, n in threads.items()}}


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file path from the package on)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3."):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker.startswith("lib/"):
                where = where.split("/", 1)[-1]
    if "/main/" in where:
        where = where.split("/main/", 1)[1]
    return f"{name} ({where})"


# =============================================================================================
# Targets and the text report.
# =============================================================================================


def per_event_us(runs: list[dict[str, Any]], key: str) -> float:
    return spread([1e6 * r[key] / max(1, r.get("unique") or r["events"]) for r in runs])["median"]


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each issue's target with the measured value; ``detail`` says how far and why."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float, target: float, issue: str, detail: str,
            op: str = ">=") -> None:
        met = value >= target if op == ">=" else value <= target if op == "<=" \
            else value < target
        out[name] = {"value": value, "target": target, "op": op, "met": bool(met),
                     "issue": issue, "detail": detail}

    e2e = results.get("e2e")
    if e2e:
        seg, ap = e2e["runs"]["segmentry"], e2e["runs"]["analytics-python"]
        add("end-to-end: segmentry / analytics-python", spread(paired(seg, ap))["median"], 2.0,
            "end-to-end >= 2x analytics-python",
            f"segmentry {med(seg):,.0f} ev/s (enqueue loop {med(seg, 'enqueue_s'):.2f} s, "
            f"then flush {med(seg, 'flush_s'):.2f} s; CPU "
            f"{per_event_us(seg, 'cpu_s'):.0f} us/event in the client process) vs "
            f"analytics-python {med(ap):,.0f} ev/s (enqueue {med(ap, 'enqueue_s'):.2f} s, "
            f"flush {med(ap, 'flush_s'):.2f} s; CPU {per_event_us(ap, 'cpu_s'):.0f} us/event);"
            f" drops {sum(int(r['drops']) for r in seg)} vs {sum(int(r['drops']) for r in ap)}"
            + (f"; with flusher=None and a flusher process instead of the thread: "
               f"{med(e2e['runs'][FLUSHER_PROCESS]):,.0f} ev/s "
               f"({spread(paired(e2e['runs'][FLUSHER_PROCESS], ap))['median']:.2f}x)"
               if FLUSHER_PROCESS in e2e["runs"] else "")
            + (f"; with flusher=\"process\": {med(e2e['runs'][OWN_PROCESS]):,.0f} ev/s "
               f"({spread(paired(e2e['runs'][OWN_PROCESS], ap))['median']:.2f}x), CPU "
               f"{per_event_us(e2e['runs'][OWN_PROCESS], 'cpu_s'):.1f} µs/event in the client "
               f"process + {per_event_us(e2e['runs'][OWN_PROCESS], 'flusher_cpu_s'):.1f} in "
               "its flusher process" if OWN_PROCESS in e2e["runs"] else ""))
        ratio = spread(paired(seg, ap))["median"]
        add("end-to-end: segmentry / analytics-python (issue 21)", ratio, 1.5,
            "issue 21: >= 1.5x (goal 2x)", "paired ratios "
            + ", ".join(f"{x:.2f}" for x in sorted(paired(seg, ap))))
        cpu = [common.ratio(s["cpu_s"] / s["unique"], a["cpu_s"] / a["unique"])
               for s, a in zip(seg, ap)]
        add("end-to-end: client CPU per delivered event, segmentry / analytics-python",
            spread(cpu)["median"], 0.6, "issue 21: <= 0.6x",
            f"segmentry {per_event_us(seg, 'cpu_s'):.1f} µs, analytics-python "
            f"{per_event_us(ap, 'cpu_s'):.1f} µs per delivered event (median); paired "
            "ratios " + ", ".join(f"{x:.2f}" for x in sorted(cpu)), "<=")
    replay = results.get("replay")
    if replay:
        runs = replay["runs"]
        flusher = runs["flusher"]
        best = max(("raw-8", "raw-1"), key=lambda k: med(runs[k]))
        ratio = spread(paired(flusher, runs[best]))["median"]
        each = sorted(paired(flusher, runs[best]))
        wall = spread([common.ratio(f["rate_wall"], r["rate"])
                       for f, r in zip(flusher, runs[best])])["median"]
        why = (f"paired ratios {', '.join(f'{x:.3f}' for x in each)}; counting the flusher's "
               f"start-up too (wall clock, spawn to exit): {wall:.3f}; "
               f"flusher {med(flusher):,.0f} ev/s (wall {med(flusher, 'rate_wall'):,.0f}), "
               f"limit ({best}) {med(runs[best]):,.0f} ev/s; CPU per event: flusher "
               f"{per_event_us(flusher, 'cpu_net_s'):.1f} us (start-up excluded), raw loop "
               f"{per_event_us(runs[best], 'cpu_s'):.1f} us, receiver "
               f"{per_event_us(flusher, 'rx_cpu_s'):.1f} us (2 cores shared by both processes)")
        add("replay: flusher / raw requests limit", ratio, 0.75, "issue 5 (>= 0.75x)", why)
        add("replay: flusher / raw requests limit (issue 3)", ratio, 0.6, "issue 3 (>= 0.6x)",
            why)
        peaks = {replay["rows"]: max(values(flusher, "max_rss_mb"))}
        for rows, drains in replay["memory"].items():
            peaks[int(rows)] = max(values(drains, "max_rss_mb"))
        sizes = sorted(peaks)
        add("replay: flusher peak RSS, MB", peaks[sizes[-1]], 50.0, "< 50 MB",
            "max RSS per backlog: " + ", ".join(f"{n:,}: {peaks[n]:.1f} MB" for n in sizes),
            "<")
        add("replay: RSS growth ~0 -> full backlog, MB", peaks[sizes[-1]] - peaks[sizes[0]], 5.0,
            "flat from 0 to 1 M (taken as < 5 MB growth)",
            f"{peaks[sizes[0]]:.1f} MB at {sizes[0]:,} events, {peaks[sizes[-1]]:.1f} MB at "
            f"{sizes[-1]:,}", "<")
    rtt = results.get("rtt")
    if rtt:
        runs = rtt["runs"]
        mif8, mif1, ap = runs["segmentry-mif8"], runs["segmentry-mif1"], runs["analytics-python"]
        ideal = 8 * BATCH / (rtt["delay_ms"] / 1000)
        add(f"{rtt['delay_ms']:g} ms RTT: replay ev/s, max_in_flight=8", med(mif8), 10_000.0,
            ">= 10 k events/s",
            f"ideal {ideal:,.0f} ev/s (8 x {BATCH} events per {rtt['delay_ms']:g} ms); "
            f"max_in_flight=1 {med(mif1):,.0f} ev/s ({spread(paired(mif8, mif1))['median']:.1f}x"
            f"), analytics-python {med(ap):,.0f} ev/s ({spread(paired(mif8, ap))['median']:.1f}"
            f"x); start-up ({med(mif8, 'startup_s'):.2f} s) subtracted, wall rate "
            f"{med(mif8, 'rate_wall'):,.0f} ev/s")
    kill = results.get("sigkill")
    if kill:
        seg, ap = kill["runs"]["segmentry"], kill["runs"]["analytics-python"]
        add("SIGKILL: segmentry events lost, %", max(values(seg, "lost_pct")), 1e-9,
            "the promise: 0 lost (worst run)",
            f"segmentry lost {sum(int(r['lost']) for r in seg)} of "
            f"{sum(int(r['returned']) for r in seg):,} returned events over {len(seg)} kills "
            f"(duplicates {sum(int(r['duplicates']) for r in seg)}); analytics-python lost "
            f"{med(ap, 'lost_pct'):.1f} % (median) of what track() had accepted", "<")
    growth = results.get("growth")
    if growth:
        sizes = [str(n) for n in growth["sizes"]]
        runs = growth["runs"]
        for key, what in (("enqueue_rate", "enqueue"), ("claim_rate", "claim + delete")):
            ratio = spread(paired(runs[sizes[-1]], runs[sizes[0]], key))["median"]
            add(f"growth: {what} rate at {int(sizes[-1]):,} / at {int(sizes[0]):,}", ratio, 0.9,
                "flat (taken as >= 0.9x)",
                ", ".join(f"{int(s):,}: {med(runs[s], key):,.0f} ev/s" for s in sizes))
    return out


def report(results: dict[str, Any]) -> str:
    """A short plain-text summary for the terminal (RESULTS.md is run.py's job)."""
    lines = []
    for name, t in results["targets"].items():
        lines.append(f"{'met   ' if t['met'] else 'MISSED'} {name}: {t['value']:,.4g} "
                     f"(target {t['op']} {t['target']:g}) - {t['detail']}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--producer", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a smoke run, well under a minute")
    p.add_argument("--runs", type=int, help="runs per contender (default 5)")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--e2e-events", type=int, help="events per end-to-end run (default 50000)")
    p.add_argument("--backlog", type=int, help="replay backlog (default 1000000)")
    p.add_argument("--raw-batches", type=int,
                   help="bodies the raw loop posts (default: the whole backlog, 10000)")
    p.add_argument("--rtt-events", type=int, help="events per 50 ms RTT run (default 20000)")
    p.add_argument("--delay-ms", type=float, default=50.0, help="the simulated round trip")
    p.add_argument("--kill-after", type=int, help="returned events before SIGKILL (20000)")
    p.add_argument("--growth-events", type=int, help="enqueued / claimed per run (20000)")
    p.add_argument("--json", help="write every raw number here")
    args = p.parse_args(argv)
    full = {"runs": 5, "e2e_events": 50_000, "backlog": 1_000_000, "raw_batches": 10_000,
            "rtt_events": 20_000, "kill_after": 20_000, "growth_events": 20_000}
    quick = {"runs": 2, "e2e_events": 5_000, "backlog": 20_000, "raw_batches": 200,
             "rtt_events": 3_000, "kill_after": 3_000, "growth_events": 3_000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.memory_sizes = (1_000, 5_000) if args.quick else (1_000, 100_000)
    args.growth_sizes = (0, 5_000, 20_000) if args.quick else (0, 100_000, 1_000_000)
    args.profile_rows = 20_000 if args.quick else 100_000
    default = [s for s in SECTIONS if s != "profile" or not args.quick]
    args.sections = args.only.split(",") if args.only else default
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def meta(args: argparse.Namespace) -> dict[str, Any]:
    from segmentry.version import __version__

    return {"segmentry": __version__, "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version, "cpus": os.cpu_count(), "runs": args.runs,
            "quick": args.quick, "sections": args.sections, "argv": sys.argv,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.producer:
        return producer_main(args.producer)
    started = time.monotonic()
    results: dict[str, Any] = {"bench": "delivery", "meta": meta(args),
                               **{name: None for name in SECTIONS}}
    workdir = tempfile.mkdtemp(prefix="segmentry-delivery-")
    try:
        with Receiver(workdir) as rx:
            bench = Bench(args, workdir)
            sections: dict[str, Callable[[], Any]] = {
                "e2e": lambda: bench.e2e_section(rx), "replay": lambda: bench.replay_section(rx),
                "rtt": lambda: bench.rtt_section(rx), "sigkill": bench.sigkill_section,
                "growth": bench.growth_section, "profile": lambda: bench.profile_section(rx)}
            for name in SECTIONS:
                if name in args.sections:
                    results[name] = sections[name]()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["targets"] = targets(results)
    return common.finish(results, started, report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
