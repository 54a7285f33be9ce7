"""The flusher cycle, one step at a time, against the stub transport: what each answer
does to the stored rows, batch limits, bisection of a rejected batch, telemetry."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import requests
from helpers import refused_port, wait_until

import segmentry
from segmentry import flusher as flusher_module
from segmentry import telemetry
from segmentry.config import Options
from segmentry.flusher import Flusher, Lock, _background, _failures, _loop, make_http
from segmentry.http import HTTPClient
from segmentry.storage import SQLiteQueue
from segmentry.testing import Stub, sequence


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "q.db")


def enqueue(path, n, event="E", **props):
    with segmentry.Client(queue_path=path, flusher=None) as c:
        return [c.track("u", event, {"i": i, **props}) for i in range(n)]


def make(path, handler=None, **options):
    stub = Stub(handler)
    opts = Options(queue_path=path, retry_attempts=options.pop("retry_attempts", 0),
                   retry_start=1, retry_expiry=options.pop("retry_expiry", 5),
                   requests_options={"adapter": stub}, **options)
    queue = SQLiteQueue(path)
    return Flusher(queue, make_http("K", opts), opts), stub, queue


def test_a_2xx_deletes_the_batch_and_sends_it_spliced_in_order(path):
    ids = enqueue(path, 5)
    flusher, stub, queue = make(path)
    assert flusher.run_once() == 5
    assert [e["messageId"] for e in stub.events] == ids
    assert queue.stats(time.time()).depth == 0 and flusher.counts.sent == 5


def test_a_cycle_claims_at_most_max_batch_size(path):
    enqueue(path, 25)
    flusher, stub, queue = make(path, max_batch_size=10)
    assert [flusher.run_once() for _ in range(4)] == [10, 10, 5, 0]
    assert [len(b) for b in stub.batches] == [10, 10, 5]


def test_a_request_body_never_exceeds_500_kb(path):
    enqueue(path, 40, pad="x" * 30_000)  # 40 events of ~30 KB: 1.2 MB in all
    sizes = []
    flusher, stub, queue = make(path, lambda r: sizes.append(len(r.body)) or 200,
                                max_batch_size=100)
    while flusher.run_once():
        pass
    assert len(stub.events) == 40 and len(sizes) >= 3
    assert max(sizes) <= 500_000
    assert sizes[0] > 500_000 - 31_000  # filled up to the limit, not split early


def test_a_retryable_failure_keeps_the_rows_and_stores_the_backoff(path):
    enqueue(path, 3)
    errors = []
    flusher, stub, queue = make(path, lambda r: 503, retry_expiry=60_000,  # 30 to 60 s
                                on_error=lambda e, ev: errors.append((e.status_code, len(ev))))
    before = time.time()
    flusher.run_once()
    stats = queue.stats(time.time())
    assert stats.depth == 3 and stats.in_flight == 0
    ready_at = queue.next_ready_at(time.time())
    assert ready_at > before and flusher.pause_until == ready_at
    assert errors == [(503, 3)]
    assert queue.claim(10, 10**9, time.time(), 60).rows == []


def test_a_restarted_flusher_honours_the_stored_backoff(path):
    enqueue(path, 1)
    first, _, _ = make(path, lambda r: 503, retry_expiry=60_000)  # stored: 30 to 60 s
    first.run_once()
    second, stub, _ = make(path)
    second.take_over()
    assert second.pause_until == first.pause_until > time.time()


def test_retries_within_a_cycle_then_success(path):
    enqueue(path, 2)
    flusher, stub, queue = make(path, sequence(503, 500, 200), retry_attempts=3)
    flusher.run_once()
    assert len(stub.requests) == 3
    assert [r.headers.get("X-Retry-Count") for r in stub.requests] == [None, "1", "2"]
    assert queue.stats(time.time()).depth == 0


def test_retry_after_is_honoured_before_the_next_attempt(path):
    enqueue(path, 1)
    seen = []

    def handler(request):
        seen.append(time.monotonic())
        return (429, "", {"Retry-After": "1"}) if len(seen) == 1 else 200

    flusher, stub, queue = make(path, handler, retry_attempts=1)
    flusher.run_once()
    assert len(seen) == 2 and seen[1] - seen[0] >= 1.0
    assert queue.stats(time.time()).depth == 0


def test_a_rejected_batch_is_split_to_isolate_the_poison_event(path):
    enqueue(path, 7)
    poison = enqueue(path, 1, event="Poison")[0]
    enqueue(path, 8)
    errors = []

    def handler(request):
        body = json.loads(request.body)
        return 400 if any(e["event"] == "Poison" for e in body["batch"]) else 200

    flusher, stub, queue = make(path, handler, on_error=lambda e, ev: errors.append(ev))
    flusher.run_once()
    assert len({e["messageId"] for e in stub.events}) == 15
    letters = queue.dead_letters()
    assert len(letters) == 1 and poison in letters[0].body and letters[0].status == 400
    assert [e[0]["messageId"] for e in errors] == [poison]
    assert queue.stats(time.time()).depth == 0


def test_a_401_keeps_everything_and_pauses_without_storing_a_backoff(path):
    enqueue(path, 4)
    seen = []
    telemetry.attach("mis", [("segmentry", "misconfigured")],
                     lambda e, m, meta: seen.append(meta["status_code"]))
    try:
        flusher, stub, queue = make(path, lambda r: 401)
        flusher.run_once()
    finally:
        telemetry.detach("mis")
    assert queue.stats(time.time()).depth == 4
    assert queue.next_ready_at(time.time()) == 0
    assert flusher.counts.misconfigured == "the receiver answered HTTP 401"
    assert flusher.pause_until > time.time()
    assert seen == [401]


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_would_drop_the_body_keeps_every_event(path, status):
    enqueue(path, 4)
    flusher, stub, queue = make(path, lambda r: (status, "", {"Location": "/login"}))
    flusher.run_once()
    assert queue.stats(time.time()).depth == 4 and queue.dead_letters() == []
    assert flusher.counts.misconfigured == f"the receiver answered HTTP {status}"
    assert len(stub.requests) == 1


def test_batches_still_in_flight_after_the_grace_are_given_back_not_left_leased(path):
    from segmentry.http import request_json

    enqueue(path, 10)
    gate = threading.Event()

    def handler(request):  # refuses the whole batch, then holds the halves of its bisection
        if len(request_json(request)["batch"]) == 10:
            return 400
        gate.wait(30)
        return 200

    flusher, stub, queue = make(path, handler)
    stop = threading.Event()
    loop = threading.Thread(target=flusher.run, args=(stop, threading.Event()))
    loop.start()
    assert wait_until(lambda: len(stub.requests) >= 1 and flusher.in_flight.count() == 1)
    stop.set()
    loop.join(30)
    flusher.finish(grace=0.1)  # the half being sent is still in the sender's hands
    stats = queue.stats(time.time())
    gate.set()
    assert (stats.depth, stats.in_flight) == (10, 0)  # all kept, none leased


def test_a_batch_held_by_its_sender_longer_than_a_lease_is_not_claimed_again(path):
    """Retries may outlast a lease (3 waits of a 300 s Retry-After); the loop renews the
    leases in flight, so the rows are never sent twice while the first sender holds them."""
    enqueue(path, 5)
    gate, now, arrived = threading.Event(), [time.time()], []

    def handler(request):
        arrived.append(request)
        gate.wait(30)
        return 200

    stub = Stub(handler)
    opts = Options(queue_path=path, retry_attempts=0, requests_options={"adapter": stub})
    queue = SQLiteQueue(path)
    flusher = Flusher(queue, make_http("K", opts), opts, clock=lambda: now[0])
    stop = threading.Event()
    loop = threading.Thread(target=flusher.run, args=(stop, threading.Event()))
    loop.start()
    try:
        assert wait_until(lambda: len(arrived) == 1)
        now[0] += flusher_module.LEASE_S + 1  # the claim's lease has run out meanwhile
        assert wait_until(lambda: queue.stats(now[0]).in_flight == 5, timeout=10)
        gate.set()
        assert wait_until(lambda: queue.stats(now[0]).depth == 0)
    finally:
        gate.set()
        stop.set()
        loop.join(30)
    assert len(arrived) == 1


def test_a_pause_of_the_http_client_is_measured_on_its_own_clock(path):
    """The HTTP client's clock is injectable: a Retry-After pause on it must hold the
    loop whatever time.monotonic() says."""
    enqueue(path, 3)
    stub = Stub()
    opts = Options(queue_path=path, retry_attempts=0, requests_options={"adapter": stub})
    http_client = HTTPClient("K", opts.api_url, clock=lambda: 0.0,
                             adapter=stub)
    http_client.pause(30.0)  # on its clock: paused until 30, now 0
    flusher = Flusher(SQLiteQueue(path), http_client, opts)
    stop = threading.Event()
    assert flusher._paused(stop)
    http_client.clock = lambda: 31.0
    assert not flusher._paused(stop)


def test_take_over_reclaims_a_dead_flushers_leases(path):
    enqueue(path, 5)
    SQLiteQueue(path).claim(5, 10**9, time.time(), 600)
    flusher, stub, queue = make(path)
    assert flusher.run_once() == 0
    flusher.take_over()
    assert flusher.run_once() == 5


def test_telemetry_spans_around_claim_and_batch_in_order(path):
    enqueue(path, 2)
    seen = []
    names = [("segmentry", n, p) for n in ("claim", "batch") for p in ("start", "stop")]
    telemetry.attach("order", names, lambda e, m, meta: seen.append((e, m, meta)))
    try:
        make(path)[0].run_once()
    finally:
        telemetry.detach("order")
    assert [e[1:] for e, _, _ in seen] == [("claim", "start"), ("claim", "stop"),
                                           ("batch", "start"), ("batch", "stop")]
    (_, start, _), (_, stop, claim_meta), _, (_, batch_stop, batch_meta) = seen
    assert isinstance(start["system_time"], int) and isinstance(stop["duration"], int)
    assert claim_meta["claimed"] == 2 and claim_meta["queue_path"] == path
    assert claim_meta["status"] == "ok"  # every stop span carries a status
    assert batch_meta["status"] == "ok" and len(batch_meta["events"]) == 2
    assert batch_meta["result"].status_code == 200 and batch_stop["duration"] > 0


def test_a_raising_telemetry_handler_never_breaks_delivery(path):
    enqueue(path, 3)

    def broken(*args):
        raise RuntimeError("boom")

    telemetry.attach("broken", [("segmentry", "batch", "start")], broken)
    flusher, stub, queue = make(path)
    flusher.run_once()
    assert queue.stats(time.time()).depth == 0
    assert not telemetry.detach("broken")  # it was detached when it raised


def test_max_in_flight_batches_are_sent_concurrently(path):
    enqueue(path, 40)
    barrier = threading.Barrier(4, timeout=10)

    def handler(request):
        barrier.wait()  # passes only when four requests are in flight together
        return 200

    flusher, stub, queue = make(path, handler, max_batch_size=10, max_in_flight=4)
    assert flusher.run(threading.Event(), threading.Event(), drain=True,
                       deadline=time.monotonic() + 30)
    assert len(stub.batches) == 4 and queue.stats(time.time()).depth == 0


def test_a_network_error_keeps_the_rows(path):
    enqueue(path, 2)
    flusher, stub, queue = make(path, sequence(requests.ConnectionError))
    flusher.run_once()
    assert queue.stats(time.time()).depth == 2 and flusher.counts.released == 2


def test_immediate_sender_posts_each_event_to_its_type(path):
    with segmentry.Client(queue_path=path, flusher=None) as c:
        c.identify("u", {"a": 1})
        c.page("u", "Home")
    flusher, stub, queue = make(path, sender="immediate")
    while flusher.run_once():
        pass
    assert [r.path for r in stub.requests] == ["/v1/identify", "/v1/page"]
    assert all("sentAt" in r.body for r in stub.requests)


def test_only_one_flusher_lock_per_queue(path):
    a, b = Lock(path), Lock(path)
    assert a.acquire(timeout=0)
    assert not b.acquire(timeout=0)
    a.release()
    assert b.acquire(timeout=0)
    b.release()


@pytest.mark.parametrize("suffix", [".lock", ".flusher"])
def test_the_lock_and_pid_files_never_follow_a_link_to_another_file(path, tmp_path, suffix):
    """In a group-writable directory a member could aim them at a file the flusher's
    user can write: it must be neither truncated nor written."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, path + suffix)
    lock = Lock(path)
    if suffix == ".lock":
        with pytest.raises(segmentry.StorageError, match="lock file"):
            lock.acquire(timeout=0)
    else:
        assert lock.acquire(timeout=0)
        assert not os.path.islink(path + suffix)  # the link was replaced, not followed
        lock.release()
    assert victim.read_text() == "precious\n"


def test_a_forked_child_closing_its_copy_of_the_lock_leaves_the_parent_holding_it(path):
    lock = Lock(path)
    assert lock.acquire(timeout=0)
    pid = os.fork()
    if pid == 0:  # the child: abandon, then prove the parent still holds the lock
        try:
            lock.abandon()
            os._exit(0 if not Lock(path).acquire(timeout=0) else 1)
        except BaseException:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0
    assert not Lock(path).acquire(timeout=0)
    lock.release()
    assert Lock(path).acquire(timeout=0)


def test_a_pid_file_that_cannot_be_written_costs_neither_the_lock_nor_delivery(path, caplog):
    os.mkdir(path + ".flusher")  # unwritable, even for root: as another user's stale one
    lock = Lock(path)
    assert lock.acquire(timeout=0) and not Lock(path).acquire(timeout=0)
    lock.release()
    assert "cannot write" in caplog.text
    stub = Stub()
    with segmentry.Client("K", queue_path=path, requests_options={"adapter": stub},
                          batch_every_ms=10) as client:
        mid = client.track("u", "E")
        assert client.flush(timeout=30)
    assert [e["messageId"] for e in stub.events] == [mid]


def test_rows_kept_for_a_later_cycle_are_reported(path):
    enqueue(path, 3)
    seen = []
    telemetry.attach("release", [("segmentry", "release")], lambda *e: seen.append(e))
    try:
        flusher, stub, queue = make(path, lambda r: 503)
        flusher.run_once()
    finally:
        telemetry.detach("release")
    [(_, measurements, metadata)] = seen
    assert measurements["count"] == 3 and measurements["delay_s"] > 0
    assert metadata == {"status_code": 503, "queue_path": queue.path}


def test_the_pid_file_names_a_live_flusher_not_a_process_that_reused_its_pid(path):
    from segmentry.flusher import holder_pid

    lock = Lock(path)
    assert lock.acquire(timeout=0)
    assert holder_pid(path) == os.getpid()
    with open(path + ".flusher") as f:
        pid, start = f.read().split()
    with open(path + ".flusher", "w") as f:  # the same pid, started at another time
        f.write(f"{pid} {int(start) + 1}\n")
    assert holder_pid(path) is None
    with open(path + ".flusher", "w") as f:  # an older segmentry's file: the pid only
        f.write(f"{pid}\n")
    assert holder_pid(path) == os.getpid()
    lock.release()


def test_an_unexpected_failure_while_sending_keeps_the_rows_unleased(path, caplog):
    enqueue(path, 4)

    def buggy(request):
        raise RuntimeError("a custom adapter's bug")

    flusher, stub, queue = make(path, buggy, retry_expiry=60_000)  # stored: 30 to 60 s
    flusher.run_once()  # no exception: the rows are released as after a network failure
    stats = queue.stats(time.time())
    assert (stats.depth, stats.in_flight, flusher.counts.released) == (4, 0, 4)
    assert flusher.pause_until > time.time()
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(logged) == 1 and "a custom adapter's bug" in caplog.text  # the traceback


def test_each_answer_is_classified_once_and_reaches_the_policy_as_it_was_made(
        path, monkeypatch):
    """One value from the HTTP layer to the flusher: http.answer makes it (classify and
    Retry-After read once per answer, not again by the retry loop, telemetry or policy)."""
    from segmentry import http as sh
    from segmentry.flusher import _settle

    calls, made, decided = Counter(), [], []
    for name in ("classify", "retry_after_s"):
        real = getattr(sh, name)
        monkeypatch.setattr(sh, name, lambda *a, _real=real, _name=name: (
            calls.update([_name]), _real(*a))[1])
    real_answer, real_decide = sh.answer, _settle.decide
    monkeypatch.setattr(sh, "answer", lambda outcome: made.append(real_answer(outcome))
                        or made[-1])
    monkeypatch.setattr(_settle, "decide", lambda answer, *a, **k: decided.append(answer)
                        or real_decide(answer, *a, **k))
    enqueue(path, 3)
    flusher, stub, queue = make(path, sequence(503, 503, 200), retry_attempts=2)
    flusher.run_once()
    assert [a.status for a in made] == [503, 503, 200] and len(stub.requests) == 3
    assert calls == Counter(classify=3, retry_after_s=2)  # the 200 has no Retry-After to read
    assert len(decided) == 1 and decided[0] is made[-1]


def test_the_window_halves_on_a_pause_and_grows_back_one_per_window():
    from segmentry.flusher import Window

    window = Window(8)
    assert (window.free(0), window.free(7), window.free(8)) == (8, 1, 0)
    window.shrink()
    window.shrink()
    assert (window.free(0), window.free(1), window.free(2)) == (2, 1, 0)
    for _ in range(2):
        window.grow()  # 2 -> 2.5 -> 2.9
    assert window.free(0) == 2
    for _ in range(40):
        window.grow()
    assert (window.free(7), window.free(8), window.free(9)) == (1, 0, 0)


def test_a_retry_after_shrinks_how_many_batches_fly_at_once(path):
    enqueue(path, 30)
    flusher, stub, queue = make(path, sequence((429, "", {"Retry-After": "0"}), 200),
                                max_batch_size=10, retry_attempts=1)
    flusher.run(threading.Event(), threading.Event(), drain=True,
                deadline=time.monotonic() + 30)
    assert queue.stats(time.time()).depth == 0
    assert flusher.window.size < 8


def test_the_flusher_thread_restarts_after_an_unexpected_error(path, monkeypatch):
    monkeypatch.setattr(_background, "RESTART_S", 0.01)
    real_claim = SQLiteQueue.claim_batches
    failures = []

    def claim_failing_once(self, *args):
        if not failures:
            failures.append(1)
            raise RuntimeError("an unexpected bug")
        return real_claim(self, *args)

    monkeypatch.setattr(SQLiteQueue, "claim_batches", claim_failing_once)
    stub = Stub()
    with segmentry.Client("K", queue_path=path, requests_options={"adapter": stub},
                          batch_every_ms=10) as client:
        mid = client.track("u", "E")
        assert client.flush(timeout=30)
    assert failures == [1] and [e["messageId"] for e in stub.events] == [mid]


def test_a_2xx_after_an_outage_resumes_rows_waiting_out_a_backoff(path):
    def waiting(queue):
        sql = "SELECT COUNT(*) FROM events WHERE not_before > ?"
        return queue._run(lambda c: c.execute(sql, (time.time(),)).fetchone()[0])

    enqueue(path, 20)
    flusher, stub, queue = make(path, sequence(503, 200), max_batch_size=10)
    flusher.run_once()  # 503: ten rows released with a stored backoff
    assert waiting(queue) == 10 and flusher.pause_until > time.time()
    flusher.run_once()  # the other ten: 200, the receiver is back
    assert waiting(queue) == 0 and flusher.pause_until <= time.time()
    assert flusher.run_once() == 10 and queue.stats(time.time()).depth == 0


def test_a_batch_delivered_while_the_loop_waits_is_deleted_at_once(path):
    """Deletes wait for the next claim, but a loop that waits between cycles deletes
    them itself within DELETE_LAG_S, or flush() would wait batch_every_ms for rows
    already delivered."""
    enqueue(path, 3)
    flusher, stub, queue = make(path, batch_every_ms=600_000)
    stop, wake = threading.Event(), threading.Event()
    loop = threading.Thread(target=flusher.run, args=(stop, wake))
    loop.start()
    try:
        assert wait_until(lambda: queue.stats(time.time()).depth == 0, timeout=20)
        assert flusher.counts.sent == 3 and len(stub.events) == 3
    finally:
        stop.set()
        wake.set()
        loop.join(10)


def test_while_producers_keep_waking_the_loop_deletes_ride_on_the_next_claim(
        path, monkeypatch):
    # Half the write transactions (each one holds the producers up): a delivered batch
    # is deleted inside the claim of the next one, not in a transaction of its own.
    monkeypatch.setattr(_loop, "DELETE_LAG_S", 600.0)  # no lull in this test
    first = enqueue(path, 100)
    flusher, stub, queue = make(path, batch_every_ms=600_000)
    own_deletes = []
    for name in ("delete", "delete_many"):
        method = getattr(queue, name)
        monkeypatch.setattr(queue, name, lambda *a, m=method: own_deletes.append(a) or m(*a))
    stop, wake = threading.Event(), threading.Event()
    loop = threading.Thread(target=flusher.run, args=(stop, wake))
    loop.start()
    try:
        assert wait_until(lambda: len(stub.events) == 100)
        enqueue(path, 100)
        wake.set()  # a producer filled the next batch
        assert wait_until(lambda: len(stub.events) == 200)
        assert [e["messageId"] for e in stub.events[:100]] == first
        assert wait_until(lambda: flusher.counts.sent == 100)
        assert queue.stats(time.time()).depth == 100  # the second batch's rows
        assert own_deletes == []
    finally:
        stop.set()
        wake.set()
        loop.join(10)


def test_what_was_delivered_when_the_loop_stops_is_deleted_not_sent_again(path):
    enqueue(path, 1000)
    stop = threading.Event()

    def answer(request):
        if len(stub.batches) >= 3:
            stop.set()
        return 200

    flusher, stub, queue = make(path, answer, max_batch_size=10)
    flusher.run(stop, threading.Event(), drain=True)
    flusher.finish(grace=10)
    received = {e["messageId"] for e in stub.events}
    left = {json.loads(b)["messageId"] for (b,) in queue._run(
        lambda c: c.execute("SELECT body FROM events").fetchall())}
    assert 30 <= len(received) < 1000
    assert not received & left and len(left) == 1000 - len(received)
    assert flusher.counts.sent == len(received)


@pytest.fixture
def claims():
    """(start, rows) of every claim, empty ones too; start in time.monotonic() seconds.
    Claims come one at a time, from the loop's thread."""
    seen, started = [], []

    def handler(event, measurements, meta):
        if event[-1] == "start":
            started[:] = [time.monotonic()]
        else:
            seen.append((started[0], meta["claimed"]))

    telemetry.attach("claims", [("segmentry", "claim", "start"), ("segmentry", "claim", "stop")],
                     handler)
    yield seen
    telemetry.detach("claims")


def _rows(claims):
    return [rows for _, rows in claims]


@contextlib.contextmanager
def _looping(flusher):
    """The flusher's loop in a thread; yields its wake event. At the end it is stopped as
    Background.stop() stops it, and must end at once, gathering or not."""
    stop, wake = threading.Event(), threading.Event()
    loop = threading.Thread(target=flusher.run, args=(stop, wake))
    loop.start()
    try:
        yield wake
    finally:
        stop.set()
        flusher.hurry.set()
        wake.set()
        loop.join(10)
    assert not loop.is_alive()


def test_between_cycles_only_full_batches_go_until_batch_every_ms_or_flush(path, claims):
    flusher, stub, queue = make(path, batch_every_ms=600_000)
    with _looping(flusher) as wake:
        assert wait_until(lambda: _rows(claims) == [0])  # the queue was empty: the loop waits
        enqueue(path, 150)
        wake.set()  # what a producer does at every max_batch_size events
        assert wait_until(lambda: sum(_rows(claims)) >= 100)
        assert [n for n in _rows(claims) if n] == [100]  # the other 50 wait
        flusher.hurry.set()  # what flush() does
        wake.set()
        assert wait_until(lambda: queue.stats(time.time()).depth == 0)
        assert [n for n in _rows(claims) if n] == [100, 50]
        # Claimed in that order, sent by two sender threads: with max_in_flight > 1 the
        # receiver may get them in either order (a thread kept off the GIL 26 ms did).
        assert sorted(len(b) for b in stub.batches) == [50, 100]


@pytest.mark.parametrize("gather_s", [1.0, 2.0])
def test_full_batches_of_one_gather_interval_go_in_one_claim_and_none_waits_longer(
        path, monkeypatch, claims, gather_s):
    monkeypatch.setattr(_loop, "GATHER_S", gather_s)
    flusher, stub, queue = make(path, batch_every_ms=600_000)
    with _looping(flusher) as wake:
        assert wait_until(lambda: _rows(claims) == [0])  # the queue was empty: the loop waits
        enqueue(path, 100)
        wake.set()  # a producer of this process filled a batch
        assert wait_until(lambda: _rows(claims) == [0, 100])
        enqueue(path, 100)
        wake.set()  # one more full batch at once: it waits out the gather...
        enqueue(path, 100)
        wake.set()  # ...and this one, filled meanwhile, joins it
        assert wait_until(lambda: sum(_rows(claims)) == 300, timeout=10)  # not batch_every_ms
        (first, _), (second, size) = [claim for claim in claims if claim[1]]
        assert gather_s <= second - first < 2 * gather_s
        assert size == 200


def test_a_full_batch_goes_at_once_when_none_went_for_a_gather_interval(
        path, monkeypatch, claims):
    monkeypatch.setattr(_loop, "GATHER_S", 600.0)
    flusher, stub, queue = make(path, batch_every_ms=600_000)
    with _looping(flusher) as wake:
        assert wait_until(lambda: _rows(claims) == [0])  # the queue was empty: the loop waits
        for n in (1, 2):
            last = flusher._claimed_at
            enqueue(path, 100)
            wake.set()  # a full batch, the first ever, then the first for 600 s
            assert wait_until(lambda n=n: len(stub.batches) == n, timeout=10)
            assert wait_until(lambda last=last: flusher._claimed_at != last)
            flusher._claimed_at -= 600.0  # as if that claim were 600 s old


def test_stopping_the_flusher_thread_ends_a_gather_under_way(path, monkeypatch, claims):
    monkeypatch.setattr(_loop, "GATHER_S", 600.0)
    options = Options(queue_path=path, batch_every_ms=600_000,
                      requests_options={"adapter": Stub()})
    background = flusher_module.Background("K", SQLiteQueue(path), options)
    background.start()
    try:
        assert wait_until(lambda: _rows(claims) == [0])  # the queue was empty: the loop waits
        for _ in range(2):
            enqueue(path, 100)
            for _ in range(100):
                background.enqueued()  # what the producer's calls do
            assert wait_until(lambda: _rows(claims) == [0, 100]
                              and not background._wake.is_set())
        # The loop took the second wake: it gathers, up to 600 s after the first claim.
    finally:
        background.stop(timeout=10)
    assert not background._thread.is_alive()
    assert _rows(claims) == [0, 100]


@pytest.mark.parametrize("how", ["flush", "immediate"])
def test_flush_and_the_immediate_sender_never_wait_for_the_gather(
        path, monkeypatch, claims, how):
    monkeypatch.setattr(_loop, "GATHER_S", 600.0)
    options = {"sender": "immediate"} if how == "immediate" else {}
    flusher, stub, queue = make(path, batch_every_ms=600_000, **options)
    with _looping(flusher) as wake:
        for n in (1, 2):
            enqueue(path, 100)
            if how == "flush":
                flusher.hurry.set()
            wake.set()
            assert wait_until(lambda n=n: sum(_rows(claims)) == 100 * n, timeout=10)


def test_flush_sends_a_batch_that_is_not_full_without_waiting_batch_every_ms(path):
    stub = Stub()
    with segmentry.Client("K", queue_path=path, requests_options={"adapter": stub},
                          batch_every_ms=600_000) as client:
        first = client.track("u", "E")  # the loop's first cycle may take anything ready
        assert client.flush(timeout=10)
        ids = [client.track("u", "E", {"i": i}) for i in range(150)]
        assert client.flush(timeout=10)  # 50 of them are not a full batch
    assert sorted(e["messageId"] for e in stub.events) == sorted([first, *ids])


def test_progress_shows_the_rate_of_the_last_interval_not_since_the_start(monkeypatch, caplog):
    from segmentry import _progress as progress

    class Fake:  # a flusher that sent 60,000 in its first minute, then nothing
        counts = flusher_module.Counts()
        queue = type("Q", (), {"stats": lambda self, now: type("S", (), {"depth": 120_000})})()

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    report = progress.Progress(Fake(), mode="log")
    caplog.set_level("INFO", logger="segmentry.flusher")
    Fake.counts.sent, now[0] = 60_000, 1060.0
    report.report()
    now[0] = 1660.0  # ten minutes of outage
    report.report()
    lines = [r.getMessage() for r in caplog.records]
    assert "1,000 events/s" in lines[0]
    assert "0 events/s  ETA -" in lines[1]



# -- nothing dropped or waited on in silence ------------------------------------------------


def test_a_401_tells_on_error_and_keeps_the_events(path):
    from segmentry.exceptions import HTTPStatusError

    ids = enqueue(path, 3)
    errors = []
    flusher, stub, queue = make(path, lambda r: 401, on_error=lambda e, ev: errors.append(
        (e, [x["messageId"] for x in ev])))
    flusher.run_once()
    assert len(errors) == 1 and isinstance(errors[0][0], HTTPStatusError)
    assert errors[0][0].status_code == 401 and not errors[0][0].retryable
    assert errors[0][1] == ids
    assert queue.stats(time.time()).depth == 3 and queue.dead_letters() == []


def _elsewhere(path, key="K", url="https://api.segment.io/v1/", handler=None):
    opts = Options(queue_path=path, retry_attempts=0, retry_start=1, retry_expiry=60_000,
                   api_url=url, requests_options={"adapter": Stub(handler)})
    queue = SQLiteQueue(path)
    return Flusher(queue, make_http(key, opts), opts), queue


@pytest.mark.parametrize("fixed", [{"key": "FIXED"}, {"url": "http://127.0.0.1:9/v1/"}])
def test_a_backoff_earned_by_another_destination_is_not_waited_out(path, fixed, caplog):
    enqueue(path, 2)
    wrong, queue = _elsewhere(path, handler=lambda r: 503)
    wrong.run_once()
    assert queue.next_ready_at(time.time()) > time.time() + 20  # 30 to 60 s stored
    fixed_flusher, _ = _elsewhere(path, **fixed)
    with caplog.at_level("INFO", logger="segmentry"):
        fixed_flusher.take_over()
    assert fixed_flusher.pause_until <= time.time()
    assert queue.next_ready_at(time.time()) == 0
    assert "backoff earned by another destination" in caplog.text
    assert "FIXED" not in caplog.text


def test_a_backoff_stored_without_its_owner_is_not_waited_out(path):
    enqueue(path, 1)
    queue = SQLiteQueue(path)
    claim = queue.claim(10, 10**6, time.time(), 60)
    queue.release(claim.token, [r.id for r in claim.rows], time.time() + 60)  # as 0.1 did
    flusher, _ = _elsewhere(path)
    flusher.take_over()
    assert flusher.pause_until <= time.time() and queue.next_ready_at(time.time()) == 0


def test_a_stored_backoff_of_the_same_destination_is_logged_with_its_end(path, caplog):
    enqueue(path, 1)
    first, _ = _elsewhere(path, handler=lambda r: 503)
    first.run_once()
    second, _ = _elsewhere(path)
    with caplog.at_level("WARNING", logger="segmentry"):
        second.take_over()
    assert second.pause_until == first.pause_until > time.time()
    when = time.strftime("%H:%M:%S", time.localtime(second.pause_until))
    assert "waiting out the backoff" in caplog.text and f"next attempt at {when}" in caplog.text


def test_a_refused_connection_is_named_in_the_failure_line(path, caplog):
    port = refused_port()
    enqueue(path, 1)
    opts = Options(queue_path=path, retry_attempts=0, api_url=f"http://127.0.0.1:{port}/v1/")
    flusher = Flusher(SQLiteQueue(path), make_http("SECRET-KEY", opts), opts)
    with caplog.at_level("WARNING", logger="segmentry"):
        flusher.run_once()
    line = [r.getMessage() for r in caplog.records if "delivery failed" in r.getMessage()]
    assert len(line) == 1, caplog.text
    assert f"NetworkError: connection refused by 127.0.0.1:{port}" in line[0]
    assert "SECRET-KEY" not in caplog.text


def _chained(*errors):
    """The errors as a chain, the first outermost (as ``raise ... from`` leaves them)."""
    for outer, inner in zip(errors, errors[1:]):
        outer.__cause__ = inner
    return errors[0]


@pytest.mark.parametrize("error, said", [
    (_chained(segmentry.NetworkError("no response"), requests.exceptions.SSLError(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate "
        "(_ssl.c:1006)")), "TLS verification failed for h.example:8443: self-signed certificate"),
    (_chained(segmentry.NetworkError("no response"), OSError(
        "Could not find a suitable TLS CA certificate bundle, invalid path: /nope.pem")),
     "CA bundle missing: /nope.pem"),
    (_chained(segmentry.NetworkError("no response"), requests.ConnectionError("x"),
              OSError(-2, "Name or service not known")),
     "DNS lookup failed for h.example: Name or service not known"),
    (_chained(segmentry.NetworkError("no response"), requests.ConnectionError(
        "[Errno 111] Connection refused")), "connection refused by h.example:8443"),
    (_chained(segmentry.NetworkError("no response"), requests.ReadTimeout("read timed out")),
     "timed out talking to h.example:8443"),
    (_chained(segmentry.NetworkError("no response"), requests.exceptions.ProxyError(
        "Unable to connect to proxy")), "cannot go through the proxy: Unable to connect"),
    (_chained(segmentry.NetworkError("no response"), requests.ConnectionError(
        "HTTPSConnectionPool(host='proxy.example'): [Errno 111] Connection refused")),
     "connection refused by h.example:8443"),  # a host named proxy is no proxy failure
    (segmentry.NetworkError("sending failed: KeyError"), None),
])
def test_a_network_failure_is_described_by_its_cause(error, said):
    described = _failures.describe(error, "https://h.example:8443/v1/")
    assert described == "NetworkError" if said is None else said in described, described


def test_python_m_segmentry_flusher_loads_the_flusher_once():
    """As ``__main__`` and again as segmentry.flusher (through service), its classes
    would exist twice: two Flusher types, two sets of module constants."""
    code = ("import gc, runpy, sys\n"
            "sys.argv = ['segmentry.flusher', '--help']\n"
            "try:\n"
            "    runpy.run_module('segmentry.flusher', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sum(isinstance(o, type) and o.__name__ == 'Flusher' for o in gc.get_objects()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.split()[-1] == "1"


def key_of(request):
    """The write key a request was sent with (HTTP Basic, the key as user name)."""
    token = request.headers["Authorization"].split()[1]
    return base64.b64decode(token).decode().rstrip(":")


def enqueue_interleaved(path, keys, n):
    """``n`` events per key, one of each key in turn, each carrying its own key."""
    clients = [segmentry.Client(key, queue_path=path, flusher=None,
                                api_url="http://127.0.0.1:9/v1/") for key in keys]
    for i in range(n):
        for client in clients:
            client.track("u", "E", {"i": i})
    for client in clients:
        client.close()


def test_a_429_from_one_destination_pauses_it_only_the_others_keep_going(path):
    """Three sources in one file, one host rate-limiting one key: the other two drain,
    in batches of one key each, while the limited one waits out its Retry-After."""
    def handler(request):
        if key_of(request) == "LIMITED":
            return 429, {}, {"Retry-After": "300"}
        return 200

    enqueue_interleaved(path, ("LIMITED", "WEB", "CRON"), 30)
    flusher, stub, queue = make(path, handler, max_batch_size=10, max_in_flight=1)
    stop = threading.Event()
    loop = threading.Thread(target=flusher.run, args=(stop, threading.Event()))
    loop.start()
    try:
        assert wait_until(lambda: queue.stats(time.time()).depth == 30, timeout=20)
    finally:
        stop.set()
        loop.join()
    batches = [(key_of(r), len(r.events)) for r in stub.requests]
    assert batches.count(("LIMITED", 10)) == 1  # asked once, then left alone
    assert sum(n for key, n in batches if key != "LIMITED") == 60
    assert all(len({e["properties"]["i"] for e in b}) == len(b) for b in stub.batches)
    left = [(d.name, d.depth) for d in queue.destination_stats(time.time()) if d.depth]
    assert left == [(flusher_module.destination("http://127.0.0.1:9/v1/", "LIMITED"), 30)]


def test_a_drain_delivers_every_other_destination_before_it_stops_on_a_refused_key(path):
    """A revoked key holds back its own source only: a drain sends the others' events,
    then stops (not at the first 401) with the refused source's events kept."""
    def handler(request):
        return 401 if key_of(request) == "REVOKED" else 200

    enqueue_interleaved(path, ("REVOKED", "WEB", "CRON"), 50)
    flusher, stub, queue = make(path, handler, max_batch_size=10, max_in_flight=1)
    assert flusher.run(threading.Event(), threading.Event(), drain=True) is False
    assert len([e for b in stub.batches for e in b]) == 100  # every accepted source
    assert queue.stats(time.time()).depth == 50
    assert "the receiver answered HTTP 401" in (flusher.counts.misconfigured or "")

