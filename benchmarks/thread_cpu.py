"""Where a process's CPU goes when it enqueues with the default flusher thread: CPU per
event of the producer thread, the flusher loop and the sender threads (psutil's
per-thread times), and how many events each request carried.

    python benchmarks/thread_cpu.py [--events 30000] [--runs 3] [--flusher thread|none]

Each run is a fresh process against ``tools/fake_segment.py`` on 127.0.0.1; nothing
else is contacted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.common import Receiver  # noqa: E402


def thread_cpu() -> collections.Counter[str]:
    """CPU seconds so far of each of this process's threads, by role."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: collections.Counter[str] = collections.Counter()
    for t in psutil.Process().threads():
        name = names.get(t.id, "other")
        out["senders" if name.startswith("segmentry-send") else name] += \
            t.user_time + t.system_time
    return out


def one_run(events: int, flusher: str, api_url: str, workdir: str) -> dict[str, Any]:
    """In a child process: ``events`` track() calls, timed, then a flush."""
    import segmentry

    options: dict[str, Any] = {"flusher": None} if flusher == "none" else {}
    client = segmentry.Client(common.WRITE_KEY, api_url=api_url,
                              queue_path=os.path.join(workdir, "queue.db"), **options)
    for i in range(500):  # warm up: imports, the connection, the flusher thread
        client.track("warm-up", "Bench Event", {"i": i})
    before, start = thread_cpu(), time.perf_counter()
    for i in range(events):
        client.track(f"user-{i}", "Bench Event", {"plan": "pro", "i": i})
    seconds = time.perf_counter() - start
    after = thread_cpu()
    client.close(timeout=60)
    return {"rate": events / seconds,
            "cpu_us": {k: (after[k] - before.get(k, 0.0)) / events * 1e6 for k in after}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--flusher", choices=("thread", "none"), default="thread")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args.events, args.flusher, *args.child.split(" ", 1))))
        return 0
    with tempfile.TemporaryDirectory() as workdir, Receiver(workdir) as rx:
        runs = []
        for run in range(args.runs):
            rundir = tempfile.mkdtemp(dir=workdir)
            rx.reset()
            out = subprocess.run(
                [sys.executable, __file__, "--events", str(args.events), "--flusher",
                 args.flusher, "--child", f"{rx.url} {rundir}"],
                env=common.child_env(), check=True, capture_output=True, text=True).stdout
            result = json.loads(out)
            stats = rx.stats()
            result["per_request"] = stats["events"] / max(1, stats["requests"])
            runs.append(result)
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["cpu_us"].items()))
            print(f"run {run + 1}: {result['rate']:,.0f} track()/s; CPU us/event: {cpu}; "
                  f"{result['per_request']:.1f} events per request", flush=True)
        rate = statistics.median(r["rate"] for r in runs)
        print(f"median {rate:,.0f} track()/s over {args.runs} runs, flusher={args.flusher}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
