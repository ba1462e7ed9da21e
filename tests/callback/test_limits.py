"""Limits that hold: no value the limits allow reaches a recursion limit anywhere (decode,
normalize, to_json, the inbox), attributes count as elements, and id fields are ids."""

from __future__ import annotations

import sqlite3

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver import Event, PayloadError, parse_callback
from receiver.callback.decode import Limits
from receiver.callback.fields import MAX_ID_LENGTH
from tests.support.processes import Receiver

DEEPEST = Limits(max_depth=200, max_bytes=4 * 1024 * 1024)  # the documented maximum


def job(inside: bytes) -> bytes:
    return (
        b"<Response><JobsDetail><JobId>j1</JobId><State>Success</State><Operation>"
        + inside
        + b"</Operation></JobsDetail></Response>"
    )


def nested_xml(levels: list[bool]) -> bytes:
    """One element per level; a level marked True repeats its element, which makes a
    list of dicts there (two levels of the document for one of XML)."""
    opening = b"".join(b"<a><a/>" if repeated else b"<a>" for repeated in levels)
    return job(opening + b"x" + b"</a>" * len(levels))


def nested_json(levels: list[bool]) -> bytes:
    value: object = "x"
    for as_list in reversed(levels):
        value = [value] if as_list else {"a": value}
    return orjson.dumps({"JobsDetail": {"JobId": "j1", "State": "Success", "Operation": value}})


def stored_and_read_back(events: list[Event]) -> None:
    for event in events:
        assert Event.from_json(event.to_json()) == event
        orjson.dumps({"event": event.to_dict()}, option=orjson.OPT_INDENT_2)  # events show


@given(st.lists(st.booleans(), max_size=210), st.sampled_from([nested_xml, nested_json]))
def test_a_document_within_the_deepest_limit_serializes_or_is_refused_as_too_deep(levels, render):
    try:
        events = parse_callback(render(levels), limits=DEEPEST)
    except PayloadError as error:
        refused = error.reason
    else:
        refused = None
        stored_and_read_back(events)
    assert refused in (None, "too_deep")


def test_the_limit_is_the_depth_of_the_document():
    # JobsDetail, Operation and the document itself are levels too.
    deepest = [False] * (200 - 3)
    stored_and_read_back(parse_callback(nested_json(deepest), limits=DEEPEST))
    with pytest.raises(PayloadError, match="too_deep"):
        parse_callback(nested_json([*deepest, False]), limits=DEEPEST)
    # A repeated XML element is a list of dicts: two levels of the document. 130 such
    # levels once passed the element count (130 < 200) and broke the inbox's JSON.
    with pytest.raises(PayloadError, match="too_deep"):
        parse_callback(nested_xml([True] * 130), limits=DEEPEST)
    stored_and_read_back(parse_callback(nested_xml([True] * 90), limits=DEEPEST))
    stored_and_read_back(parse_callback(nested_xml([False] * 190), limits=DEEPEST))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("JobId", "j1\x00"),
        ("JobId", "j" * 900_000),
        ("JobId", "j1\nINFO forged log line"),
        ("State", "Success" * 40),
        ("Tag", "Smart Cover"),
        ("QueueId", "p\u202e1"),
    ],
)
def test_an_id_field_that_is_no_id_is_refused_with_its_name(field, value):
    detail = {"JobId": "j1", "State": "Success", "Tag": "SmartCover", field: value}
    body = orjson.dumps({"JobsDetail": detail})
    with pytest.raises(PayloadError) as refused:
        parse_callback(body, limits=DEEPEST)
    assert refused.value.reason == "bad_id"
    assert refused.value.message.startswith(f"{field} is not an id")


def test_ids_as_ci_writes_them_pass():
    for job_id in ("j6842765cf84611ecb8546d80f2baf56f", "j96ca39faebe411eda9b5*********", 12345):
        detail = {"JobId": job_id, "State": "Success", "Tag": "SmartCover"}
        (event,) = parse_callback(orjson.dumps({"JobsDetail": detail}))
        assert event.job_id == str(job_id)
    (event,) = parse_callback(orjson.dumps({"JobsDetail": {"JobId": "j" * MAX_ID_LENGTH}}))
    assert len(event.job_id) == MAX_ID_LENGTH


def test_workflow_and_moderation_ids_are_checked_too():
    workflow = {"WorkflowExecution": {"RunId": "i\x01", "State": "Success"}}
    simple = {"code": 0, "data": {"trace_id": "t" * 200, "event": "ReviewImage"}}
    for document in (workflow, simple):
        with pytest.raises(PayloadError, match="bad_id"):
            parse_callback(orjson.dumps(document))


def test_over_http_the_deepest_limit_gives_400s_and_keeps_them(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[limits]\nmax_depth = 200\nmax_bytes = 2000000\n'
    )
    receiver = Receiver(config).start()
    try:
        assert receiver.post(nested_xml([True] * 90)).status_code == 200
        too_deep = receiver.post(nested_xml([True] * 130))
        assert (too_deep.status_code, too_deep.json()["error"]) == (400, "too_deep")
        huge_id = orjson.dumps({"JobsDetail": {"JobId": "j" * 900_000, "State": "Success"}})
        refused = receiver.post(huge_id)
        assert (refused.status_code, refused.json()["error"]) == (400, "bad_id")
        assert receiver.post(orjson.dumps({"JobsDetail": {"JobId": "j\x00"}})).status_code == 400
    finally:
        receiver.terminate()
    with sqlite3.connect(tmp_path / "data" / "inbox.db") as inbox:
        outcomes = inbox.execute(
            "SELECT outcome, error_reason FROM receipts ORDER BY id"
        ).fetchall()
    assert outcomes == [
        ("accepted", None),
        ("rejected", "too_deep"),
        ("rejected", "bad_id"),
        ("rejected", "bad_id"),
    ]
