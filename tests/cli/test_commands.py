"""The ci-receiver command as a user types it."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest

from receiver import parse_callback
from receiver.testing import sample_body
from tests.support.callbacks import load, path
from tests.support.cli import cli
from tests.support.handler_doubles import recorded
from tests.support.processes import REPO, Receiver
from tests.support.waiting import wait_until


def recorder(tmp_path: Path, name: str, file: str, options: str = "") -> str:
    """The `[handlers.NAME]` table of a Recorder writing to `tmp_path / file`."""
    return (
        f'[handlers.{name}]\ntype = "tests.support.handler_doubles:Recorder"\n'
        f'path = "{tmp_path / file}"\n{options}'
    )


def write_config(tmp_path: Path, *tables: str) -> Path:
    """ci-receiver.toml in `tmp_path`: its data folder, a quick dispatch poll, `tables`."""
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[dispatch]\npoll_interval = 0.1\n' + "".join(tables)
    )
    return config


@pytest.fixture
def receiver(tmp_path):
    config = write_config(
        tmp_path,
        recorder(tmp_path, "recorder", "recorded.jsonl"),
        recorder(tmp_path, "later", "later.jsonl"),
        '[[routes]]\nhandlers = ["recorder"]\n',
    )
    process = Receiver(config).start()
    yield process
    process.stop()


def test_send_posts_a_file_and_prints_the_answer(receiver, tmp_path):
    result = cli(
        tmp_path, "send", str(path("smartcover.json")), "--url", receiver.url + "/callbacks"
    )
    assert result.stderr.decode().strip() == "200 OK"
    assert orjson.loads(result.stdout)["ids"] == ["job:j6842765cf84611ecb8546d80f2baf56f:Success"]
    bad = cli(
        tmp_path, "send", str(REPO / "README.md"), "--url", receiver.url + "/callbacks", ok=False
    )
    assert bad.returncode == 1
    assert orjson.loads(bad.stdout)["error"] == "not_xml_or_json"


def test_send_reports_an_unreachable_receiver(tmp_path):
    (tmp_path / "ci-receiver.toml").write_text("")
    result = cli(
        tmp_path,
        "send",
        str(path("smartcover.json")),
        "--url",
        "http://127.0.0.1:9/callbacks",
        ok=False,
    )
    assert result.returncode == 1
    assert b"cannot POST to http://127.0.0.1:9/callbacks" in result.stderr


def test_events_list_and_show(receiver, tmp_path):
    receiver.post(load("transcode.xml"))
    receiver.post(load("smartcover_failed.xml"))
    receiver.post(load("workflow_finish.xml"))
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 3)
    time.sleep(0.3)
    header, *listed = cli(tmp_path, "events", "list").stdout.decode().splitlines()
    assert header.split() == ["RECEIVED", "ID", "EVENT", "TAG", "STATE", "VERDICT", "HANDLERS"]
    assert [line.split()[2:] for line in listed] == [
        [
            "workflow:i166ee19017b011eda8a5525400c540df:WorkflowFinish:Success",
            "WorkflowFinish",
            "-",
            "Success",
            "-",
            "recorder=done",
        ],
        [
            "job:j9f42765cf84611ecb8546d80f2baf5aa:Failed",
            "TaskFinish",
            "SmartCover",
            "Failed",
            "-",
            "recorder=done",
        ],
        [
            "job:j68427030f84611ecb8546d80f2baf56f:Success",
            "TaskFinish",
            "Transcode",
            "Success",
            "-",
            "recorder=done",
        ],
    ]
    # The filters match as routes do: without regard to case, and a workflow (which has
    # no tag) by its event name.
    failed = cli(tmp_path, "events", "list", "--state", "failed", "--json").stdout.splitlines()
    assert [orjson.loads(line)["tag"] for line in failed] == ["SmartCover"]
    workflow = cli(tmp_path, "events", "list", "--tag", "workflowfinish", "--json")
    assert [orjson.loads(line)["kind"] for line in workflow.stdout.splitlines()] == ["workflow"]
    none = cli(tmp_path, "events", "list", "--tag", "Snapshot")
    assert none.stdout == b""
    assert b"no events match --tag Snapshot" in none.stderr
    never = cli(tmp_path, "events", "list", "--state", "done", ok=False)
    assert b"'done' can never match: CI sends Submitted, Running, Success" in never.stderr
    run = cli(tmp_path, "events", "list", "--job", "i166ee19017b011eda8a5525400c540df", "--json")
    assert [orjson.loads(line)["kind"] for line in run.stdout.splitlines()] == ["workflow"]

    shown = cli(tmp_path, "events", "show", "job:j9f42765cf84611ecb8546d80f2baf5aa:Failed")
    lines = shown.stdout.decode().splitlines()
    assert lines[0] == "job:j9f42765cf84611ecb8546d80f2baf5aa:Failed"
    fields = dict(line.strip().split(maxsplit=1) for line in lines[1:4])
    assert fields == {"kind": "job (TaskFinish)", "tag": "SmartCover", "state": "Failed"}
    assert any(line.strip().startswith("error     ResourceDownloadFailed: ") for line in lines)
    assert lines[lines.index("handlers") + 1].strip() == "recorder  done, 1 attempt(s)"
    full = orjson.loads(
        cli(
            tmp_path, "events", "show", "--json", "job:j9f42765cf84611ecb8546d80f2baf5aa:Failed"
        ).stdout
    )
    assert full["event"]["code"] == "ResourceDownloadFailed"
    assert full["event"]["raw"]["JobsDetail"]["Tag"] == "SmartCover"
    assert [(a["handler"], a["outcome"]) for a in full["attempts"]] == [("recorder", "done")]
    missing = cli(tmp_path, "events", "show", "job:nope:Success", ok=False)
    assert b"no event 'job:nope:Success'" in missing.stderr


def test_moderation_verdicts_show_and_filter_in_events_list_and_stats(receiver, tmp_path):
    for name in ("moderation-simple", "moderation-detail", "moderation-suspected"):
        assert receiver.post(sample_body(name)).status_code == 200
    receiver.post(load("transcode.xml"))
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 4)
    header, *listed = cli(tmp_path, "events", "list").stdout.decode().splitlines()
    column = header.split().index("VERDICT") + 1  # RECEIVED is a date and a time
    assert sorted(line.split()[column] for line in listed) == [
        "-", "normal", "suspected", "violation",
    ]  # fmt: skip
    porn = cli(tmp_path, "events", "list", "--verdict", "VIOLATION", "--json")
    assert [orjson.loads(line)["verdict"] for line in porn.stdout.splitlines()] == ["violation"]
    refused = cli(tmp_path, "events", "list", "--verdict", "porn", ok=False)
    assert b"'porn' can never match: CI sends normal, violation, suspected" in refused.stderr
    counts = orjson.loads(cli(tmp_path, "stats", "--json").stdout)
    assert counts["verdicts"] == {"normal": 1, "violation": 1, "suspected": 1}
    assert "moderation events by verdict" in cli(tmp_path, "stats").stdout.decode()


def test_a_run_being_run_shows_where_and_since_when_and_replays_keep_counting(receivers, tmp_path):
    config = write_config(
        tmp_path,
        "[admin]\ninspector = true\n",
        recorder(tmp_path, "slow", "slow.jsonl", "delay = 3\n"),
    )
    receiver = receivers(config, "serve")
    receiver.post(load("transcode.xml"))
    wait_until(lambda: len(recorded(tmp_path / "slow.jsonl", "started")) == 1)
    event_id = "job:j68427030f84611ecb8546d80f2baf56f:Success"
    shown = cli(tmp_path, "events", "show", event_id).stdout.decode().splitlines()
    (run,) = [line.strip() for line in shown if line.strip().startswith("slow ")]
    assert run.startswith(f"slow  running on {socket.gethostname()} (pid ")
    assert run.endswith(", 0 attempt(s) before")
    record = orjson.loads(cli(tmp_path, "events", "show", "--json", event_id).stdout)
    running = record["runs"][0]["running"]
    assert running["on"] == f"{socket.gethostname()} (pid {receiver.process.pid})"
    page = httpx.get(f"{receiver.admin_url}/inspector/events/{quote(event_id, safe='')}")
    assert '<span class="badge running">running</span>' in page.text
    assert f"on {socket.gethostname()} (pid {receiver.process.pid}) since" in page.text
    wait_until(lambda: len(recorded(tmp_path / "slow.jsonl")) == 1, 15)

    cli(tmp_path, "replay", event_id)
    wait_until(lambda: len(recorded(tmp_path / "slow.jsonl")) == 2, 15)
    time.sleep(0.3)
    shown = cli(tmp_path, "events", "show", event_id).stdout.decode().splitlines()
    attempts = [line.split()[3:] for line in shown[shown.index("attempts") + 1 :]]
    assert [words[:3] for words in attempts] == [
        ["slow", "#1", "done"],
        ["slow", "#2", "(replayed)"],
    ]


def test_events_list_json_carries_each_events_source_as_show_does(receiver, tmp_path):
    receiver.post(load("smartcover.xml"))
    receiver.post(load("cmq_envelope_transcode.json"))  # a CMQ topic's JSON push
    pushed = load("workflow_finish.xml")  # its SIMPLIFIED push: the body and CMQ headers
    receiver.post(pushed, headers={"x-cmq-message-id": "m-1", "x-cmq-message-tag": "t"})
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 3)
    listed = [
        orjson.loads(line) for line in cli(tmp_path, "events", "list", "--json").stdout.splitlines()
    ]
    assert [event["source"] for event in listed] == ["cmq-push", "cmq-push", "http"]
    for event in listed:
        shown = orjson.loads(cli(tmp_path, "events", "show", "--json", event["id"]).stdout)
        assert shown["event"]["source"] == event["source"]
    # Read again from its receipt, a pushed event keeps what the push told about it.
    workflow = orjson.loads(cli(tmp_path, "events", "show", "--json", listed[0]["id"]).stdout)
    assert workflow["event"]["source_meta"]["message_id"] == "m-1"


def test_events_show_a_forged_value_does_not_reach_the_terminal_raw(receiver, tmp_path):
    callback = orjson.loads(load("smartcover.json"))
    # A terminal title, a screen clear and a colour, as JSON lets them be written.
    callback["JobsDetail"][0]["Operation"]["UserData"] = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred"
    event_id = receiver.post(orjson.dumps(callback)).json()["ids"][0]
    shown = cli(tmp_path, "events", "show", event_id).stdout.decode()
    assert "\x1b" not in shown
    assert "\x07" not in shown
    assert "user data \\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred" in shown


def test_an_empty_inbox_says_so(receiver, tmp_path):
    receiver.post(load("transcode.xml"))  # the inbox exists, with an accepted callback
    listed = cli(tmp_path, "events", "list", "--status", "dead")
    assert (listed.stdout, listed.stderr) == (b"", b"no events match --status dead\n")
    rejected = cli(tmp_path, "events", "rejected")
    assert (rejected.stdout, rejected.stderr) == (b"", b"no rejected callbacks\n")


def test_a_refused_body_is_not_written_raw_to_a_terminal(receiver, tmp_path):
    hostile = b"\x1b]0;pwned\x07\x1b[2Jnot a callback"
    assert receiver.post(hostile).status_code == 400
    # To a pipe or a file: the bytes as they came.
    assert cli(tmp_path, "events", "rejected", "--body", "1").stdout == hostile
    # To a terminal: refused, and said why.
    controller, terminal = pty.openpty()
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "receiver.cli", "events", "rejected", "--body", "1"],
            stdout=terminal, stderr=subprocess.PIPE, timeout=60, cwd=tmp_path,
            env={"PYTHONPATH": str(REPO), "CI_RECEIVER_CONFIG": str(tmp_path / "ci-receiver.toml")},
        )  # fmt: skip
        os.close(terminal)
        written = b""
        with contextlib.suppress(OSError):  # the terminal's other end is gone: all read
            while chunk := os.read(controller, 4096):
                written += chunk
    finally:
        os.close(controller)
    assert shown.returncode == 1
    assert b"send it to a file" in shown.stderr
    assert b"\x1b" not in written
    # A bad --limit is a usage error, on either backend alike.
    assert cli(tmp_path, "events", "list", "--limit", "-1", ok=False).returncode == 2


def test_stats_counts_what_arrived_and_what_the_handlers_did(receiver, tmp_path):
    receiver.post(load("transcode.xml"))
    receiver.post(load("transcode.xml"))  # CI sending it again: a duplicate
    receiver.post(load("two_jobs.xml"))
    receiver.post(b"not a callback")
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 3)
    counted = orjson.loads(cli(tmp_path, "stats", "--since", "1h", "--json").stdout)
    assert counted["callbacks"] == {"accepted": 2, "duplicate": 1, "rejected": 1}
    assert counted["tags"] == {"Transcode": 3}
    assert counted["states"] == {"Success": 3}
    assert counted["handlers"] == {"recorder": {"done": 3}}
    shown = cli(tmp_path, "stats").stdout.decode()
    assert "callbacks\n  accepted" in shown
    assert "handler recorder\n  done" in shown
    later = cli(tmp_path, "stats", "--since", "2099-01-01T00:00:00Z").stdout.decode()
    assert later.splitlines()[-1] == "nothing received"


def test_events_tail_follows_new_events_and_stops_on_sigterm(receiver, tmp_path):
    receiver.post(load("transcode.xml"))
    receiver.post(load("smartcover.xml"))
    out = tmp_path / "tail.out"
    with open(out, "wb") as sink:
        tail = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "events", "tail", "-n", "1",
             "--interval", "0.1"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={"PYTHONPATH": str(REPO), "CI_RECEIVER_CONFIG": str(tmp_path / "ci-receiver.toml")},
        )  # fmt: skip
    try:
        wait_until(lambda: "SmartCover" in out.read_text())
        receiver.post(load("workflow_finish.xml"))
        receiver.post(load("two_jobs.xml"))
        wait_until(lambda: len(out.read_text().splitlines()) == 4)
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(30) == 0
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    ids = [line.split()[2] for line in out.read_text().splitlines()]
    assert ids == [
        "job:j6842765cf84611ecb8546d80f2baf56f:Success",  # only the last one at first
        "workflow:i166ee19017b011eda8a5525400c540df:WorkflowFinish:Success",
        *[event.id for event in parse_callback(load("two_jobs.xml"))],  # as stored
    ]


def test_rejected_callbacks_can_be_listed_read_and_replayed(receiver, tmp_path):
    # A body refused today (here: over a limit) and accepted once the limit is raised.
    body = load("transcode.xml")
    config = tmp_path / "ci-receiver.toml"
    receiver.stop()
    config.write_text(config.read_text() + "[limits]\nmax_elements = 20\n")
    restarted = Receiver(config).start()
    try:
        assert restarted.post(body).json()["error"] == "too_many_elements"
        listed = cli(tmp_path, "events", "rejected").stdout.decode()
        assert listed.startswith("#1 ")
        assert "too_many_elements: more than 20 XML elements" in listed
        assert cli(tmp_path, "events", "rejected", "--body", "1").stdout == body
        config.write_text(config.read_text().replace("max_elements = 20", "max_elements = 5000"))
        replayed = cli(tmp_path, "replay", "--receipt", "1").stdout.decode()
        assert replayed.strip() == "1 new event(s), 0 already stored"
        wait_until(
            lambda: (
                recorded(tmp_path / "recorded.jsonl")
                == ["job:j68427030f84611ecb8546d80f2baf56f:Success"]
            )
        )
    finally:
        restarted.stop()
    lines = [orjson.loads(line) for line in (tmp_path / "recorded.jsonl").read_bytes().splitlines()]
    assert lines[-1]["source"] == "replay"


def test_a_body_kept_only_in_part_is_not_decoded_again(receiver, tmp_path):
    config = tmp_path / "ci-receiver.toml"
    receiver.stop()
    config.write_text(
        config.read_text() + "[limits]\nmax_bytes = 100\n[inbox]\nrejected_body_bytes = 50\n"
    )
    restarted = Receiver(config).start()
    try:
        assert restarted.post(load("transcode.xml")).json()["error"] == "too_large"
    finally:
        restarted.stop()
    result = cli(tmp_path, "replay", "--receipt", "1", ok=False)
    assert result.returncode == 1
    assert b"was not kept whole" in result.stderr


def test_replay_all_backfills_a_new_handler(receiver, tmp_path):
    receiver.post(load("transcode.xml"))
    receiver.post(load("two_jobs.xml"))
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 3)
    assert recorded(tmp_path / "later.jsonl") == []
    # The routes send nothing to `later`: replay says so rather than queue behind them.
    routed = cli(tmp_path, "replay", "--all", "--handler", "later")
    assert routed.stdout.strip() == b"0 run(s) queued again, of 3 event(s)"
    assert b"3 event(s) not sent to later by the routes" in routed.stderr
    planned = cli(tmp_path, "replay", "--all", "--handler", "later", "--ignore-routes", "--dry-run")
    assert planned.stdout.strip() == b"3 run(s) would be queued, of 3 event(s)"
    assert recorded(tmp_path / "later.jsonl") == []
    forced = cli(tmp_path, "replay", "--all", "--handler", "later", "--ignore-routes")
    assert forced.stdout.strip() == b"3 run(s) queued again, of 3 event(s)"
    assert b"no running receiver" not in forced.stderr  # the receiver has `later`
    wait_until(lambda: len(recorded(tmp_path / "later.jsonl")) == 3)
    assert sorted(recorded(tmp_path / "later.jsonl")) == sorted(
        recorded(tmp_path / "recorded.jsonl")
    )


def test_replay_by_filter_and_time(receiver, tmp_path):
    receiver.post(load("transcode.xml"))
    receiver.post(load("two_jobs.xml"))
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 3)
    tags = cli(tmp_path, "replay", "--tag", "Transcode", "--since", "1h", "--dry-run")
    assert tags.stdout.strip() == b"3 run(s) would be queued, of 3 event(s)"
    keys = cli(tmp_path, "replay", "--key", "input/?.mp4", "--dry-run")
    assert keys.stdout.strip() == b"2 run(s) would be queued, of 2 event(s)"
    assert (
        cli(tmp_path, "replay", "--until", "1h")
        .stderr.strip()
        .endswith(b"no event matches: nothing to replay")
    )
    again = cli(tmp_path, "replay", "--key", "*.mp4", "--handler", "recorder")
    assert again.stdout.strip().startswith(b"3 run(s) queued again")
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 6)


def test_replay_for_a_handler_no_running_receiver_has_warns(receiver, tmp_path):
    receiver.post(load("transcode.xml"))
    wait_until(lambda: len(recorded(tmp_path / "recorded.jsonl")) == 1)
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        config.read_text().replace(
            "[[routes]]",
            recorder(tmp_path, "added", "added.jsonl") + "[[routes]]",
        )
    )
    wait_until(lambda: presence_written(tmp_path))
    result = cli(tmp_path, "replay", "--all", "--handler", "added", "--ignore-routes")
    assert result.stdout.strip() == b"1 run(s) queued again, of 1 event(s)"
    assert b"no running receiver has handler 'added'" in result.stderr


def test_replay_leaves_the_runs_of_a_handler_no_receiver_runs(tmp_path):
    # A handler taken out of the config: queued again, its dead run would wait for a
    # receiver that never comes. Replaying every handler's dead runs leaves it dead, and
    # says so.
    fails = "fail_first = 1\nmax_attempts = 1\n"
    kept = recorder(tmp_path, "kept", "kept.jsonl", fails)
    config = write_config(tmp_path, kept, recorder(tmp_path, "removed", "removed.jsonl", fails))
    process = Receiver(config).start()
    try:
        process.post(load("transcode.xml"))
        wait_until(lambda: run_statuses(tmp_path) == {"kept": "dead", "removed": "dead"})
    finally:
        assert process.terminate() == 0  # gone: no longer running `removed`
    write_config(tmp_path, kept)
    result = cli(tmp_path, "replay", "--dead")
    assert result.stdout.strip() == b"1 run(s) queued again, of 1 event(s)"
    assert b"1 run(s) of removed left as they are: no receiver runs that handler" in result.stderr
    assert run_statuses(tmp_path) == {"kept": "pending", "removed": "dead"}


def run_statuses(tmp_path) -> dict[str, str]:
    import sqlite3

    connection = sqlite3.connect(tmp_path / "data" / "inbox.db")
    try:
        return dict(connection.execute("SELECT handler, status FROM runs").fetchall())
    finally:
        connection.close()


def presence_written(tmp_path) -> bool:
    import sqlite3

    connection = sqlite3.connect(tmp_path / "data" / "inbox.db")
    try:
        return bool(connection.execute("SELECT 1 FROM state WHERE key LIKE 'process:%'").fetchall())
    finally:
        connection.close()


def test_replay_needs_to_be_told_what(receiver, tmp_path):
    result = cli(tmp_path, "replay", ok=False)
    assert result.returncode == 2
    assert b"say what to replay" in result.stderr
    every_handler = cli(tmp_path, "replay", "--all", ok=False)
    assert every_handler.returncode == 2
    assert b"name them with --handler" in every_handler.stderr
    assert (
        b"not configured: nope"
        in cli(tmp_path, "replay", "--dead", "--handler", "nope", ok=False).stderr
    )


def test_a_config_error_is_reported_not_a_traceback(tmp_path):
    (tmp_path / "ci-receiver.toml").write_text("[http]\nport = 'x'\n")
    result = cli(tmp_path, "serve", ok=False)
    assert result.returncode == 1
    assert b"Error: config: " in result.stderr
    assert b"http.port" in result.stderr
    assert b"Traceback" not in result.stderr
