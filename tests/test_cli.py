"""The ``segmentry`` command and the flusher's command line, run as real processes:
exit codes, one-line errors, refused files left byte-identical, and the systemd unit."""

from __future__ import annotations

import ctypes
import datetime as dt
import io
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from fake_segment import FakeSegment
from helpers import FAST, enqueue, wait_until

import segmentry
from segmentry.flusher import holder_pid
from segmentry.service import GRACE_S
from segmentry.storage import SCHEMA_VERSION, SQLiteQueue, destination

pytestmark = pytest.mark.slow

KEY = "test-write-key-7f3a"
LOCAL = "http://127.0.0.1:9/v1/"  # nothing listens: a test that gets past a check sends nowhere
UNIT = Path(__file__).resolve().parent.parent / "tools" / "segmentry-flusher.service"
STATUS_KEYS = {"depth", "bytes", "oldest_age_s", "dead_letters", "flusher_pid", "in_flight",
               "queue_path", "disk_bytes"}


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path):
    """The environment of every process: no write key or SEGMENTRY_* from the caller, and
    a private state dir so the default queue path is inside the test's tmp_path."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SEGMENTRY_") and k != "SEGMENT_WRITE_KEY"}
    return {**clean, "XDG_STATE_HOME": str(tmp_path / "state")}


def run(env, *args, module="segmentry", extra=None, timeout=120, user=None):
    return subprocess.run([sys.executable, "-m", module, *args], env={**env, **(extra or {})},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=user)


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def bound_by_modes():
    """A preexec_fn after which the process obeys our files' modes, as another user would:
    as root (CI), it drops the capabilities that let root read and write anything (the
    modes the tests set deny the owner too); as anyone else there is nothing to drop."""
    if os.geteuid() != 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    return drop


@pytest.fixture
def locked_dir(tmp_path):
    """A directory whose modes the test may take away; given back for the cleanup."""
    path = tmp_path / "shared"
    path.mkdir()
    yield path
    path.chmod(0o755)
    for child in path.iterdir():
        child.chmod(0o644)


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def flusher(env, path, url, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "segmentry.flusher", "--queue", path, "--api-url", url,
         *FAST, *args],
        env={**env, "SEGMENT_WRITE_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def assert_one_line_error(proc, code, *words):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("segmentry: "), proc.stderr
    for word in words:
        assert word in lines[0]


def status_json(env, path):
    proc = run(env, "status", "--queue", path, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stored_events(path):
    conn = sqlite3.connect(path)
    try:
        return [json.loads(body) for (body,) in conn.execute("SELECT body FROM events")]
    finally:
        conn.close()


# -- status ---------------------------------------------------------------------------------


def test_status_of_a_missing_queue_is_all_zeros_and_does_not_create_it(env, queue_path):
    report = status_json(env, queue_path)
    assert STATUS_KEYS <= set(report)
    assert report["queue_path"] == queue_path
    assert (report["depth"], report["bytes"], report["dead_letters"], report["in_flight"],
            report["disk_bytes"]) == (0, 0, 0, 0, 0)
    assert report["oldest_age_s"] is None and report["flusher_pid"] is None
    assert os.listdir(os.path.dirname(queue_path)) == []


def test_status_json_counts_queued_events_their_bytes_and_the_oldest_age(env, queue_path):
    enqueue(queue_path, 3)
    expected = SQLiteQueue(queue_path).stats(time.time())
    report = status_json(env, queue_path)
    assert report["depth"] == 3 and report["bytes"] == expected.bytes > 0
    assert report["oldest_age_s"] >= 0 and report["in_flight"] == 0
    assert report["dead_letters"] == 0 and report["flusher_pid"] is None
    assert report["disk_bytes"] >= os.path.getsize(queue_path)


def test_status_counts_each_destination_named_by_url_and_key_hash_never_the_key(
        env, queue_path):
    url = "http://127.0.0.1:9/v1/"
    enqueue(queue_path, 2)  # no key: no destination of their own
    for key, n in (("key-web-0001", 3), ("key-cron-0002", 1)):
        with segmentry.Client(key, queue_path=queue_path, api_url=url, flusher=None) as c:
            for _ in range(n):
                c.track("u", "E")
    report = status_json(env, queue_path)
    views = {d["name"]: d for d in report["destinations"]}
    assert {name: d["depth"] for name, d in views.items()} == {
        "default": 2, destination(url, "key-web-0001"): 3, destination(url, "key-cron-0002"): 1}
    web = views[destination(url, "key-web-0001")]
    assert web["bytes"] > 0 and web["oldest_age_s"] >= 0 and web["dead_letters"] == 0
    text = run(env, "status", "--queue", queue_path).stdout
    assert f"{destination(url, 'key-cron-0002')}: 1 events" in text
    for shown in (json.dumps(report), text):
        assert "key-web-0001" not in shown and "key-cron-0002" not in shown


def test_status_without_json_prints_a_readable_summary(env, queue_path):
    enqueue(queue_path, 2)
    proc = run(env, "status", "--queue", queue_path)
    assert proc.returncode == 0, proc.stderr
    assert queue_path in proc.stdout and "2 events" in proc.stdout
    assert "none running" in proc.stdout


def test_status_reads_the_queue_from_segmentry_queue_then_the_state_dir(env, tmp_path):
    path = str(tmp_path / "from-env.db")
    enqueue(path, 1)
    proc = run(env, "status", "--json", extra={"SEGMENTRY_QUEUE": path})
    assert json.loads(proc.stdout)["depth"] == 1
    proc = run(env, "status", "--json")
    default = tmp_path / "state" / "segmentry" / "queue.db"
    assert json.loads(proc.stdout)["queue_path"] == str(default) and not default.exists()


def test_status_of_an_empty_file_reports_an_empty_queue_and_leaves_it_empty(env, queue_path):
    Path(queue_path).touch()
    report = status_json(env, queue_path)
    assert report["exists"] and (report["depth"], report["dead_letters"]) == (0, 0)
    assert os.listdir(os.path.dirname(queue_path)) == ["q.db"]
    assert os.path.getsize(queue_path) == 0


def test_status_reads_a_queue_it_cannot_write_and_changes_nothing(env, locked_dir):
    path = locked_dir / "q.db"
    enqueue(str(path), 3)
    path.chmod(0o444)
    locked_dir.chmod(0o555)  # nor create a -wal or -shm beside it
    before = files_of(locked_dir)
    proc = run(env, "status", "--json", "--queue", str(path), user=bound_by_modes())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["depth"] == 3
    assert files_of(locked_dir) == before


def test_status_reads_a_queue_a_live_client_holds_open(env, locked_dir):
    path = locked_dir / "q.db"
    with segmentry.Client(queue_path=str(path), flusher=None) as client:
        client.track("u1", "E")
        assert (locked_dir / "q.db-wal").exists()  # read through the WAL, not the file alone
        for name in ("q.db", "q.db-wal", "q.db-shm"):
            (locked_dir / name).chmod(0o444)
        proc = run(env, "status", "--json", "--queue", str(path), user=bound_by_modes())
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["depth"] == 1


@pytest.mark.parametrize("command", [["status"], ["dead-letters", "list"]])
@pytest.mark.parametrize("locked", ["file", "directory"])
def test_a_queue_that_cannot_be_read_is_permission_denied_exit_1(env, locked_dir, command,
                                                                  locked):
    path = locked_dir / "q.db"
    enqueue(str(path), 3)
    (path if locked == "file" else locked_dir).chmod(0o000 if locked == "file" else 0o600)
    proc = run(env, *command, "--json", "--queue", str(path), user=bound_by_modes())
    assert_one_line_error(proc, 1, "permission denied", str(path))
    assert proc.stdout == ""


def test_status_says_when_leases_are_a_stopped_flushers(env, queue_path):
    enqueue(queue_path, 3)
    SQLiteQueue(queue_path).claim(3, 10**6, time.time(), 600)  # as a flusher killed mid-send
    proc = run(env, "status", "--queue", queue_path)
    assert "3 leased by a flusher that stopped" in proc.stdout, proc.stdout


def test_status_shows_the_pid_of_the_running_flusher(env, queue_path):
    enqueue(queue_path, 5)
    with FakeSegment(write_key=KEY) as receiver:
        receiver.delay(ms=10_000)  # holds the batch in flight while we look
        # --wait: our probe of the lock may win a start-up race; the flusher then stands by.
        proc = flusher(env, queue_path, receiver.url, "--wait")
        try:
            assert wait_until(lambda: holder_pid(queue_path) == proc.pid)
            assert wait_until(lambda: SQLiteQueue(queue_path).stats(time.time()).in_flight)
            report = status_json(env, queue_path)
        finally:
            proc.kill()
            _, err = proc.communicate()
    assert report["flusher_pid"] == proc.pid, err
    assert (report["in_flight"], report["depth"]) == (5, 5), err
    assert status_json(env, queue_path)["flusher_pid"] is None


# -- track and identify ---------------------------------------------------------------------


def test_track_enqueues_durably_and_prints_the_message_id(env, queue_path):
    proc = run(env, "track", "--queue", queue_path, "--user-id", "u1", "--event", "Signed Up",
               "--property", "plan=pro", "--context", "ip=10.0.0.1")
    assert proc.returncode == 0, proc.stderr
    message_id = proc.stdout.strip()
    [event] = stored_events(queue_path)
    assert event["messageId"] == message_id
    assert (event["type"], event["userId"], event["event"]) == ("track", "u1", "Signed Up")
    assert event["properties"] == {"plan": "pro"} and event["context"]["ip"] == "10.0.0.1"


def test_track_never_starts_a_flusher(env, queue_path):
    proc = run(env, "track", "--queue", queue_path, "--user-id", "u", "--event", "E",
               extra={"SEGMENT_WRITE_KEY": KEY,
                      "SEGMENTRY_API_URL": "http://127.0.0.1:9/v1/"})  # never the internet
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(queue_path + ".lock")  # no flusher, so no network


def test_property_values_are_json_when_they_parse_else_text(env, queue_path):
    values = ["size=10", "ok=true", 'name="x"', "ratio=1.5", "none=null", "raw=hello",
              "nan=NaN", "empty=", "eq=a=b"]
    args = [a for v in values for a in ("--property", v)]
    proc = run(env, "track", "--queue", queue_path, "--user-id", "u", "--event", "E", *args)
    assert proc.returncode == 0, proc.stderr
    assert stored_events(queue_path)[0]["properties"] == {
        "size": 10, "ok": True, "name": "x", "ratio": 1.5, "none": None, "raw": "hello",
        "nan": "NaN", "empty": "", "eq": "a=b"}


def test_track_keeps_a_given_timestamp_message_id_and_anonymous_id(env, queue_path):
    proc = run(env, "track", "--queue", queue_path, "--anonymous-id", "anon-1", "--event", "E",
               "--timestamp", "2024-05-01T12:00:00Z", "--message-id", "fixed-id-1")
    assert proc.returncode == 0 and proc.stdout.strip() == "fixed-id-1"
    [event] = stored_events(queue_path)
    assert event["timestamp"] == "2024-05-01T12:00:00.000Z"
    assert event["anonymousId"] == "anon-1" and "userId" not in event


def test_identify_enqueues_traits_and_prints_the_message_id(env, queue_path):
    proc = run(env, "identify", "--queue", queue_path, "--user-id", "u1",
               "--trait", "email=a@example.com", "--trait", "age=42")
    assert proc.returncode == 0, proc.stderr
    [event] = stored_events(queue_path)
    assert event["messageId"] == proc.stdout.strip() and event["type"] == "identify"
    assert event["traits"] == {"email": "a@example.com", "age": 42}


def test_track_uses_segmentry_queue_when_no_queue_is_given(env, queue_path):
    proc = run(env, "track", "--user-id", "u", "--event", "E",
               extra={"SEGMENTRY_QUEUE": queue_path})
    assert proc.returncode == 0, proc.stderr
    assert stored_events(queue_path)[0]["messageId"] == proc.stdout.strip()


@pytest.mark.parametrize("args, words", [
    (["--event", "E"], ["--user-id or --anonymous-id"]),
    (["--user-id", "u", "--event", "E", "--timestamp", "2024-05-01T12:00:00"],
     ["naive", "--timestamp"]),
    (["--user-id", "u", "--event", "E", "--timestamp", "yesterday"], ["ISO-8601"]),
    (["--user-id", "u", "--event", "E", "--message-id", "x" * 100], ["message_id"]),
])
def test_an_invalid_event_exits_2_in_one_line_and_stores_nothing(env, queue_path, args, words):
    proc = run(env, "track", "--queue", queue_path, *args)
    assert_one_line_error(proc, 2, *words)
    assert not os.path.exists(queue_path) or stored_events(queue_path) == []


def test_a_bad_segmentry_setting_in_the_environment_exits_2(env, queue_path):
    proc = run(env, "track", "--queue", queue_path, "--user-id", "u", "--event", "E",
               extra={"SEGMENTRY_DURABILITY": "sometimes"})
    assert_one_line_error(proc, 2, "durability")


# -- bad command lines ----------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    ([], ["COMMAND"]),
    (["frobnicate"], ["frobnicate"]),
    (["status", "--bogus"], ["--bogus"]),
    (["dead-letters", "list", "--limit", "many"], ["--limit", "many"]),
    (["dead-letters", "list", "--limit", "0"], ["--limit"]),
    (["dead-letters", "purge", "x"], ["ID"]),
    (["dead-letters", "purge", str(2**63)], ["positive integer"]),
    (["track", "--user-id", "u"], ["--event"]),
    (["track", "--user-id", "u", "--event", "E", "--property", "novalue"], ["KEY=VALUE"]),
])
def test_a_bad_option_value_exits_2_in_one_line(env, queue_path, args, words):
    proc = run(env, *args)
    assert_one_line_error(proc, 2, *words)
    assert not os.path.exists(queue_path)


def test_the_console_script_is_the_same_command(env, queue_path):
    script = shutil.which("segmentry", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the segmentry console script is not installed next to this python")
    proc = subprocess.run([script, "status", "--queue", queue_path, "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["depth"] == 0


# -- files that are not a usable queue ------------------------------------------------------


def random_bytes(path):
    Path(path).write_bytes(os.urandom(8192))


def another_apps_database(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()


def newer_schema(path):
    enqueue(path, 2)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()


REFUSED = {
    "random bytes": (random_bytes, ["corrupt", "mv "]),
    "another app's sqlite file": (another_apps_database, ["not a segmentry queue"]),
    "a newer schema": (newer_schema, ["newer than this segmentry", "upgrade"]),
}
COMMANDS = {
    "status": ["status", "--json"],
    "dead-letters list": ["dead-letters", "list"],
    "dead-letters requeue": ["dead-letters", "requeue", "--all"],
    "track": ["track", "--user-id", "u", "--event", "E"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", REFUSED)
def test_a_file_that_is_not_a_usable_queue_exits_1_and_is_left_untouched(
        env, queue_path, kind, command):
    make, words = REFUSED[kind]
    make(queue_path)
    before = Path(queue_path).read_bytes()
    proc = run(env, *COMMANDS[command], "--queue", queue_path)
    assert_one_line_error(proc, 1, queue_path, *words)
    assert Path(queue_path).read_bytes() == before


@pytest.mark.parametrize("kind", REFUSED)
def test_the_flusher_refuses_such_a_file_with_exit_1_and_leaves_it_untouched(
        env, queue_path, kind):
    make, words = REFUSED[kind]
    make(queue_path)
    before = Path(queue_path).read_bytes()
    proc = run(env, "--queue", queue_path, "--drain", "--api-url", "http://127.0.0.1:9/v1/",
               module="segmentry.flusher", extra={"SEGMENT_WRITE_KEY": KEY})
    assert_one_line_error(proc, 1, queue_path, *words)
    assert Path(queue_path).read_bytes() == before


def test_a_drain_without_a_write_key_keeps_events_that_carry_none_and_says_why(
        env, queue_path):
    enqueue(queue_path, 3)  # a producer without a key: the events carry no destination
    proc = run(env, "--queue", queue_path, "--drain", module="segmentry.flusher")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("segmentry: ")]
    assert len(said) == 1 and "SEGMENT_WRITE_KEY" in said[0], proc.stderr
    assert SQLiteQueue(queue_path).stats(time.time()).depth == 3


def test_a_flusher_without_a_write_key_delivers_the_events_that_carry_their_own(
        env, queue_path):
    with FakeSegment(write_key=KEY) as receiver:
        with segmentry.Client(KEY, queue_path=queue_path, api_url=receiver.url,
                              flusher=None) as producer:
            for i in range(4):
                producer.track("u", "E", {"i": i})
        proc = run(env, "--queue", queue_path, "--drain", module="segmentry.flusher")
        assert proc.returncode == 0, proc.stderr
        assert receiver.stats()["unique"] == 4 and KEY not in proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--max-batch-size", "abc"], ["--max-batch-size"]),
    (["--summary-every", "-1"], ["--summary-every"]),
    (["--drain-timeout", "nan"], ["--drain-timeout"]),
    (["--drain-timeout", "-3"], ["--drain-timeout"]),
    (["--timeout", "0"], ["--timeout"]),
    (["--no-such-flag"], ["--no-such-flag"]),
])
def test_a_bad_flusher_flag_exits_2_in_one_line_and_creates_nothing(env, queue_path, args,
                                                                     words):
    proc = run(env, "--queue", queue_path, "--drain", *args, module="segmentry.flusher",
               extra={"SEGMENT_WRITE_KEY": KEY})
    assert_one_line_error(proc, 2, *words)
    assert not os.path.exists(queue_path)


@pytest.mark.parametrize("key_file, words", [
    (b"\xff\xfebinary", ["not UTF-8"]),
    ("k\u2019ey".encode(), ["write_key", "latin-1"]),  # requests could never send it
])
def test_a_write_key_that_cannot_be_sent_exits_2_before_touching_the_queue(
        env, queue_path, tmp_path, key_file, words):
    path = tmp_path / "key"
    path.write_bytes(key_file)
    proc = run(env, "--queue", queue_path, "--wait", "--write-key-file", str(path),
               module="segmentry.flusher")  # --wait: never standing by with a bad setting
    assert_one_line_error(proc, 2, *words)
    assert not os.path.exists(queue_path)


def test_an_empty_segmentry_queue_is_unset_not_the_working_directory(env, tmp_path):
    code = "import segmentry; print(segmentry.Client(flusher=None).queue_path)"
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "SEGMENTRY_QUEUE": ""},
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == str(tmp_path / "state" / "segmentry" / "queue.db"), proc


def test_transport_flags_become_requests_options(tmp_path):
    from segmentry.service import build_parser, options_from_args

    ca, cert, key = (str(tmp_path / n) for n in ("ca.pem", "client.pem", "client.key"))
    for path in (ca, cert, key):
        Path(path).write_text("PEM")
    args = build_parser().parse_args([
        "--timeout", "3", "--proxy", "http://proxy:3128", "--ca-bundle", ca,
        "--cert", cert, "--cert-key", key, "--header", "X-Tenant: t1",
        "--header", "X-Env:prod"])
    assert options_from_args(args, {}).requests_options == {
        "timeout": 3.0, "proxies": {"http": "http://proxy:3128", "https": "http://proxy:3128"},
        "verify": ca, "cert": (cert, key), "headers": {"X-Tenant": "t1", "X-Env": "prod"}}


@pytest.mark.parametrize("args, words", [
    (["--header", "no colon"], ["--header", "NAME: VALUE"]),
    (["--header", "X-Bad: a\nb"], ["header 'X-Bad'"]),
    (["--cert-key", "k.pem"], ["--cert-key goes with --cert"]),
    (["--api-url", "http://exa mple/"], ["--api-url", "space"]),
    (["--api-url", "http://host:port/v1"], ["--api-url", "port"]),
    (["--ca-bundle", "/nope.pem"], ["--ca-bundle /nope.pem does not exist"]),
    (["--cert", "/nope.pem"], ["--cert /nope.pem does not exist"]),
    (["--proxy", "notaurl"], ["--proxy", "http://"]),
])
def test_a_bad_transport_flag_exits_2_in_one_line(env, queue_path, args, words):
    """Found before the queue is opened: never retried forever as a network error."""
    proc = run(env, "--queue", queue_path, "--drain", "--api-url", LOCAL, *args,
               module="segmentry.flusher",
               extra={"SEGMENT_WRITE_KEY": KEY}, timeout=60)
    assert_one_line_error(proc, 2, *words)
    assert not os.path.exists(queue_path)


def test_a_cert_the_flusher_cannot_read_exits_2(env, queue_path, locked_dir):
    cert = locked_dir / "client.pem"
    cert.write_text("PEM")
    cert.chmod(0o000)
    proc = run(env, "--queue", queue_path, "--drain", "--api-url", LOCAL, "--cert", str(cert),
               module="segmentry.flusher",
               extra={"SEGMENT_WRITE_KEY": KEY}, timeout=60, user=bound_by_modes())
    assert_one_line_error(proc, 2, "--cert", "cannot be read")
    assert not os.path.exists(queue_path)


def test_a_bad_url_in_the_environment_exits_2_like_the_flag(env, queue_path):
    proc = run(env, "--queue", queue_path, "--drain", module="segmentry.flusher",
               extra={"SEGMENT_WRITE_KEY": KEY, "SEGMENTRY_API_URL": "http://exa mple/"},
               timeout=60)
    assert_one_line_error(proc, 2, "api_url")
    assert not os.path.exists(queue_path)


def test_the_flusher_refuses_a_queue_in_a_directory_that_does_not_exist(env, tmp_path):
    path = tmp_path / "typo" / "deep" / "q.db"
    proc = run(env, "--queue", str(path), "--drain", module="segmentry.flusher",
               extra={"SEGMENT_WRITE_KEY": KEY}, timeout=60)
    assert_one_line_error(proc, 1, "no directory", str(path.parent), "--queue")
    assert not (tmp_path / "typo").exists()


def test_no_gzip_overrides_segmentry_gzip():
    from segmentry.service import build_parser, options_from_args

    args = build_parser().parse_args(["--no-gzip"])
    assert options_from_args(args, {"SEGMENTRY_GZIP": "true"}).gzip is False
    assert options_from_args(build_parser().parse_args([]), {"SEGMENTRY_GZIP": "true"}).gzip


# -- flush ----------------------------------------------------------------------------------


def test_flush_is_the_flusher_process(env, queue_path):
    ids = enqueue(queue_path, 20)
    with FakeSegment(write_key=KEY, record=True) as receiver:
        proc = run(env, "flush", "--queue", queue_path, "--api-url", receiver.url, "--drain",
                   *FAST, extra={"SEGMENT_WRITE_KEY": KEY})
        assert proc.returncode == 0, proc.stderr
        assert {e["messageId"] for e in receiver.events()} == set(ids)
    assert status_json(env, queue_path)["depth"] == 0


def test_flush_help_names_segmentry_flush_and_every_flags_default(env):
    proc = run(env, "flush", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: segmentry flush ")
    assert "python -m segmentry.flusher" not in proc.stdout
    assert "dead-lettered" in proc.stdout  # the exit codes


def test_every_flusher_flag_has_help_with_its_default():
    from segmentry.service import build_parser

    flags = [a for a in build_parser()._actions if a.option_strings
             and a.dest not in ("help", "version")]
    assert len(flags) > 25
    for action in flags:
        assert action.help and "default" in action.help, action.option_strings


@pytest.mark.parametrize("command", [["--version"], ["flush", "--version"]])
def test_version_prints_the_package_version(env, command):
    proc = run(env, *command)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"segmentry {segmentry.__version__}")


def test_the_drain_progress_says_a_stored_backoff_is_waited_out_and_until_when(queue_path):
    from segmentry._progress import Progress
    from segmentry.flusher import Counts

    enqueue(queue_path, 2)
    queue = SQLiteQueue(queue_path)
    claim = queue.claim(2, 10**6, time.time(), 60)
    ready = time.time() + 300
    queue.release(claim.token, [row.id for row in claim.rows], ready)
    stream = io.StringIO()
    Progress(types.SimpleNamespace(counts=Counts(), queue=queue), "bar", stream).report()
    queue.close()
    until = dt.datetime.fromtimestamp(ready, dt.timezone.utc).strftime("%H:%M:%S")
    assert f"waiting out a backoff until {until} UTC" in stream.getvalue()
    assert "remaining 2" in stream.getvalue()


def test_flush_without_a_write_key_keeps_events_that_carry_none_like_the_flusher(
        env, queue_path):
    enqueue(queue_path, 1)
    proc = run(env, "flush", "--queue", queue_path, "--drain")
    said = [line for line in proc.stderr.splitlines() if line.startswith("segmentry: ")]
    assert proc.returncode == 1 and len(said) == 1 and "SEGMENT_WRITE_KEY" in said[0]


# -- dead letters ---------------------------------------------------------------------------


@pytest.fixture
def poisoned(env, queue_path):
    """A queue whose two "Poison" events the receiver refused: two dead letters."""
    enqueue(queue_path, 3)
    poison = enqueue(queue_path, 2, event="Poison", properties={"secret": "s3cret-body"})
    with FakeSegment(write_key=KEY) as receiver:
        receiver.reject("Poison")
        proc = flusher(env, queue_path, receiver.url, "--drain")
        _, err = proc.communicate(timeout=120)
    assert status_json(env, queue_path)["dead_letters"] == 2
    assert proc.returncode == 1, err  # delivered all it could, but not everything
    assert "2 events were refused" in err and "segmentry dead-letters list" in err
    return poison


def test_once_exits_1_when_it_dead_lettered_an_event(env, queue_path):
    enqueue(queue_path, 1, event="Poison")
    with FakeSegment(write_key=KEY) as receiver:
        receiver.reject("Poison")
        proc = flusher(env, queue_path, receiver.url, "--once")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "segmentry dead-letters list" in err, err


def dead_letters(env, path, *args):
    proc = run(env, "dead-letters", "list", "--queue", path, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_dead_letters_list_shows_status_event_and_message_id_not_the_body(
        env, queue_path, poisoned):
    proc = run(env, "dead-letters", "list", "--queue", queue_path,
               extra={"SEGMENT_WRITE_KEY": KEY})
    assert proc.returncode == 0, proc.stderr
    for message_id in poisoned:
        assert message_id in proc.stdout
    assert "Poison" in proc.stdout and "400" in proc.stdout and "rejected" in proc.stdout
    assert "s3cret-body" not in proc.stdout and KEY not in proc.stdout + proc.stderr


def test_dead_letters_list_json_gives_each_letter_and_the_total(env, queue_path, poisoned):
    listing = dead_letters(env, queue_path, "--limit", "1")
    assert listing["total"] == 2 and len(listing["dead_letters"]) == 1
    letter = listing["dead_letters"][0]
    assert (letter["status"], letter["type"], letter["event"]) == (400, "track", "Poison")
    assert letter["messageId"] == poisoned[0] and "rejected" in letter["response"]
    assert "body" not in letter and "s3cret-body" not in json.dumps(listing)


def test_show_body_adds_each_full_event(env, queue_path, poisoned):
    letters = dead_letters(env, queue_path, "--show-body")["dead_letters"]
    assert [d["body"]["properties"] for d in letters] == [{"secret": "s3cret-body"}] * 2


def test_dead_letters_list_json_gives_the_whole_response_the_table_one_line(env, queue_path):
    enqueue(queue_path, 1)
    queue = SQLiteQueue(queue_path)
    claim = queue.claim(1, 10**6, time.time(), 60)
    answer = '{"success": false, "errors": [' + ", ".join(['"field too long"'] * 30) + "]}"
    queue.bury(claim.token, [row.id for row in claim.rows], 400, answer, time.time())
    queue.close()
    assert dead_letters(env, queue_path)["dead_letters"][0]["response"] == answer
    table = run(env, "dead-letters", "list", "--queue", queue_path).stdout
    assert answer not in table and "…" in table


def test_dead_letters_list_of_a_missing_queue_is_empty_and_creates_nothing(env, queue_path):
    assert dead_letters(env, queue_path) == {"queue_path": queue_path, "total": 0,
                                             "by_destination": {}, "dead_letters": []}
    assert not os.path.exists(queue_path)


def test_requeue_by_id_puts_that_dead_letter_back_in_the_queue(env, queue_path, poisoned):
    first = dead_letters(env, queue_path)["dead_letters"][0]["id"]
    proc = run(env, "dead-letters", "requeue", "--queue", queue_path, str(first))
    assert proc.returncode == 0 and "requeued 1 dead letters" in proc.stdout
    report = status_json(env, queue_path)
    assert (report["depth"], report["dead_letters"]) == (1, 1)
    assert stored_events(queue_path)[0]["messageId"] == poisoned[0]


def test_requeue_all_puts_every_dead_letter_back(env, queue_path, poisoned):
    proc = run(env, "dead-letters", "requeue", "--queue", queue_path, "--all")
    assert proc.returncode == 0 and "requeued 2 dead letters" in proc.stdout
    assert {e["messageId"] for e in stored_events(queue_path)} == set(poisoned)


def test_purge_all_deletes_every_dead_letter_and_says_how_many(env, queue_path, poisoned):
    proc = run(env, "dead-letters", "purge", "--queue", queue_path, "--all")
    assert proc.returncode == 0 and "purged 2 dead letters" in proc.stdout
    report = status_json(env, queue_path)
    assert (report["depth"], report["dead_letters"]) == (0, 0)


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_unknown_ids_exit_1_saying_they_are_not_dead_letters(env, queue_path, poisoned,
                                                             action):
    first = dead_letters(env, queue_path)["dead_letters"][0]["id"]
    proc = run(env, "dead-letters", action, "--queue", queue_path, str(first), "999")
    assert proc.returncode == 1 and f"{action}d 1 dead letters" in proc.stdout
    assert_one_line_error(proc, 1, "1 of the given ids are not dead letters")
    assert status_json(env, queue_path)["dead_letters"] == 1


@pytest.mark.parametrize("action", ["requeue", "purge"])
@pytest.mark.parametrize("choice", [[], ["1", "--all"]])
def test_requeue_and_purge_need_ids_or_all_but_not_both(env, queue_path, action, choice):
    enqueue(queue_path, 1)
    proc = run(env, "dead-letters", action, "--queue", queue_path, *choice)
    assert_one_line_error(proc, 2, "--all")


def test_requeue_on_a_missing_queue_exits_1_and_creates_nothing(env, queue_path):
    proc = run(env, "dead-letters", "requeue", "--queue", queue_path, "--all")
    assert_one_line_error(proc, 1, "no queue file", queue_path)
    assert not os.path.exists(queue_path)


# -- the systemd unit -----------------------------------------------------------------------


def read_unit(path=UNIT):
    """A tiny unit-file parser: {section: {key: [values]}} (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value):
    return float(value[:-1] if value.endswith("s") else value)


def test_the_unit_restarts_as_a_dedicated_user_with_the_key_and_queue_from_files():
    service = read_unit()["Service"]
    assert service["Restart"] == ["always"] and seconds(service["RestartSec"][0]) > 0
    assert service["User"] == ["segmentry"] and service["Group"] == ["segmentry"]
    assert service["EnvironmentFile"] == ["-/etc/segmentry/env"]  # optional: events carry keys
    assert "SEGMENTRY_QUEUE=/var/lib/segmentry/queue.db" in service["Environment"]
    assert service["StateDirectory"] == ["segmentry"]
    assert service["StateDirectoryMode"][0].endswith("770")
    assert "-m segmentry.flusher" in service["ExecStart"][0]
    assert service["ExecStart"][0].startswith("/opt/segmentry/bin/python ")  # a virtualenv
    assert service["Type"] == ["notify"] and seconds(service["WatchdogSec"][0]) > 2
    assert not any("--write-key " in v for v in service["ExecStart"])


def test_the_unit_stops_with_sigterm_and_waits_longer_than_the_grace_period():
    service = read_unit()["Service"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert seconds(service["TimeoutStopSec"][0]) > GRACE_S


def test_the_unit_is_hardened_and_lets_the_group_write_the_queue():
    service = read_unit()["Service"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectControlGroups", "LockPersonality"):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6",
                                                                  "AF_UNIX"}
    assert "/var/lib/segmentry" in service["ReadWritePaths"][0].split()
    assert service["UMask"] == ["0007"] and service["MemoryMax"]


def test_the_units_start_step_creates_a_group_writable_queue_and_never_truncates_one(
        tmp_path):
    [pre] = read_unit()["Service"]["ExecStartPre"]
    argv = shlex.split(pre)
    path = tmp_path / "queue.db"
    step = ["/bin/sh", "-c", f"umask 0007; {argv[-1]}"]
    subprocess.run(step, env={"SEGMENTRY_QUEUE": str(path)}, check=True)
    assert path.stat().st_mode & 0o777 == 0o660 and path.read_bytes() == b""
    enqueue(str(path), 1)
    before = path.read_bytes()
    subprocess.run(step, env={"SEGMENTRY_QUEUE": str(path)}, check=True)
    assert path.read_bytes() == before and len(before) > 0
