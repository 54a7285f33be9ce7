"""Power loss, simulated: the filesystem of tools/powerloss.py drops what was not fsynced
at a cut (its model first, on plain files and on SQLite), then the short run: producers
and a flusher on the queue, cut at random moments, and every property (tools/powerloss.py
documents F1-F6) must hold."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from helpers import run_harness
from powerloss import missing_fuse, mount, power_cut

PROPERTIES = ("F1", "F2", "F3", "F4", "F5", "F6")
WHY = missing_fuse()
REQUIRED = bool(os.environ.get("SEGMENTRY_REQUIRE_FUSE"))  # set by .ci/run: never skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(WHY is not None and not REQUIRED,
                       reason=f"power-loss tests need FUSE: {WHY} (.ci/run installs it)"),
]


@pytest.fixture
def disk(tmp_path):
    """A mounted filesystem; ``disk.cut(drop)`` cuts the power (and mounts again)."""

    class Disk:
        live, mnt = tmp_path / "live", tmp_path / "mnt"

        def __init__(self):
            self.live.mkdir()
            self.mnt.mkdir()
            self.fs = None

        def start(self, drop="whole"):
            self.fs = mount(str(self.live), str(self.mnt), drop, seed=7)

        def cut(self, drop="whole"):
            report = power_cut(str(self.mnt), self.fs)
            self.start(drop)
            return report

    d = Disk()
    d.start()
    yield d
    power_cut(str(d.mnt), d.fs)


def write(path, data, offset=0, sync=False):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_cut_keeps_what_was_fsynced_and_drops_the_rest(disk):
    f = disk.mnt / "f"
    write(f, b"kept", sync=True)
    sync_dir(disk.mnt)
    write(f, b"-lost", offset=4)
    assert f.read_bytes() == b"kept-lost"  # read back before the cut, as from the cache
    report = disk.cut()
    assert f.read_bytes() == b"kept"
    assert report["unsynced"] == 1 and report["kept"] == 0


def test_a_file_whose_directory_was_never_fsynced_is_gone_after_a_cut(disk):
    write(disk.mnt / "new", b"data", sync=True)
    report = disk.cut()
    assert not (disk.mnt / "new").exists()
    assert report["files_lost"] == ["new"]


def test_an_unlink_not_made_durable_is_undone_by_a_cut(disk):
    f = disk.mnt / "f"
    write(f, b"durable", sync=True)
    sync_dir(disk.mnt)
    f.unlink()
    disk.cut()
    assert f.read_bytes() == b"durable"


def test_a_subset_cut_keeps_some_unsynced_writes_and_drops_others(disk):
    f = disk.mnt / "f"
    write(f, b"." * 200, sync=True)
    sync_dir(disk.mnt)
    disk.cut("subset")
    for i in range(200):
        write(f, b"x", offset=i)
    report = disk.cut()
    kept = f.read_bytes().count(b"x")
    assert 0 < kept < 200 and kept == report["kept"]


# Commits with synchronous=FULL, then with OFF; then the process dies without closing (a
# close would checkpoint).
SQLITE_WRITER = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=FULL")
conn.execute("CREATE TABLE t (x)")
for i in range(50):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
conn.execute("PRAGMA synchronous=OFF")
for i in range(50, 80):
    conn.execute("INSERT INTO t VALUES (?)", (i,))
assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 80
os._exit(0)
"""


def test_sqlite_keeps_synced_commits_and_loses_unsynced_ones(disk):
    """The filesystem has teeth: SQLite's commits made with synchronous=OFF are lost. The
    file itself survives: SQLite fsyncs the directory when it first syncs a new WAL."""
    db = str(disk.mnt / "q.db")
    subprocess.run([sys.executable, "-c", SQLITE_WRITER, db], check=True)
    disk.cut()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 50
    finally:
        conn.close()


@pytest.fixture(scope="module")
def short_run():
    return run_harness("tools/powerloss.py", "--cuts", "12", "--seed", "1")


def test_the_short_power_loss_run_passes(short_run):
    done, report = short_run
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["pass"] is True, report.get("verdict")


@pytest.mark.parametrize("prop", PROPERTIES)
def test_property_holds(short_run, prop):
    _, report = short_run
    assert report["properties"][prop], (report.get("violations", {}).get(prop),
                                        report.get("verdict"))


def test_the_run_really_cut_a_busy_queue(short_run):
    """A run that stored nothing, or whose cuts dropped nothing, would pass vacuously."""
    _, report = short_run
    assert report["cuts"] == 12
    assert report["cuts_by_delivery"] == {"process": 8, "thread": 4}
    assert report["returned"]["full"] > 500 and report["returned"]["normal"] > 500
    assert report["unsynced_writes"] > 0
    assert report["accepted"] > 500
    assert report["integrity_checks"] == 13
