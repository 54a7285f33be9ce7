"""End to end: the real flusher process (``python -m segmentry.flusher``) against a real
receiver on 127.0.0.1 that fails on demand. Crashes are real SIGKILLs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from fake_segment import FakeSegment
from helpers import FAST, enqueue, refused_url, wait_until

import segmentry
from segmentry.service import GRACE_S
from segmentry.storage import SQLiteQueue

pytestmark = pytest.mark.slow

KEY = "test-key"


@pytest.fixture
def receiver():
    with FakeSegment(write_key=KEY, record=True) as srv:
        yield srv


def flusher(path, url, *args, env=None):
    environ = {**os.environ, "SEGMENT_WRITE_KEY": KEY, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "segmentry.flusher", "--queue", path, "--api-url", url,
         *FAST, *args],
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def drain(path, url, *args, timeout=120):
    proc = flusher(path, url, "--drain", *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def depth(path):
    return SQLiteQueue(path).stats(time.time())


def test_drain_delivers_everything_once_and_exits_0(receiver, queue_path):
    ids = enqueue(queue_path, 1000)
    code, err = drain(queue_path, receiver.url)
    assert code == 0, err
    stats = receiver.stats()
    assert (stats["unique"], stats["duplicates"]) == (1000, 0)
    assert {e["messageId"] for e in receiver.events()} == set(ids)
    assert depth(queue_path).depth == 0


def test_an_outage_drops_nothing_and_everything_arrives_after(receiver, queue_path):
    enqueue(queue_path, 300)
    receiver.fail(503, count=12)
    code, err = drain(queue_path, receiver.url)
    assert code == 0, err
    stats = receiver.stats()
    assert stats["requests_by_status"]["503"] == 12
    assert stats["unique"] == 300


def test_dropped_connections_are_retried(receiver, queue_path):
    enqueue(queue_path, 200)
    receiver.drop(count=3)
    code, err = drain(queue_path, receiver.url)
    assert code == 0, err
    assert receiver.stats()["unique"] == 200


def test_ambiguous_replies_duplicate_with_the_same_message_id(receiver, queue_path):
    ids = enqueue(queue_path, 100)
    receiver.ambiguous(count=1)
    code, err = drain(queue_path, receiver.url, "--max-in-flight", "1")
    assert code == 0, err
    stats = receiver.stats()
    assert stats["unique"] == 100 and stats["duplicates"] == 100
    assert sorted(e["messageId"] for e in receiver.events()) == sorted(ids * 2)


def test_a_poison_event_is_dead_lettered_and_the_others_arrive(receiver, queue_path):
    enqueue(queue_path, 50)
    poison = enqueue(queue_path, 1, event="Poison")[0]
    enqueue(queue_path, 49)
    receiver.reject("Poison")
    code, err = drain(queue_path, receiver.url)
    assert code == 1 and "segmentry dead-letters list" in err, err  # not all delivered
    assert receiver.stats()["unique"] == 99
    letters = SQLiteQueue(queue_path).dead_letters()
    assert len(letters) == 1 and poison in letters[0].body and letters[0].status == 400


class Flushers:
    """Flusher processes of one test, killed at teardown if a failed assertion left any."""

    def __init__(self, receiver, queue_path):
        self.receiver, self.queue_path, self.procs = receiver, queue_path, []
        self.ids: list[str] = []

    def start(self, *args):
        proc = flusher(self.queue_path, self.receiver.url, *args)
        self.procs.append(proc)
        return proc

    def mid_send(self, events):
        """Enqueue ``events`` (their ids in self.ids), hold every request 5 s, start a
        flusher; return it once a batch is in flight."""
        self.ids = enqueue(self.queue_path, events)
        self.receiver.delay(ms=5000)
        proc = self.start()
        assert wait_until(lambda: depth(self.queue_path).in_flight > 0)
        return proc


@pytest.fixture
def flushers(receiver, queue_path):
    started = Flushers(receiver, queue_path)
    yield started
    for proc in started.procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_flusher_killed_mid_send_loses_nothing(receiver, queue_path, flushers):
    proc = flushers.mid_send(500)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    receiver.clear_faults()
    code, err = drain(queue_path, receiver.url)
    assert code == 0, err
    assert receiver.wait_for(lambda s: s["unique"] == 500, timeout=30)
    assert {e["messageId"] for e in receiver.events()} == set(flushers.ids)
    assert SQLiteQueue(queue_path).integrity_check() == "ok"


def test_sigterm_stops_the_service_with_exit_0_and_keeps_what_is_left(receiver, queue_path):
    enqueue(queue_path, 300)
    receiver.delay(ms=300)
    proc = flusher(queue_path, receiver.url, "--max-batch-size", "10", "--max-in-flight", "1")
    assert receiver.wait_for(lambda s: s["unique"] >= 10, timeout=30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    left = depth(queue_path)
    assert left.in_flight == 0 and left.depth + receiver.stats()["unique"] == 300


def test_sigterm_does_not_wait_out_a_retry_after_longer_than_the_grace(receiver, queue_path):
    enqueue(queue_path, 20)
    receiver.fail(429, retry_after=120)
    proc = flusher(queue_path, receiver.url, "--retry-attempts", "5")
    assert receiver.wait_for(lambda s: s["requests"] >= 1, timeout=30)
    assert wait_until(lambda: depth(queue_path).in_flight > 0)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.monotonic() - started < GRACE_S / 2
    left = depth(queue_path)
    assert (left.depth, left.in_flight) == (20, 0)  # given back, not left leased


def test_a_standby_flusher_takes_over_when_the_active_one_dies(receiver, queue_path,
                                                               flushers):
    active = flushers.mid_send(100)
    standby = flushers.start("--wait")
    active.send_signal(signal.SIGKILL)
    active.wait(timeout=10)
    receiver.clear_faults()
    assert receiver.wait_for(lambda s: s["unique"] == 100, timeout=30)
    # The receiver counts what the killed flusher sent too. An empty queue is the
    # standby's doing (the dead one deleted nothing), and means it runs its loop: a
    # SIGTERM while it still started up (imports) killed it before its handler was set.
    assert wait_until(lambda: depth(queue_path).depth == 0, timeout=30)
    standby.send_signal(signal.SIGTERM)
    standby.communicate(timeout=30)
    assert standby.returncode == 0


def test_a_second_flusher_without_wait_exits_1_naming_the_holder(receiver, queue_path,
                                                                 flushers):
    active = flushers.mid_send(1)
    code, err = drain(queue_path, receiver.url)
    assert code == 1 and f"pid {active.pid}" in err and "Traceback" not in err


def test_a_revoked_write_key_exits_1_on_drain_and_keeps_everything(receiver, queue_path):
    enqueue(queue_path, 20)
    proc = subprocess.run(
        [sys.executable, "-m", "segmentry.flusher", "--queue", queue_path, "--api-url",
         receiver.url, "--drain", *FAST],
        env={**os.environ, "SEGMENT_WRITE_KEY": "wrong"}, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 1
    assert "HTTP 401" in proc.stderr and "Traceback" not in proc.stderr
    assert "wrong" not in proc.stderr
    assert depth(queue_path).depth == 20
    code, err = drain(queue_path, receiver.url)
    assert code == 0 and receiver.stats()["unique"] == 20


def test_drain_timeout_exits_1_when_events_remain(receiver, queue_path):
    enqueue(queue_path, 10)
    receiver.fail(503)
    code, err = drain(queue_path, receiver.url, "--drain-timeout", "1")
    assert code == 1 and "10 events left" in err
    assert depth(queue_path).depth == 10


def test_drain_timeout_bounds_the_run_even_with_a_batch_in_flight(receiver, queue_path):
    enqueue(queue_path, 10)
    receiver.delay(ms=30_000)  # the request outlives the timeout and the 10 s grace
    started = time.monotonic()
    code, err = drain(queue_path, receiver.url, "--drain-timeout", "1")
    assert code == 1 and "10 events left" in err
    assert time.monotonic() - started < 8  # start-up, the timeout, no grace


def test_a_drain_stopped_by_a_signal_exits_1_with_what_is_left(receiver, queue_path):
    enqueue(queue_path, 10)
    receiver.fail(503)
    proc = flusher(queue_path, receiver.url, "--drain")
    assert wait_until(lambda: receiver.stats()["requests"] > 0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by a signal with 10 events left" in err
    assert "Traceback" not in err


def test_in_process_thread_delivers_and_flush_waits_for_it(receiver, queue_path):
    with segmentry.Client(KEY, queue_path=queue_path, api_url=receiver.url,
                          batch_every_ms=50) as client:
        ids = [client.track("u", "E", {"i": i}) for i in range(250)]
        assert client.flush(timeout=30)
    assert {e["messageId"] for e in receiver.events()} == set(ids)


def test_immediate_sender_posts_one_event_per_request_to_its_type(receiver, queue_path):
    with segmentry.Client(KEY, queue_path=queue_path, api_url=receiver.url,
                          sender="immediate") as client:
        client.identify("u", {"a": 1})
        client.track("u", "E")
        assert client.flush(timeout=30)
    stats = receiver.stats()
    assert stats["singles"] == 2 and stats["batches"] == 0


def test_close_is_bounded_when_the_receiver_is_down(receiver, queue_path):
    receiver.fail(503)
    client = segmentry.Client(KEY, queue_path=queue_path, api_url=receiver.url)
    client.track("u", "E")
    started = time.monotonic()
    client.close(timeout=1.0)
    assert time.monotonic() - started < 10
    assert depth(queue_path).depth == 1


def test_a_forked_child_delivers_and_never_frees_the_parents_flusher_lock(receiver,
                                                                         queue_path):
    from segmentry.flusher import holder_pid

    client = segmentry.Client(KEY, queue_path=queue_path, api_url=receiver.url,
                              batch_every_ms=20)
    client.track("parent", "E")
    assert client.flush(timeout=30)
    assert holder_pid(queue_path) == os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: enqueue with the inherited client, wait for delivery
        ok = False
        try:
            ok = client.track("child", "E") is not None and client.flush(timeout=30)
        finally:
            os._exit(0 if ok else 1)  # never return into pytest in the forked copy
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert holder_pid(queue_path) == os.getpid()
    client.track("parent", "after")
    assert client.flush(timeout=30)
    client.close()
    users = sorted(e["userId"] for e in receiver.events())
    assert users == ["child", "parent", "parent"]


def test_once_sends_one_batch_and_exits_1_when_it_could_not_deliver(receiver, queue_path):
    enqueue(queue_path, 150)
    ok = flusher(queue_path, receiver.url, "--once")
    assert ok.wait(timeout=60) == 0
    assert receiver.stats()["unique"] == 100 and depth(queue_path).depth == 50
    receiver.fail(503)
    failed = flusher(queue_path, receiver.url, "--once", "--retry-attempts", "0")
    assert failed.wait(timeout=60) == 1
    assert depth(queue_path).depth == 50


def test_the_service_logs_a_summary_line_without_bodies_or_key(receiver, queue_path):
    enqueue(queue_path, 30, event="Secret Event Name")
    proc = flusher(queue_path, receiver.url, "--summary-every", "0.1")
    assert receiver.wait_for(lambda s: s["unique"] == 30, timeout=30)
    lines, end = [], time.monotonic() + 30
    while time.monotonic() < end:  # a line every 0.1 s: until one says all was sent
        lines.append(proc.stderr.readline())
        if not lines[-1] or "sent 30" in lines[-1] and "remaining 0" in lines[-1]:
            break  # (or it exited: the asserts below say how)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    err = "".join(lines) + err
    assert proc.returncode == 0
    assert "sent 30" in err and "remaining 0" in err
    assert "Secret Event Name" not in err and KEY not in err


def test_debug_logging_bridges_telemetry_without_bodies(receiver, queue_path):
    enqueue(queue_path, 5, event="Secret Event Name")
    code, err = drain(queue_path, receiver.url, "--log-level", "DEBUG")
    assert code == 0
    assert "segmentry.batch.stop" in err and "segmentry.claim.stop" in err
    assert "Secret Event Name" not in err and KEY not in err


def test_a_standby_flusher_stopped_with_sigterm_exits_0(receiver, queue_path, flushers):
    flushers.mid_send(1)
    standby = flushers.start("--wait")
    assert "standing by" in standby.stderr.readline()
    standby.send_signal(signal.SIGTERM)
    assert standby.wait(timeout=30) == 0


def test_drain_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(receiver, queue_path):
    import pty

    enqueue(queue_path, 500)
    main, secondary = pty.openpty()  # a real terminal on stderr: --progress auto picks the bar
    env = {**os.environ, "SEGMENT_WRITE_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segmentry.flusher", "--queue", queue_path, "--api-url",
         receiver.url, "--drain", *FAST], env=env, stderr=secondary, stdout=subprocess.PIPE)
    os.close(secondary)
    assert proc.wait(timeout=60) == 0
    screen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed once the flusher exited
            break
        if not chunk:
            break
        screen += chunk
    os.close(main)
    text = screen.decode()
    assert "\rsent " in text and "remaining 0" in text and "events/s" in text and "ETA" in text
    assert "INFO segmentry.flusher: sent" not in text
    enqueue(queue_path, 10)
    code, err = drain(queue_path, receiver.url)  # stderr is a pipe: a log line
    assert code == 0 and "\rsent" not in err and "INFO segmentry.flusher: sent 10" in err


# -- nothing dropped or waited on in silence ------------------------------------------------


def test_a_drain_after_the_url_is_fixed_sends_the_backlog_at_once(receiver, queue_path):
    wrong = refused_url()  # the mistyped URL
    enqueue(queue_path, 5)
    slow = ["--retry-attempts", "0", "--retry-expiry", "20000"]  # a backoff of 10 to 20 s
    code, err = drain(queue_path, wrong, *slow, "--drain-timeout", "1")
    assert code == 1 and "connection refused by 127.0.0.1" in err, err
    assert SQLiteQueue(queue_path).next_ready_at(time.time()) > time.time() + 5
    code, err = drain(queue_path, receiver.url, *slow, "--drain-timeout", "5")
    assert code == 0, err
    assert receiver.stats()["unique"] == 5 and "earned by another destination" in err


def test_a_flush_that_times_out_during_an_outage_says_why_without_logging(queue_path):
    # Nothing listens on the port: every attempt is refused. With no logging configured
    # the flusher's warning reaches nobody, so flush() itself says why it returns False.
    url = refused_url()
    code = textwrap.dedent("""
        import sys, segmentry
        c = segmentry.Client("SECRET-KEY", queue_path=sys.argv[1], api_url=sys.argv[2],
                             retry_attempts=0, batch_every_ms=10)
        c.track("u", "E")
        print(c.flush(timeout=3), c.flush(timeout=0.5))
    """)
    proc = subprocess.run([sys.executable, "-c", code, queue_path, url],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], (proc.stdout, proc.stderr)
    said = [line for line in proc.stderr.splitlines() if "flush() timed out" in line]
    assert len(said) == 1 and "connection refused by 127.0.0.1" in said[0], proc.stderr
    assert "SECRET-KEY" not in proc.stderr and depth(queue_path).depth == 1


def test_a_flush_without_a_flusher_of_its_own_names_the_one_that_is_late(queue_path):
    # flusher=None beside a service that meets an outage: the service logs why; the
    # client's flush() says which process to look at instead of returning False mutely.
    url = refused_url()
    enqueue(queue_path, 1)  # creates the queue for the service
    service = flusher(queue_path, url)
    try:
        from segmentry.flusher import holder_pid

        assert wait_until(lambda: holder_pid(queue_path) == service.pid)
        code = textwrap.dedent("""
            import sys, segmentry
            c = segmentry.Client(queue_path=sys.argv[1], flusher=None)
            c.track("u", "E")
            print(c.flush(timeout=3), c.flush(timeout=0.5))
        """)
        proc = subprocess.run([sys.executable, "-c", code, queue_path],
                              capture_output=True, text=True, timeout=60)
    finally:
        service.kill()
        service.communicate()
    assert proc.stdout.split() == ["False", "False"], (proc.stdout, proc.stderr)
    said = [line for line in proc.stderr.splitlines() if "flush() timed out" in line]
    assert len(said) == 1 and f"(pid {service.pid})" in said[0], proc.stderr


def test_start_with_a_wrong_key_then_flush_returns_false_instead_of_hanging(receiver,
                                                                           queue_path):
    code = textwrap.dedent("""
        import sys, segmentry
        segmentry.start("WRONG", queue_path=sys.argv[1], api_url=sys.argv[2])
        segmentry.track("u", "E")
        print(segmentry.flush())
    """)
    proc = subprocess.run([sys.executable, "-c", code, queue_path, receiver.url],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", (proc.stdout, proc.stderr)
    assert "segmentry: flush() gives up: the receiver answered HTTP 401" in proc.stderr
    assert "WRONG" not in proc.stderr and depth(queue_path).depth == 1


def test_under_systemd_the_service_notifies_ready_status_watchdog_and_stopping(
        receiver, queue_path, tmp_path):
    """Type=notify: READY=1 once the queue is open and the lock held, STATUS= as the
    state changes (a 401 makes it misconfigured), WATCHDOG=1 from the loop, STOPPING=1
    on SIGTERM; datagrams to $NOTIFY_SOCKET, here a socket of the test's own."""

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    enqueue(queue_path, 5)
    receiver.fail(401)
    proc = flusher(queue_path, receiver.url, env={
        "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"})
    seen: list[str] = []
    try:
        while not (any(m.startswith("READY=1") for m in seen)
                   and any("misconfigured: the receiver answered HTTP 401" in m for m in seen)
                   and sum(m == "WATCHDOG=1" for m in seen) >= 2):
            seen.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0  # its datagrams wait in our socket meanwhile
        sock.settimeout(0)
        while not seen[-1].startswith("STOPPING=1"):
            seen.append(sock.recv(4096).decode())  # BlockingIOError: it never said so
    finally:
        proc.kill()
        proc.communicate()
        sock.close()
    assert seen[0].startswith("STATUS=standby")
    assert depth(queue_path).depth == 5  # the 401 kept everything


PRODUCER = textwrap.dedent("""
    import sys
    import segmentry
    key, path, url, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with segmentry.Client(key, queue_path=path, api_url=url, flusher=None) as client:
        for i in range(count):
            client.track("user", "E", {"source": key, "i": i})
""")


def waiting(path):
    """The events left in the queue, by destination."""
    return {d.name: d.depth for d in SQLiteQueue(path).destination_stats(time.time())
            if d.depth}


def test_three_sources_share_one_queue_and_a_refused_key_holds_back_only_its_own(
        queue_path):
    keys, count = ["key-web", "key-billing", "key-cron"], 300
    with FakeSegment(write_key=keys[:2], record=True) as receiver:  # key-cron: 401
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, key, queue_path,
                                       receiver.url, str(count)]) for key in keys]
        assert [p.wait(timeout=120) for p in producers] == [0, 0, 0]
        service = flusher(queue_path, receiver.url, env={"SEGMENT_WRITE_KEY": ""})
        try:
            delivered = receiver.ledger.wait_for(
                lambda s: all(s["events_by_key"].get(k) == count for k in keys[:2]), 60)
            assert delivered, receiver.stats()
            held = {segmentry.flusher.destination(receiver.url, keys[2]): count}
            assert wait_until(lambda: waiting(queue_path) == held), waiting(queue_path)
            receiver.accept_keys(keys)  # the key is fixed: its events go
            assert receiver.ledger.wait_for(
                lambda s: s["events_by_key"].get(keys[2]) == count, 90), receiver.stats()
            assert wait_until(lambda: depth(queue_path).depth == 0)
        finally:
            service.terminate()
            _, err = service.communicate(timeout=30)
    assert receiver.stats()["duplicates"] == 0
    assert "HTTP 401" in err and not any(key in err for key in keys)
