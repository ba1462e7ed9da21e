"""The reconciler as a user runs it: `ci-receiver serve` and `ci-receiver reconcile` as
child processes, against the loopback stand-in for CI (tests/support/ci_api_server.py)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import orjson

from tests.support.ci_api_server import (
    BUCKET,
    REGION,
    SECRET_ID,
    SECRET_KEY,
    CiApiServer,
    callback_body,
    job,
)
from tests.support.cli import ci_cli as cli
from tests.support.handler_doubles import json_lines, recorded
from tests.support.processes import Receiver
from tests.support.waiting import wait_until


def config(
    tmp_path: Path, ci: CiApiServer, secret_key: str = SECRET_KEY, settle: str | None = None
) -> Path:
    path = tmp_path / "ci-receiver.toml"
    settling = f'settle = "{settle}"' if settle is not None else ""
    path.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
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
interval = "0.5s"
window = "1h"
{settling}
[[ci.buckets]]
name = "{BUCKET}"
region = "{REGION}"
tags = ["Transcode"]
"""
    )
    (tmp_path / "secret_key").write_text(secret_key)
    return path


def environment(tmp_path: Path) -> dict[str, str]:
    return {"CI_TEST_SECRET_KEY": (tmp_path / "secret_key").read_text()}


def test_ten_jobs_end_three_callbacks_are_lost_and_the_running_receiver_recovers_them(tmp_path, ci):
    jobs = [job(n, BUCKET, REGION) for n in range(10)]
    ci.add_jobs(BUCKET, *({**detail, "State": "Running"} for detail in jobs))
    receiver = Receiver(config(tmp_path, ci)).start(env=environment(tmp_path))
    try:
        receiver.wait_for_log("reconcile pass done")
        # Seven callbacks come through; CI's API still shows the jobs running.
        lost = {1, 5, 8}
        for n, detail in enumerate(jobs):
            if n not in lost:
                assert receiver.post(callback_body(detail)).status_code == 200
        # Then the API shows all ten finished: the next pass finds the three.
        ci.jobs[BUCKET] = jobs
        done = tmp_path / "recorded.jsonl"
        wait_until(lambda: len(recorded(done)) == 10, what="ten jobs handled")
        # More passes go by; nothing is stored or handled twice.
        passes = receiver.log().count("reconcile pass done")
        wait_until(lambda: receiver.log().count("reconcile pass done") >= passes + 3)
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
    handled = [line for line in json_lines(done) if line["what"] == "done"]
    assert Counter(line["id"] for line in handled) == {
        f"job:j{n:032x}:Success": 1 for n in range(10)
    }
    by_source = {line["id"]: line["source"] for line in handled}
    assert {i for i, source in by_source.items() if source == "reconcile"} == {
        f"job:j{n:032x}:Success" for n in lost
    }
    log = [orjson.loads(line) for line in receiver.log().splitlines() if line.startswith("{")]
    recovered = [
        line for line in log if line["event"] == "recovered an event whose callback never came"
    ]
    assert sorted(line["job_id"] for line in recovered) == [f"j{n:032x}" for n in sorted(lost)]
    assert SECRET_KEY not in receiver.log()
    # Every request the receiver made was signed as CI checks it.
    assert ci.requests
    assert all(seen.status == 200 for seen in ci.requests)


def passes_done(receiver: Receiver) -> list[dict]:
    lines = [orjson.loads(line) for line in receiver.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == "reconcile pass done"]


def test_a_callback_still_on_its_way_when_its_job_ends_is_not_recovered(tmp_path, ci):
    """CI lists the job finished a moment before its callback comes: the passes leave
    it to settle, and the callback is what gets stored and handled."""
    ended = datetime.now(timezone.utc)
    detail = job(1, BUCKET, REGION, ended=ended)
    ci.add_jobs(BUCKET, detail)
    receiver = Receiver(config(tmp_path, ci, settle="4s")).start(env=environment(tmp_path))

    def left() -> bool:
        return any(p["settling"] == 1 for p in passes_done(receiver))

    try:
        wait_until(left, what="a pass leaving the job to settle")
        assert receiver.post(callback_body(detail)).status_code == 200
        done = tmp_path / "recorded.jsonl"
        wait_until(lambda: len(recorded(done)) == 1, what="the callback handled")
        # Passes go on past settle: they find the job stored.
        time.sleep(max(0.0, (ended - datetime.now(timezone.utc)).total_seconds() + 4))
        passes = len(passes_done(receiver))
        wait_until(lambda: len(passes_done(receiver)) >= passes + 2, what="two more passes")
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
    assert [line["source"] for line in json_lines(done) if line["what"] == "done"] == ["http"]
    assert "recovered an event whose callback never came" not in receiver.log()
    assert all(p["recovered"] == 0 for p in passes_done(receiver))


def test_reconcile_by_hand_leaves_a_job_that_just_ended_unless_told_not_to(tmp_path, ci):
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION, ended=datetime.now(timezone.utc)))
    config(tmp_path, ci)

    waits = cli(tmp_path, "reconcile", "--since", "1h")
    assert waits.returncode == 0, waits.stderr
    assert f"settling  job:j{1:032x}:Success  Transcode  {BUCKET}  input/video-1.mp4" in (
        waits.stdout
    )
    assert "1 finished checked, 0 missing, 0 recovered; 1 ended too recently" in waits.stdout
    assert cli(tmp_path, "events", "list").stdout == ""

    now = cli(tmp_path, "reconcile", "--since", "1h", "--settle", "0")
    assert now.returncode == 0, now.stderr
    assert f"recovered  job:j{1:032x}:Success" in now.stdout
    assert "1 finished checked, 1 missing, 1 recovered" in now.stdout

    wrong = cli(tmp_path, "reconcile", "--settle", "soon")
    assert wrong.returncode == 2
    assert "--settle" in wrong.stderr


def test_wrong_credentials_are_a_clear_error_at_start(tmp_path, ci):
    receiver = Receiver(config(tmp_path, ci, secret_key="not-the-key"))
    receiver.start(env=environment(tmp_path), wait_http=False)
    try:
        assert receiver.wait(30) == 1
    finally:
        receiver.stop()
    output = receiver.log()
    assert "[ci]: check media-1250000000: HTTP 403 SignatureDoesNotMatch" in output
    assert "listening" not in output
    assert "not-the-key" not in output


def test_reconcile_by_hand_dry_run_changes_nothing(tmp_path, ci):
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION), job(2, BUCKET, REGION, state="Failed"))
    config(tmp_path, ci)

    dry = cli(tmp_path, "reconcile", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"missing  job:j{1:032x}:Success  Transcode  {BUCKET}  input/video-1.mp4" in dry.stdout
    assert f"missing  job:j{2:032x}:Failed" in dry.stdout
    assert "2 finished checked, 2 missing (dry run: nothing stored)" in dry.stdout
    assert cli(tmp_path, "events", "list").stdout == ""

    real = cli(tmp_path, "reconcile", "--since", "2h", "--bucket", BUCKET)
    assert real.returncode == 0, real.stderr
    assert real.stdout.count("recovered  job:") == 2
    assert "2 finished checked, 2 missing, 2 recovered" in real.stdout
    listed = cli(tmp_path, "events", "list", "--json").stdout.splitlines()
    assert sorted(orjson.loads(line)["state"] for line in listed) == ["Failed", "Success"]

    again = cli(tmp_path, "reconcile")
    assert "2 finished checked, 0 missing, 0 recovered" in again.stdout

    unknown = cli(tmp_path, "reconcile", "--bucket", "other-1250000000")
    assert unknown.returncode == 1
    assert "other-1250000000 is not in [ci] buckets (media-1250000000)" in unknown.stderr


def test_check_config_masks_the_credentials_from_file_or_environment(tmp_path, ci):
    config(tmp_path, ci)
    shown = cli(tmp_path, "check-config", "--all", CI_RECEIVER_CI__SECRET_ID="AKIDfromenvironment")
    assert shown.returncode == 0, shown.stderr
    effective = orjson.loads(shown.stdout)["ci"]
    assert (effective["secret_id"], effective["secret_key"]) == ("**********", "**********")
    assert (effective["interval"], effective["window"], effective["settle"]) == (0.5, 3600, 120)
    assert "AKIDfromenvironment" not in shown.stdout
    assert SECRET_KEY not in shown.stdout

    # The environment overrides the file: the right key from there, a wrong one in it.
    config(tmp_path, ci, secret_key="not-the-key")
    assert cli(tmp_path, "reconcile", "--dry-run").returncode == 1
    fixed = cli(tmp_path, "reconcile", "--dry-run", CI_RECEIVER_CI__SECRET_KEY=SECRET_KEY)
    assert fixed.returncode == 0, fixed.stderr

    (tmp_path / "ci-receiver.toml").write_text(
        f'[ci]\nsecret_id = "x"\nsecret_key = "y"\n[[ci.buckets]]\nname = "{BUCKET}"\n'
        f'region = "{REGION}"\n'
    )
    refused = cli(tmp_path, "check-config")
    assert refused.returncode == 1
    assert "ci.buckets[1]: name the job tags" in refused.stderr
