"""The HTTP receiver over real HTTP on loopback, against `ci-receiver serve` as a process."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from receiver import parse_callback
from tests.support.callbacks import ALL, load
from tests.support.cli import ci_receiver
from tests.support.handler_doubles import PLANNED, recorded
from tests.support.processes import Receiver
from tests.support.waiting import wait_until


def serve(tmp_path: Path, extra: str = "", *, recorder: str = "") -> Receiver:
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[dispatch]
poll_interval = 0.2
[handlers.jobs]
type = "sqlite"
path = "{tmp_path / "jobs.db"}"
[handlers.log]
type = "log"
[handlers.recorder]
type = "tests.support.handler_doubles:Recorder"
path = "{tmp_path / "recorded.jsonl"}"
backoff_initial = 0.1
backoff_max = 0.2
{recorder}
{extra}
"""
    )
    return Receiver(config).start()


@pytest.fixture
def receiver(tmp_path):
    process = serve(tmp_path)
    yield process
    process.stop()


def inbox_rows(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "data" / "inbox.db") as connection:
        return connection.execute(sql).fetchall()


def test_every_fixture_is_accepted_stored_once_and_handled(receiver, tmp_path):
    seen: set[str] = set()
    for name in ALL:
        expected = [event.id for event in parse_callback(load(name))]
        response = receiver.post(load(name))
        assert response.status_code == 200, (name, response.text)
        answer = response.json()
        assert answer["ids"] == expected
        assert answer["accepted"] == len(set(expected) - seen), name
        assert answer["duplicates"] == len(set(expected) & seen), name
        seen.update(expected)
    # Each event is stored once and run once by every handler.
    assert sorted(row[0] for row in inbox_rows(tmp_path, "SELECT id FROM events")) == sorted(seen)
    assert len(inbox_rows(tmp_path, "SELECT id FROM receipts")) == len(ALL)
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == len(seen))
    assert sorted(recorded(tmp_path / "recorded.jsonl")) == sorted(seen)
    wait_until(lambda: not inbox_rows(tmp_path, "SELECT 1 FROM runs WHERE status != 'done'"))
    with sqlite3.connect(tmp_path / "jobs.db") as jobs:
        stored_jobs = jobs.execute("SELECT job_id, state FROM ci_jobs").fetchall()
    assert len(stored_jobs) == len({event_id.split(":")[1] for event_id in seen})


def test_a_duplicate_is_answered_200_and_not_handled_again(receiver, tmp_path):
    first = receiver.post(load("transcode.xml"))
    second = receiver.post(load("transcode.xml"))
    third = receiver.post(ci_json_of("transcode.xml"))
    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert [r.json()["accepted"] for r in (first, second, third)] == [1, 0, 0]
    wait_until(lambda: recorded(tmp_path / "recorded.jsonl") == first.json()["ids"])
    time.sleep(0.5)
    assert recorded(tmp_path / "recorded.jsonl") == first.json()["ids"]
    outcomes = inbox_rows(tmp_path, "SELECT outcome FROM receipts ORDER BY id")
    assert outcomes == [("accepted",), ("duplicate",), ("duplicate",)]
    logged = [orjson.loads(line) for line in receiver.log().splitlines() if "duplicate" in line]
    assert [(line["level"], line["event"], line["event_id"]) for line in logged] == [
        ("info", "duplicate event; already stored", first.json()["ids"][0])
    ] * 2


def ci_json_of(name: str) -> bytes:
    from tests.support.callbacks import ci_json_from_xml

    return ci_json_from_xml(load(name))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"hello", "not_xml_or_json"),
        (b"<Response><JobsDetail>", "malformed_xml"),
        (b'{"JobsDetail": {},}', "malformed_json"),
        (b'<!DOCTYPE r [<!ENTITY a "b">]><Response/>', "forbidden_xml"),
        (b'{"hello": "world"}', "unknown_shape"),
    ],
)
def test_bad_input_is_a_400_with_its_reason_and_the_body_is_kept(receiver, tmp_path, body, reason):
    response = receiver.post(body, headers={"Content-Type": "application/xml"})
    assert response.status_code == 400
    assert response.json()["error"] == reason
    assert response.json()["detail"]
    rows = inbox_rows(tmp_path, "SELECT outcome, error_reason, body, headers FROM receipts")
    assert rows == [("rejected", reason, body, rows[0][3])]
    assert orjson.loads(rows[0][3])["content-type"] == "application/xml"


def test_an_id_field_of_the_wrong_type_is_a_400_naming_it_and_the_body_is_kept(receiver, tmp_path):
    bodies = [
        b'{"JobsDetail": {"JobId": "j1", "State": ["Success"]}}',
        b'{"JobsDetail": {"JobId": {}, "State": "Success"}}',
        b"<Response><JobsDetail><JobId>j1</JobId><State>Success</State><State>Failed</State>"
        b"</JobsDetail></Response>",
    ]
    answers = [receiver.post(body) for body in bodies]
    assert [(a.status_code, a.json()["error"]) for a in answers] == [(400, "bad_id")] * 3
    assert [a.json()["detail"].split(":")[0] for a in answers] == [
        "State is not an id",
        "JobId is not an id",
        "State is not an id",
    ]
    rows = inbox_rows(tmp_path, "SELECT outcome, error_reason, body FROM receipts ORDER BY id")
    assert rows == [("rejected", "bad_id", body) for body in bodies]
    assert inbox_rows(tmp_path, "SELECT count(*) FROM events") == [(0,)]


def test_unreadable_times_and_user_data_are_kept_as_sent_and_counted(receiver, tmp_path):
    detail = {
        "JobId": "j-odd",
        "State": "Success",
        "EndTime": "soon",
        "Operation": {"UserData": {"video_id": 1001}},
    }
    body = orjson.dumps({"JobsDetail": detail})
    assert receiver.post(body).status_code == 200
    assert receiver.post(body).json()["duplicates"] == 1  # counted once
    assert receiver.post(load("transcode.xml")).status_code == 200
    metrics = httpx.get(receiver.admin_url + "/metrics").text
    assert 'ci_receiver_field_warnings_total{field="EndTime"} 1.0' in metrics
    assert 'ci_receiver_field_warnings_total{field="UserData"} 1.0' in metrics
    assert metrics.count("ci_receiver_field_warnings_total{") == 2
    show = [sys.executable, "-m", "receiver.cli", "events", "show", "--json", "job:j-odd:Success"]
    shown = orjson.loads(
        subprocess.run(
            [*show, "--config", str(receiver.config_file)], capture_output=True, check=True
        ).stdout
    )["event"]
    assert (shown["finished_at"], shown["user_data"]) == (None, '{"video_id":1001}')
    assert shown["raw"]["JobsDetail"] == detail
    assert "callback fields not understood" in receiver.log()


def test_a_warning_is_counted_when_its_entry_is_first_stored(receiver, tmp_path):
    known = {"JobId": "j-known", "State": "Success", "EndTime": "soon"}
    assert receiver.post(orjson.dumps({"JobsDetail": known})).json()["accepted"] == 1
    # An id that only informs, of the wrong type, is kept (not a 400) and counted.
    fresh = {"JobId": "j-new", "State": "Success", "Code": [], "Operation": {"TemplateId": {}}}
    both = orjson.dumps({"JobsDetail": [known, fresh]})
    answer = receiver.post(both).json()
    assert (answer["accepted"], answer["duplicates"]) == (1, 1)
    assert receiver.post(both).json()["accepted"] == 0
    metrics = httpx.get(receiver.admin_url + "/metrics").text
    counted = [
        line for line in metrics.splitlines() if line.startswith("ci_receiver_field_warnings_total")
    ]
    assert sorted(counted) == [
        'ci_receiver_field_warnings_total{field="Code"} 1.0',
        'ci_receiver_field_warnings_total{field="EndTime"} 1.0',
        'ci_receiver_field_warnings_total{field="TemplateId"} 1.0',
    ]
    stored = inbox_rows(tmp_path, "SELECT id FROM events ORDER BY id")
    assert stored == [("job:j-known:Success",), ("job:j-new:Success",)]


def test_a_body_over_the_limit_is_refused_early(tmp_path):
    receiver = serve(tmp_path, "[limits]\nmax_bytes = 1000\n")
    try:
        declared = receiver.post(b"<" + b"x" * 2000)
        assert declared.status_code == 413
        assert declared.json()["error"] == "too_large"

        def chunks():  # no Content-Length: the limit is found while streaming
            yield b"<Response>"
            for _ in range(100):
                yield b"x" * 100

        streamed = httpx.post(receiver.url + "/callbacks", content=chunks(), timeout=10)
        assert streamed.status_code == 413
        rows = inbox_rows(
            tmp_path, "SELECT outcome, error_reason, size, length(body) FROM receipts"
        )
        assert rows[0] == ("rejected", "too_large", 2001, 0)
        assert rows[1][:2] == ("rejected", "too_large")
        assert rows[1][2] > 1000
        assert receiver.post(load("transcode.xml")[:1000]).status_code == 400  # within: decoded
    finally:
        receiver.stop()


def test_unknown_paths_and_methods_get_json_errors(receiver):
    missing = httpx.get(receiver.url + "/nope")
    assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
    wrong = httpx.get(receiver.url + "/callbacks")
    assert (wrong.status_code, wrong.json()["error"]) == (405, "method_not_allowed")


def test_tokens_guard_the_callback_url_and_stay_out_of_the_logs(tmp_path):
    receiver = serve(tmp_path, '[http]\ntokens = ["s3cret-one", "s3cret-two"]\n')
    try:
        assert receiver.post(load("transcode.xml")).status_code == 401
        assert receiver.post(load("transcode.xml"), path="/callbacks/wrong").status_code == 401
        assert receiver.post(load("transcode.xml"), path="/callbacks/s3cret-two").status_code == 200
        assert inbox_rows(tmp_path, "SELECT count(*) FROM receipts") == [(1,)]
    finally:
        receiver.terminate()
    assert "s3cret" not in receiver.log()
    assert '"path":"/callbacks/{token}"' in receiver.log()


def test_health_readiness_and_metrics(receiver):
    assert httpx.get(receiver.url + "/healthz").json() == {"status": "ok"}
    # The public port tells a load balancer ready or not, and nothing more.
    assert httpx.get(receiver.url + "/readyz").json() == {"ready": True}
    assert httpx.get(receiver.url + "/metrics").status_code == 404
    ready = httpx.get(receiver.admin_url + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["inbox"] == "writable"
    assert ready.json()["checks"]["handler:jobs"] == "started"
    assert ready.json()["checks"]["disk"].endswith("MiB free")
    receiver.post(load("transcode.xml"))
    receiver.post(b"nope")
    metrics = httpx.get(receiver.admin_url + "/metrics").text
    assert 'ci_receiver_callbacks_total{outcome="accepted",source="http"} 1.0' in metrics
    assert 'ci_receiver_callbacks_total{outcome="rejected",source="http"} 1.0' in metrics
    assert 'ci_receiver_events_total{kind="job",state="Success"} 1.0' in metrics
    # A state CI does not document is counted, but cannot make series of its own.
    receiver.post(b'{"JobsDetail": {"JobId": "j1", "State": "Whatever-1"}}')
    receiver.post(b'{"JobsDetail": {"JobId": "j2", "State": "Whatever-2"}}')
    metrics = httpx.get(receiver.admin_url + "/metrics").text
    assert 'ci_receiver_events_total{kind="job",state="other"} 2.0' in metrics
    assert "Whatever" not in metrics


def test_the_request_id_is_echoed_and_carried_into_handler_logs(receiver):
    response = receiver.post(load("smartcover.xml"), headers={"X-Request-Id": "ci-abc-123"})
    assert response.headers["x-request-id"] == "ci-abc-123"
    generated = receiver.post(load("transcode.xml")).headers["x-request-id"]
    wait_until(lambda: receiver.log().count('"logger":"ci_receiver.events"') >= 2)
    handled = [
        orjson.loads(line) for line in receiver.log().splitlines() if '"ci_receiver.events"' in line
    ]
    assert {(line["request_id"], line["tag"]) for line in handled} == {
        ("ci-abc-123", "SmartCover"),
        (generated, "Transcode"),
    }


def test_moderation_callbacks_with_their_header(receiver):
    response = receiver.post(
        load("moderation_video_simple.json"),
        headers={"Content-Type": "application/json", "X-Ci-Content-Version": "Simple"},
    )
    assert response.json()["ids"] == ["moderation:test_trace_id:Success:0"]


def test_a_failing_handler_is_retried_and_the_others_are_not_rerun(tmp_path):
    receiver = serve(tmp_path, recorder="fail_first = 2")
    try:
        (event_id,) = receiver.post(load("transcode.xml")).json()["ids"]
        wait_until(lambda: recorded(tmp_path / "recorded.jsonl") == [event_id])
        wait_until(lambda: not inbox_rows(tmp_path, "SELECT 1 FROM runs WHERE status != 'done'"))
        attempts = inbox_rows(
            tmp_path, "SELECT handler, number, outcome FROM attempts ORDER BY handler, number"
        )
    finally:
        receiver.terminate()
    assert attempts == [
        ("jobs", 1, "done"),
        ("log", 1, "done"),
        ("recorder", 1, "retry"),
        ("recorder", 2, "retry"),
        ("recorder", 3, "done"),
    ]
    assert recorded(tmp_path / "recorded.jsonl", "failed") == [event_id, event_id]


def test_dead_letters_then_replay(tmp_path):
    receiver = serve(tmp_path, recorder="fail_first = 5\nmax_attempts = 2")
    config = tmp_path / "ci-receiver.toml"
    try:
        (event_id,) = receiver.post(load("transcode.xml")).json()["ids"]
        wait_until(
            lambda: (
                inbox_rows(tmp_path, "SELECT status, attempts FROM runs WHERE handler = 'recorder'")
                == [("dead", 2)]
            )
        )
        replay = ci_receiver(config, "replay", "--dead", env={"PATH": ""}, text=True, ok=True)
        assert replay.stdout.strip() == "1 run(s) queued again, of 1 event(s)"
        wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl", "failed")) == 4)
        wait_until(
            lambda: (
                inbox_rows(tmp_path, "SELECT status, attempts FROM runs WHERE handler = 'recorder'")
                == [("dead", 2)]
            )
        )
    finally:
        receiver.terminate()
    listed = ci_receiver(
        config, "events", "list", "--status", "dead", "--json", env={"PATH": ""}, text=True, ok=True
    )
    (row,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert row["id"] == event_id
    assert row["handlers"]["recorder"] == {
        "status": "dead",
        "attempts": 2,
        "error": PLANNED.format(4, 5),
    }
    assert row["handlers"]["jobs"]["status"] == "done"
