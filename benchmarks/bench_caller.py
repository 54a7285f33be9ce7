"""What the caller feels: CPU per event and per-call latency of ``track()``, for measures
that mean the same on every machine (a rate ratio against a threaded client does not).

    python benchmarks/bench_caller.py [--calls 100000] [--runs 5] [--quick]
        [--skip-machine] [--only NAME,...] [--json out.json]

``--quick`` (a smoke test) makes 5,000 calls x 2 runs. The full run (100,000 calls x 5
runs x 10 contenders) takes about 9 minutes on 2 cores.

Method. Each run is one fresh interpreter (``bench_enqueue.enqueue_worker``): ``--warmup``
untimed calls, then ``--calls`` calls each timed with ``perf_counter_ns``; around the timed
loop only, the caller thread's CPU (``time.thread_time_ns``), the whole process's CPU
(``getrusage(RUSAGE_SELF)``, user + system: every thread, the flusher's or consumer's too)
and the context switches of the caller thread (``RUSAGE_THREAD``: voluntary = it blocked,
on a lock, the GIL or I/O; involuntary = the kernel preempted it). Contenders are
alternated run by run; tables show the median (min–max) over runs, ratios paired within a
round. Every receiver is ``tools/fake_segment.py`` on 127.0.0.1; nothing else is contacted.

Contenders (the issue's four, then the "machine" variants that test why
analytics-python's rate moves between machines):

- ``segmentry``: default options, the in-process flusher thread delivering;
- ``segmentry-child``: ``flusher="process"``: the client starts its own flusher process;
- ``segmentry-process``: ``flusher=None`` while ``python -m segmentry.flusher`` delivers;
- ``segmentry-alone``: ``flusher=None``, nothing delivering;
- ``analytics-python``: its in-memory queue and one consumer thread sending;
- ``analytics-python-noconsumer``: the same with ``thread=0``: its queue fills, no
  thread competes with the caller for the GIL;
- ``*-1cpu``: the run's process pinned to one CPU (``sched_setaffinity``): the caller and
  the consumer or flusher thread share one core, as on a 1-vCPU container;
- ``*-busy``: another process spins on a core for the whole run: a loaded machine.

JSON (``--json``): ``{"bench": "caller", "meta": {...}, "contenders": {NAME: {"label",
"group" ("main"|"machine"), "runs": [RUN]}}, "targets": {NAME: TARGET}}``, RUN as in
bench_enqueue plus ``thread_cpu_s``, ``process_cpu_s``, ``p999_us``, ``over_1ms``,
``over_5ms``, ``thread_vcsw``, ``thread_ivcsw``, ``process_vcsw``, ``process_ivcsw``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_enqueue, common  # noqa: E402
from benchmarks.common import fmt_spread, log, paired, spread, table, values  # noqa: E402

BASELINE = "analytics-python"
THREAD = {"kind": "segmentry", "flusher": "thread"}
AP = {"kind": "analytics"}
CONTENDERS: dict[str, dict[str, Any]] = {
    "segmentry": {**THREAD, "group": "main", "label": "segmentry, default (flusher thread)"},
    "segmentry-child": {"kind": "segmentry", "flusher": "process", "group": "main",
                        "label": "segmentry, flusher=\"process\" (the client's own flusher "
                        "process)"},
    "segmentry-process": {"kind": "segmentry", "flusher": None, "flusher_process": True,
                          "group": "main", "label": "segmentry, flusher=None beside "
                          "`python -m segmentry.flusher`"},
    "segmentry-alone": {"kind": "segmentry", "flusher": None, "group": "main",
                        "label": "segmentry, flusher=None, nothing delivering"},
    "analytics-python": {**AP, "group": "main",
                         "label": "analytics-python (in memory, consumer thread sending)"},
    "analytics-python-noconsumer": {**AP, "consumers": 0, "group": "machine",
                                    "label": "analytics-python, no consumer thread"},
    "analytics-python-1cpu": {**AP, "cpus": 1, "group": "machine",
                              "label": "analytics-python, process on 1 CPU"},
    "analytics-python-busy": {**AP, "busy_core": True, "group": "machine",
                              "label": "analytics-python, a core kept busy"},
    "segmentry-1cpu": {**THREAD, "cpus": 1, "group": "machine",
                       "label": "segmentry default, process on 1 CPU"},
    "segmentry-busy": {**THREAD, "busy_core": True, "group": "machine",
                       "label": "segmentry default, a core kept busy"},
}


def run_spec(name: str) -> dict[str, Any]:
    return {k: v for k, v in CONTENDERS[name].items() if k not in ("label", "group")}


def run_all(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Every contender, alternated, each run a fresh process (bench_enqueue's harness)."""
    workdir = tempfile.mkdtemp(prefix="segmentry-caller-")
    try:
        with common.Receiver(workdir) as receiver:
            bench = bench_enqueue.Bench(argparse.Namespace(events=args.calls,
                                                           warmup=args.warmup),
                                        workdir, receiver, "thread")

            def one(name: str, run: int) -> dict[str, Any]:
                spec = run_spec(name)
                sends = spec["kind"] == "analytics" and spec.get("consumers", 1) > 0 \
                    or bool(spec.get("flusher")) or bool(spec.get("flusher_process"))
                return bench.run_enqueue({"name": name, **spec}, run, sends)

            runs = common.alternate(names, args.runs, one, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {name: {"label": CONTENDERS[name]["label"], "group": CONTENDERS[name]["group"],
                   "runs": runs[name]} for name in names}


# -- measures, the report and the targets -----------------------------------------------------


def per_event_us(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [1e6 * r[key] / r["events"] for r in runs if r.get(key) is not None]


def per_kcall(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [1e3 * r[key] / r["events"] for r in runs if r.get(key) is not None]


def busy_share(runs: list[dict[str, Any]]) -> list[float]:
    """The caller thread's CPU over the loop's wall time: the rest it spent off CPU."""
    return [r["thread_cpu_s"] / r["seconds"] for r in runs if r.get("thread_cpu_s")]


def rows(contenders: dict[str, Any]) -> list[list[str]]:
    """One row per contender: CPU and latency first, rate and ratio after."""
    base = contenders[BASELINE]["runs"] if BASELINE in contenders else None
    out = []
    for section in contenders.values():
        runs = section["runs"]
        out.append([section["label"],
                    fmt_spread(per_event_us(runs, "thread_cpu_s"), "{:.1f}"),
                    fmt_spread(per_event_us(runs, "process_cpu_s"), "{:.1f}"),
                    fmt_spread(values(runs, "p50_us"), "{:.1f}"),
                    fmt_spread(values(runs, "p99_us"), "{:.0f}"),
                    fmt_spread(values(runs, "p999_us"), "{:,.0f}"),
                    fmt_spread([v / 1e3 for v in values(runs, "max_us")], "{:.1f}"),
                    fmt_spread(values(runs, "over_1ms")),
                    fmt_spread(values(runs, "over_5ms")),
                    fmt_spread(values(runs)),
                    fmt_spread(paired(runs, base), "{:.2f}x") if base else "-"])
    return out


HEADERS = ["contender", "caller CPU µs/call", "process CPU µs/call", "p50 µs", "p99 µs",
           "p99.9 µs", "max ms", "calls > 1 ms", "calls > 5 ms", "calls/s",
           "vs analytics-python"]


def switch_rows(contenders: dict[str, Any]) -> list[list[str]]:
    """Why a rate moves: how much of the wall time the caller ran, and how often it
    blocked or was preempted."""
    out = []
    for section in contenders.values():
        runs = section["runs"]
        out.append([section["label"], fmt_spread(values(runs)),
                    fmt_spread(busy_share(runs), "{:.0%}"),
                    fmt_spread(per_kcall(runs, "thread_vcsw"), "{:.1f}"),
                    fmt_spread(per_kcall(runs, "thread_ivcsw"), "{:.1f}"),
                    fmt_spread(per_event_us(runs, "process_cpu_s"), "{:.1f}")])
    return out


SWITCH_HEADERS = ["contender", "calls/s", "caller on CPU / wall",
                  "caller blocked (vol. switches) per 1k calls",
                  "caller preempted (invol.) per 1k calls", "process CPU µs/call"]


def targets(contenders: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 21's caller targets, each from the medians over runs (range in detail)."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, runs_values: list[float], target: float, op: str, issue: str) -> None:
        value = spread(runs_values)["median"]
        met = value >= target if op == ">=" else value <= target
        out[name] = {"value": value, "target": target, "op": op, "met": bool(met),
                     "issue": issue, "detail": "runs: " + ", ".join(
                         f"{v:,.4g}" for v in sorted(runs_values))}

    for name, what in (("segmentry", "default track()"),
                       ("segmentry-child", 'flusher="process"'),
                       ("segmentry-process", "flusher=None beside a flusher process")):
        if name not in contenders:
            continue
        runs = contenders[name]["runs"]
        add(f"caller: {what}, p99.9 µs", values(runs, "p999_us"), 1000.0, "<=",
            "issue 21: p99.9 <= 1 ms")
        add(f"caller: {what}, max ms", [v / 1e3 for v in values(runs, "max_us")], 10.0, "<=",
            "issue 21: max <= 10 ms")
    if "segmentry" in contenders and BASELINE in contenders:
        add("caller: default track() / analytics-python rate",
            paired(contenders["segmentry"]["runs"], contenders[BASELINE]["runs"]), 1.2, ">=",
            "issue 21: >= 1.2x (goal 2x)")
    return out


def report(results: dict[str, Any]) -> str:
    meta = results["meta"]
    contenders = results["contenders"]
    main = {k: v for k, v in contenders.items() if v["group"] == "main"}
    m = meta["machine"]
    lines = [f"{meta['calls']:,} timed calls x {meta['runs']} runs per contender | "
             f"{m['nproc']} x {m['cpu']} | Python {m['python']} | segmentry at {meta['git']}"
             f" | load {meta['loadavg_start']} -> {meta['loadavg_end']}",
             "", table(HEADERS, rows(main)), ""]
    if len(contenders) > len(main):
        lines += ["Why rates move between machines (caller thread's CPU share and switches):",
                  table(SWITCH_HEADERS, switch_rows(contenders)), ""]
    lines += [f"{'met   ' if t['met'] else 'MISSED'} {name}: {t['value']:,.4g} "
              f"({t['op']} {t['target']:g}); {t['detail']}"
              for name, t in results["targets"].items()]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--calls", type=int, help="timed calls per run (default 100000)")
    p.add_argument("--runs", type=int, help="runs per contender (default 5)")
    p.add_argument("--warmup", type=int, default=500, help="untimed calls first (500)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 5000 calls x 2 runs")
    p.add_argument("--skip-machine", action="store_true",
                   help="only the main contenders, not the 1-CPU / busy-core variants")
    p.add_argument("--only", help="these contenders, comma-separated (default: all)")
    p.add_argument("--json", help="write every raw number here")
    args = p.parse_args(argv)
    if args.only and not set(args.only.split(",")) <= set(CONTENDERS):
        p.error(f"--only takes some of {', '.join(CONTENDERS)}")
    if args.calls is None:
        args.calls = 5_000 if args.quick else 100_000
    if args.runs is None:
        args.runs = 2 if args.quick else 5
    if args.calls < 1 or args.runs < 1 or args.warmup < 0:
        p.error("--calls and --runs must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    names = [n for n, c in CONTENDERS.items()
             if (c["group"] == "main" or not args.skip_machine)
             and (not args.only or n in args.only.split(","))]
    results: dict[str, Any] = {"bench": "caller", "meta": {
        "calls": args.calls, "runs": args.runs, "warmup": args.warmup, "quick": args.quick,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version, "argv": sys.argv, "machine": common.machine(),
        "git": common.git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": common.loadavg()}}
    log(f"caller: {len(names)} contenders x {args.runs} runs, {args.calls:,} calls each")
    results["contenders"] = run_all(args, names)
    results["targets"] = targets(results["contenders"])
    return common.finish(results, started, report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
