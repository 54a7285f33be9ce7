"""Run every benchmark, then write ``benchmarks/RESULTS.md`` and ``benchmarks/results.png``.

    python benchmarks/run.py [--quick] [--only caller,enqueue,delivery,fleet]
    python benchmarks/run.py --from-json benchmarks/out/*.json   # re-render, run nothing

Runs ``bench_caller.py``, ``bench_enqueue.py``, ``bench_delivery.py`` and ``bench_fleet.py``
one after the other, each through its own command line with ``--json
benchmarks/out/<name>.json`` (each alternates its contenders and takes the median of 5
runs, min–max shown; ``--quick`` is a smoke version of all four in about 2 minutes, the
full run about 40 minutes on 2 cores).
Their progress goes to stderr, their text report to ``benchmarks/out/<name>.txt``, and
this run's command, date and machine to ``benchmarks/out/run.json``. ``render_markdown``
builds RESULTS.md from those JSON files alone, so a report can be re-rendered any time.
Nothing here talks to any host but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_caller, chart, common  # noqa: E402
from benchmarks.bench_fleet import longest_stall  # noqa: E402
from benchmarks.common import fmt_spread, log, med, paired, values  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "out")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
RESULTS_PNG = os.path.join(HERE, "results.png")
BENCHES = ("caller", "enqueue", "delivery", "fleet")
# The flags each bench gets: full run, then quick run.
FLAGS = {"caller": ([], ["--quick"]), "enqueue": (["--profile"], ["--quick"]),
         "delivery": ([], ["--quick"]), "fleet": ([], ["--quick"])}
TIMEOUT_S = {"caller": 1800, "enqueue": 1800, "delivery": 3600, "fleet": 600}


# =============================================================================================
# Running.
# =============================================================================================


def run_bench(name: str, quick: bool) -> dict[str, Any]:
    """One bench through its CLI; its JSON in out/<name>.json, its report in out/<name>.txt."""
    json_path = os.path.join(OUT_DIR, f"{name}.json")
    if os.path.exists(json_path):
        os.unlink(json_path)  # never render a stale file as this run's
    command = [sys.executable, os.path.join(HERE, f"bench_{name}.py"),
               *FLAGS[name][1 if quick else 0], "--json", json_path]
    log(f"== {name}: {' '.join(command[1:])}")
    started = time.monotonic()
    with open(os.path.join(OUT_DIR, f"{name}.txt"), "w") as report:
        try:
            proc = subprocess.run(command, cwd=common.ROOT, env=common.child_env(),
                                  stdout=report, timeout=TIMEOUT_S[name])
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {TIMEOUT_S[name]} s"
    elapsed = time.monotonic() - started
    log(f"== {name}: exit {code} in {elapsed:.0f} s")
    return {"command": " ".join(command[1:]), "exit": code, "elapsed_s": elapsed,
            "json": os.path.exists(json_path)}


# =============================================================================================
# Loading.
# =============================================================================================


def load(paths: Sequence[str]) -> dict[str, Any]:
    """The results by bench ("run", "caller", "enqueue", "delivery", "fleet"), whatever the
    file names."""
    results: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        kind = data.get("bench") or ("enqueue" if "enqueue" in data else None)
        if kind:
            results[kind] = data
        else:
            log(f"{path}: not a benchmark result, ignored")
    return results


# =============================================================================================
# Markdown.
# =============================================================================================


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, "l" or "r" (default: the
    first column left, the others, numbers, right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sp(runs: list[dict[str, Any]], key: str = "rate", fmt: str = "{:,.0f}") -> str:
    return fmt_spread(values(runs, key), fmt)


def ratio_sp(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "rate") -> str:
    return fmt_spread(paired(a, b, key), "{:.2f}x")


def us_per_event(runs: list[dict[str, Any]], key: str, count: str = "unique") -> str:
    return fmt_spread([1e6 * r[key] / max(1, r.get(count) or r["events"]) for r in runs
                       if r.get(key) is not None], "{:.1f}")


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def header(results: dict[str, Any]) -> list[str]:
    run = results.get("run") or {}
    # Without run.py's own record (benches run one by one), bench_caller's stands in.
    meta = run.get("meta") or (results.get("caller") or {}).get("meta") or {}
    m = meta.get("machine") or common.machine()
    lines = ["# segmentry benchmarks", ""]
    if meta.get("quick"):
        lines += ["> **Smoke run (`--quick`)**: few runs of small sizes; not for comparison.", ""]
    command = meta.get("command") or ("the benches below one by one, then `python "
                                      "benchmarks/run.py --from-json benchmarks/out/*.json`")
    lines += [
        f"- Command: {command if 'command' not in meta else f'`{command}`'}",
        f"- Date: {meta.get('date', 'unknown')}"
        + (f" (took {meta['elapsed_s'] / 60:.0f} min)" if run.get("meta") else ""),
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m.get('memory_gb', '?')} GB RAM, "
        f"{m.get('platform', '')}; shared and noisy: other work ran beside it",
        f"- Python {m['python']}, SQLite {m.get('sqlite', '?')}, segmentry at "
        f"{meta.get('git', 'unknown')}; load average {meta.get('loadavg_start', '?')} before, "
        f"{meta.get('loadavg_end', '?')} after",
        "- Every receiver is `tools/fake_segment.py` in its own process on 127.0.0.1; nothing "
        "else is contacted.",
        "- Tables: median (min–max) over runs, contenders alternated run by run, a fresh "
        "process per run; ratios are paired within a round (then median, min–max).",
        "- Re-render from the saved JSON: `python benchmarks/run.py --from-json "
        "benchmarks/out/*.json`", ""]
    lines += ["Each section's own command, and the load average (1, 5, 15 min) before and "
              "after it; a bench run with `--quick` is a smoke run, not for comparison:", ""]
    for name in ("caller", "enqueue", "delivery", "fleet"):
        bench_meta = (results.get(name) or {}).get("meta") or {}
        if bench_meta.get("argv"):
            argv = " ".join(["python", f"benchmarks/{os.path.basename(bench_meta['argv'][0])}",
                             *bench_meta["argv"][1:]])
            lines.append(f"- {name}: `{argv}`, load {bench_meta.get('loadavg_start', '?')} → "
                         f"{bench_meta.get('loadavg_end', '?')}"
                         + (" (**smoke run**)" if bench_meta.get("quick") else ""))
    lines.append("")
    failed = [f"`{name}` ({info['exit']})" for name, info in (run.get("benches") or {}).items()
              if info["exit"] != 0 or not info["json"]]
    if failed:
        lines += [f"**Benches that failed this run: {', '.join(failed)}**; see "
                  "`benchmarks/out/<name>.txt`.", ""]
    return lines


def all_targets(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every bench's targets in one list, bench_enqueue's mapped to the same shape."""
    out = []
    for name, t in (results.get("enqueue") or {}).get("targets", {}).items():
        op = "<=" if "p99" in name or "errors" in name else ">="
        issue = f"target {t['target']:g}" + (f", goal {t['goal']:g}" if t.get("goal") else "")
        out.append((f"enqueue: {name}", {**t, "op": op, "issue": issue, "detail": ""}))
    for bench in ("caller", "delivery", "fleet"):
        out += list((results.get(bench) or {}).get("targets", {}).items())
    return out


def gap(t: dict[str, Any]) -> str:
    """How far a missed target is, in words."""
    if t["met"]:
        return ""
    value, target = t["value"], t["target"]
    if t["op"] == ">=":
        return f"at {value / target:.1%} of the target ({value:,.4g} vs {target:,.4g})"
    over = value - target
    return f"{over:,.3g} over" + (f" ({value / target:.1f}x the target)" if target else "")


def targets_section(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, t in all_targets(results):
        status = "met" if t["met"] else "**MISSED** " + gap(t)
        rows.append([name, t.get("issue", ""), f"{t['value']:,.4g}",
                     f"{t['op']} {t['target']:,.3g}", status, t.get("detail", "")])
    return ["## Targets (measured, never asserted in tests)", "",
            md_table(["target", "from", "measured", "wanted", "status", "detail (how, why)"],
                     rows, "llrrll"), ""]


def enqueue_section(data: dict[str, Any]) -> list[str]:
    meta = data["meta"]
    out = ["## Enqueue (`bench_enqueue.py`)", "",
           f"{meta['events']:,} timed `track()` calls per run after {meta['warmup']} untimed, "
           f"{meta['runs']} runs; the method is in `bench_enqueue.py`'s docstring.", ""]
    section = data.get("enqueue")
    if section:
        base = section["analytics-python"]["runs"]
        rows = []
        for name, contender in section.items():
            runs = contender["runs"]
            delivered = values(runs, "delivered")
            rows.append([f"{name}: {contender['label']}",
                         us_per_event(runs, "thread_cpu_s", "events"),
                         us_per_event(runs, "process_cpu_s", "events"),
                         sp(runs), ratio_sp(runs, base),
                         sp(runs, "p50_us", "{:.1f}"), sp(runs, "p99_us", "{:.0f}"),
                         sp(runs, "p999_us", "{:,.0f}"),
                         f"{max(values(runs, 'max_us')) / 1e3:.1f}",
                         sum(int(v) for v in values(runs, "drops")),
                         f"{min(delivered):,.0f}" if delivered else "-"])
        out += [md_table(["contender", "caller CPU µs/call", "process CPU µs/call",
                          "events/s", "vs analytics-python", "p50 µs", "p99 µs", "p99.9 µs",
                          "max ms", "drops", "delivered (min)"], rows), ""]
    backlog = data.get("backlog")
    if backlog:
        runs = backlog["runs"]
        out += [f"Enqueue (flusher=None) on an empty queue vs a {backlog['rows']:,}-row "
                "backlog:", "",
                md_table(["queue", "events/s", "vs empty", "p99 µs"],
                         [[name, sp(runs[name]), ratio_sp(runs[name], runs["empty"]),
                           sp(runs[name], "p99_us", "{:.0f}")] for name in ("empty", "backlog")]),
                ""]
    contention = data.get("contention")
    if contention:
        rows = [[f"{r['procs']}" + (" + flusher process" if r["flusher_process"] else ""),
                 f"{r['rate']:,.0f}", f"{r['p50_us']:.0f}", f"{r['p99_us'] / 1e3:.2f}",
                 f"{r['max_us'] / 1e3:.1f}", r["locked_errors"], r["drops"],
                 "-" if r["delivered"] is None else f"{r['delivered']:,}"] for r in contention]
        out += ["Producer processes on one queue file (one run each):", "",
                md_table(["producers", "total events/s", "p50 µs", "p99 ms", "max ms",
                          "locked errors", "drops", "delivered"], rows), ""]
    profile = data.get("profile")
    if profile:
        parts = profile["breakdown_ns"]
        total = parts["total: track (flusher=None)"]
        out += ["Where one `track()` goes (flusher=None, bench_enqueue `--profile`):", "",
                md_table(["part", "µs/event", "share"],
                         [[k, f"{v / 1e3:.2f}", f"{100 * v / total:.0f}%"]
                          for k, v in parts.items()]), ""]
    return out


def caller_section(data: dict[str, Any]) -> list[str]:
    meta, contenders = data["meta"], data["contenders"]
    main = {k: v for k, v in contenders.items() if v["group"] == "main"}
    out = ["## What the caller feels: CPU per call and latency (`bench_caller.py`)", "",
           f"`{' '.join(['python benchmarks/bench_caller.py', *meta['argv'][1:]])}`: "
           f"{meta['calls']:,} `track()` calls timed one by one per run, {meta['runs']} runs "
           "per contender, alternated, each a fresh process; median (min–max) over the runs. "
           "Caller CPU: `time.thread_time_ns` of the calling thread around the loop; process "
           "CPU: `getrusage(RUSAGE_SELF)` user + system, every thread of the process. These "
           "two and the percentiles move far less between machines than the rate ratio in "
           "the last column.", "",
           md_table(bench_caller.HEADERS, bench_caller.rows(main)), ""]
    if len(contenders) > len(main):
        out += ["Why the rates (and so the ratio) move between machines: the same runs, with "
                "the share of the loop's wall time the caller thread was on a CPU and its "
                "context switches (`getrusage(RUSAGE_THREAD)`); the variants pin the process "
                "to one CPU (`sched_setaffinity`) or keep a core busy with a spinning process; "
                "the explanation is in the notes above.", "",
                md_table(bench_caller.SWITCH_HEADERS, bench_caller.switch_rows(contenders)),
                ""]
    return out


def e2e_section(e2e: dict[str, Any]) -> list[str]:
    seg, ap = e2e["runs"]["segmentry"], e2e["runs"]["analytics-python"]
    process = e2e["runs"].get("segmentry-flusher-process", [])
    rows = []
    for name, runs in (("segmentry (default flusher thread)", seg),
                       ("analytics-python (upload_size=100)", ap),
                       ("segmentry flusher=None + `python -m segmentry.flusher "
                        "--batch-every-ms 50` (extra, not the target's)", process)):
        if not runs:
            continue
        cpu = us_per_event(runs, "cpu_s")
        caller = us_per_event(runs, "caller_cpu_s", "events")
        if runs is process:
            cpu += f" + flusher process {us_per_event(runs, 'flusher_cpu_s')}"
        rows.append([name, cpu, caller, sp(runs), ratio_sp(runs, ap),
                     ratio_sp(runs, ap, "cpu_s") if runs is not ap else "1.00x",
                     sp(runs, "enqueue_s", "{:.2f}"), sp(runs, "flush_s", "{:.2f}"),
                     us_per_event(runs, "rx_cpu_s"),
                     sum(int(r["drops"]) for r in runs), sum(int(r["duplicates"]) for r in runs)])
    logs = sorted({line for r in seg + ap + process for line in r.get("log", [])})
    out = ["## End to end: enqueue N, until the receiver has all N", "",
           f"N = {e2e['events']:,} `track()` calls then `flush()`, timed until the receiver "
           "holds N unique messageIds.", "",
           md_table(["contender", "client process CPU µs/delivered event",
                     "caller thread CPU µs/track() (enqueue loop)", "events/s",
                     "vs analytics-python", "client CPU vs analytics-python", "track loop s",
                     "flush s", "receiver CPU µs/event", "drops (all runs)", "duplicates"],
                    rows), ""]
    if logs:
        out += ["Warnings the clients logged:", "", *[f"- `{line}`" for line in logs[:10]], ""]
    return out


def replay_section(replay: dict[str, Any]) -> list[str]:
    runs = replay["runs"]
    flusher = runs["flusher"]
    best = max(("raw-8", "raw-1"), key=lambda k: med(runs[k]))
    limit = runs[best]
    rows = [["`python -m segmentry.flusher --drain` (start-up excluded)", sp(flusher),
             ratio_sp(flusher, limit), us_per_event(flusher, "cpu_net_s"),
             us_per_event(flusher, "rx_cpu_s")],
            ["the same, wall time from spawn to exit", sp(flusher, "rate_wall"),
             fmt_spread([common.ratio(f["rate_wall"], r["rate"]) for f, r in zip(flusher, limit)],
                        "{:.2f}x"), us_per_event(flusher, "cpu_s"), ""]]
    for threads in (8, 1):
        raw = runs[f"raw-{threads}"]
        rows.append([f"raw `requests.Session` POST loop, {threads} thread"
                     f"{'s' if threads > 1 else ''}" + (" (the limit)" if raw is limit else ""),
                     sp(raw), ratio_sp(raw, limit), us_per_event(raw, "cpu_s", "events"),
                     us_per_event(raw, "rx_cpu_s", "events")])
    startup = replay["startup"]
    out = ["## Backlog replay", "",
           f"A copy of a cached {replay['rows']:,}-event queue file per run; the raw loop posts "
           f"{replay['raw_batches']:,} pre-built bodies of 100 of the same events. Start-up (a "
           f"drain of an empty queue, same round) took {sp(startup, 'seconds', '{:.2f}')} s "
           f"and {sp(startup, 'cpu_s', '{:.2f}')} CPU s.", "",
           md_table(["contender", "events/s", "vs the limit", "sender CPU µs/event",
                     "receiver CPU µs/event"], rows), ""]
    mem_rows = []
    drains = {int(k): v for k, v in replay["memory"].items()}
    drains[replay["rows"]] = flusher
    for rows_n in sorted(drains):
        d = drains[rows_n]
        mem_rows.append([f"{rows_n:,}", sp(d, "max_rss_mb", "{:.1f}"),
                         sp(d, "sampled_rss_mb", "{:.1f}"), sp(d, "seconds", "{:.1f}"),
                         f"{med(d, 'wchar') / rows_n:,.0f}" if values(d, "wchar") else "-",
                         mb(med(d, "db_before")), mb(med(d, "wal_before")),
                         mb(med(d, "db_after")), mb(med(d, "wal_after")),
                         ", ".join(sorted({str(r["exit"]) for r in d}))])
    out += ["Flusher memory and files per backlog drained (max RSS from `wait4`, as "
            "`/usr/bin/time -v`; sampled = psutil every 50 ms; bytes written = the process's "
            "`wchar` in /proc/PID/io, last read up to 50 ms before it exits, over the events "
            "drained; each stored event is about 330 bytes):", "",
            md_table(["backlog", "max RSS MB", "sampled RSS MB", "drain s",
                      "bytes written per event", "DB MB before",
                      "WAL MB before", "DB MB after", "WAL MB after", "exit"], mem_rows), ""]
    return out


def rtt_section(rtt: dict[str, Any]) -> list[str]:
    runs = rtt["runs"]
    mif1, ap = runs["segmentry-mif1"], runs["analytics-python"]
    rows = []
    for name, key in (("segmentry flusher --drain, max_in_flight=8", "segmentry-mif8"),
                      ("segmentry flusher --drain, max_in_flight=1", "segmentry-mif1"),
                      ("analytics-python (enqueue N, flush)", "analytics-python")):
        r = runs[key]
        rows.append([name, sp(r), sp(r, "rate_wall") if key != "analytics-python" else "-",
                     ratio_sp(r, mif1), ratio_sp(r, ap)])
    return [f"## Replay over a {rtt['delay_ms']:g} ms round trip", "",
            f"The receiver holds every ingest reply {rtt['delay_ms']:g} ms; {rtt['rows']:,} "
            "events. segmentry's rate excludes its start-up (measured the same round); "
            "analytics-python is timed from its first `track()` to the last event received.",
            "", md_table(["contender", "events/s", "wall events/s", "vs max_in_flight=1",
                          "vs analytics-python"], rows), ""]


def sigkill_section(kill: dict[str, Any]) -> list[str]:
    rows = []
    for name, runs in kill["runs"].items():
        rows.append([name, sp(runs, "returned"), sp(runs, "delivered_before_kill"),
                     sp(runs, "delivered"), sp(runs, "lost"), sp(runs, "lost_pct", "{:.2f}"),
                     sum(int(r["duplicates"]) for r in runs)])
    return ["## What a SIGKILL costs", "",
            f"A producer enqueues as fast as it can; SIGKILL once {kill['k']:,} messageIds have "
            "come back (a few more are returned before the signal lands). segmentry's queue "
            "is then drained by `python -m segmentry.flusher --drain`.", "",
            md_table(["client", "returned", "delivered before the kill", "delivered in the end",
                      "lost", "lost %", "duplicates (all runs)"], rows), ""]


def growth_section(growth: dict[str, Any]) -> list[str]:
    runs = growth["runs"]
    base = runs[str(growth["sizes"][0])]
    rows = []
    for size in growth["sizes"]:
        r = runs[str(size)]
        rows.append([f"{size:,}", sp(r, "enqueue_rate"), ratio_sp(r, base, "enqueue_rate"),
                     sp(r, "enqueue_p99_us", "{:.0f}"), sp(r, "claim_rate"),
                     ratio_sp(r, base, "claim_rate"), sp(r, "claim_p50_us", "{:.0f}"),
                     sp(r, "delete_p50_us", "{:.0f}"), sp(r, "batch_p99_us", "{:.0f}"),
                     sp(r, "claim_inflight_p50_us", "{:.0f}")])
    return ["## Cost growth with the backlog", "",
            f"Per run: {growth['events']:,} `track()` calls (flusher=None) on a queue file "
            f"already holding the backlog, then {growth['batches']} batches of "
            "`claim(100, 499_000, now, 600)` + `delete` on the same file; last column: "
            "claims with 7 other batches leased, as a flusher with max_in_flight=8 has them.",
            "", md_table(["backlog", "enqueue events/s", "vs empty", "enqueue p99 µs",
                          "claim+delete events/s", "vs empty", "claim p50 µs", "delete p50 µs",
                          "batch p99 µs", "claim p50 µs, 7 in flight"], rows), ""]


def profile_section(profile: dict[str, Any]) -> list[str]:
    threads = ", ".join(f"{name} {100 * share:.0f}%" for name, share in
                        sorted(profile["threads"].items(), key=lambda kv: -kv[1]))
    return ["## Where the flusher's CPU goes (py-spy)", "",
            f"`py-spy record --nonblocking` (1 kHz, stacks of running threads) over one "
            f"`--drain` of {profile['rows']:,} events ({profile['samples']:,} samples; by "
            f"thread: {threads}). Each sample is put in the first category whose marker is "
            "in its stack (`PROFILE_CATEGORIES` in bench_delivery.py); SQLite's and the "
            "socket's C time counts for the Python frame that called it.", "",
            md_table(["category", "share of samples"],
                     [[name, f"{100 * share:.1f}%"] for name, share in
                      profile["categories"]]), "",
            md_table(["frame (self)", "share of samples"],
                     [[f"`{name}`", f"{100 * share:.1f}%"] for name, share in profile["self"]]),
            ""]


def fleet_section(fleet: dict[str, Any]) -> list[str]:
    meta = fleet["meta"]
    phases = fleet["phases"]
    rows = []
    for name, p in phases.items():
        status = p["by_status"]
        rows.append([name, f"{p['rate_per_host']:g} x {len(p['hosts'])} for {p['seconds']:g} s",
                     f"{p['returned']:,}", f"{p['delivered']:,}", p["lost"], p["duplicates"],
                     f"{p['requests']:,}", status.get("200", 0), status.get("429", 0),
                     status.get("503", 0), f"{100 * p['rejected_share']:.1f}%",
                     f"{p['accepted_rps']:.1f}" if "accepted_rps" in p else "-",
                     f"{p['peak_rps']:.0f}" if "peak_rps" in p else "-"])
    out = ["## Fleet: hosts against one rate-limited receiver", "",
           f"{meta['hosts']} host processes, each with its own queue file and default flusher "
           f"thread, against one receiver limited to R = {meta['limit']:g} requests/s (429, "
           "`Retry-After: 1`). One run per phase; the method is in `bench_fleet.py`.", "",
           md_table(["phase", "events/s per host", "returned", "delivered", "lost", "dup",
                     "requests", "200", "429", "503", "429 share", "accepted req/s (backlog)",
                     "peak req/s"], rows), ""]
    outage = phases.get("outage")
    if outage:
        start, length = outage["outage"]

        def s(v: float | None) -> str:
            return "never" if v is None else f"{v:.1f} s"

        out += [f"Outage: every request answered 503 from {start:g} s for {length:g} s while "
                "the hosts kept enqueueing, then the receiver came back (still at R):", "",
                md_table(["requests/s at the dead receiver", "events waiting at recovery",
                          "first 200 after recovery", "backlogs drained after recovery",
                          "longest stall after recovery (events waiting, no request)",
                          "peak req/s while recovering", "vs R", "429s / requests while "
                          "recovering"],
                         [[f"{outage['outage_rps']:.1f}", f"{outage['backlog_at_recovery']:,}",
                           s(outage["first_ok_after_s"]), s(outage["drain_after_s"]),
                           s(longest_stall(outage["timeline"], start + length,
                                           len(outage["hosts"]))),
                           f"{outage['recovery_peak_rps']:.0f}",
                           f"{outage['recovery_peak_rps'] / outage['limit']:.2f}x",
                           f"{outage['recovery_429']:.0f} / {outage['recovery_requests']:.0f}"]]),
                ""]
    return out


NOTES = [
    "## Method notes", "",
    "- Rates are events per second of wall time. A replay's start-up (interpreter, imports, "
    "opening the file, taking the lock) is measured by draining an empty queue in the same "
    "round and subtracted; the wall rate including it is shown beside.",
    "- CPU per event: the flusher's from `wait4` rusage (user + system, start-up CPU "
    "subtracted where said), the raw loop's and the e2e clients' from their own process "
    "time, the receiver's from psutil. On 2 cores the receiver and the sender compete for "
    "the same CPUs, so the receiver's cost is part of every end-to-end number.",
    "- The chart (`results.png`) shows the same medians, whiskers min–max.", ""]


def missed_section() -> list[str]:
    """The hand-written analysis of the missed targets (benchmarks/missed.md)."""
    path = os.path.join(HERE, "missed.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [*f.read().rstrip("\n").split("\n"), ""]


def render_markdown(results: dict[str, Any]) -> str:
    """RESULTS.md from the loaded JSON (see ``load``)."""
    lines = header(results) + targets_section(results) + missed_section()
    if results.get("caller"):
        lines += caller_section(results["caller"])
    if results.get("enqueue"):
        lines += enqueue_section(results["enqueue"])
    delivery = results.get("delivery") or {}
    for key, section in (("e2e", e2e_section), ("replay", replay_section),
                         ("rtt", rtt_section), ("sigkill", sigkill_section),
                         ("growth", growth_section), ("profile", profile_section)):
        if delivery.get(key):
            lines += section(delivery[key])
    if results.get("fleet"):
        lines += fleet_section(results["fleet"])
    lines += NOTES
    lines.append("![results](results.png)")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], md_path: str, png_path: str) -> None:
    with open(md_path, "w") as f:
        f.write(render_markdown(results))
    log(f"wrote {md_path}")
    if chart.render(results, png_path):
        log(f"wrote {png_path}")


# =============================================================================================
# Main.
# =============================================================================================


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of everything (~2 min)")
    p.add_argument("--only", help=f"comma-separated benches of {','.join(BENCHES)}")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="render RESULTS.md and the chart from saved JSON; run nothing")
    p.add_argument("--results", default=RESULTS_MD, help="the Markdown report to write")
    p.add_argument("--chart", default=RESULTS_PNG, help="the PNG chart to write")
    args = p.parse_args(argv)
    args.benches = args.only.split(",") if args.only else list(BENCHES)
    if set(args.benches) - set(BENCHES):
        p.error(f"--only takes {', '.join(BENCHES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        write_outputs(load(args.from_json), args.results, args.chart)
        return 0
    os.makedirs(OUT_DIR, exist_ok=True)
    started = time.monotonic()
    meta: dict[str, Any] = {
        "command": "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": common.machine(), "git": common.git_revision(), "quick": args.quick,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    benches = {name: run_bench(name, args.quick) for name in args.benches}
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["elapsed_s"] = time.monotonic() - started
    with open(os.path.join(OUT_DIR, "run.json"), "w") as f:
        json.dump({"bench": "run", "meta": meta, "benches": benches}, f, indent=1)
    paths = [os.path.join(OUT_DIR, f"{name}.json") for name in ("run", *args.benches)]
    write_outputs(load([p for p in paths if os.path.exists(p)]), args.results, args.chart)
    failed = [name for name, info in benches.items() if info["exit"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
