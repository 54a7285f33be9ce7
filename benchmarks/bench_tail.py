"""Where each slow ``track()`` call comes from: time every call, record what the flusher
was doing meanwhile, and name, for each call over ``--over-ms``, what overlapped it.

    python benchmarks/bench_tail.py [--calls 100000] [--over-ms 1] [--runs 2]
        [--max-in-flight 8] [--switch-interval S] [--json out.json]

One process, the default client (flusher thread) against ``tools/fake_segment.py`` on
127.0.0.1. Recorded, as (start, end) intervals on ``perf_counter_ns``: the flusher's
queue calls (claims, deletes, releases, checkpoints), each HTTP attempt (``post``), each
garbage collection (``gc0``-``gc2``), and the caller's waits over 100 µs for the lock it
shares with the flusher (``lock-wait``), and the caller's queue calls on the retrying path
(``caller-retry-path``: a ``put`` that found the file locked, retried with sleeps, and the
size check every few hundred calls). A slow call overlapped by a flusher interval but by
no wait of its own waited for the GIL: its cause is what the flusher thread was running.

The wrappers cost the flusher a few µs a call; rates here are not comparable with
bench_caller.py's, the attribution is the point.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

FLUSHER_CALLS = ("claim_batches", "delete_many", "delete", "release", "bury", "maintain",
                 "checkpoint", "renew", "pending")
LOCK_WAIT_NS = 100_000  # a caller's wait for the shared lock worth recording

Interval = tuple[str, int, int]


class Recorder:
    """Intervals of the flusher's work and of the caller's waits, from wrapped calls."""

    def __init__(self) -> None:
        self.intervals: list[Interval] = []
        self.caller = threading.main_thread()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str | None = None,
             caller_only: bool = False) -> None:
        real = getattr(owner, name)
        clock, record, caller = time.perf_counter_ns, self.intervals.append, self.caller

        def timed(*args: Any, **kwargs: Any) -> Any:
            if caller_only and threading.current_thread() is not caller:
                return real(*args, **kwargs)
            start = clock()
            try:
                return real(*args, **kwargs)
            finally:
                record((label or name, start, clock()))

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, real))

    def restore(self) -> None:
        """Put every wrapped method back (the next run wraps the real ones again)."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def watch_gc(self) -> None:
        clock, started = time.perf_counter_ns, [0]

        def callback(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = clock()
            else:
                self.intervals.append((f"gc{info['generation']}", started[0], clock()))

        gc.callbacks.append(callback)
        self._undo.append(lambda: gc.callbacks.remove(callback))

    def watch_lock(self, queue: Any) -> None:
        """The caller's waits for the queue object's lock (shared with the flusher)."""
        queue._lock = _TimedLock(queue._lock, self)


class _TimedLock:
    def __init__(self, lock: Any, recorder: Recorder) -> None:
        self.lock, self.recorder = lock, recorder

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self.lock.acquire(*args, **kwargs))

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> None:
        if threading.current_thread() is not self.recorder.caller:
            self.lock.acquire()
            return
        start = time.perf_counter_ns()
        self.lock.acquire()
        end = time.perf_counter_ns()
        if end - start > LOCK_WAIT_NS:
            self.recorder.intervals.append(("lock-wait", start, end))

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def one_run(args: argparse.Namespace, workdir: str, url: str, run: int) -> dict[str, Any]:
    import segmentry
    from segmentry import http, storage

    recorder = Recorder()
    for name in FLUSHER_CALLS:
        recorder.wrap(storage.SQLiteQueue, name)
    recorder.wrap(storage.SQLiteQueue, "_run", "caller-retry-path", caller_only=True)
    recorder.wrap(http.HTTPClient, "post")
    recorder.watch_gc()
    client = segmentry.Client("KEY", queue_path=os.path.join(workdir, f"q{run}.db"),
                              api_url=url, max_in_flight=args.max_in_flight)
    recorder.watch_lock(client.queue)
    track, clock = client.track, time.perf_counter_ns
    for i in range(500):
        track(f"user-{i}", "Bench Event", {"plan": "pro", "i": i})
    recorder.intervals.clear()
    slow: list[tuple[int, int]] = []
    start = clock()
    for i in range(args.calls):
        t0 = clock()
        track(f"user-{i}", "Bench Event", {"plan": "pro", "i": i})
        t1 = clock()
        if t1 - t0 > args.over_ms * 1e6:
            slow.append((t0, t1))
    seconds = (clock() - start) / 1e9
    client.close()
    recorder.restore()
    return {"rate": args.calls / seconds, "slow": len(slow),
            "causes": attribute(slow, recorder.intervals),
            "spans": span_summary(recorder.intervals)}


def attribute(slow: list[tuple[int, int]], intervals: list[Interval]) -> dict[str, list[float]]:
    """For each slow call, the names of the intervals overlapping it: {cause: [ms, ...]}."""
    intervals = sorted(intervals, key=lambda iv: iv[1])
    causes: dict[str, list[float]] = defaultdict(list)
    for t0, t1 in slow:
        names = {name for name, start, end in intervals if start < t1 and end > t0}
        causes["+".join(sorted(names)) or "nothing recorded"].append((t1 - t0) / 1e6)
    return dict(causes)


def span_summary(intervals: list[Interval]) -> dict[str, dict[str, float]]:
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, start, end in intervals:
        by_name[name].append((end - start) / 1e3)
    return {name: {"n": len(v), "p50_us": common.percentile(sorted(v), 50),
                   "p99_us": common.percentile(sorted(v), 99), "max_us": max(v)}
            for name, v in by_name.items()}


def report(runs: list[dict[str, Any]], over_ms: float) -> None:
    total: Counter[str] = Counter()
    ms: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for cause, durations in run["causes"].items():
            total[cause] += len(durations)
            ms[cause] += durations
    rates = ", ".join(f"{r['rate']:,.0f}" for r in runs)
    print(f"{len(runs)} run(s): calls/s {rates}; calls over {over_ms:g} ms: "
          f"{', '.join(str(r['slow']) for r in runs)}")
    print(f"\n{'calls':>6} {'mean ms':>8} {'max ms':>7}  overlapped by")
    for cause, count in total.most_common():
        print(f"{count:6d} {sum(ms[cause]) / count:8.2f} {max(ms[cause]):7.2f}  {cause}")
    print(f"\n{'interval (last run)':24} {'n':>7} {'p50 µs':>9} {'p99 µs':>9} {'max µs':>9}")
    for name, s in sorted(runs[-1]["spans"].items()):
        print(f"{name:24} {s['n']:7.0f} {s['p50_us']:9.0f} {s['p99_us']:9.0f} "
              f"{s['max_us']:9.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--over-ms", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval() for the run (CPython's is 0.005)")
    parser.add_argument("--json", help="write every run's numbers here")
    args = parser.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    with tempfile.TemporaryDirectory() as workdir, common.Receiver(workdir) as receiver:
        runs = [one_run(args, workdir, receiver.url, run) for run in range(args.runs)]
    report(runs, args.over_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "tail", "args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

