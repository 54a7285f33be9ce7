"""Building, validating and encoding one event: the payload of each type and each
refusal, which names the field."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import segmentry
from segmentry import messages as m
from segmentry.exceptions import InvalidMessage, MessageTooLarge

NOW = 1_795_733_103.373


def decode(encoded):
    return json.loads(encoded.body)


def track(**kw):
    fields = {"event": kw.pop("event", "Signed Up"), "properties": kw.pop("properties", None)}
    return m.encode("track", kw.pop("user_id", "u1"), fields, NOW, **kw)


class Color(enum.Enum):
    RED = "red"


def test_track_payload_has_segments_wire_names_and_fixed_fields():
    event = decode(track(properties={"plan": "pro"}, anonymous_id="a1",
                         integrations={"All": False}, context={"ip": "1.2.3.4"}))
    assert event["type"] == "track"
    assert event["userId"] == "u1" and event["anonymousId"] == "a1"
    assert event["event"] == "Signed Up" and event["properties"] == {"plan": "pro"}
    assert event["integrations"] == {"All": False}
    assert event["context"] == {"ip": "1.2.3.4", "library": m.LIBRARY}
    assert event["timestamp"] == "2026-11-26T22:45:03.373Z"
    assert uuid.UUID(event["messageId"]).version == 4


@pytest.mark.parametrize("type_, fields, expected", [
    ("identify", {"traits": {"email": "a@b.c"}}, {"traits": {"email": "a@b.c"}}),
    ("page", {"name": "Pricing", "properties": {"x": 1}, "category": "Docs"},
     {"name": "Pricing", "properties": {"x": 1}, "category": "Docs"}),
    ("screen", {"name": "Home", "properties": None, "category": None}, {"name": "Home"}),
    ("group", {"groupId": "org-9", "traits": {"name": "Acme"}},
     {"groupId": "org-9", "traits": {"name": "Acme"}}),
    ("alias", {"previousId": "anon-42"}, {"previousId": "anon-42"}),
])
def test_each_type_carries_its_own_fields(type_, fields, expected):
    event = decode(m.encode(type_, "u1", fields, NOW))
    assert event["type"] == type_
    assert {k: event[k] for k in expected} == expected
    assert "sentAt" not in event


def test_the_body_starts_with_its_type_so_it_can_be_read_without_decoding():
    for type_ in m.TYPES:
        fields = {"event": "E"} if type_ == "track" else {}
        fields.update({"group": {"groupId": "g"}, "alias": {"previousId": "p"}}.get(type_, {}))
        assert m.type_of(m.encode(type_, "u", fields, NOW).body) == type_


def test_dataclass_form_encodes_like_the_positional_form():
    msg = m.Track(user_id="u1", event="E", properties={"a": 1}, message_id="mid-1",
                  context=m.Context(active=False, user_agent="ua"))
    event = decode(m.encode_message(msg, NOW))
    assert event["messageId"] == "mid-1"
    assert event["context"] == {"active": False, "userAgent": "ua", "library": m.LIBRARY}


def test_ids_become_strings():
    event = decode(m.encode("group", 42, {"groupId": 7}, NOW))
    assert event["userId"] == "42" and event["groupId"] == "7"


def test_usual_python_values_convert_to_json():
    props = {"when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
             "day": dt.date(2026, 1, 2), "price": decimal.Decimal("9.5"),
             "id": uuid.UUID(int=1), "color": Color.RED, "tags": {"b"}, "pair": (1, 2)}
    event = decode(track(properties=props))
    assert event["properties"] == {
        "when": "2026-01-02T03:04:05+00:00", "day": "2026-01-02", "price": 9.5,
        "id": str(uuid.UUID(int=1)), "color": "red", "tags": ["b"], "pair": [1, 2]}


@pytest.mark.parametrize("kw, field", [
    ({"user_id": None}, "user_id"),
    ({"user_id": ""}, "user_id"),
    ({"user_id": 1.5}, "user_id"),
    ({"event": None}, "event"),
    ({"event": 3}, "event"),
    ({"properties": ["not", "a", "dict"]}, "properties"),
    ({"properties": {"bad": object()}}, "bad"),
    ({"properties": {"nested": {"deep": [1, b"bytes"]}}}, "nested.deep[1]"),
    ({"properties": {"nan": float("nan")}}, "nan"),
    ({"timestamp": dt.datetime(2026, 1, 1)}, "timestamp"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"timestamp": True}, "timestamp"),
    ({"message_id": "x" * 100}, "message_id"),
    ({"context": "not a dict"}, "context"),
    ({"integrations": ["All"]}, "integrations"),
])
def test_bad_input_is_refused_naming_the_field(kw, field):
    with pytest.raises(InvalidMessage) as info:
        track(**kw)
    assert field in str(info.value)


def test_group_and_alias_require_their_second_id():
    with pytest.raises(InvalidMessage, match="group_id"):
        m.encode("group", "u", {"groupId": None}, NOW)
    with pytest.raises(InvalidMessage, match="previous_id"):
        m.encode("alias", "u", {"previousId": ""}, NOW)


def test_anonymous_id_alone_is_enough():
    assert "userId" not in decode(track(user_id=None, anonymous_id="anon"))


def test_an_event_over_32_kb_is_too_large():
    with pytest.raises(MessageTooLarge, match="32768"):
        track(properties={"blob": "x" * m.MAX_EVENT_BYTES})
    assert len(track(properties={"blob": "x" * 30_000}).body) <= m.MAX_EVENT_BYTES


def test_a_given_timestamp_is_normalised_to_utc_with_milliseconds():
    paris = dt.timezone(dt.timedelta(hours=1))
    when = dt.datetime(2026, 1, 1, 13, 0, 0, 250000, tzinfo=paris)
    assert decode(track(timestamp=when))["timestamp"] == "2026-01-01T12:00:00.250Z"
    assert decode(track(timestamp="2026-01-01T12:00:00Z"))["timestamp"] == \
        "2026-01-01T12:00:00.000Z"


@pytest.mark.parametrize("when", [
    1e20,  # past time_t
    1_700_000_000_000_000,  # microseconds taken for seconds: year 50 million
    dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-1))),  # year 10000 in UTC
])
def test_a_timestamp_out_of_range_is_an_invalid_message_naming_it(when):
    with pytest.raises(InvalidMessage, match="timestamp") as excinfo:
        track(timestamp=when)
    assert excinfo.value.field == "timestamp"


def test_an_empty_message_id_gets_a_fresh_one_not_one_shared_by_all():
    ids = {json.loads(track(message_id="").body)["messageId"] for _ in range(3)}
    assert len(ids) == 3 and all(uuid.UUID(i).version == 4 for i in ids)


def test_a_container_that_contains_itself_is_refused_as_a_circular_reference():
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(InvalidMessage, match="circular reference") as info:
        track(properties=loop)
    assert info.value.field.startswith("properties.self")
    items: list = []
    items.append({"again": items})
    with pytest.raises(InvalidMessage, match=r"properties\.list\[0\]\.again: circular"):
        track(properties={"list": items})


def test_a_value_nested_too_deeply_says_so():
    deep: dict = {}
    inner = deep
    for _ in range(100_000):  # deeper than any Python's encoder goes (3.13 goes past 5000)
        inner["n"] = inner = {}
    with pytest.raises(InvalidMessage, match="nested too deeply"):
        track(properties=deep)


@pytest.mark.parametrize("year", [1, 999, 1000])
def test_a_timestamp_before_year_1000_is_written_with_four_digits(year):
    when = dt.datetime(year, 3, 4, 5, 6, 7, 8000, tzinfo=dt.timezone.utc)
    assert decode(track(timestamp=when))["timestamp"] == f"{year:04d}-03-04T05:06:07.008Z"


def test_datetime_min_as_a_timestamp_is_readable_iso_8601():
    text = decode(track(timestamp=dt.datetime.min.replace(tzinfo=dt.timezone.utc)))["timestamp"]
    assert text == "0001-01-01T00:00:00.000Z"
    assert dt.datetime.fromisoformat(text.replace("Z", "+00:00")).year == 1


LONE = "bad \ud800"


@pytest.mark.parametrize("kw, field", [
    ({"user_id": LONE}, "user_id"),
    ({"user_id": None, "anonymous_id": "x\udfff"}, "anonymous_id"),
    ({"event": LONE}, "event"),
    ({"properties": {"plan": LONE}}, "properties.plan"),
    ({"properties": {LONE: 1}}, "properties.bad \\ud800"),
    ({"properties": {"a": {"b": ["ok", "\udc00 low"]}}}, "properties.a.b[1]"),
    ({"properties": {"set": {"\udbff"}}}, "properties.set[0]"),
    ({"properties": {"pair reversed": "\udc00\ud800"}}, "properties.pair reversed"),
    ({"context": {"traits": {"name": LONE}}}, "context.traits.name"),
    ({"integrations": {"Amplitude": {"id": LONE}}}, "integrations.Amplitude.id"),
    ({"message_id": "m-\ud800"}, "message_id"),
])
def test_a_lone_surrogate_is_refused_naming_the_field(kw, field):
    with pytest.raises(InvalidMessage, match="lone surrogate") as info:
        track(**kw)
    assert info.value.field == field
    str(info.value).encode("utf-8")  # the message itself can be logged


@pytest.mark.parametrize("text", [
    "thumbs \U0001F44D", "\U0001F44D\U0001F44D", "text \\ud800 that only looks like one",
    "\\\U0001F44D", "\ud7ff\ue000 around the range", "中文",
])
def test_valid_text_near_a_surrogate_is_kept_as_given(text):
    event = decode(track(user_id=text, event=text, properties={text: text}))
    assert event["userId"] == event["event"] == text and event["properties"] == {text: text}


@given(st.text(st.sampled_from(["\\", "u", "d", "8", "c", "0", '"', "a", "\ud800", "\udbff",
                                "\udc00", "\udfff", "\U0001F44D", "\ud7ff"]), max_size=8))
def test_an_event_is_refused_exactly_when_the_receiver_could_not_read_it_as_utf8(text):
    try:
        json.loads(json.dumps(text)).encode("utf-8")  # what the receiver reads
        readable = True
    except UnicodeEncodeError:
        readable = False
    try:
        body = track(properties={"p": text}).body
    except InvalidMessage as exc:
        assert not readable and exc.field == "properties.p"
    else:
        assert readable
        assert json.loads(body)["properties"]["p"] == json.loads(json.dumps(text))


@pytest.mark.parametrize("msg, call, right", [
    (m.Identify(user_id="u1"), "track", "identify"),
    (m.Track(user_id="u1", event="E"), "identify", "track"),
    (m.Alias(user_id="u1", previous_id="p"), "page", "alias"),
])
def test_a_message_given_to_another_call_names_the_call_to_use(msg, call, right):
    fields = {"event": "E"} if call == "track" else {}
    with pytest.raises(InvalidMessage) as info:
        m.encode(call, msg, fields, NOW)
    text = str(info.value)
    assert f"{call}() was given a" in text and type(msg).__name__ in text
    assert f"client.{right}(msg)" in text and "client.send(msg)" in text
    assert info.value.field == "user_id"


def test_client_track_given_an_identify_names_the_mistake(tmp_path):
    client = segmentry.Client("K", queue_path=str(tmp_path / "q.db"), flusher=None)
    try:
        with pytest.raises(InvalidMessage, match=r"track\(\) was given an Identify message"):
            client.track(segmentry.Identify(user_id="u1"))
    finally:
        client.close()


def test_splice_batch_is_valid_json_without_decoding_events():
    bodies = [track().body, track().body]
    batch = json.loads(m.splice_batch(bodies, "2026-01-01T00:00:00.000Z"))
    assert [e["messageId"] for e in batch["batch"]] == \
        [json.loads(b)["messageId"] for b in bodies]
    assert batch["sentAt"] == "2026-01-01T00:00:00.000Z"


def test_message_ids_are_unique_uuid4_strings():
    ids = {m.new_message_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 4 for i in ids)


def test_the_body_is_compact_ascii_json_with_its_members_in_wire_order():
    event = m.encode("page", 5, {"name": "Home", "properties": {"é": 1.5}, "category": "Docs"},
                     NOW, anonymous_id="a", context={"ip": "1"}, integrations={"All": False},
                     message_id='m"1')
    decoded = json.loads(event.body)
    assert list(decoded) == ["type", "userId", "anonymousId", "name", "properties", "category",
                             "context", "integrations", "timestamp", "messageId"]
    assert event.body == json.dumps(decoded, separators=(",", ":"))  # ASCII, nothing extra
    assert decoded["context"] == {"ip": "1", "library": m.LIBRARY}
    assert event.message_id == decoded["messageId"] == 'm"1'
