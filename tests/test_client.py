"""The producer: the six calls store exactly what they return, refuse bad input without
storing anything, and survive several processes, fork and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import segmentry
from segmentry import telemetry
from segmentry.exceptions import ConfigurationError, InvalidMessage, QueueFull, StorageError
from segmentry.storage import SQLiteQueue

NOW = time.time()


@pytest.fixture
def client(tmp_path):
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    yield c
    c.close()


def stored(client):
    """Every event in the queue file, decoded, in enqueue order."""
    conn = sqlite3.connect(client.queue_path)
    rows = conn.execute("SELECT body FROM events ORDER BY id").fetchall()
    conn.close()
    return [json.loads(r[0]) for r in rows]


def test_each_call_stores_the_event_and_returns_its_message_id(client):
    ids = [
        client.track("u1", "Signed Up", {"plan": "pro"}),
        client.identify("u1", {"email": "a@example.com"}),
        client.page("u1", "Pricing", {"path": "/p"}, category="Docs"),
        client.screen("u1", "Home"),
        client.group("u1", "org-9", {"name": "Acme"}),
        client.alias("u1", "anon-42"),
    ]
    events = stored(client)
    assert [e["messageId"] for e in events] == ids
    assert [e["type"] for e in events] == ["track", "identify", "page", "screen", "group",
                                           "alias"]
    assert events[0]["properties"] == {"plan": "pro"}
    assert events[1]["traits"] == {"email": "a@example.com"}
    assert (events[2]["name"], events[2]["category"]) == ("Pricing", "Docs")
    assert events[4]["groupId"] == "org-9"
    assert (events[5]["userId"], events[5]["previousId"]) == ("u1", "anon-42")


def test_context_is_the_fourth_positional_argument_of_track(client):
    client.track("u1", "Clicked", {"x": 1}, segmentry.Context(active=False))
    assert stored(client)[0]["context"]["active"] is False


def test_each_call_accepts_the_full_struct_form(client):
    mid = client.track(segmentry.Track(user_id="abc", event="Signed Up", message_id="m-1"))
    client.alias(segmentry.Alias(user_id="new", previous_id="old"))
    client.page(segmentry.Page(user_id="u", name="P"))
    client.screen(segmentry.Screen(user_id="u", name="S"))
    assert mid == "m-1"
    assert [e["type"] for e in stored(client)] == ["track", "alias", "page", "screen"]


def test_keywords_set_the_common_fields(client):
    client.identify("u1", anonymous_id="a1", message_id="fixed", integrations={"All": True},
                    timestamp="2026-01-01T00:00:00Z")
    event = stored(client)[0]
    assert (event["anonymousId"], event["messageId"], event["timestamp"]) == \
        ("a1", "fixed", "2026-01-01T00:00:00.000Z")


@pytest.mark.parametrize("call", [
    lambda c: c.track(None, "E"),
    lambda c: c.track("u", None),
    lambda c: c.track("u", "E", {"x": object()}),
    lambda c: c.group("u", None),
    lambda c: c.alias("u", None),
    lambda c: c.track("u", "E", {"blob": "x" * 40_000}),
    lambda c: c.track("u", "E", message_id="x" * 120),
])
def test_bad_input_raises_and_stores_nothing(client, call):
    client.track("u", "kept")
    with pytest.raises(InvalidMessage):
        call(client)
    assert [e["event"] for e in stored(client)] == ["kept"]


def test_an_unknown_keyword_is_a_type_error(client):
    with pytest.raises(TypeError, match="colour"):
        client.track("u", "E", colour="red")


def test_on_full_raise_refuses_past_the_disk_cap(tmp_path):
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None,
                         max_queue_bytes=64 * 1024, on_full="raise")
    with pytest.raises(QueueFull, match="max_queue_bytes"):
        for i in range(5000):
            c.track("u", "E", {"pad": "x" * 200, "i": i})
    c.close()


def test_on_full_drop_returns_none_counts_and_reports(tmp_path):
    seen = []
    telemetry.attach("drops", [("segmentry", "enqueue", "drop")],
                     lambda e, meas, meta: seen.append(meta["reason"]))
    try:
        c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None,
                             max_queue_bytes=64 * 1024)
        results = [c.track("u", "E", {"pad": "x" * 200}) for _ in range(1000)]
    finally:
        telemetry.detach("drops")
    assert results[0] is not None and results[-1] is None
    assert c.dropped == results.count(None) == len(seen)
    assert set(seen) == {"QueueFull"}
    c.close()


def test_a_client_whose_queue_is_full_from_the_start_still_delivers_it(tmp_path):
    from helpers import wait_until

    from segmentry.testing import Stub

    path = str(tmp_path / "q.db")
    with segmentry.Client(queue_path=path, flusher=None) as backlog:  # an outage filled it
        for i in range(400):
            backlog.track("u", "E", {"pad": "x" * 200, "i": i})
    stub = Stub()
    with segmentry.Client("K", queue_path=path, max_queue_bytes=64 * 1024,
                          requests_options={"adapter": stub}, batch_every_ms=10) as client:
        assert client.track("u", "first") is None  # refused: the queue is over the cap
        assert wait_until(lambda: len(stub.events) == 400)  # but its flusher started
        assert wait_until(lambda: client.track("u", "later") is not None)


def test_a_drained_queue_takes_events_again_under_a_small_cap(tmp_path):
    from segmentry.testing import Stub

    path = str(tmp_path / "q.db")
    producer = segmentry.Client(queue_path=path, flusher=None, max_queue_bytes=1 << 20,
                                on_full="raise")
    stored = 0
    with pytest.raises(QueueFull):
        while True:
            producer.track("u", "E", {"pad": "x" * 200})
            stored += 1
    stub = Stub()
    with segmentry.Client("K", queue_path=path, requests_options={"adapter": stub},
                          batch_every_ms=10) as flusher:
        flusher.track("u", "wake")
        assert flusher.flush(60)
    assert len(stub.events) == stored + 1
    # Empty again: the file keeps its free pages and the WAL its kept size, neither counts.
    assert producer.track("u", "after the drain") is not None
    producer.close()


def test_a_storage_failure_follows_on_full(tmp_path):
    def failing_put(body, now, destination=None):  # as a disk that fails after the client was made
        raise StorageError("queue file q.db: disk I/O error")

    dropping = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    dropping.queue.put = failing_put
    assert dropping.track("u", "E") is None and dropping.dropped == 1
    raising = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None,
                               on_full="raise")
    raising.queue.put = failing_put
    with pytest.raises(StorageError, match="disk I/O error"):
        raising.track("u", "E")


def test_sending_without_a_write_key_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match="write key"):
        segmentry.Client(queue_path=str(tmp_path / "q.db"))


@pytest.mark.parametrize("option", [
    {"max_batch_size": 0}, {"on_full": "block"}, {"durability": "off"}, {"sender": "x"},
    {"api_url": "ftp://x"}, {"retry_expiry": 1}, {"flusher": "proces"}, {"bogus": 1},
])
def test_bad_options_are_configuration_errors(tmp_path, option):
    with pytest.raises(ConfigurationError):
        segmentry.Client("K", queue_path=str(tmp_path / "q.db"), **option)


def test_environment_is_the_fallback_for_options(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENTRY_QUEUE", str(tmp_path / "env.db"))
    monkeypatch.setenv("SEGMENTRY_MAX_BATCH_SIZE", "42")
    c = segmentry.Client(flusher=None)
    assert c.queue_path == str(tmp_path / "env.db") and c.options.max_batch_size == 42
    assert segmentry.Client(flusher=None, max_batch_size=7).options.max_batch_size == 7


def test_module_level_default_client(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", "from-env")
    client = segmentry.start(queue_path=str(tmp_path / "q.db"), flusher=None)
    try:
        assert client.write_key == "from-env"
        mid = segmentry.track("u1", "E")
        assert [e["messageId"] for e in stored(client)] == [mid]
    finally:
        segmentry.stop()


def test_a_call_while_start_replaces_the_default_client_is_stored_not_dropped(tmp_path):
    # start() closes the old client (up to a final flush) before it makes the new one; a
    # call from another thread meanwhile found the old one closed, and its event was
    # dropped. It must wait for the new client instead.
    path = str(tmp_path / "q.db")
    old = segmentry.start(queue_path=path, flusher=None)
    result = []
    caller = threading.Thread(target=lambda: result.append(segmentry.track("u", "meanwhile")))
    real_close = old.close

    def close(*args, **kwargs):
        real_close(*args, **kwargs)
        caller.start()  # the old client is closed and start() is not done yet
        caller.join(0.5)  # before the fix, the call returns (dropped) within this; after,
        # it waits for start(): the join times out, whatever the scheduling

    old.close = close
    try:
        new = segmentry.start(queue_path=path, flusher=None)
        caller.join(30)
        assert not caller.is_alive()
        assert result and result[0] is not None and old.dropped == 0
        assert [e["messageId"] for e in stored(new)] == result
    finally:
        segmentry.stop()


def test_a_client_without_a_key_takes_segment_write_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_WRITE_KEY", "from-env")
    with segmentry.Client(queue_path=str(tmp_path / "q.db"),
                          api_url="http://127.0.0.1:9/v1/") as client:
        assert client.write_key == "from-env"
    with segmentry.Client("given", queue_path=str(tmp_path / "q.db"),
                          api_url="http://127.0.0.1:9/v1/") as client:
        assert client.write_key == "given"


def test_client_is_a_context_manager(tmp_path):
    with segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None,
                          on_full="raise") as c:
        c.track("u", "E")
    with pytest.raises(StorageError, match="closed"):
        c.track("u", "E")


def test_a_call_after_close_follows_on_full_drop_and_never_raises(tmp_path):
    # As a daemon thread's call after the exit hook closed every client.
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    c.track("u", "E")
    c.close()
    with pytest.warns(RuntimeWarning, match="closed Client"):
        assert c.track("u", "late") is None and c.dropped == 1
    assert SQLiteQueue(str(tmp_path / "q.db")).stats(time.time()).depth == 1


def test_two_clients_of_one_process_with_different_keys_share_a_file_each_event_its_key(
        tmp_path):
    from fake_segment import FakeSegment

    with FakeSegment(write_key=["KEY-A", "KEY-B"]) as receiver:
        path = str(tmp_path / "q.db")
        a = segmentry.Client("KEY-A", queue_path=path, api_url=receiver.url)
        b = segmentry.Client("KEY-B", queue_path=path, api_url=receiver.url)
        for _ in range(5):
            a.track("u", "A")
            b.track("u", "B")
        assert a.flush(timeout=10) and b.flush(timeout=10)
        a.close()
        b.close()
        assert receiver.stats()["events_by_key"] == {"KEY-A": 5, "KEY-B": 5}


def test_flush_waits_for_the_clients_own_events_not_another_keys_refused_ones(tmp_path):
    from fake_segment import FakeSegment

    with FakeSegment(write_key="KEY-A") as receiver:  # KEY-B: 401
        path = str(tmp_path / "q.db")
        a = segmentry.Client("KEY-A", queue_path=path, api_url=receiver.url)
        b = segmentry.Client("KEY-B", queue_path=path, api_url=receiver.url)
        for _ in range(5):
            b.track("u", "B")
            a.track("u", "A")
        assert a.flush(timeout=20)  # B's events, between A's, wait: A's went
        assert not b.flush(timeout=0.5)
        a.close()
        b.close()
        assert receiver.stats()["events_by_key"] == {"KEY-A": 5}
        assert SQLiteQueue(path).stats(time.time()).depth == 5


def test_a_call_that_races_close_stores_its_event_but_starts_no_flusher(tmp_path):
    client = segmentry.Client("K", queue_path=str(tmp_path / "q.db"),
                              api_url="http://127.0.0.1:9/v1/")
    real_put = client.queue.put

    # close() runs between the call's store and its wake-up
    def put_then_closed(body, now, destination=None):
        row = real_put(body, now, destination)
        client.close()
        return row

    client.queue.put = put_then_closed
    assert client.track("u", "E") is not None
    assert client._flusher is None  # no thread sending for a closed client
    assert SQLiteQueue(str(tmp_path / "q.db")).stats(time.time()).depth == 1


def test_flush_without_timeout_returns_false_when_another_thread_closes_the_client(tmp_path):
    import threading

    from segmentry.testing import Stub

    answer = threading.Event()

    def hang(request):  # the receiver does not answer until the test ends
        answer.wait(30)
        return 200

    stub = Stub(hang)
    client = segmentry.Client("K", queue_path=str(tmp_path / "q.db"),
                              requests_options={"adapter": stub}, batch_every_ms=10)
    client.track("u", "E")
    result = []
    waiter = threading.Thread(target=lambda: result.append(client.flush()))
    waiter.start()
    client.close(timeout=0.2)
    waiter.join(30)
    answer.set()
    assert result == [False]


def test_the_exit_hook_shares_one_deadline_between_clients(tmp_path, monkeypatch):
    from segmentry import client as client_module

    clock = [0.0]
    given = []

    def close(self, timeout=client_module.CLOSE_TIMEOUT_S):
        given.append(timeout)
        clock[0] += timeout  # as a close against a receiver that never answers

    clients = [segmentry.Client(queue_path=str(tmp_path / f"{i}.db"), flusher=None)
               for i in range(3)]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(client_module.Client, "close", close)
    monkeypatch.setattr(client_module, "_clients", set(clients))
    client_module._close_all_at_exit()
    assert len(given) == 3 and clock[0] <= client_module.CLOSE_TIMEOUT_S + 0.3


@pytest.mark.parametrize("lock_name", ["segmentry.telemetry._lock", "segmentry._default_lock"])
def test_a_fork_while_another_thread_holds_a_module_lock_does_not_hang_the_child(
        tmp_path, lock_name):
    import importlib

    from helpers import fork_holding

    import segmentry.telemetry

    def child() -> bool:  # as if a thread were inside telemetry.execute or segmentry.start()
        segmentry.telemetry.attach("child", [("segmentry", "claim", "start")],
                                   lambda *e: None)
        segmentry.start(queue_path=str(tmp_path / "child.db"), flusher=None)
        segmentry.stop()
        return True

    module_name, attr = lock_name.rsplit(".", 1)
    assert fork_holding(getattr(importlib.import_module(module_name), attr), child) == 0


# -- several processes, fork, SIGKILL ----------------------------------------------------

PRODUCER = textwrap.dedent("""
    import sys, segmentry
    path, n = sys.argv[1], int(sys.argv[2])
    c = segmentry.Client(queue_path=path, flusher=None, on_full="raise")
    errors = 0
    for i in range(n):
        try:
            c.track("user-%d" % i, "E", {"i": i})
        except Exception as exc:
            errors += 1
            print("ERROR", exc, file=sys.stderr)
    c.close()
    print(errors)
""")

FORKER = textwrap.dedent("""
    import os, sys, segmentry
    path, n = sys.argv[1], int(sys.argv[2])
    c = segmentry.Client(queue_path=path, flusher=None, on_full="raise")
    for i in range(n):
        c.track("parent", "E", {"i": i})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # wait until the parent has closed its client
        for i in range(n):
            c.track("child", "E", {"i": i})
        os._exit(0)
    os.close(r)
    c.close()
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status))
""")


def run_python(code, *args, **kw):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


POOL = textwrap.dedent("""
    import multiprocessing, sys, segmentry
    path, url = sys.argv[1], sys.argv[2]
    client = None

    def init():
        global client
        client = segmentry.Client("K", queue_path=path, api_url=url, batch_every_ms=50)

    def work(i):
        client.track("user", "E", {"i": i})

    if __name__ == "__main__":  # the parent itself never enqueues
        pool = multiprocessing.get_context("fork").Pool(2, initializer=init)
        pool.map(work, range(200))
        pool.close()
        pool.join()
""")


@pytest.mark.slow
def test_multiprocessing_workers_deliver_before_they_exit(tmp_path):
    from fake_segment import FakeSegment

    path = str(tmp_path / "q.db")
    with FakeSegment(write_key="K", record=True) as receiver:
        proc = run_python(POOL, path, receiver.url)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        stats = receiver.stats()
    # Not left on disk for the next flusher: sent, and deleted (else sent twice later).
    assert SQLiteQueue(path).stats(time.time()).depth == 0
    assert stats["unique"] == 200 and stats["duplicates"] == 0


@pytest.mark.slow
def test_four_producers_and_a_forked_child_store_the_exact_count(tmp_path):
    path = str(tmp_path / "q.db")
    n = 2000
    procs = [run_python(PRODUCER, path, n) for _ in range(4)] + [run_python(FORKER, path, n)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip() == "0", err
    conn = sqlite3.connect(path)
    by_user = dict(conn.execute(
        "SELECT json_extract(body, '$.userId') = 'child', COUNT(*) FROM events GROUP BY 1"))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    assert by_user == {0: 5 * n, 1: n}


KILLED = textwrap.dedent("""
    import sys, segmentry
    c = segmentry.Client(queue_path=sys.argv[1], flusher=None, on_full="raise")
    i = 0
    while True:
        mid = c.track("u", "E", {"i": i})
        print(mid, flush=True)
        i += 1
""")


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_a_producer_killed_mid_stream_loses_no_returned_event(tmp_path, durability):
    path = str(tmp_path / "q.db")
    code = KILLED.replace('on_full="raise"', f'on_full="raise", durability="{durability}"')
    proc = run_python(code, path)
    returned = []
    for line in proc.stdout:
        returned.append(line.strip())
        if len(returned) >= 3000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = {r[0] for r in conn.execute("SELECT json_extract(body, '$.messageId') FROM events")}
    conn.close()
    assert set(returned) <= ids


def test_a_child_process_never_reuses_the_parents_connection(tmp_path):
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    c.track("u", "before fork")
    parent_conn = c.queue._conn
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports whether it got a fresh connection
        try:
            c.track("u", "in child")
            os.write(w, b"1" if c.queue._conn is not parent_conn else b"0")
        finally:
            os._exit(0)  # never return into pytest in the forked copy
    os.close(w)
    answer = os.read(r, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert [e["event"] for e in stored(c)] == ["before fork", "in child"]
    c.close()


def test_flush_waits_for_events_whose_ids_restarted_after_the_queue_emptied(client):
    """SQLite reuses ids once the table is empty: flush() must still see the new ones."""
    with segmentry.Client(queue_path=client.queue_path, flusher=None) as other:
        other.track("other", "E")
        other.track("other", "E")  # ids 1 and 2
    client.track("u", "first")  # id 3
    drain = client.queue.claim(10, 10**9, time.time(), 60)
    client.queue.delete(drain.token, [r.id for r in drain.rows])  # the queue is empty
    client.track("u", "second")  # gets id 1 again
    assert client.flush(timeout=0.05) is False


def test_an_event_stored_while_flush_waits_is_not_forgotten(client):
    """Another thread's event may land inside the range flush() waited for (ids restart
    once the queue empties): the next flush() must still wait for it."""
    client.track("u", "first")
    real_pending = client.queue.pending

    def delivered_then_another_thread_tracks(first, last, destination="any"):
        claim = client.queue.claim(10, 10**9, time.time(), 60)
        client.queue.delete(claim.token, [r.id for r in claim.rows])  # delivered
        client.track("u", "meanwhile")  # gets id 1 again: inside the waited range
        client.queue.pending = real_pending
        return False

    client.queue.pending = delivered_then_another_thread_tracks
    assert client.flush(timeout=1)
    assert client.flush(timeout=0.05) is False


def test_producers_beside_the_flusher_thread_never_run_checkpoints(tmp_path):
    # Checkpoints are the flusher's job. The flusher thread shares the Client's
    # connection for claims and deletes, so it must not raise that connection's
    # autocheckpoint (a producer's commit would then run it); it checkpoints on its own.
    from segmentry.storage import PRODUCER_AUTOCHECKPOINT

    client = segmentry.Client("K", queue_path=str(tmp_path / "q.db"), send_to_http=False)
    try:
        for i in range(50):
            client.track("u", "E", {"i": i})
        assert client.flush(timeout=30)  # delivered: the thread holds the queue's lock
        setting = client.queue._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        assert setting == PRODUCER_AUTOCHECKPOINT
    finally:
        client.close()


def test_a_small_cap_bounds_the_files_on_disk_wal_included(tmp_path):
    # The WAL a queue writes over is not counted in its cap: at most a quarter of a small
    # cap (and 4 MiB), not the 64 MiB a large one may reuse.
    cap = 4 << 20
    path = str(tmp_path / "q.db")
    client = segmentry.Client(queue_path=path, flusher=None, max_queue_bytes=cap,
                              on_full="raise")
    with pytest.raises(QueueFull):
        for i in range(100_000):
            client.track("u", "E", {"i": i, "blob": "x" * 900})
    on_disk = os.path.getsize(path) + os.path.getsize(path + "-wal")
    client.close()
    assert i > 1000 and on_disk <= cap + (4 << 20) + (2 << 20)  # + 256 puts between stats


# -- nothing dropped or waited on in silence ------------------------------------------------


def _junk(path):
    path.write_bytes(b"not a database at all" * 100)


def _foreign(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("make, name, reason", [
    (lambda p: p.mkdir(), "q.db", "it is a directory"),
    (lambda p: p.parent.write_text(""), "file/q.db", "file is not a directory"),
    (lambda p: None, "missing/q.db", "directory .*missing does not exist; create it"),
    (_junk, "q.db", "corrupt or not a SQLite database.*mv "),
    (_foreign, "q.db", "not a segmentry queue"),
])
def test_a_queue_that_cannot_be_used_is_refused_when_the_client_is_made(
        tmp_path, make, name, reason):
    target = tmp_path / name
    make(target)
    before = sorted(os.listdir(tmp_path))
    for flusher in (None, "thread"):
        with pytest.raises(StorageError, match=reason) as error:
            segmentry.Client("K", queue_path=str(target), flusher=flusher,
                             api_url="http://127.0.0.1:9/v1/")
        assert str(target) in str(error.value)
        assert "cannot create queue file" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created, nothing moved


def test_the_default_per_user_directory_is_created_by_the_producer(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SEGMENTRY_QUEUE", raising=False)
    with segmentry.Client(flusher=None) as client:
        assert client.track("u", "E") is not None
    assert (tmp_path / "state" / "segmentry" / "queue.db").is_file()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(segmentry.__file__)))


def _nobody_python():
    """An interpreter the nobody user can run segmentry with (root only), or None."""
    import shutil

    if os.geteuid() != 0 or shutil.which("su") is None:
        return None
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        probe = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c",
                                f"cd /tmp && PYTHONPATH={ROOT} {python} -c 'import segmentry'"],
                               capture_output=True)
        if python and probe.returncode == 0:
            return python
    return None


NOBODY = textwrap.dedent("""
    import sys, segmentry
    try:
        segmentry.Client("KEY", **({"queue_path": sys.argv[1]} if sys.argv[1:] else {}))
    except segmentry.StorageError as exc:
        print(exc)
""")


@pytest.mark.skipif(_nobody_python() is None, reason="needs root, su and an interpreter "
                    "that the nobody user can run")
def test_a_user_who_cannot_write_the_queue_gets_a_storage_error_not_silence():
    import shlex
    import shutil
    import tempfile

    shared = tempfile.mkdtemp(prefix="segmentry-shared-")  # /tmp: nobody can reach it
    try:
        os.chmod(shared, 0o755)
        segmentry.Client(queue_path=f"{shared}/q.db", flusher=None).close()  # root's, 0600
        for args, reason in (([], "cannot create directory /nonexistent"),
                             ([f"{shared}/q.db"], "permission denied (owner uid 0"),
                             ([f"{shared}/new.db"], f"permission denied on {shared}")):
            env = f"cd /tmp && HOME=/nonexistent XDG_STATE_HOME= PYTHONPATH={ROOT}"
            command = " ".join([env, _nobody_python(), "-c", shlex.quote(NOBODY), *args])
            proc = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c", command],
                                  capture_output=True, text=True, timeout=60)
            assert reason in proc.stdout, (args, proc.stdout, proc.stderr)
    finally:
        shutil.rmtree(shared)


def test_a_user_who_cannot_write_the_queue_is_told_why_and_how_to_fix_it(tmp_path,
                                                                          monkeypatch):
    from segmentry import _files

    target = tmp_path / "q.db"
    target.write_text("")
    # As a user outside the file's group (root passes every check, so it is simulated).
    monkeypatch.setattr(_files.os, "access", lambda path, mode: path != str(target))
    reason = _files.open_failure(str(target))
    assert "permission denied (owner uid" in reason and "member of its group" in reason
    monkeypatch.setattr(_files.os, "access", lambda path, mode: path != str(tmp_path))
    assert "cannot search directory" in _files.open_failure(str(tmp_path / "other.db"))


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys, segmentry
    client = segmentry.Client(queue_path=sys.argv[1], flusher=None)
    client.track("u", "before")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the disk is full now
    results = [client.track("u", "E", {"pad": "x" * 20000}) for _ in range(100)]
    print(results.count(None), client.dropped, client.flush(timeout=1))
""")


def test_a_disk_that_fills_later_drops_loudly_without_any_logging_configured(tmp_path):
    proc = run_python(FULL_DISK, tmp_path / "q.db")
    out, err = proc.communicate(timeout=120)
    dropped, counted, flushed = out.split()
    assert int(dropped) == int(counted) > 0 and flushed == "False", (out, err)
    lines = [line for line in err.splitlines() if "dropped" in line]
    # One line for the first drop; the rest within the minute are counted, not repeated.
    assert len(lines) == 1 and lines[0].startswith("segmentry: dropped 1 event(s)"), err
    assert "q.db" in lines[0] and "pad" not in err and "xxxx" not in err


def test_drops_that_go_on_are_reported_once_a_minute_with_a_count(tmp_path, monkeypatch,
                                                                  caplog):
    from segmentry import client as client_module

    clock = [1000.0]
    monkeypatch.setattr(client_module.time, "monotonic", lambda: clock[0])
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    c.queue.put = lambda body, now, destination=None: _raise(StorageError("disk I/O error"))
    with caplog.at_level("WARNING", logger="segmentry"):
        for _ in range(5):
            c.track("u", "E")
            clock[0] += 10
        clock[0] += 20  # a minute after the first report
        c.track("u", "E")
    said = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("dropped 1 event(s)")
    assert said[1].startswith("dropped 5 event(s) since the last report (6 in all")
    assert c.dropped == 6


def test_flush_says_false_once_for_events_dropped_since_the_last_flush(client):
    real_put = client.queue.put
    client.track("u", "stored")
    client.queue.put = lambda body, now, destination=None: _raise(StorageError("disk I/O error"))
    assert client.track("u", "dropped") is None
    client.queue.put = real_put
    client.queue._run(lambda c: c.execute("DELETE FROM events"))  # as delivered
    assert client.flush(timeout=5) is False
    assert client.flush(timeout=5) is True  # nothing dropped since


def test_flush_on_a_closed_client_is_false_and_a_late_call_warns_once(tmp_path):
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    c.close()
    assert c.flush(timeout=1) is False
    with pytest.warns(RuntimeWarning, match="closed Client") as caught:
        c.track("u", "late")
        c.identify("u", {"a": 1})
    assert len([w for w in caught if "closed Client" in str(w.message)]) == 1
    assert c.dropped == 2


def test_flush_without_any_flusher_gives_up_after_a_grace_saying_why(tmp_path, monkeypatch,
                                                                     caplog):
    from segmentry import client as client_module

    monkeypatch.setattr(client_module, "NO_FLUSHER_GRACE_S", 0.1)
    c = segmentry.Client(queue_path=str(tmp_path / "q.db"), flusher=None)
    c.track("u", "E")
    with caplog.at_level("WARNING", logger="segmentry"):
        assert c.flush() is False  # no timeout: it used to wait forever
    assert "no flusher delivers" in caplog.text and str(tmp_path / "q.db") in caplog.text
    # With a flusher holding the queue (its pid file names a live process), it waits.
    (tmp_path / "q.db.flusher").write_text(f"{os.getpid()}\n")
    caplog.clear()
    assert c.flush(timeout=0.5) is False
    assert "no flusher delivers" not in caplog.text
    c.close()


def test_flush_returns_false_once_the_receiver_refuses_the_key(tmp_path, caplog):
    from segmentry.exceptions import HTTPStatusError
    from segmentry.testing import Stub

    errors = []
    c = segmentry.Client("WRONG", queue_path=str(tmp_path / "q.db"), batch_every_ms=10,
                         requests_options={"adapter": Stub(lambda r: 401)},
                         on_error=lambda exc, events: errors.append((exc, events)))
    mid = c.track("u", "E")
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="segmentry"):
        assert c.flush() is False  # no timeout: it used to wait forever
    assert time.monotonic() - started < 30
    line = [r.getMessage() for r in caplog.records if "flush() gives up" in r.getMessage()]
    assert len(line) == 1 and "HTTP 401" in line[0] and "WRONG" not in caplog.text
    assert isinstance(errors[0][0], HTTPStatusError) and errors[0][0].status_code == 401
    assert errors[0][1][0]["messageId"] == mid
    with caplog.at_level("WARNING", logger="segmentry"):
        assert c.flush() is False
        c.close()  # the final flush gives up too, without saying it again
    said = [r for r in caplog.records if "flush() gives up" in r.getMessage()]
    assert len(said) == 1
    assert SQLiteQueue(str(tmp_path / "q.db")).stats(time.time()).depth == 1  # kept


def test_close_takes_at_most_its_timeout_in_all(tmp_path):
    from segmentry.testing import Stub

    answer = threading.Event()

    def hang(request):  # the receiver does not answer until the test ends
        answer.wait(30)
        return 200

    c = segmentry.Client("K", queue_path=str(tmp_path / "q.db"), batch_every_ms=10,
                         requests_options={"adapter": Stub(hang)})
    c.track("u", "E")
    started = time.monotonic()
    c.close(timeout=2.0)  # was the flush's 2 s, then up to 2 s more to stop the thread
    elapsed = time.monotonic() - started
    answer.set()
    assert elapsed < 3.0


def test_a_queue_file_removed_while_in_use_is_recreated_keeping_its_events(
        tmp_path, monkeypatch, caplog):
    from segmentry import client as client_module

    monkeypatch.setattr(client_module, "CAP_RESTAT_EVERY", 4)
    path = tmp_path / "q.db"
    c = segmentry.Client(queue_path=str(path), flusher=None)
    ids = [c.track("u", "E", {"i": i}) for i in range(3)]
    for suffix in ("", "-wal", "-shm"):  # as a cleanup job would
        os.remove(f"{path}{suffix}")
    with caplog.at_level("WARNING", logger="segmentry"):
        ids += [c.track("u", "E", {"i": i}) for i in range(3, 10)]
    assert "was removed or replaced while in use" in caplog.text
    c.close()
    conn = sqlite3.connect(path)
    kept = [json.loads(b)["messageId"] for b, in conn.execute("SELECT body FROM events")]
    conn.close()
    assert sorted(kept) == sorted(ids)


def test_flush_notices_a_removed_queue_file(tmp_path, caplog):
    path = tmp_path / "q.db"
    c = segmentry.Client(queue_path=str(path), flusher=None)
    c.track("u", "E")
    os.remove(path)
    with caplog.at_level("WARNING", logger="segmentry"):
        c.flush(timeout=0.1)
    assert "1 event(s) still in the old file were moved" in caplog.text
    assert SQLiteQueue(str(path)).stats(time.time()).depth == 1
    c.close()


def _raise(error):
    raise error
