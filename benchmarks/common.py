"""Shared helpers for segmentry's benchmarks: statistics, contenders alternated run by run
in fresh interpreters, a Segment receiver on 127.0.0.1, and plain-text tables.
Standard library only (``queue_file`` imports segmentry); nothing here talks to
any host but 127.0.0.1.

``python -m benchmarks.common --ready-file F`` serves the minimal built-in receiver,
used when ``tools/fake_segment.py`` is missing or does not start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WRITE_KEY = "BENCH_WRITE_KEY"
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
    """p50, p99 and max of per-call latencies, in microseconds (sorts the list in place)."""
    latencies_ns.sort()
    return {"p50_us": percentile(latencies_ns, 50) / 1e3,
            "p99_us": percentile(latencies_ns, 99) / 1e3,
            "max_us": (latencies_ns[-1] / 1e3) if latencies_ns else math.nan}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- fresh processes --------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of every child: the repository importable, and no proxy, so
    requests and urllib go straight to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
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


def read_spec(path: str) -> dict[str, Any]:
    with open(path) as f:
        spec: dict[str, Any] = json.load(f)
    return spec


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def alternate(names: Sequence[str], runs: int, run_one: Callable[[str, int], dict[str, Any]],
              log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """Run every contender once per round, A B C A B C ..., so drift on a noisy machine
    hits all of them alike. Returns each contender's results in run order."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for run in range(runs):
        for name in names:
            result = run_one(name, run)
            results[name].append(result)
            log(f"  run {run + 1}/{runs} {name:<22} {result.get('rate', math.nan):>10,.0f} ev/s")
    return results


# -- the receiver -----------------------------------------------------------------------------


class Receiver:
    """A Segment receiver in its own process on 127.0.0.1: tools/fake_segment.py when it
    is there and starts, else the built-in one below. Both answer GET /__stats."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.kind = ""
        self.url = ""  # the api_url: http://127.0.0.1:PORT/v1/
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """The base URL analytics-python takes as ``host``."""
        return self.url[: -len("v1/")].rstrip("/")

    def start(self) -> Receiver:
        fake = ROOT / "tools" / "fake_segment.py"
        if fake.exists():
            if self._spawn([sys.executable, str(fake), "--port", "0"], "tools/fake_segment.py"):
                return self
        if not self._spawn([sys.executable, "-m", "benchmarks.common"], "built-in"):
            raise RuntimeError("could not start a local receiver")
        return self

    def _spawn(self, command: list[str], kind: str) -> bool:
        ready = os.path.join(self.workdir, f"receiver-{kind.replace('/', '_')}.ready")
        proc = subprocess.Popen([*command, "--ready-file", ready], cwd=ROOT, env=child_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RECEIVER_START_S
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(ready):
                with open(ready) as f:
                    url = f.read().strip()
                if url.startswith(f"http://{HOST}:"):
                    self._proc, self.kind, self.url = proc, kind, url.rstrip("/") + "/"
                    if not self.url.endswith("/v1/"):
                        self.url += "v1/"
                    try:
                        self.events()
                        return True
                    except OSError:
                        break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        self._proc = None
        return False

    def stats(self) -> dict[str, Any]:
        with _DIRECT.open(self.host + "/__stats", timeout=10) as reply:
            stats: dict[str, Any] = json.load(reply)
        return stats

    def events(self) -> int:
        return int(self.stats()["events"])

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    """200 to every POST under /v1/, HTTP/1.1 keep-alive; counts events without decoding
    them (each one carries exactly one "messageId" key)."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.startswith("/v1/"):
            return self._reply(404, b'{"success": false}')
        with self.server.lock:
            self.server.requests += 1
            self.server.events += body.count(b'"messageId"')
        self._reply(200, b'{"success": true}')

    def do_GET(self) -> None:
        if self.path != "/__stats":
            return self._reply(404, b"{}")
        with self.server.lock:
            stats = {"events": self.server.events, "requests": self.server.requests}
        self._reply(200, json.dumps(stats).encode())

    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Handler)
        self.lock = threading.Lock()
        self.events = 0
        self.requests = 0


def serve(ready_file: str) -> None:
    """Serve the built-in receiver until killed; write its api_url to ``ready_file``."""
    server = _Server()
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"http://{HOST}:{server.server_address[1]}/v1/\n")
    os.replace(tmp, ready_file)  # the parent never reads a half-written file
    server.serve_forever()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the built-in local receiver")
    parser.add_argument("--ready-file", required=True)
    serve(parser.parse_args(argv).ready_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


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
