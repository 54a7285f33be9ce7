"""Shared helpers for segmentry's benchmarks: statistics, contenders alternated run by run
in fresh interpreters, the Segment receiver (``tools/fake_segment.py`` on 127.0.0.1), and
plain-text tables. Standard library only (``queue_file`` imports segmentry,
``Receiver.cpu_s`` psutil); nothing here talks to any host but 127.0.0.1.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import platform
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WRITE_KEY = "BENCH_WRITE_KEY"
FAKE_SEGMENT = ROOT / "tools" / "fake_segment.py"
RECEIVER_START_S = 15.0
# urllib honours *_proxy variables: the receiver must be reached directly, never via a proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# -- statistics -------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` from 0 to 100) of values already sorted."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of one measurement over runs."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def values(runs: Sequence[dict[str, Any]], key: str = "rate") -> list[float]:
    """One measurement of every run that has it."""
    return [float(r[key]) for r in runs if r.get(key) is not None]


def med(runs: Sequence[dict[str, Any]], key: str = "rate") -> float:
    return spread(values(runs, key))["median"]


def paired(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]],
           key: str = "rate") -> list[float]:
    """a / b within each round (the runs that ran back to back)."""
    return [ratio(x[key], y[key]) for x, y in zip(a, b)]


def latency_summary(latencies_ns: list[int]) -> dict[str, float]:
    """p50, p99, p99.9 and max of per-call latencies in microseconds, and how many calls
    took over 1 ms and over 5 ms (sorts the list in place)."""
    latencies_ns.sort()
    return {"p50_us": percentile(latencies_ns, 50) / 1e3,
            "p99_us": percentile(latencies_ns, 99) / 1e3,
            "p999_us": percentile(latencies_ns, 99.9) / 1e3,
            "max_us": (latencies_ns[-1] / 1e3) if latencies_ns else math.nan,
            "over_1ms": len(latencies_ns) - bisect.bisect_right(latencies_ns, 1_000_000),
            "over_5ms": len(latencies_ns) - bisect.bisect_right(latencies_ns, 5_000_000)}


def cpu_snapshot() -> dict[str, float]:
    """CPU and context switches so far: this thread's (the caller's) and the whole
    process's (every thread: a flusher or consumer thread included)."""
    me = resource.getrusage(resource.RUSAGE_THREAD)
    everyone = resource.getrusage(resource.RUSAGE_SELF)
    return {"thread_cpu_s": time.thread_time_ns() / 1e9,
            "process_cpu_s": everyone.ru_utime + everyone.ru_stime,
            # voluntary: the thread blocked (a lock, the GIL, I/O); involuntary: preempted
            "thread_vcsw": me.ru_nvcsw, "thread_ivcsw": me.ru_nivcsw,
            "process_vcsw": everyone.ru_nvcsw, "process_ivcsw": everyone.ru_nivcsw}


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """What ``cpu_snapshot`` counts, used since ``before``."""
    now = cpu_snapshot()
    return {key: now[key] - before[key] for key in before}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 2**20, 1),
            "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform()}


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- fresh processes --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of every child: the repository importable, and no proxy, so
    requests and urllib go straight to 127.0.0.1."""
    # No SEGMENTRY_* from the caller's shell either: they would change "the defaults".
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith("SEGMENTRY_")
           and k != "SEGMENT_WRITE_KEY"}
    env["NO_PROXY"] = env["no_proxy"] = f"{HOST},localhost"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONHASHSEED"] = "0"
    return env


def worker_command(module: str, spec_path: str) -> list[str]:
    return [sys.executable, "-m", module, "--worker", spec_path]


def run_worker(module: str, spec: dict[str, Any], workdir: str, timeout: float) -> dict[str, Any]:
    """Run ``python -m module --worker SPEC`` in a fresh interpreter, so each run starts
    with its own heap and GC state; return the JSON object it wrote to its result file."""
    fd, spec_path = tempfile.mkstemp(dir=workdir, prefix="spec-", suffix=".json")
    result_path = spec_path[:-5] + ".result.json"
    with os.fdopen(fd, "w") as f:
        json.dump({**spec, "result": result_path}, f)
    try:
        proc = subprocess.run(worker_command(module, spec_path), cwd=ROOT, env=child_env(),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(result_path):
            raise RuntimeError(f"worker {spec.get('name', spec)} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(result_path) as f:
            result: dict[str, Any] = json.load(f)
        return result
    finally:
        for path in (spec_path, result_path):
            if os.path.exists(path):
                os.unlink(path)


def start_spinner() -> subprocess.Popen[bytes]:
    """Another process that keeps one core busy (pure Python, no I/O): a loaded machine,
    reproducibly. Stop it with ``stop_spinner``."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_spinner(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.kill()
        proc.wait()


def read_spec(path: str) -> dict[str, Any]:
    with open(path) as f:
        spec: dict[str, Any] = json.load(f)
    return spec


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def alternate(names: Sequence[str], runs: int, run_one: Callable[[str, int], dict[str, Any]],
              log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """Run every contender once per round, A B C, B C A, C A B ..., so drift on a noisy
    machine hits all of them alike, and none always runs right after the same other
    (say, one that leaves the disk busy). Returns each contender's results in run order."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for run in range(runs):
        shift = run % len(names) if names else 0
        for name in [*names[shift:], *names[:shift]]:
            result = run_one(name, run)
            results[name].append(result)
            log(f"  run {run + 1}/{runs} {name:<22} {result.get('rate', math.nan):>10,.0f} ev/s")
    return results


# -- the receiver -----------------------------------------------------------------------------


def http_json(url: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Any:
    """One request to 127.0.0.1 (no proxy), JSON in and out."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with _DIRECT.open(request, timeout=timeout) as reply:
        return json.load(reply)


class Receiver:
    """``tools/fake_segment.py --port 0`` on 127.0.0.1 in its own process (so it never shares
    a GIL with what it measures); counts, faults and records over HTTP.
    ``with Receiver(workdir) as rx:`` starts it; do not call start() as well."""

    kind = "tools/fake_segment.py"  # what the reports name as the receiver

    def __init__(self, workdir: str, record: bool = False) -> None:
        self.workdir = workdir
        self.record = record  # --record: keeps every arrival, for message_ids()
        self.url = ""  # the api_url: http://127.0.0.1:PORT/v1/
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """The base URL (analytics-python's ``host``, and the control endpoints')."""
        return self.url[: -len("/v1/")]

    def start(self) -> Receiver:
        ready = os.path.join(self.workdir, f"receiver-{os.getpid()}-{id(self)}.ready")
        command = [sys.executable, str(FAKE_SEGMENT), "--port", "0", "--ready-file", ready]
        self.proc = subprocess.Popen(command + (["--record"] if self.record else []),
                                     cwd=ROOT, env=child_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RECEIVER_START_S
        while not os.path.exists(ready):  # written atomically once it listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("tools/fake_segment.py did not start")
            time.sleep(0.02)
        with open(ready) as f:
            self.url = f.read().strip()
        if not self.url.startswith(f"http://{HOST}:") or not self.url.endswith("/v1/"):
            self.close()
            raise RuntimeError(f"unexpected receiver URL {self.url!r}")
        return self

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = http_json(self.host + "/__stats")
        return stats

    def events(self) -> int:
        """Events received so far (duplicates included)."""
        return int(self.stats()["events"])

    def reset(self) -> None:
        """Counts, records and faults forgotten: as just started."""
        http_json(self.host + "/__reset", "POST", {})

    def faults(self, spec: dict[str, Any]) -> None:
        """Arm the fault kinds ``spec`` names (replacing those kinds only)."""
        http_json(self.host + "/__faults", "POST", spec)

    def message_ids(self) -> list[str]:
        """The messageId of every recorded arrival (needs record=True)."""
        reply = http_json(self.host + "/__events?since=0", timeout=120)
        return [str(event.get("messageId")) for event in reply["events"]]

    def cpu_s(self) -> float:
        """CPU seconds the receiver process has used so far."""
        import psutil

        assert self.proc is not None
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- output -------------------------------------------------------------------------------------


CACHE_DIR = os.path.join(tempfile.gettempdir(), "segmentry-bench-cache")
INSERT = "INSERT INTO events (body, size, created) VALUES (?, ?, ?)"


def queue_file(name: str, rows: int, body: Callable[[int, float], str]) -> str:
    """A segmentry queue file holding ``rows`` events, ``body(i, created)`` each, built
    once and cached under the temp directory. The schema comes from ``SQLiteQueue``
    itself (its first put); the other rows go in one executemany."""
    import sqlite3

    from segmentry.storage import SCHEMA_VERSION, SQLiteQueue
    from segmentry.version import __version__

    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, f"{name}-{__version__}-schema{SCHEMA_VERSION}-{rows}.db")
    if os.path.exists(path):
        return path
    log(f"  building a {rows:,}-event queue file in {path} (cached)")
    tmp = path + ".building"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(tmp + suffix):
            os.unlink(tmp + suffix)
    start = time.time() - rows / 1000.0  # created times as if 1000 events/s came in
    queue = SQLiteQueue(tmp)
    queue.put(body(0, start), start)
    queue.close()

    def events() -> Any:
        for i in range(1, rows):
            created = start + i / 1000.0
            text = body(i, created)
            yield text, len(text), created

    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")  # a fixture: rebuilt if anything goes wrong
    conn.execute("BEGIN")
    conn.executemany(INSERT, events())
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    conn.close()
    queue = SQLiteQueue(tmp)
    depth = queue.stats(time.time()).depth
    queue.close()
    if depth != rows:
        raise RuntimeError(f"queue file fixture holds {depth} rows, not {rows}")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(tmp + suffix):
            os.unlink(tmp + suffix)
    os.replace(tmp, path)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt_spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """``median (min–max)`` of a measurement over runs."""
    s = spread(values)
    if math.isnan(s["median"]):
        return "n/a"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def finish(results: dict[str, Any], started: float,
           render: Callable[[dict[str, Any]], str], json_path: str | None) -> int:
    """The end of every bench's main(): the run's meta, the report, the JSON if asked."""
    meta = results["meta"]
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["elapsed_s"] = time.monotonic() - started
    print(render(results))
    print(f"({meta['elapsed_s']:.0f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries the report."""
    print(message, file=sys.stderr, flush=True)
