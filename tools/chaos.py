"""Chaos run: real producer processes and a real flusher process are SIGKILLed at random
while a local receiver (tools/fake_segment.py, in this process) fails on purpose; then the
queue is drained and the promise (no event whose call returned is lost) is checked,
property by property.

    python tools/chaos.py [--seconds 45] [--producers 4] [--kills N] [--minutes M]
                          [--seed S] [--max-in-flight 8] [--batch 100] [--queue PATH] [--json]

P1 no event whose call returned is lost; P2 nothing invented, every copy byte-identical and
as the producer sent it; P3 duplicates within (flusher kills x max_in_flight + ambiguous
replies) x batch; P4 after the faults stop the queue drains to zero and a new event gets
through; P5 integrity_check "ok" after every kill, file and WAL small after the drain;
P6 no exception, drop or "database is locked" reached a producer (nor the flusher's log).

The details, then ONE verdict line; ``--json`` prints one JSON object on stdout instead
(the details go to stderr). Exit 0 only if every property holds. Traffic goes to 127.0.0.1
only; every child is killed on exit, Ctrl-C and SIGTERM included. This process never
imports segmentry, so the read-only SQLite checks here cannot disturb a producer's locks
(SQLite's POSIX locks are per process: closing any descriptor of the file drops them all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
from fake_segment import FakeSegment  # noqa: E402

KEY = "chaos-write-key"
NAME = "Chaos \u00e9v\u00e9nement \u2713"  # non-ASCII: the stored text is \u-escaped JSON
TEXT = "h\u00e9 \u2603 \U0001f600"
BIG_PAD = 25_000  # bursts of events this big force batches to split at 500 KB
WAL_LIMIT = 4 << 20  # P5: the WAL after a drain (the drain truncates it)
DB_LIMIT = 16 << 20  # P5: the file after a drain (freed pages are given back)
STOP_GRACE_S = 20.0  # the flusher's own SIGTERM grace is 10 s
DRAIN_TIMEOUT_S = 120
PROBE_TIMEOUT_S = 30.0
CRON_SPEEDUP = 4  # a cron producer's pace, in paced producers' rates
EXAMPLES = 5  # violations listed per kind

# A producer: a Client in its own process; each returned messageId and the event's
# sequence number go to stdout, flushed only after the call returned. A "cron" producer
# stores a small quota fast and exits cleanly (the atexit flush); the others run until
# killed, paced at --rate events/s.
PRODUCER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import segmentry
from chaos import call_args, event_spec
tools, key, queue, url, me, mode, rate, quota, batch, flight = sys.argv[1:]
rate, quota = float(rate), int(quota)
options = dict(queue_path=queue, api_url=url, max_batch_size=int(batch),
               max_in_flight=int(flight), retry_start=5, retry_expiry=200,
               batch_every_ms=50)
if mode == "none-strict":  # fsync per commit, and a failed enqueue raises (P6 sees it)
    options.update(on_full="raise", durability="full")
if mode.startswith("none"):
    options["flusher"] = None
client = segmentry.Client(key, **options)
out, seq, start = sys.stdout, 0, time.monotonic()
while quota == 0 or seq < quota:
    kind, wire = event_spec(me, seq)
    args, kwargs = call_args(kind, wire)
    mid = getattr(client, kind)(*args, **kwargs)
    if mid is None:
        print("DROP", seq, client.dropped, file=sys.stderr, flush=True)
    else:
        out.write("%s %d\n" % (mid, seq))
        out.flush()
    seq += 1
    ahead = seq / rate - (time.monotonic() - start) if rate else 0
    if ahead > 0:
        time.sleep(ahead)
out.write("DONE\n")
out.flush()
"""

# The P4 probe: one event through a Client's own flusher thread, after the chaos.
PROBE = rf"""
import sys
sys.path.insert(0, sys.argv[1])
import segmentry
from chaos import call_args, event_spec
tools, key, queue, url = sys.argv[1:]
client = segmentry.Client(key, queue_path=queue, api_url=url, batch_every_ms=50)
kind, wire = event_spec("probe", 0)
args, kwargs = call_args(kind, wire)
mid = getattr(client, kind)(*args, **kwargs)
print(mid, client.flush(timeout={PROBE_TIMEOUT_S!r}), flush=True)
"""

# Slot i runs MODES[i % 4]: a flusher thread; flusher=None with durability="full" and
# on_full="raise"; a cron-like producer (thread, quota, clean exit); flusher=None.
MODES = ("thread", "none-strict", "cron", "none")
FAULTS = ("outage", "long-outage", "429", "drop", "ambiguous", "delay")
TYPES = ("track", "identify", "page", "screen", "group", "alias")


# -- the events: one pure spec, used by the producers to call and here to check -----------


def event_spec(me: str, seq: int) -> tuple[str, dict[str, Any]]:
    """Event number ``seq`` of producer ``me``: its type and the wire fields it must carry."""
    kind = TYPES[seq % len(TYPES)]
    big = (seq // 50) % 80 == 3  # 50 big events in a row, one burst per 4,000
    props = {"producer": me, "seq": seq, "text": TEXT,
             "pad": "x" * (BIG_PAD if big else seq % 64)}
    wire: dict[str, Any] = {"type": kind, "userId": f"user-{seq % 97}",
                            "context": {"chaos": {"producer": me, "seq": seq}}}
    if kind == "track":
        wire.update(event=NAME, properties=props)
    elif kind in ("page", "screen"):
        wire.update(name=f"{NAME} {kind}", properties=props)
        if kind == "page":
            wire["category"] = "Docs"
    elif kind in ("identify", "group"):
        wire["traits"] = props
        if kind == "group":
            wire["groupId"] = f"org-{seq % 7}"
    else:
        wire["previousId"] = f"anon-{me}-{seq}"
    return kind, wire


def call_args(kind: str, wire: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The positional call that must produce ``wire`` (a swapped argument shows in P2)."""
    user, ctx = wire["userId"], {"chaos": wire["context"]["chaos"]}
    if kind == "track":
        return [user, wire["event"], wire["properties"], ctx], {}
    if kind in ("page", "screen"):
        extra = {"category": wire["category"]} if kind == "page" else {}
        return [user, wire["name"], wire["properties"], ctx], extra
    if kind == "identify":
        return [user, wire["traits"], ctx], {}
    if kind == "group":
        return [user, wire["groupId"], wire["traits"], ctx], {}
    return [user, wire["previousId"], ctx], {}


def wire_mismatch(event: dict[str, Any]) -> str | None:
    """Why a received event is not what its producer sent (None when it is)."""
    chaos = event.get("context", {}).get("chaos", {})
    try:
        kind, wire = event_spec(chaos["producer"], chaos["seq"])
    except (KeyError, TypeError):
        return "no context.chaos marker"
    for key, value in wire.items():
        got = event.get(key)
        if key == "context":
            got = {"chaos": chaos}
        if got != value:
            return f"{key} differs"
    if event.get("context", {}).get("library", {}).get("name") != "segmentry":
        return "context.library missing"
    if "sentAt" in event or not isinstance(event.get("timestamp"), str):
        return "sentAt inside a batched event, or no timestamp"
    return None


def _not_compact(event: dict[str, Any], text: str) -> str | None:
    """The client stores compact ASCII JSON and the flusher splices it unchanged: any
    other text means somebody decoded and re-encoded (or mangled) it."""
    if json.dumps(event, separators=(",", ":")) != text:
        return "the text is not the client's compact encoding"
    return None


# -- processes ------------------------------------------------------------------------------


@dataclasses.dataclass
class Incarnation:
    """One run of a producer slot: its process and what it reported."""

    name: str  # "p2.5": slot 2, fifth start; the producer id inside its events
    mode: str
    proc: subprocess.Popen[str]
    returned: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    stderr: list[str] = dataclasses.field(default_factory=list)
    readers: list[threading.Thread] = dataclasses.field(default_factory=list)
    done_at: float | None = None  # a cron producer printed DONE
    eof_at: float | None = None
    killed: bool = False

    @property
    def has_flusher(self) -> bool:
        return self.mode in ("thread", "cron")


def _read_stdout(inc: Incarnation) -> None:
    assert inc.proc.stdout is not None
    for line in inc.proc.stdout:
        if not line.endswith("\n"):
            break  # cut by the kill: the call's return was never reported
        if line == "DONE\n":
            inc.done_at = time.monotonic()
            continue
        mid, seq = line.split()
        inc.returned.append((mid, int(seq)))
    inc.eof_at = time.monotonic()


def _read_stderr(proc: subprocess.Popen[str], sink: list[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        sink.append(line.rstrip("\n"))


def _start_reader(target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _popen(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # A new session: a Ctrl-C in the terminal reaches this harness only, which then
    # kills every child itself (in `Harness.cleanup`).
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _run(argv: list[str], timeout: float,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a child to its end; one that outlives ``timeout`` is killed and reported with
    code -9 (a property fails on it; the harness goes on to its verdict)."""
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return subprocess.CompletedProcess(argv, -9, "", err + f"\nkilled after {timeout} s")


def integrity(path: str) -> str:
    """PRAGMA integrity_check on a read-only connection ("ok" when the file is sound)."""
    if not os.path.exists(path):  # stat only: nothing here opens the file by hand
        return "ok"
    for _ in range(20):
        try:
            return str(_ro_query(path, "PRAGMA integrity_check")[0][0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                return f"error: {exc}"
            time.sleep(0.1)  # a crashed writer's WAL is being recovered: look again
    return "error: still locked after 20 tries"


def _ro_query(path: str, sql: str) -> list[Any]:
    conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


# -- the harness ----------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    kills: int = 0
    flusher_kills: int = 0
    clean_exits: int = 0
    slowest_exit_s: float = 0.0
    flusher_restarts: int = 0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    integrity: list[str] = dataclasses.field(default_factory=list)
    max_wal_bytes: int = 0  # sampled after each kill
    anomalies: list[str] = dataclasses.field(default_factory=list)  # unexpected exits


class Harness:
    """One chaos run: the receiver, the producer slots, the flusher process, the chaos
    loop, the drain and the probe. ``run()`` returns the report ``judge`` builds."""

    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.args = args
        self.say = say
        self.rng = random.Random(args.seed)
        self.tmp = None if args.queue else tempfile.mkdtemp(prefix="segmentry-chaos-")
        self.queue = args.queue or os.path.join(self.tmp or "", "queue.db")
        self.srv = FakeSegment(write_key=KEY, record=True)
        self.slots: list[list[Incarnation]] = [[] for _ in range(args.producers)]
        self.flusher: subprocess.Popen[str] | None = None
        self.flusher_log: list[str] = []
        self.children: list[subprocess.Popen[str]] = []
        self.tally = Tally()
        self.undo: list[tuple[float, Callable[[], None]]] = []  # timed ends of faults

    # -- children ----------------------------------------------------------------------------

    def start_producer(self, slot: int) -> None:
        mode = MODES[slot % len(MODES)]
        name = f"p{slot}.{len(self.slots[slot])}"
        quota = self.rng.randint(100, 800) if mode == "cron" else 0
        rate = self.args.rate * (CRON_SPEEDUP if mode == "cron" else 1)
        argv = [sys.executable, "-c", PRODUCER, TOOLS, KEY, self.queue, self.srv.url, name,
                mode, str(rate), str(quota), str(self.args.batch), str(self.args.max_in_flight)]
        proc = _popen(argv)
        self.children.append(proc)
        inc = Incarnation(name, mode, proc)
        inc.readers = [_start_reader(_read_stdout, inc),
                       _start_reader(_read_stderr, proc, inc.stderr)]
        self.slots[slot].append(inc)

    def flusher_argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "segmentry.flusher", "--queue", self.queue,
                "--api-url", self.srv.url, "--max-in-flight", str(self.args.max_in_flight),
                "--max-batch-size", str(self.args.batch), "--retry-start", "5",
                "--retry-expiry", "200", "--batch-every-ms", "50", "--log-level", "WARNING",
                *extra]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SEGMENT_WRITE_KEY": KEY}

    def start_flusher(self) -> None:
        # --wait: while a producer's thread holds the queue, this one stands by.
        self.flusher = _popen(self.flusher_argv("--wait"), self.env())
        self.children.append(self.flusher)
        _start_reader(_read_stderr, self.flusher, self.flusher_log)

    def supervise(self) -> None:
        """Restart whatever exited on its own (cron producers do; nothing else should)."""
        for slot, incs in enumerate(self.slots):
            inc = incs[-1]
            if inc.proc.poll() is not None:
                self._note_exit(inc)
                self.start_producer(slot)
        if self.flusher is not None and self.flusher.poll() is not None:
            self.tally.anomalies.append(f"flusher exited by itself, code {self.flusher.returncode}")
            self.tally.flusher_restarts += 1
            self.start_flusher()

    def _note_exit(self, inc: Incarnation) -> None:
        for reader in inc.readers:
            reader.join(5)
        if inc.mode == "cron" and inc.proc.returncode == 0 and inc.done_at is not None:
            self.tally.clean_exits += 1
            took = (inc.eof_at or time.monotonic()) - inc.done_at
            self.tally.slowest_exit_s = max(self.tally.slowest_exit_s, took)
        else:
            self.tally.anomalies.append(
                f"producer {inc.name} ({inc.mode}) exited by itself, code {inc.proc.returncode}")

    def kill_one(self) -> None:
        self.supervise()
        if self.rng.random() < 0.3 and self.flusher is not None:
            self.flusher.kill()
            self.flusher.wait()
            self.tally.flusher_kills += 1
            self.start_flusher()
        else:
            slot = self.rng.randrange(len(self.slots))
            self._kill_producer(self.slots[slot][-1])
            self.start_producer(slot)
        self.tally.kills += 1
        self.tally.integrity.append(integrity(self.queue))
        wal = file_size(self.queue + "-wal")
        self.tally.max_wal_bytes = max(self.tally.max_wal_bytes, wal)

    def _kill_producer(self, inc: Incarnation) -> None:
        if inc.proc.poll() is not None:
            self._note_exit(inc)  # it exited by itself a moment ago
            return
        inc.killed = True
        inc.proc.kill()
        self.tally.flusher_kills += inc.has_flusher  # its thread may hold the queue
        inc.proc.wait()
        for reader in inc.readers:
            reader.join(10)

    # -- faults ------------------------------------------------------------------------------

    def inject(self) -> None:
        kind = self.rng.choice(FAULTS)
        srv, rng = self.srv, self.rng
        if kind == "outage":
            srv.fail(503, count=rng.randint(3, 30))
        elif kind == "long-outage":  # every request fails until it is lifted
            srv.fail(rng.choice((500, 502, 503, 504)))
            self.later(rng.uniform(2.0, 8.0), lambda: srv.fail(503, count=0))
        elif kind == "429":
            srv.fail(429, retry_after=1, count=1)
        elif kind == "drop":
            srv.drop(count=self.rng.randint(1, 5))
        elif kind == "ambiguous":
            srv.ambiguous(count=self.rng.randint(1, 3))
        else:
            srv.delay(rng.randint(20, 300))
            self.later(rng.uniform(0.5, 3.0), lambda: srv.delay(0))
        self.tally.faults[kind] = self.tally.faults.get(kind, 0) + 1

    def later(self, seconds: float, action: Callable[[], None]) -> None:
        self.undo.append((time.monotonic() + seconds, action))

    def lift_faults(self, now: float) -> None:
        due = [action for at, action in self.undo if at <= now]
        self.undo = [(at, action) for at, action in self.undo if at > now]
        for action in due:
            action()

    # -- phases ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.srv.start()
        self.say(f"receiver {self.srv.url}, queue {self.queue}, seed {self.args.seed}")
        for slot in range(len(self.slots)):
            self.start_producer(slot)
        self.start_flusher()
        self.chaos()
        self.stop_everything()
        report = self.finish()
        report["seconds"] = round(time.monotonic() - started, 1)
        return report

    def chaos(self) -> None:
        args, rng = self.args, self.rng
        end = time.monotonic() + args.duration
        mean = args.duration / args.kills if args.kills else 1.5
        next_kill = time.monotonic() + rng.uniform(0.2, 1.8) * mean
        next_fault = time.monotonic() + rng.uniform(1.0, 4.0)
        while time.monotonic() < end and (not args.kills or self.tally.kills < args.kills):
            now = time.monotonic()
            self.supervise()
            if now >= next_kill:
                self.kill_one()
                next_kill = now + rng.uniform(0.2, 1.8) * mean
            if now >= next_fault:
                self.inject()
                next_fault = now + rng.uniform(1.0, 4.0)
            self.lift_faults(now)
            time.sleep(0.05)  # the harness's own pace; no result depends on it

    def stop_everything(self) -> None:
        """Faults off, producers killed (their returned lines are final), flusher stopped."""
        self.srv.clear_faults()
        self.supervise()
        for incs in self.slots:
            self._kill_producer(incs[-1])
        assert self.flusher is not None
        self.flusher.send_signal(signal.SIGTERM)
        try:
            code = self.flusher.wait(STOP_GRACE_S)
            self.say(f"flusher stopped by SIGTERM, exit code {code}")
        except subprocess.TimeoutExpired:
            self.flusher.kill()
            self.flusher.wait()
            self.tally.flusher_kills += 1
            self.tally.anomalies.append(f"flusher ignored SIGTERM for {STOP_GRACE_S:.0f} s")
        self.tally.integrity.append(integrity(self.queue))

    def finish(self) -> dict[str, Any]:
        """Drain, probe, measure; then judge."""
        drain = self.drain()
        sizes = {"db_bytes": file_size(self.queue), "wal_bytes": file_size(self.queue + "-wal")}
        probe = self.probe()
        left = _ro_query(self.queue, "SELECT (SELECT COUNT(*) FROM events), "
                                     "(SELECT COUNT(*) FROM dead_letters)")[0] \
            if os.path.exists(self.queue) else (0, 0)
        self.tally.integrity.append(integrity(self.queue))
        return judge(self, drain, probe, sizes, left)

    def drain(self) -> dict[str, Any]:
        argv = self.flusher_argv("--drain", "--drain-timeout", str(DRAIN_TIMEOUT_S),
                                 "--progress", "none")
        started = time.monotonic()
        done = _run(argv, DRAIN_TIMEOUT_S + 30, self.env())
        took = time.monotonic() - started
        self.flusher_log.extend(done.stderr.splitlines())
        self.say(f"drain: exit code {done.returncode} in {took:.1f} s")
        return {"code": done.returncode, "seconds": round(took, 1)}

    def probe(self) -> dict[str, Any]:
        argv = [sys.executable, "-c", PROBE, TOOLS, KEY, self.queue, self.srv.url]
        done = _run(argv, PROBE_TIMEOUT_S + 30)
        mid, _, flushed = done.stdout.strip().partition(" ")
        received = bool(mid) and bool(self.srv.raw(mid))
        self.say(f"probe: {mid or 'no messageId'}, flush() -> {flushed or '?'}, "
                 f"received {received}, exit code {done.returncode}")
        return {"mid": mid, "flushed": flushed == "True", "received": received,
                "code": done.returncode, "stderr": done.stderr.strip()}

    def cleanup(self) -> None:
        """Kill every child still alive, stop the receiver, remove the temporary queue."""
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.srv.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# -- the verdict ------------------------------------------------------------------------------


@dataclasses.dataclass
class Findings:
    """Violations by property, each a list of short examples."""

    lists: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {p: [] for p in ("P1", "P2", "P3", "P4", "P5", "P6")})

    def add(self, prop: str, text: str) -> None:
        self.lists[prop].append(text)

    def ok(self, prop: str) -> bool:
        return not self.lists[prop]


def returned_ids(h: Harness) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """messageId -> (producer, seq) of every call that returned; and, per killed
    producer, how many of its calls returned."""
    ids: dict[str, tuple[str, int]] = {}
    counts: dict[str, int] = {}
    for inc in (i for incs in h.slots for i in incs):
        if inc.killed:  # only a killed producer can leave a call half reported
            counts[inc.name] = len(inc.returned)
        for mid, seq in inc.returned:
            ids[mid] = (inc.name, seq)
    return ids, counts


def check_received(h: Harness, returned: dict[str, tuple[str, int]], counts: dict[str, int],
                   found: Findings) -> dict[str, str]:
    """P2 over every received copy; returns messageId -> its (single) text."""
    texts: dict[str, str] = {}
    unreturned: dict[str, str] = {}  # producer -> the one messageId it may add
    for text in h.srv.raw_events():
        event = json.loads(text)
        mid = event.get("messageId")
        if mid in texts:  # a duplicate: the first copy was checked, this one must equal it
            if texts[mid] != text:
                found.add("P2", f"{mid}: two copies with different texts")
            continue
        texts[mid] = text
        why = wire_mismatch(event) or _not_compact(event, text)
        if why:
            found.add("P2", f"{mid}: {why}")
            continue
        chaos = event["context"]["chaos"]
        origin = (chaos["producer"], chaos["seq"])
        if mid in returned:
            if returned[mid] != origin:
                found.add("P2", f"{mid}: returned by {returned[mid]}, carries {origin}")
        elif not _in_flight_at_kill(origin, counts, unreturned, mid):
            found.add("P2", f"{mid}: received but never returned ({origin})")
    return texts


def _in_flight_at_kill(origin: tuple[str, int], counts: dict[str, int],
                       unreturned: dict[str, str], mid: str) -> bool:
    """A killed producer may have stored one event whose return it never reported: the
    one after its last reported line, and only one."""
    producer, seq = origin
    if producer not in counts or seq != counts[producer] or producer in unreturned:
        return False
    unreturned[producer] = mid
    return True


def judge(h: Harness, drain: dict[str, Any], probe: dict[str, Any], sizes: dict[str, int],
          left: tuple[int, int]) -> dict[str, Any]:
    found = Findings()
    returned, counts = returned_ids(h)
    counts["probe"] = 0
    if probe["mid"]:
        returned[probe["mid"]] = ("probe", 0)
    texts = check_received(h, returned, counts, found)
    lost = [mid for mid in returned if mid not in texts]
    for mid in lost:
        found.add("P1", f"{mid} {returned[mid]} returned, never received")
    stats = h.srv.stats()
    ambiguous = stats["requests_by_status"].get("ambiguous", 0)
    bound = (h.tally.flusher_kills * h.args.max_in_flight + ambiguous) * h.args.batch
    if stats["duplicates"] > bound:
        found.add("P3", f"{stats['duplicates']} duplicates > bound {bound}")
    check_end_state(h, drain, probe, left, found)
    check_files(h, sizes, found)
    check_logs(h, found)
    return report(h, found, returned, texts, stats, ambiguous, bound, drain, probe, sizes, left)


def check_end_state(h: Harness, drain: dict[str, Any], probe: dict[str, Any],
                    left: tuple[int, int], found: Findings) -> None:
    if drain["code"] != 0:
        found.add("P4", f"drain exited {drain['code']}")
    if not (probe["flushed"] and probe["received"] and probe["code"] == 0):
        found.add("P4", f"the probe event did not get through: {probe}")
    if left != (0, 0):
        found.add("P4", f"after the drain: {left[0]} events queued, {left[1]} dead letters")


def check_files(h: Harness, sizes: dict[str, int], found: Findings) -> None:
    bad = [r for r in h.tally.integrity if r != "ok"]
    for result in bad:
        found.add("P5", f"integrity_check: {result}")
    if sizes["wal_bytes"] > WAL_LIMIT or sizes["db_bytes"] > DB_LIMIT:
        found.add("P5", f"after the drain db {sizes['db_bytes']} B, wal {sizes['wal_bytes']} B "
                        f"(limits {DB_LIMIT}, {WAL_LIMIT})")


# What a producer that exits during an injected outage says, by design: its exit hook's
# flush() timed out and its events stay queued (they are counted by P1 like all others).
OUTAGE_AT_EXIT = "segmentry: flush() timed out: delivery is failing ("


def check_logs(h: Harness, found: Findings) -> None:
    for inc in (i for incs in h.slots for i in incs):
        for line in inc.stderr:
            if not line.startswith(OUTAGE_AT_EXIT):
                found.add("P6", f"producer {inc.name}: {line}")
    for line in h.flusher_log:
        if "Traceback" in line or "locked" in line or line.startswith(("ERROR", "CRITICAL")):
            found.add("P6", f"flusher: {line}")
    for anomaly in h.tally.anomalies:
        found.add("P6", anomaly)


def report(h: Harness, found: Findings, returned: dict[str, tuple[str, int]],
           texts: dict[str, str], stats: dict[str, Any], ambiguous: int, bound: int,
           drain: dict[str, Any], probe: dict[str, Any], sizes: dict[str, int],
           left: tuple[int, int]) -> dict[str, Any]:
    t = h.tally
    props = {p: found.ok(p) for p in found.lists}
    locked = sum("database is locked" in line for incs in h.slots for i in incs
                 for line in i.stderr)
    return {
        "pass": all(props.values()), "properties": props,
        "returned": len(returned), "delivered": sum(mid in texts for mid in returned),
        "received": stats["events"], "unique": stats["unique"],
        "duplicates": stats["duplicates"], "duplicate_bound": bound,
        "unreturned_delivered": len(texts) - sum(mid in texts for mid in returned),
        "kills": t.kills, "flusher_kills": t.flusher_kills, "faults": sum(t.faults.values()),
        "faults_by_kind": t.faults, "ambiguous_replies": ambiguous,
        "requests_by_status": stats["requests_by_status"], "batches": stats["batches"],
        "producer_starts": sum(len(incs) for incs in h.slots), "cron_clean_exits":
        t.clean_exits, "slowest_clean_exit_s": round(t.slowest_exit_s, 2),
        "integrity_checks": len(t.integrity), "database_locked": locked,
        "drain": drain, "probe": {k: v for k, v in probe.items() if k != "stderr"},
        "left_after_drain": {"events": left[0], "dead_letters": left[1]}, **sizes,
        "max_wal_bytes_during_run": t.max_wal_bytes,
        "violations": {p: v[:EXAMPLES] for p, v in found.lists.items() if v},
        "violation_counts": {p: len(v) for p, v in found.lists.items() if v},
        "seed": h.args.seed,
    }


def verdict(r: dict[str, Any]) -> str:
    failed = [p for p, ok in r["properties"].items() if not ok]
    head = ("PASS " + " ".join(r["properties"]) if not failed else
            "FAIL " + " ".join(failed) + " (ok: " +
            " ".join(p for p in r["properties"] if p not in failed) + ")")
    return (f"chaos: {head} \u2014 {r['returned']:,} returned, {r['delivered']:,} delivered, "
            f"{r['duplicates']:,} duplicates (bound {r['duplicate_bound']:,}), "
            f"{r['kills']} kills ({r['flusher_kills']} flusher), {r['faults']} faults, "
            f"{r['seconds']:.0f} s")


def details(r: dict[str, Any]) -> list[str]:
    lines = [
        f"producers started {r['producer_starts']}, cron clean exits {r['cron_clean_exits']} "
        f"(slowest {r['slowest_clean_exit_s']} s after its last call)",
        f"receiver: {r['received']:,} events in {r['batches']:,} batches, {r['unique']:,} unique, "
        f"requests by status {r['requests_by_status']}",
        f"faults {r['faults_by_kind']}, ambiguous replies that fired {r['ambiguous_replies']}",
        f"received, never reported returned (a call cut by its kill): "
        f"{r['unreturned_delivered']}",
        f"integrity checks {r['integrity_checks']}, 'database is locked' seen "
        f"{r['database_locked']}",
        f"after the drain: db {r['db_bytes']:,} B, wal {r['wal_bytes']:,} B "
        f"(largest wal seen during the run {r['max_wal_bytes_during_run']:,} B), "
        f"left {r['left_after_drain']}",
    ]
    for prop, examples in r["violations"].items():
        lines.append(f"{prop} violated {r['violation_counts'][prop]} time(s), e.g.:")
        lines += [f"  {e}" for e in examples]
    return lines


# -- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=45.0, help="chaos phase length")
    p.add_argument("--minutes", type=float, help="chaos phase length (overrides --seconds)")
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--kills", type=int, help="kill budget, spread over the run")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--rate", type=float, default=150.0, help="events/s per paced producer")
    p.add_argument("--queue", help="queue file to create (must not exist; kept afterwards)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    args.duration = args.minutes * 60 if args.minutes is not None else args.seconds
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if args.queue and os.path.exists(args.queue):
        p.error(f"--queue {args.queue} exists: every event in the file must be this run's")
    if args.producers < 1 or args.batch < 1 or args.max_in_flight < 1:
        p.error("--producers, --batch and --max-in-flight must be at least 1")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds into Harness.cleanup


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    signal.signal(signal.SIGTERM, _terminate)
    harness = Harness(args, say)
    try:
        result = harness.run()
    finally:
        harness.cleanup()
    for line in details(result):
        say(line)
    result["verdict"] = verdict(result)
    say(result["verdict"])
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
