"""Built-in handlers behind `ci-receiver serve`, a real process: a callback POSTed to
it reaches the peers (a webhook receiver, a WeCom robot, PostgreSQL) through the real
inbox and dispatcher, retries included."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from standardwebhooks import Webhook

from handlers.sql import async_url
from tests.support.callbacks import load
from tests.support.databases import drop_tables, require_server
from tests.support.http_peers import HttpPeer, Reply, wecom_robot
from tests.support.processes import Receiver
from tests.support.sample_events import event
from tests.support.waiting import wait_until

ROBOT_KEY = "e2e-robot-key-5c1f"  # in the robot's URL: never to be logged
SECRET = "whsec_" + base64.b64encode(b"end-to-end secret, 32 bytes long").decode()
# Small backoffs so that a retry comes within the test.
FAST_RETRIES = "backoff_initial = 0.05\nbackoff_max = 0.2\nmax_attempts = 3\n"


def configure(tmp_path, handlers_toml: str) -> Receiver:
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[dispatch]\npoll_interval = 0.2\n{handlers_toml}'
    )
    return Receiver(config)


def show(receiver: Receiver, event_id: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "receiver.cli", "events", "show", event_id, "--json",
         "--config", str(receiver.config_file)],
        capture_output=True, text=True, timeout=60, cwd=receiver.config_file.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def run_status(receiver: Receiver, event_id: str, handler: str) -> dict:
    [run] = [run for run in show(receiver, event_id)["runs"] if run["handler"] == handler]
    return run


@pytest.fixture
async def postgres_table():
    url = require_server("postgresql")
    table = f"jobs_{uuid.uuid4().hex[:10]}"
    yield url, table
    await drop_tables(url, [table])


async def test_a_callback_reaches_a_webhook_a_robot_and_postgresql(
    tmp_path, postgres_table, monkeypatch
):
    url, table = postgres_table
    monkeypatch.setenv("HOOK_SECRET", SECRET)  # the secret comes from the environment
    with HttpPeer() as hook, HttpPeer(wecom_robot(ROBOT_KEY)) as robot:
        receiver = configure(
            tmp_path,
            f"""
[handlers.hook]
type = "webhook"
url = "{hook.url}/ci"
secret = "${{HOOK_SECRET}}"
[handlers.robot]
type = "wecom"
url = "{robot.url}/cgi-bin/webhook/send?key={ROBOT_KEY}"
[handlers.db]
type = "sql"
url = "{url}"
table = "{table}"
""",
        ).start()
        try:
            assert receiver.post(load("smartcover_failed.xml")).status_code == 200
            [delivery] = hook.wait_for(1)
            [message] = robot.wait_for(1)
            failed = event("smartcover_failed.xml")
            wait_until(
                lambda: run_status(receiver, failed.id, "db")["status"] == "done",
                what="the sql handler's run",
            )
        finally:
            receiver.stop()

    payload = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert payload["id"] == failed.id == delivery.headers["webhook-id"]
    assert payload["source"] == "http"
    assert "SmartCover Failed" in message.json()["markdown"]["content"]
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(text(f"SELECT job_id, state FROM {table}"))).one()
    finally:
        await engine.dispose()
    assert tuple(row) == (failed.job_id, "Failed")
    log = receiver.log()
    assert '"event":"request"' in log  # the process logged at info ...
    assert ROBOT_KEY not in log  # ... and the robot's URL nowhere


def test_500_then_200_is_retried_by_the_dispatcher_then_done(tmp_path):
    with HttpPeer() as hook:
        hook.replies = [Reply(status=500, body="oops")]
        receiver = configure(
            tmp_path, f'[handlers.hook]\ntype = "webhook"\nurl = "{hook.url}"\n{FAST_RETRIES}'
        ).start()
        try:
            assert receiver.post(load("transcode.xml")).status_code == 200
            first, second = hook.wait_for(2)
            transcode = event("transcode.xml")
            run = wait_until(
                lambda: (r := run_status(receiver, transcode.id, "hook"))["status"] == "done" and r,
                what="the webhook run to be done",
            )
        finally:
            receiver.stop()
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == transcode.id
    assert run["attempts"] == 2
    assert len(hook.requests) == 2


def test_a_vendor_refusal_is_dead_lettered_without_retries(tmp_path):
    with HttpPeer(wecom_robot("right-key")) as robot:
        receiver = configure(
            tmp_path,
            f'[handlers.robot]\ntype = "wecom"\n'
            f'url = "{robot.url}/cgi-bin/webhook/send?key=wrong-key"\n{FAST_RETRIES}',
        ).start()
        try:
            assert receiver.post(load("snapshot.xml")).status_code == 200
            snapshot = event("snapshot.xml")
            run = wait_until(
                lambda: (r := run_status(receiver, snapshot.id, "robot"))["status"] == "dead" and r,
                what="the robot run to be dead-lettered",
            )
        finally:
            receiver.stop()
    assert run["attempts"] == 1
    assert "93000" in run["error"]


def test_bad_database_credentials_hold_the_handler_back_while_callbacks_are_kept(tmp_path):
    require_server("mysql")
    with HttpPeer() as hook:
        receiver = configure(
            tmp_path,
            f"""
[handlers.db]
type = "sql"
url = "mysql://root:wrongpassword@127.0.0.1:3306/test"
[handlers.hook]
type = "webhook"
url = "{hook.url}"
""",
        ).start()
        try:
            assert receiver.post(load("stream_extract.xml")).status_code == 200
            hook.wait_for(1)  # the other handler is not held up
            receiver.wait_for_log("handler cannot start; its events wait in the inbox")
            ready = httpx.get(receiver.admin_url + "/readyz", timeout=10)
            assert receiver.post(load("snapshot.xml")).status_code == 200
            stream = event("stream_extract.xml")
            assert run_status(receiver, stream.id, "db")["status"] == "pending"
            assert receiver.process.poll() is None  # still serving
        finally:
            receiver.stop()
    assert ready.status_code == 200
    # /readyz (on the admin listener) says why, the password masked, as the log does.
    assert ready.json()["checks"]["handler:db"].startswith(
        "not started: RuntimeError: cannot open mysql+aiomysql://root:***@127.0.0.1:3306/test"
    )
    (line,) = [line for line in receiver.log().splitlines() if "handler cannot start" in line]
    assert (
        "cannot open mysql+aiomysql://root:***@127.0.0.1:3306/test?charset=***: OperationalError"
        in line
    )
    assert "Access denied for user 'root'" in line
    assert "wrongpassword" not in receiver.log()
