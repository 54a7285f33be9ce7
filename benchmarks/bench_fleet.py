"""Fleet simulation: N hosts, each a process with its own queue file and its own flusher
thread, enqueueing at a steady rate against ONE receiver rate-limited to R requests/s
(429 + ``Retry-After: 1``); then a long outage (503 for every request) while the hosts keep
enqueueing, and the recovery after it.

    python benchmarks/bench_fleet.py [--hosts 4] [--limit 20] [--quick] [--json out.json]

Each host is ``segmentry.Client(KEY, queue_path=<its own file>, api_url=receiver)`` with
default options (flusher thread, max_in_flight 8, batches of 100, batch_every_ms 2000),
calling ``track()`` at a paced rate for the phase's production time, then ``flush()`` until
the phase's deadline. The receiver is ``tools/fake_segment.py`` in its own process on
127.0.0.1. The parent samples the receiver's counts (``GET /__stats``) and every host's
queue depth (``SQLiteQueue.stats``) every ``SAMPLE_S`` seconds. After each phase, whatever
a host could not deliver before the deadline is drained with ``python -m segmentry.flusher
--drain`` (no fault armed), so "lost" is only what never arrives at all.

Phases:

- ``rate_limit``: demand = hosts x rate / 100 full batches/s, twice R by default. Reported:
  requests/s accepted while a backlog exists (vs R), the rejected share (429s / all
  requests: a small share means Retry-After is obeyed and no retry storm), events/s, loss.
- ``outage``: demand below R; from ``outage_start`` for ``outage_s`` seconds every request
  gets 503 (no Retry-After), then the receiver is back (still limited to R). Reported:
  requests/s at the dead receiver, time from recovery to the first accepted request and to
  the backlogs drained (every host back under one batch), the peak requests/s while
  recovering vs R (no thundering herd), 429s while recovering, loss.

The whole run is bounded (about 3 minutes by default, ``--quick`` well under one) and
stops by itself: hosts that outlive a phase's deadline are terminated.

JSON (``--json``): ``{"bench": "fleet", "meta": {...}, "phases": {NAME: PHASE},
"targets": {NAME: {"value", "target", "op", "met", "issue", "detail"}}}`` where PHASE holds
the phase's settings, ``hosts`` (each host's result), ``timeline`` (``[t, requests, ok,
rejected_429, failed_503, unique, depth]`` rows, t in seconds from the start) and the
metrics named above.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `segmentry` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.bench_delivery import flusher_command, flusher_env  # noqa: E402
from benchmarks.common import WRITE_KEY, Receiver, log  # noqa: E402

MODULE = "benchmarks.bench_fleet"
EVENT_NAME = "Page Viewed"
BATCH = 100  # the default max_batch_size
SAMPLE_S = 0.25
START_DELAY_S = 2.5  # time for every host to import and open its queue before the start
HOST_EXIT_S = 10.0


# =============================================================================================
# A host: one process, one queue file, the default flusher thread.
# =============================================================================================


def host_main(spec_path: str) -> int:
    """Enqueue at ``rate`` events/s for ``seconds``, then flush until ``deadline``."""
    import segmentry
    import segmentry.flusher  # noqa: F401  (loaded before the start, not during the run)

    spec = common.read_spec(spec_path)
    client = segmentry.Client(WRITE_KEY, queue_path=spec["queue_path"], api_url=spec["api_url"])
    track = client.track
    time.sleep(max(0.0, spec["start_at"] - time.time()))
    start = time.monotonic()
    returned = dropped = i = 0
    slowest = 0.0
    while (elapsed := time.monotonic() - start) < spec["seconds"]:
        due = int(elapsed * spec["rate"])
        while i < due:
            t0 = time.perf_counter()
            if track(f"{spec['name']}-user-{i % 1000}", EVENT_NAME, {"i": i}) is None:
                dropped += 1
            else:
                returned += 1
            slowest = max(slowest, time.perf_counter() - t0)
            i += 1
        time.sleep(0.005)
    produced_at = time.time()
    flushed = client.flush(max(0.0, spec["deadline"] - time.time()))
    flushed_at = time.time()
    client.close(1.0)
    common.write_result(spec, {"name": spec["name"], "returned": returned, "dropped": dropped,
                               "flushed": flushed, "produced_at": produced_at,
                               "flushed_at": flushed_at, "slowest_track_ms": slowest * 1e3})
    return 0


# =============================================================================================
# The parent: phases, sampling, metrics.
# =============================================================================================


class Fleet:
    """The host processes of one phase and their queue files."""

    def __init__(self, workdir: str, hosts: int, api_url: str) -> None:
        self.dir = tempfile.mkdtemp(dir=workdir, prefix="fleet-")
        self.api_url = api_url
        self.names = [f"host{k}" for k in range(hosts)]
        self.queues = [os.path.join(self.dir, f"{name}.db") for name in self.names]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.results = [os.path.join(self.dir, f"{name}.result.json") for name in self.names]
        self._readers: dict[str, Any] = {}

    def start(self, rate: float, seconds: float, start_at: float, deadline: float) -> None:
        for name, queue, result in zip(self.names, self.queues, self.results):
            spec_path = os.path.join(self.dir, f"{name}.json")
            with open(spec_path, "w") as f:
                json.dump({"name": name, "queue_path": queue, "api_url": self.api_url,
                           "rate": rate, "seconds": seconds, "start_at": start_at,
                           "deadline": deadline, "result": result}, f)
            err = open(os.path.join(self.dir, f"{name}.log"), "wb")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", MODULE, "--host", spec_path], cwd=common.ROOT,
                env=common.child_env(), stdout=subprocess.DEVNULL, stderr=err))
            err.close()  # the child has its own descriptor

    def running(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def depth(self) -> int:
        """Events waiting or in flight in every host's queue file."""
        from segmentry.storage import SQLiteQueue

        total = 0
        for queue in self.queues:
            if not os.path.exists(queue):
                continue
            reader = self._readers.setdefault(queue, SQLiteQueue(queue))
            total += reader.stats(time.time()).depth
        return total

    def stop(self) -> list[str]:
        """Terminate hosts still running (their exit hook does a bounded final flush)."""
        late = []
        for name, proc in zip(self.names, self.procs):
            if proc.poll() is None:
                late.append(name)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(HOST_EXIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return late

    def host_results(self) -> list[dict[str, Any]]:
        out = []
        for name, path in zip(self.names, self.results):
            if os.path.exists(path):
                with open(path) as f:
                    out.append(json.load(f))
            else:
                log_path = os.path.join(self.dir, f"{name}.log")
                with open(log_path, "rb") as f:
                    tail = f.read().decode(errors="replace")[-1000:]
                out.append({"name": name, "returned": None, "error": tail})
        return out

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def sample(rx: Receiver, fleet: Fleet, t0: float) -> list[float]:
    stats = rx.stats()
    by_status = stats["requests_by_status"]
    return [round(time.time() - t0, 3), stats["requests"], by_status.get("200", 0),
            by_status.get("429", 0), by_status.get("503", 0), stats["unique"], fleet.depth()]


T, REQ, OK, R429, R503, UNIQUE, DEPTH = range(7)


def window(timeline: list[list[float]], start: float, end: float, col: int) -> float:
    """How much column ``col`` grew between the samples nearest ``start`` and ``end``."""
    inside = [row for row in timeline if start <= row[T] <= end]
    return inside[-1][col] - inside[0][col] if len(inside) >= 2 else 0.0


def peak_per_second(timeline: list[list[float]], start: float, end: float, col: int) -> float:
    """The largest growth of ``col`` over any 1-second span of samples in [start, end]."""
    rows = [row for row in timeline if start <= row[T] <= end]
    best = 0.0
    for i, row in enumerate(rows):
        later = [r for r in rows[i:] if r[T] - row[T] <= 1.0 + SAMPLE_S / 2]
        if len(later) >= 2 and later[-1][T] - row[T] >= 0.75:
            best = max(best, (later[-1][col] - row[col]) / (later[-1][T] - row[T]))
    return best


def first_time(timeline: list[list[float]], after: float, test: Any) -> float | None:
    return next((row[T] for row in timeline if row[T] >= after and test(row)), None)


def run_phase(args: argparse.Namespace, workdir: str, rx: Receiver, name: str, rate: float,
              seconds: float, budget: float, outage: tuple[float, float] | None
              ) -> dict[str, Any]:
    """Run one phase: start the hosts, sample until they are done (or the budget is
    spent), drain leftovers, count."""
    limit = {"rate_limit": {"per_second": args.limit, "retry_after": 1}}
    rx.reset()
    rx.faults(limit)
    fleet = Fleet(workdir, args.hosts, rx.url)
    t0 = time.time() + START_DELAY_S
    deadline = t0 + budget
    log(f"fleet {name}: {args.hosts} hosts x {rate:g} ev/s for {seconds:g} s, limit "
        f"{args.limit:g} req/s" + (f", 503 from {outage[0]:g} s for {outage[1]:g} s"
                                   if outage else ""))
    timeline: list[list[float]] = []
    try:
        fleet.start(rate, seconds, t0, deadline)
        armed = restored = outage is None
        while fleet.running() and time.time() < deadline + HOST_EXIT_S:
            now = time.time() - t0
            if outage and not armed and now >= outage[0]:
                rx.faults({"status": {"code": 503}})
                armed = True
            if outage and not restored and now >= outage[0] + outage[1]:
                rx.faults({"status": {"code": 503, "count": 0}})  # count 0 disarms
                restored = True
            if now >= 0:
                timeline.append(sample(rx, fleet, t0))
            time.sleep(SAMPLE_S)
        late = fleet.stop()
        timeline.append(sample(rx, fleet, t0))
        hosts = fleet.host_results()
        in_phase = rx.stats()
        leftover = fleet.depth()
        rx.reset()  # counts and faults: the final drain meets an unlimited receiver
        drained_exit = [drain_leftover(queue, rx.url) for queue in fleet.queues]
        final_unique = in_phase["unique"] + rx.stats()["unique"]
    finally:
        fleet.stop()
        fleet.close()
    returned = sum(h["returned"] or 0 for h in hosts)
    out: dict[str, Any] = {
        "hosts": hosts, "late_hosts": late, "rate_per_host": rate, "seconds": seconds,
        "limit": args.limit, "budget_s": budget, "outage": outage, "timeline": timeline,
        "returned": returned, "dropped": sum(h.get("dropped") or 0 for h in hosts),
        "delivered_in_phase": in_phase["unique"], "leftover": leftover,
        "delivered": final_unique, "lost": returned - final_unique,
        "duplicates": in_phase["duplicates"], "requests": in_phase["requests"],
        "by_status": in_phase["requests_by_status"], "drain_exits": drained_exit,
        "rejected_share": in_phase["requests_by_status"].get("429", 0)
        / max(1, in_phase["requests"])}
    out.update(rate_metrics(timeline, args.hosts, args.limit, returned))
    if outage:
        out.update(outage_metrics(timeline, args.hosts, args.limit, outage))
    log(f"  {name}: {summary(out)}")
    return out


def drain_leftover(queue: str, api_url: str) -> int | None:
    """Deliver what a host left behind (nothing, normally); the flusher's exit code."""
    if not os.path.exists(queue):
        return None
    proc = subprocess.run(flusher_command(queue, api_url, 8, ["--drain-timeout", "60"]),
                          cwd=common.ROOT, env=flusher_env(), capture_output=True, timeout=120)
    return proc.returncode


def rate_metrics(timeline: list[list[float]], hosts: int, limit: float,
                 returned: int) -> dict[str, Any]:
    """Accepted requests/s while a backlog exists (demand >= supply), and delivery rate."""
    first = first_time(timeline, 0.0, lambda r: r[REQ] > 0)
    busy = [r[T] for r in timeline if r[DEPTH] > hosts * BATCH]
    done = first_time(timeline, 0.0, lambda r: r[UNIQUE] >= returned > 0)
    out: dict[str, Any] = {"first_request_s": first, "all_delivered_s": done}
    if first is not None and busy and busy[-1] > first + 1:
        span = busy[-1] - first
        out["backlog_window_s"] = span
        out["accepted_rps"] = window(timeline, first, busy[-1], OK) / span
        out["requests_rps"] = window(timeline, first, busy[-1], REQ) / span
        out["events_per_s"] = window(timeline, first, busy[-1], UNIQUE) / span
        out["peak_rps"] = peak_per_second(timeline, first, busy[-1], REQ)
    return out


def longest_stall(timeline: list[list[float]], after: float, hosts: int) -> float:
    """The longest time after ``after`` during which events were waiting (more than one
    batch per host) yet no request at all reached the receiver: backoff outliving the
    outage."""
    longest, since = 0.0, None
    for prev, row in zip(timeline, timeline[1:]):
        if row[T] < after:
            continue
        stalled = row[REQ] == prev[REQ] and row[DEPTH] > hosts * BATCH
        if stalled:
            since = prev[T] if since is None else since
            longest = max(longest, row[T] - since)
        else:
            since = None
    return longest


def outage_metrics(timeline: list[list[float]], hosts: int, limit: float,
                   outage: tuple[float, float]) -> dict[str, Any]:
    start, length = outage
    end = start + length
    ok_at_end = next((r[OK] for r in timeline if r[T] >= end), 0)
    first_ok = first_time(timeline, end, lambda r: r[OK] > ok_at_end)
    drained = first_time(timeline, end + SAMPLE_S, lambda r: r[DEPTH] <= hosts * BATCH)
    depth_at_end = next((r[DEPTH] for r in timeline if r[T] >= end), 0)
    recover_end = drained if drained is not None else timeline[-1][T]
    return {"outage_rps": window(timeline, start, end, R503) / length,
            "backlog_at_recovery": depth_at_end,
            "first_ok_after_s": None if first_ok is None else first_ok - end,
            "drain_after_s": None if drained is None else drained - end,
            "recovery_peak_rps": peak_per_second(timeline, end, max(end + 1, recover_end), REQ),
            "recovery_429": window(timeline, end, recover_end, R429),
            "stall_after_s": longest_stall(timeline, end, hosts),
            "recovery_requests": window(timeline, end, recover_end, REQ)}


def summary(p: dict[str, Any]) -> str:
    parts = [f"returned {p['returned']:,}", f"delivered {p['delivered']:,}", f"lost {p['lost']}",
             f"requests {p['requests']:,}", f"429 share {100 * p['rejected_share']:.1f} %"]
    if "accepted_rps" in p:
        parts.append(f"accepted {p['accepted_rps']:.1f} req/s")
    if "drain_after_s" in p:
        parts.append(f"drained {_s(p['drain_after_s'])} after recovery, peak "
                     f"{p['recovery_peak_rps']:.1f} req/s")
    return ", ".join(parts)


def targets(phases: dict[str, dict[str, Any]], limit: float) -> dict[str, dict[str, Any]]:
    """The fleet's targets. The issue names them without numbers: the thresholds are ours."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float, target: float, op: str, issue: str, detail: str) -> None:
        met = value >= target if op == ">=" else value < target if op == "<" else value <= target
        out[name] = {"value": value, "target": target, "op": op, "met": bool(met),
                     "issue": issue, "detail": detail}

    for name, p in phases.items():
        add(f"fleet {name}: events lost", p["lost"], 0, "<=", "no loss",
            f"{p['delivered']:,} of {p['returned']:,} returned events delivered "
            f"({p['delivered_in_phase']:,} within the phase, {p['duplicates']} duplicates)")
    rate = phases.get("rate_limit")
    if rate and "accepted_rps" in rate:
        add("fleet rate_limit: accepted req/s / R", rate["accepted_rps"] / limit, 0.8, ">=",
            "aggregate delivery near R (threshold 0.8 R, ours)",
            f"{rate['accepted_rps']:.1f} accepted req/s of R = {limit:g} while a backlog "
            f"existed ({rate['events_per_s']:,.0f} events/s)")
        add("fleet rate_limit: rejected share", rate["rejected_share"], 0.10, "<=",
            "no retry storm: 429s <= 10 % of requests (threshold ours)",
            f"{rate['by_status'].get('429', 0):,} 429s in {rate['requests']:,} requests; peak "
            f"{rate['peak_rps']:.0f} req/s")
    out_ = phases.get("outage")
    if out_:
        add("fleet outage: peak req/s after recovery / R", out_["recovery_peak_rps"] / limit, 2.0,
            "<=", "no thundering herd: peak <= 2 R (threshold ours)",
            f"peak {out_['recovery_peak_rps']:.0f} req/s, {out_['recovery_429']:.0f} 429s in "
            f"{out_['recovery_requests']:.0f} requests while recovering; {out_['outage_rps']:.1f}"
            f" req/s at the dead receiver; first 200 {_s(out_['first_ok_after_s'])} and drained "
            f"{_s(out_['drain_after_s'])} after recovery ({out_['backlog_at_recovery']:,} events "
            f"waiting at recovery; longest stretch with events waiting and no request at all: "
            f"{out_.get('stall_after_s', 0):.1f} s)")
    return out


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--hosts", type=int, default=4, help="host processes (default 4)")
    p.add_argument("--limit", type=float, default=20.0, help="receiver requests/s (default 20)")
    p.add_argument("--quick", action="store_true", help="short phases, well under a minute")
    p.add_argument("--json", help="write every raw number here")
    p.add_argument("--skip-outage", action="store_true")
    p.add_argument("--skip-rate-limit", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # production seconds, phase budget; outage start and length
        args.rate_phase, args.outage_phase = (5.0, 25.0), (12.0, 40.0, 2.0, 5.0)
    else:
        args.rate_phase, args.outage_phase = (20.0, 55.0), (45.0, 95.0, 5.0, 20.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.host:
        return host_main(args.host)
    from segmentry.version import __version__

    started, loadavg_start = time.monotonic(), common.loadavg()
    # Demand: twice R in full batches for the rate-limit phase, half of R during the outage.
    full_rate = 2 * args.limit * BATCH / args.hosts
    phases: dict[str, dict[str, Any]] = {}
    workdir = tempfile.mkdtemp(prefix="segmentry-fleet-")
    try:
        with Receiver(workdir) as rx:
            if not args.skip_rate_limit:
                seconds, budget = args.rate_phase
                phases["rate_limit"] = run_phase(args, workdir, rx, "rate_limit", full_rate,
                                                 seconds, budget, None)
            if not args.skip_outage:
                seconds, budget, start, length = args.outage_phase
                phases["outage"] = run_phase(args, workdir, rx, "outage", full_rate / 4,
                                             seconds, budget, (start, length))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = {"bench": "fleet", "meta": {
        "segmentry": __version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "hosts": args.hosts, "limit": args.limit, "quick": args.quick, "argv": sys.argv,
        "loadavg_start": loadavg_start},
        "phases": phases, "targets": targets(phases, args.limit)}
    return common.finish(results, started, report, args.json)


def report(results: dict[str, Any]) -> str:
    return "\n".join(f"{'met   ' if t['met'] else 'MISSED'} {name}: {t['value']:.4g} "
                     f"(target {t['op']} {t['target']:g}) - {t['detail']}"
                     for name, t in results["targets"].items())


if __name__ == "__main__":
    raise SystemExit(main())
