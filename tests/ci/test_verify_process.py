"""Verification as a user runs it: `ci-receiver serve` with `[http] verify = "ci-api"` as
a child process, callbacks over HTTP, the commands to look and replay, against the
loopback stand-in for CI's job API (tests/support/ci_api_server.py), which CI itself cannot be
reached from here."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson

from tests.support.ci_api_server import (
    BUCKET,
    REGION,
    SECRET_ID,
    SECRET_KEY,
    CiApiServer,
    Failure,
    callback_body,
    job,
)
from tests.support.cli import ci_cli as cli
from tests.support.handler_doubles import recorded
from tests.support.processes import Receiver
from tests.support.waiting import wait_until


def config(tmp_path: Path, ci: CiApiServer) -> Path:
    path = tmp_path / "ci-receiver.toml"
    path.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[http]
verify = "ci-api"
[log]
format = "json"
[dispatch]
poll_interval = 0.2
[handlers.recorder]
type = "tests.support.handler_doubles:Recorder"
path = "{tmp_path / "recorded.jsonl"}"
[ci]
secret_id = "{SECRET_ID}"
secret_key = "${{CI_TEST_SECRET_KEY}}"
endpoint = "{ci.url}"
interval = "1h"
[[ci.buckets]]
name = "{BUCKET}"
region = "{REGION}"
tags = ["Transcode"]
"""
    )
    (tmp_path / "secret_key").write_text(SECRET_KEY)
    return path


def log_lines(receiver: Receiver, event: str) -> list[dict]:
    lines = [orjson.loads(line) for line in receiver.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"].startswith(event)]


def test_serve_hands_on_the_genuine_callback_and_keeps_the_forged_ones(tmp_path, ci):
    genuine, failed = job(1, BUCKET, REGION), job(2, BUCKET, REGION, state="Failed")
    handled = tmp_path / "recorded.jsonl"
    receiver = Receiver(config(tmp_path, ci)).start(env={"CI_TEST_SECRET_KEY": SECRET_KEY})
    try:
        # The jobs end after the receiver's first reconcile pass (the next is an hour away).
        receiver.wait_for_log("reconcile pass done")
        ci.add_jobs(BUCKET, genuine, failed)
        bodies = {
            "genuine": callback_body(genuine),
            "unknown": callback_body({**genuine, "JobId": f"j{99:032x}"}),
            "success for failed": callback_body({**failed, "State": "Success"}),
        }
        # CI is never kept waiting: every callback is answered at once.
        ids = {}
        for name, body in bodies.items():
            answer = receiver.post(body)
            assert answer.status_code == 200
            ids[name] = answer.json()["ids"][0]
        wait_until(lambda: recorded(handled) == [ids["genuine"]], what="the genuine one handled")
        wait_until(lambda: len(log_lines(receiver, "forged callback")) == 2, what="two forged")

        listed = cli(tmp_path, "events", "list", "--status", "forged", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert sorted(row["id"] for row in rows) == sorted(
            [ids["unknown"], ids["success for failed"]]
        )
        assert all(row["handlers"]["recorder"]["status"] == "forged" for row in rows)
        shown = orjson.loads(cli(tmp_path, "events", "show", ids["unknown"], "--json").stdout)
        assert [(r["handler"], r["status"], r["error"]) for r in shown["runs"]] == [
            ("(verify)", "forged", f"forged: CI's job API knows no job j{99:032x}"),
            ("recorder", "forged", None),
        ]
        metrics = httpx.get(receiver.admin_url + "/metrics").text
        assert 'ci_receiver_verify_total{outcome="forged"} 2.0' in metrics
        assert 'ci_receiver_verify_total{outcome="confirmed"} 1.0' in metrics

        # Named, a forged event is handed on after all; its verdict stays on record.
        replayed = cli(tmp_path, "replay", ids["unknown"])
        assert replayed.stdout.strip() == "1 run(s) queued again, of 1 event(s)"
        wait_until(lambda: ids["unknown"] in recorded(handled), what="the replayed one handled")
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
    assert recorded(handled) == [ids["genuine"], ids["unknown"]]
    forged = {line["job_id"]: line for line in log_lines(receiver, "forged callback")}
    assert forged[failed["JobId"]]["reason"] == (
        "the callback says State='Success', CI's job API 'Failed'"
    )
    assert SECRET_KEY not in receiver.log()


def test_a_callback_waits_while_ci_is_unreachable_and_is_handled_once_it_answers(tmp_path, ci):
    detail = job(3, BUCKET, REGION)
    handled = tmp_path / "recorded.jsonl"
    receiver = Receiver(config(tmp_path, ci)).start(env={"CI_TEST_SECRET_KEY": SECRET_KEY})
    try:
        receiver.wait_for_log("reconcile pass done")
        ci.add_jobs(BUCKET, detail)
        ci.fail_next(Failure(drop=True), Failure(503, "SlowDown"), Failure(429, "TooManyRequests"))
        answer = receiver.post(callback_body(detail))
        assert answer.status_code == 200
        event_id = answer.json()["ids"][0]
        wait_until(lambda: len(ci.requests) >= 3, what="three failed requests")
        assert recorded(handled) == []
        waiting = cli(tmp_path, "events", "list", "--status", "held", "--json").stdout
        assert [orjson.loads(line)["id"] for line in waiting.splitlines()] == [event_id]
        wait_until(lambda: recorded(handled) == [event_id], what="handled once CI answered")
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
    assert [seen.status for seen in ci.requests[-4:]] == [0, 503, 429, 200]


def test_verification_without_ci_credentials_is_a_config_error(tmp_path):
    (tmp_path / "ci-receiver.toml").write_text('[http]\nverify = "ci-api"\n')
    (tmp_path / "secret_key").write_text("")
    refused = cli(tmp_path, "check-config")
    assert refused.returncode == 1
    assert 'http.verify = "ci-api" needs [ci] secret_id, secret_key' in refused.stderr
