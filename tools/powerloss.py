"""Power-loss run: the queue lives on a FUSE filesystem that keeps every write not yet
fsynced in memory and drops it at a simulated power cut, while producers store events
and a flusher delivers them; after each cut the queue is recovered and checked.

    python tools/powerloss.py [--cuts 100] [--minutes M] [--durability full|normal|both]
                              [--drop whole|subset|both] [--delivery process|thread|both]
                              [--producers 2] [--rate 400] [--seed S] [--json]

The filesystem (a passthrough over a directory on the real disk, in a child process: the
``serve`` subcommand) models the disk under a power loss, as LazyFS and ALICE do:

- a write reaches the file at once (every process reads it back, as from the page
  cache) and is logged as unsynced; fsync or fdatasync of the file makes its logged
  writes and truncations durable;
- at a cut, each file goes back to its content at its last fsync, plus either none of
  its unsynced writes ("whole": all dropped) or a random half of them, applied in order
  ("subset": the disk wrote back some pages and not others);
- directory entries: a file created since its directory was last fsynced is gone after
  the cut, even if its data was fsynced; a file unlinked since then comes back (with its
  durable content). SQLite fsyncs the directory when it first syncs a new WAL, so the
  queue file's entry is durable from its first synced commit;
- the ``-shm`` file is not modelled: it is left as the processes last wrote it (a stale
  index), which SQLite must ignore and rebuild; it holds no durable state.

A cut: SIGKILL every process using the mount (the producers and the flusher), unmount
(the kernel's page cache of the mount goes with it), let the filesystem process drop
what the model says and exit; then mount again and recover: ``PRAGMA integrity_check``
and the messageIds left in the queue. Each round picks its producers' durability, the
cut's drop mode and who delivers (a flusher process, or the producers' own flusher
threads), arms a receiver fault at times, and cuts at a random moment. After the
last cut a flusher drains the recovered queue. Properties:

F1 durability="full": no event whose call returned is lost (each is in the recovered
   queue or was accepted by the receiver);
F2 integrity_check is "ok" after every cut;
F3 durability="normal": only the last commits before a cut are lost (per producer, no
   event survives in the queue after one of its earlier events was lost);
F4 the flusher never deleted an event the receiver did not accept (an event in a
   recovered queue is there at the next recovery, or was accepted);
F5 after the last cut the queue drains: empty, every event it held accepted;
F6 no producer or flusher reported an error (a corrupt queue would show here).

Every returned messageId is written by the producer to a pipe to this process (the real
disk's side of the cut) after the call returned. Needs /dev/fuse, fusermount and libfuse2
(Debian: ``apt-get install fuse libfuse2``) and fusepy (the test extra). Traffic goes to
127.0.0.1 only; every child is killed and the mount removed on exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
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
from typing import Any, Callable

TOOLS = os.path.dirname(os.path.abspath(__file__))
KEY = "powerloss-write-key"
MOUNT_TIMEOUT_S = 20.0
UNMOUNT_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 120
EXAMPLES = 5
PROGRESS_EVERY = 25  # cuts between progress lines
PROPERTIES = ("F1", "F2", "F3", "F4", "F5", "F6")
STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime",
               "st_mtime", "st_ctime", "st_blocks", "st_blksize")
STATVFS_FIELDS = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_flag", "f_namemax")

# A producer: a Client in its own process, with its own flusher thread ("thread") or none
# (a flusher process delivers); each returned messageId and the event's sequence number go
# to stdout, flushed only after the call returned.
PRODUCER = r"""
import sys, time
import segmentry
key, queue, url, me, durability, rate, delivery = sys.argv[1:]
rate = float(rate)
client = segmentry.Client(key, queue_path=queue, api_url=url, durability=durability,
                          on_full="raise", retry_start=5, retry_expiry=200, batch_every_ms=50,
                          flusher="thread" if delivery == "thread" else None)
out, seq, start = sys.stdout, 0, time.monotonic()
while True:
    mid = client.track("user-%d" % (seq % 97), "Power cut", {"producer": me, "seq": seq})
    out.write("%s %d\n" % (mid, seq))
    out.flush()
    seq += 1
    ahead = seq / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
"""


# -- the filesystem ---------------------------------------------------------------------------


class FileLog:
    """One file's content at its last fsync (a copy on the real disk) and the writes and
    truncations made since, in order: ``(offset, data)``, or ``(length, None)``."""

    def __init__(self, synced: str, volatile: bool) -> None:
        self.synced = synced
        self.volatile = volatile  # the -shm: never logged, never restored
        self.pending: list[tuple[int, bytes | None]] = []

    def record(self, offset: int, data: bytes | None) -> None:
        if not self.volatile:
            self.pending.append((offset, data))

    def sync(self) -> None:
        apply_ops(self.synced, self.pending)
        self.pending = []


def apply_ops(path: str, ops: list[tuple[int, bytes | None]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for offset, data in ops:
            if data is None:
                os.ftruncate(fd, offset)
            else:
                os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


class PowerLossFS:
    """The fusepy operations of a flat directory (the queue's), passed through to
    ``live`` with pread/pwrite and fstat/ftruncate on the open file (SQLite maps the
    -shm: a shared file offset, or answers by path alone, end in SIGBUS). What a power
    cut keeps is decided by `power_cut`, after the filesystem is unmounted."""

    def __init__(self, live: str, synced: str) -> None:
        self.live = live
        self.synced_dir = synced
        self.mutex = threading.Lock()  # orders each write with its log entry
        self.files: dict[str, FileLog] = {}
        self.handles: dict[int, FileLog] = {}
        self.gone: dict[str, FileLog] = {}  # unlinked, the unlink not yet durable
        self.counter = 0
        os.makedirs(synced, exist_ok=True)
        for name in os.listdir(live):  # after a cut, everything on the disk is durable
            log = self._new_log(name)
            shutil.copyfile(self._path(name), log.synced)
            self.files[name] = log
        self.durable_names = set(self.files)

    def __call__(self, op: str, *args: Any) -> Any:
        method = getattr(self, op, None)
        if method is None:
            raise OSError(errno.ENOSYS, op)
        return method(*args)

    def _path(self, name: str) -> str:
        return os.path.join(self.live, name)

    def _name(self, path: str) -> str:
        name = path.lstrip("/")
        if "/" in name:
            raise OSError(errno.ENOENT, path)  # flat: no subdirectories
        return name

    def _new_log(self, name: str) -> FileLog:
        self.counter += 1
        return FileLog(os.path.join(self.synced_dir, f"{self.counter}"), name.endswith("-shm"))

    # -- metadata ---------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None else os.lstat(self._path(self._name(path)))
        return {key: getattr(st, key) for key in STAT_FIELDS}

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self.live)
        return {key: getattr(st, key) for key in STATVFS_FIELDS}

    def access(self, path: str, amode: int) -> int:
        return 0

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._path(self._name(path)), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._path(self._name(path)), uid, gid)

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._path(self._name(path)), times)

    def opendir(self, path: str) -> int:
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self.live)]

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> None:
        with self.mutex:
            self.durable_names = set(self.files)
            self.gone.clear()

    # -- files ------------------------------------------------------------------------------

    def create(self, path: str, mode: int) -> int:
        name = self._name(path)
        with self.mutex:
            fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, mode)
            log = self.files.get(name)
            if log is None:
                log = self.files[name] = self._new_log(name)
                open(log.synced, "wb").close()
            self.handles[fd] = log
        return fd

    def open(self, path: str, flags: int) -> int:
        name = self._name(path)
        with self.mutex:
            fd = os.open(self._path(name), flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
            log = self.handles[fd] = self.files[name]
            if flags & os.O_TRUNC:
                os.ftruncate(fd, 0)
                log.record(0, None)
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            done = os.pwrite(fh, data, offset)
            self.handles[fh].record(offset, bytes(data[:done]))
        return done

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self.mutex:
            if fh is not None:
                os.ftruncate(fh, length)
                log = self.handles[fh]
            else:
                name = self._name(path)
                os.truncate(self._path(name), length)
                log = self.files[name]
            log.record(length, None)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        with self.mutex:
            self.handles[fh].sync()

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> None:
        with self.mutex:
            self.handles.pop(fh, None)
            os.close(fh)

    def unlink(self, path: str) -> None:
        name = self._name(path)
        with self.mutex:
            os.unlink(self._path(name))
            log = self.files.pop(name)
            if name in self.durable_names and not log.volatile and name not in self.gone:
                self.gone[name] = log  # its durable content comes back at a cut

    # -- the cut ----------------------------------------------------------------------------

    def power_cut(self, rng: random.Random, drop: str) -> dict[str, Any]:
        """Leave in ``live`` what a disk would hold after a power loss now; say what went."""
        report: dict[str, Any] = {"unsynced": 0, "kept": 0, "files_lost": [],
                                  "files_back": []}
        for name in sorted(set(self.files) | set(self.gone)):  # the seed decides, not hashes
            path = self._path(name)
            log = self.gone.get(name) or self.files[name]
            if name not in self.durable_names:
                report["files_lost"].append(name)
                os.unlink(path)
            elif not log.volatile:
                kept = [op for op in log.pending if drop == "subset" and rng.random() < 0.5]
                report["unsynced"] += len(log.pending)
                report["kept"] += len(kept)
                if name in self.gone:
                    report["files_back"].append(name)
                shutil.copyfile(log.synced, path)
                apply_ops(path, kept)
        shutil.rmtree(self.synced_dir, ignore_errors=True)
        return report


def serve(argv: list[str]) -> int:
    """Mount the filesystem on MOUNT over LIVE until unmounted, then cut the power: print
    what was dropped as one JSON line."""
    p = argparse.ArgumentParser(prog="powerloss.py serve")
    p.add_argument("live")
    p.add_argument("mount")
    p.add_argument("--drop", choices=("whole", "subset"), default="whole")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from fuse import FUSE  # fusepy: the test extra

    fs = PowerLossFS(args.live, args.live.rstrip("/") + ".synced")
    # hard_remove: an unlinked open file is not renamed to .fuse_hidden* (no rename here).
    FUSE(fs, args.mount, foreground=True, nothreads=False, hard_remove=True,
         fsname="powerloss")
    report = fs.power_cut(random.Random(args.seed), args.drop)
    print(json.dumps(report), flush=True)
    return 0


def mount(live: str, mountpoint: str, drop: str, seed: int) -> subprocess.Popen[str]:
    """Start the filesystem over ``live`` and return once ``mountpoint`` is mounted."""
    argv = [sys.executable, os.path.abspath(__file__), "serve", live, mountpoint,
            "--drop", drop, "--seed", str(seed)]
    fs = _popen(argv)
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not os.path.ismount(mountpoint):
        if fs.poll() is not None or time.monotonic() > deadline:
            fs.kill()
            _, err = fs.communicate()
            raise RuntimeError(f"the filesystem did not mount: {err.strip()[-2000:]}")
        time.sleep(0.02)
    return fs


def power_cut(mountpoint: str, fs: subprocess.Popen[str]) -> dict[str, Any]:
    """Unmount (every process using the mount must be dead): the filesystem process then
    leaves on the real disk what a power loss would, and reports what it dropped."""
    subprocess.run(["fusermount", "-u", "-z", mountpoint], check=True, capture_output=True,
                   timeout=UNMOUNT_TIMEOUT_S)
    out, err = fs.communicate(timeout=UNMOUNT_TIMEOUT_S)
    lines = out.strip().splitlines()
    if fs.returncode != 0 or not lines:
        raise RuntimeError(f"the filesystem process failed ({fs.returncode}): {err[-2000:]}")
    return dict(json.loads(lines[-1]))


# -- processes --------------------------------------------------------------------------------


def _popen(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # A session of its own: a Ctrl-C reaches this harness only, which kills every child.
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _start_reader(target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _read_lines(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


@dataclasses.dataclass
class Child:
    """A workload process and what it wrote."""

    name: str
    proc: subprocess.Popen[str]
    out: list[str] = dataclasses.field(default_factory=list)
    err: list[str] = dataclasses.field(default_factory=list)
    readers: list[threading.Thread] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = cls(name, _popen(argv, env))
        child.readers = [_start_reader(_read_lines, child.proc.stdout, child.out),
                         _start_reader(_read_lines, child.proc.stderr, child.err)]
        return child

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for reader in self.readers:
            reader.join(10)

    def returned(self) -> list[tuple[str, int]]:
        """(messageId, seq) of each call whose return the producer reported whole."""
        lines = [line.split() for line in self.out if line.endswith("\n")]
        return [(mid, int(seq)) for mid, seq in lines]


def recover(queue: str) -> tuple[str, set[str]]:
    """Open the queue as a process does after a reboot (SQLite replays what it finds of
    the WAL): integrity_check, and the messageIds of its events and dead letters."""
    if not os.path.exists(queue):
        return "ok", set()  # its directory entry was never durable
    conn = sqlite3.connect(queue, timeout=30, isolation_level=None)
    try:
        result = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "events" not in tables:
            return result, set()  # cut before the schema's commit was durable
        rows = conn.execute("SELECT json_extract(body, '$.messageId') FROM events UNION ALL "
                            "SELECT json_extract(body, '$.messageId') FROM dead_letters")
        return result, {row[0] for row in rows}
    except sqlite3.DatabaseError as exc:
        return f"error: {exc}", set()
    finally:
        conn.close()


# -- the harness ------------------------------------------------------------------------------


@dataclasses.dataclass
class Cut:
    """One round: its producers' durability, the drop mode, and what the calls returned."""

    number: int
    durability: str
    drop: str
    delivery: str  # "process": a flusher process; "thread": the producers' own threads
    fault: str
    seconds: float
    returned: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    fs: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the cut dropped
    lost: int = 0
    unreported: int = 0  # in the queue after the cut, its return never reported


class Harness:
    """The receiver, the filesystem process, the rounds of workload and cut, the checks
    after each recovery and the final drain. ``run()`` returns the report."""

    def __init__(self, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        from fake_segment import FakeSegment

        self.args = args
        self.say = say
        self.rng = random.Random(args.seed)
        self.tmp = tempfile.mkdtemp(prefix="segmentry-powerloss-")
        self.live = os.path.join(self.tmp, "live")
        self.mount = os.path.join(self.tmp, "mnt")
        os.mkdir(self.live)
        os.mkdir(self.mount)
        self.queue = os.path.join(self.mount, "queue.db")
        self.srv = FakeSegment(write_key=KEY, record=True).start()
        self.fs: subprocess.Popen[str] | None = None
        self.children: list[Child] = []
        self.accepted: set[str] = set()
        self.seen = 0  # receiver texts read so far
        self.held: set[str] = set()  # messageIds in the queue at the last recovery
        self.cuts: list[Cut] = []
        self.integrity: list[str] = []
        self.found: dict[str, list[str]] = {p: [] for p in PROPERTIES}

    # -- the filesystem ---------------------------------------------------------------------

    def mount_fs(self, drop: str) -> None:
        self.fs = mount(self.live, self.mount, drop, self.rng.randrange(2**31))

    def unmount_fs(self) -> dict[str, Any]:
        assert self.fs is not None
        fs, self.fs = self.fs, None
        return power_cut(self.mount, fs)

    # -- the workload -----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "SEGMENT_WRITE_KEY": KEY}

    def start_workload(self, cut: Cut) -> None:
        for i in range(self.args.producers):
            argv = [sys.executable, "-c", PRODUCER, KEY, self.queue, self.srv.url,
                    f"c{cut.number}p{i}", cut.durability, str(self.args.rate), cut.delivery]
            self.children.append(Child.start(f"producer c{cut.number}p{i}", argv))
        if cut.delivery == "thread":
            return  # one producer's thread delivers, the others' stand by
        argv = [sys.executable, "-m", "segmentry.flusher", "--queue", self.queue,
                "--api-url", self.srv.url, "--durability", cut.durability,
                "--retry-start", "5", "--retry-expiry", "200", "--batch-every-ms", "50",
                "--log-level", "WARNING", "--progress", "none"]
        self.children.append(Child.start(f"flusher c{cut.number}", argv, self.env()))

    def arm_fault(self) -> str:
        self.srv.clear_faults()
        kind = self.rng.choice(("none", "none", "503", "ambiguous", "drop"))
        if kind == "503":
            self.srv.fail(503, count=self.rng.randint(1, 5))
        elif kind == "ambiguous":
            self.srv.ambiguous(count=self.rng.randint(1, 3))
        elif kind == "drop":
            self.srv.drop(count=self.rng.randint(1, 3))
        return kind

    def freeze(self, cut: Cut) -> None:
        """SIGKILL every process using the mount; keep what each producer reported."""
        for child in self.children:
            child.kill()
            if child.name.startswith("producer"):
                for mid, seq in child.returned():
                    cut.returned[mid] = (child.name, seq)
            self.note_errors(child)
        self.children = []

    def note_errors(self, child: Child) -> None:
        for line in child.err:
            if "Traceback" in line or "locked" in line or line.startswith(("ERROR", "CRIT")):
                self.found["F6"].append(f"{child.name}: {line.strip()}")

    # -- the rounds -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + self.args.minutes * 60 if self.args.minutes else None
        while len(self.cuts) < self.args.cuts and (deadline is None or
                                                    time.monotonic() < deadline):
            self.one_round(len(self.cuts))
            if len(self.cuts) % PROGRESS_EVERY == 0:
                self.say(f"{len(self.cuts)} cuts, {time.monotonic() - started:.0f} s")
        self.mount_fs("whole")
        try:
            self.check_recovery()
            drain = self.drain()
        finally:
            self.unmount_fs()
        return self.report(drain, time.monotonic() - started)

    def one_round(self, number: int) -> None:
        cut = Cut(number, self.pick(self.args.durability, ("full", "normal"), number),
                  self.pick(self.args.drop, ("whole", "subset"), number // 2),
                  self.pick(self.args.delivery, ("process", "thread"), number // 4),
                  self.arm_fault(),
                  round(self.rng.uniform(self.args.min_s, self.args.max_s), 2))
        self.mount_fs(cut.drop)
        try:
            self.check_recovery()
            self.start_workload(cut)
            time.sleep(cut.seconds)
            self.freeze(cut)
        finally:
            for child in self.children:
                child.kill()
            self.children = []
            cut.fs = self.unmount_fs()
        self.cuts.append(cut)

    @staticmethod
    def pick(choice: str, both: tuple[str, str], number: int) -> str:
        return both[number % 2] if choice == "both" else choice

    # -- the checks -------------------------------------------------------------------------

    def receive(self) -> None:
        texts = self.srv.raw_events(self.seen)
        self.seen += len(texts)
        self.accepted.update(json.loads(text)["messageId"] for text in texts)

    def check_recovery(self) -> None:
        """After a cut: F2, then F1, F3 and F4 against the round before it."""
        result, held = recover(self.queue)
        self.integrity.append(result)
        self.receive()
        if result != "ok":
            self.found["F2"].append(f"after cut {len(self.cuts)}: {result}")
        if self.cuts:
            self.check_cut(self.cuts[-1], held)
        self.held = held

    def check_cut(self, cut: Cut, held: set[str]) -> None:
        def gone(mid: str) -> bool:
            return mid not in held and mid not in self.accepted

        for mid in filter(gone, self.held):
            self.found["F4"].append(f"cut {cut.number}: {mid} was in the queue, then "
                                    f"neither there nor accepted")
        lost = [mid for mid in cut.returned if gone(mid)]
        cut.lost = len(lost)
        # A producer killed inside a call may have stored the event it never reported.
        cut.unreported = len(held - self.held - set(cut.returned))
        if cut.durability == "full":
            for mid in lost:
                self.found["F1"].append(f"cut {cut.number}: {mid} {cut.returned[mid]} lost")
            return
        for producer, first_lost, last_kept in self.suffix_breaks(cut, held, lost):
            self.found["F3"].append(f"cut {cut.number}: {producer} lost seq {first_lost} "
                                    f"but kept seq {last_kept} in the queue")

    @staticmethod
    def suffix_breaks(cut: Cut, held: set[str],
                      lost: list[str]) -> list[tuple[str, int, int]]:
        """Producers with an event kept in the queue after an earlier one was lost (a
        producer commits in its seq order: a power loss may only take a suffix)."""
        first: dict[str, int] = {}
        for mid in lost:
            producer, seq = cut.returned[mid]
            first[producer] = min(seq, first.get(producer, seq))
        breaks = []
        for producer, seq in first.items():
            kept = [s for m, (p, s) in cut.returned.items() if p == producer and m in held]
            if kept and max(kept) > seq:
                breaks.append((producer, seq, max(kept)))
        return breaks

    def drain(self) -> dict[str, Any]:
        """F5: a flusher sends the recovered queue to the end; every event it held arrives."""
        self.srv.clear_faults()
        argv = [sys.executable, "-m", "segmentry.flusher", "--queue", self.queue,
                "--api-url", self.srv.url, "--drain", "--drain-timeout", str(DRAIN_TIMEOUT_S),
                "--progress", "none", "--log-level", "WARNING"]
        done = subprocess.run(argv, env=self.env(), capture_output=True, text=True,
                              timeout=DRAIN_TIMEOUT_S + 30, stdin=subprocess.DEVNULL)
        result, left = recover(self.queue)
        self.receive()
        missing = [mid for mid in self.held if mid not in self.accepted]
        if done.returncode != 0 or left or missing or result != "ok":
            self.found["F5"].append(f"drain exit {done.returncode}, {len(left)} left, "
                                    f"{len(missing)} never accepted, {result}: "
                                    f"{done.stderr[-500:]}")
        return {"code": done.returncode, "events": len(self.held)}

    # -- the verdict ------------------------------------------------------------------------

    def report(self, drain: dict[str, Any], seconds: float) -> dict[str, Any]:
        cuts = self.cuts
        returned = {mode: sum(len(c.returned) for c in cuts if c.durability == mode)
                    for mode in ("full", "normal")}
        normal_lost = [c.lost for c in cuts if c.durability == "normal"]
        props = {p: not v for p, v in self.found.items()}
        return {
            "pass": all(props.values()), "properties": props,
            "cuts": len(cuts),
            "cuts_by_durability": {m: sum(c.durability == m for c in cuts)
                                   for m in ("full", "normal")},
            "cuts_by_drop": {d: sum(c.drop == d for c in cuts) for d in ("whole", "subset")},
            "cuts_by_delivery": {d: sum(c.delivery == d for c in cuts)
                                 for d in ("process", "thread")},
            "faults": {k: sum(c.fault == k for c in cuts)
                       for k in ("none", "503", "ambiguous", "drop")},
            "returned": returned,
            "lost_full": sum(c.lost for c in cuts if c.durability == "full"),
            "lost_normal": sum(normal_lost),
            "normal_cuts_with_loss": sum(n > 0 for n in normal_lost),
            "lost_normal_max_per_cut": max(normal_lost, default=0),
            "accepted": len(self.accepted),
            "stored_unreported": sum(c.unreported for c in cuts),
            "unsynced_writes": sum(c.fs.get("unsynced", 0) for c in cuts),
            "unsynced_writes_kept": sum(c.fs.get("kept", 0) for c in cuts),
            "files_lost": sum(len(c.fs.get("files_lost", [])) for c in cuts),
            "files_back": sum(len(c.fs.get("files_back", [])) for c in cuts),
            "integrity_checks": len(self.integrity),
            "drained": drain,
            "violations": {p: v[:EXAMPLES] for p, v in self.found.items() if v},
            "violation_counts": {p: len(v) for p, v in self.found.items() if v},
            "seconds": round(seconds, 1), "seed": self.args.seed,
        }

    def cleanup(self) -> None:
        """Kill every child still alive, unmount, stop the receiver, remove the files."""
        for child in self.children:
            child.kill()
        if self.fs is not None:
            subprocess.run(["fusermount", "-u", "-z", self.mount], capture_output=True)
            try:
                self.fs.wait(UNMOUNT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.fs.kill()
        self.srv.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def verdict(r: dict[str, Any]) -> str:
    failed = [p for p, ok in r["properties"].items() if not ok]
    head = "PASS " + " ".join(r["properties"]) if not failed else "FAIL " + " ".join(failed)
    by = r["cuts_by_durability"]
    return (f"powerloss: {head} \u2014 {r['cuts']} cuts ({by['full']} full, {by['normal']} "
            f"normal); full: {r['returned']['full']:,} returned, {r['lost_full']} lost; "
            f"normal: {r['returned']['normal']:,} returned, {r['lost_normal']:,} lost in "
            f"{r['normal_cuts_with_loss']} cuts (at most {r['lost_normal_max_per_cut']}); "
            f"{r['unsynced_writes']:,} unsynced writes cut, {r['seconds']:.0f} s")


def details(r: dict[str, Any]) -> list[str]:
    lines = [
        f"drops {r['cuts_by_drop']}, delivery {r['cuts_by_delivery']}, receiver faults "
        f"{r['faults']}",
        f"unsynced writes at the cuts {r['unsynced_writes']:,}, kept by 'subset' "
        f"{r['unsynced_writes_kept']:,}; files whose entry was not durable, gone "
        f"{r['files_lost']}; unlinked files back {r['files_back']}",
        f"in the queue after a cut, the call's return never reported (killed inside it): "
        f"{r['stored_unreported']}",
        f"receiver accepted {r['accepted']:,} distinct events; the drain sent the last "
        f"{r['drained']['events']:,} (exit {r['drained']['code']}); integrity checks "
        f"{r['integrity_checks']}",
    ]
    for prop, examples in r["violations"].items():
        lines.append(f"{prop} violated {r['violation_counts'][prop]} time(s), e.g.:")
        lines += [f"  {e}" for e in examples]
    return lines


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--cuts", type=int, default=100)
    p.add_argument("--minutes", type=float, help="stop cutting after this long")
    p.add_argument("--durability", choices=("full", "normal", "both"), default="both",
                   help="the producers' durability (both: alternate by round)")
    p.add_argument("--drop", choices=("whole", "subset", "both"), default="both",
                   help="what a cut drops of each file's unsynced writes")
    p.add_argument("--delivery", choices=("process", "thread", "both"), default="both",
                   help="who delivers: a flusher process, or the producers' flusher threads")
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--rate", type=float, default=400.0, help="events/s per producer")
    p.add_argument("--min-s", type=float, default=0.3, help="shortest round before its cut")
    p.add_argument("--max-s", type=float, default=2.5, help="longest round before its cut")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**31)
    if args.cuts < 1 or args.producers < 1 or not 0 < args.min_s <= args.max_s:
        p.error("--cuts and --producers must be at least 1, 0 < --min-s <= --max-s")
    return args


def missing_fuse() -> str | None:
    """Why this machine cannot run the filesystem (None when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount") is None:
        return "no fusermount (Debian: apt-get install fuse libfuse2)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"fusepy or libfuse2 missing ({exc}): pip install fusepy; apt-get install libfuse2"
    return None


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds into Harness.cleanup


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    why = missing_fuse()
    if why:
        say(f"powerloss: cannot run: {why}")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    sys.path.insert(0, TOOLS)
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
