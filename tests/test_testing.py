"""The shipped test seam: a stub adapter answering from a function of the request, and a
recorder of what the receiver accepted."""

from __future__ import annotations

import gzip
import threading

import pytest
import requests

import segmentry.http as sh
from segmentry import testing
from segmentry.exceptions import NetworkError
from segmentry.messages import Track
from segmentry.testing import RecordedRequest, Recorder, Stub, StubAdapter, sequence

URL = "https://receiver.test/v1/batch"


def session_on(adapter) -> requests.Session:
    """A plain requests session: the stub is an ordinary requests adapter."""
    session = requests.Session()
    session.mount("https://", adapter)
    return session


def post(adapter, body=None, **kwargs) -> requests.Response:
    payload = {"batch": [{"type": "track", "event": "E"}]} if body is None else body
    return session_on(adapter).post(URL, json=payload, **kwargs)


def test_a_stub_answers_200_success_and_records_by_default():
    stub = Stub()
    http = sh.client("KEY", adapter=stub)
    sh.batch(http, [Track(user_id="u", event="E")])
    assert stub.events[0]["event"] == "E"
    assert stub.batches == [stub.events]
    assert stub.requests[0].status == 200


def test_a_bare_2xx_status_answers_segments_success_body():
    assert post(Stub(lambda request: 200)).json() == {"success": True}
    assert post(Stub(lambda request: 201)).status_code == 201


@pytest.mark.parametrize("answer, status, content, content_type", [
    (503, 503, b"", None),
    ((400, "bad event"), 400, b"bad event", None),
    ((413, b"\x00raw"), 413, b"\x00raw", None),
    ((200, {"success": True}), 200, b'{"success": true}', "application/json"),
    ((200, [1, 2]), 200, b"[1, 2]", "application/json"),
    ((429, "", {"Retry-After": "3"}), 429, b"", None),
    ((200, {"a": 1}, {"Content-Type": "text/x"}), 200, b'{"a": 1}', "text/x"),
])
def test_a_handler_answer_becomes_a_real_response(answer, status, content, content_type):
    response = post(StubAdapter(lambda request: answer))
    assert isinstance(response, requests.Response)
    assert response.status_code == status and response.content == content
    assert response.headers.get("Content-Type") == content_type
    assert response.url == URL and response.request.method == "POST"


def test_a_reason_phrase_is_given_when_the_status_has_one():
    assert post(StubAdapter(lambda request: 503)).reason == "Service Unavailable"
    assert post(StubAdapter(lambda request: 460)).reason == ""


def test_headers_of_an_answer_reach_the_response():
    response = post(StubAdapter(lambda request: (429, "", {"Retry-After": "3"})))
    assert response.headers["retry-after"] == "3"
    assert sh.retry_after_s(response) == 3.0


@pytest.mark.parametrize("answer", ["200", (200,), (200, "", {}, "extra"), 42, 600, True])
def test_a_malformed_answer_is_a_type_error(answer):
    with pytest.raises(TypeError, match="stub handler"):
        post(StubAdapter(lambda request: answer))


def test_the_handler_sees_the_prepared_request():
    seen = []
    post(StubAdapter(lambda request: seen.append(request) or 200), headers={"X-A": "1"})
    (request,) = seen
    assert isinstance(request, requests.PreparedRequest)
    assert request.headers["X-A"] == "1" and request.url == URL


@pytest.mark.parametrize("error", [requests.ConnectionError, requests.Timeout])
def test_a_raising_handler_plays_a_network_failure(error):
    stub = Stub(sequence(error))
    with pytest.raises(error):
        post(stub)
    assert [r.status for r in stub.requests] == [None]
    assert stub.batches == []
    http = sh.client("KEY", adapter=stub, retry_attempts=0)
    with pytest.raises(NetworkError):
        sh.batch(http, [Track(user_id="u", event="E")])


def test_the_recorder_keeps_every_request_but_only_accepted_batches():
    stub = Stub(sequence(503, 200))
    http = sh.client("KEY", adapter=stub, retry_start=1, retry_expiry=1)
    sh.batch(http, [Track(user_id="u", event="A"), Track(user_id="u", event="B")])
    assert [r.status for r in stub.requests] == [503, 200]
    assert [[e["event"] for e in batch] for batch in stub.batches] == [["A", "B"]]
    assert [e["event"] for e in stub.events] == ["A", "B"]


def test_a_recorded_request_has_path_headers_and_decoded_body():
    stub = Stub()
    sh.send(sh.client("KEY", adapter=stub), Track(user_id="u", event="Solo"))
    (request,) = stub.requests
    assert isinstance(request, RecordedRequest)
    assert request.method == "POST" and request.path == "/v1/track"
    assert request.headers["authorization"].startswith("Basic ")
    assert request.body["event"] == "Solo" and "sentAt" in request.body
    assert stub.batches == [[request.body]]  # a single-event request is a batch of one


def test_the_recorder_gunzips_bodies():
    stub = Stub()
    sh.batch(sh.client("KEY", adapter=stub, gzip=True), [Track(user_id="u", event="Z")])
    assert stub.requests[0].headers["Content-Encoding"] == "gzip"
    assert stub.events[0]["event"] == "Z"


def test_a_body_that_is_not_json_is_recorded_as_none():
    stub = Stub()
    session_on(stub).post(URL, data=b"\xffnot json")
    session_on(stub).post(URL, data=gzip.compress(b"nope"), headers={"Content-Encoding": "gzip"})
    assert [r.body for r in stub.requests] == [None, None]
    assert stub.events == []


def test_clear_forgets_what_was_recorded():
    stub = Stub()
    post(stub)
    stub.clear()
    assert stub.requests == [] and stub.batches == [] and stub.events == []
    post(stub)
    assert len(stub.requests) == 1


def test_a_recorder_can_be_fed_by_a_receiver_of_your_own():
    recorder = Recorder()
    recorder.add(RecordedRequest("POST", "/v1/batch", {}, {"batch": [{"event": "X"}]}, 200))
    recorder.add(RecordedRequest("POST", "/v1/batch", {}, {"batch": [{"event": "Y"}]}, 500))
    assert recorder.events == [{"event": "X"}]


def test_sequence_answers_in_order_then_repeats_the_last():
    handler = sequence(503, (429, ""), 200)
    answers = [handler(None) for _ in range(5)]  # type: ignore[arg-type]
    assert answers == [503, (429, ""), 200, 200, 200]


def test_sequence_raises_exception_classes_and_instances():
    boom = requests.Timeout("slow")
    handler = sequence(requests.ConnectionError, boom, 200)
    with pytest.raises(requests.ConnectionError):
        handler(None)  # type: ignore[arg-type]
    with pytest.raises(requests.Timeout) as excinfo:
        handler(None)  # type: ignore[arg-type]
    assert excinfo.value is boom
    assert handler(None) == 200  # type: ignore[arg-type]


def test_an_exception_repeated_by_sequence_keeps_a_short_traceback():
    handler = sequence(requests.Timeout("slow"))
    for _ in range(50):
        with pytest.raises(requests.Timeout) as excinfo:
            handler(None)  # type: ignore[arg-type]
    depth = 0
    tb = excinfo.value.__traceback__
    while tb is not None:
        depth, tb = depth + 1, tb.tb_next
    assert depth <= 3  # this test and the handler, not every earlier raise


@pytest.mark.parametrize("body", [None, 3, object()])
def test_a_body_a_stub_cannot_send_is_a_clear_type_error(body):
    with pytest.raises(TypeError, match="stub handler's body must be"):
        post(StubAdapter(lambda request: (503, body)))


def test_sequence_needs_an_answer():
    with pytest.raises(ValueError):
        sequence()


def test_a_stub_is_safe_to_share_between_threads():
    stub = Stub(sequence(*([503] * 50), 200))
    # More retries than 503s in the sequence: every batch gets through, whatever the order.
    http = sh.client("KEY", adapter=stub, retry_attempts=60, retry_start=1, retry_expiry=1)
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(25):
            sh.batch(http, [Track(user_id="u", event=f"{n}-{i}")])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(e["event"] for e in stub.events) == sorted(
        f"{n}-{i}" for n in range(8) for i in range(25))
    assert len(stub.requests) == 200 + 50


def test_the_module_documents_its_public_names():
    assert {"Stub", "StubAdapter", "Recorder", "sequence"} <= set(testing.__all__)
