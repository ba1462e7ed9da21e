"""Retention as it runs: the pruner on a clock the test controls, the space it gives
back, the background pass of a running receiver, and `ci-receiver prune`."""

from __future__ import annotations

import base64
import random
import sqlite3
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from prometheus_client import CollectorRegistry

from receiver import parse_callback
from receiver.config import RetentionConfig
from receiver.inbox import Receipt
from receiver.inbox.sqlite import SqliteInbox
from receiver.upkeep.retention import Pruner, retention_cutoffs
from tests.support.callbacks import load
from tests.support.cli import ci_receiver as cli
from tests.support.processes import Receiver
from tests.support.waiting import wait_until

DAY = timedelta(days=1)


def now() -> datetime:
    return datetime.now(timezone.utc)


def callback(number: int, padding: int = 0) -> bytes:
    """A job callback with `padding` bytes of user data that do not compress (the inbox
    keeps bodies compressed)."""
    user_data = base64.b64encode(random.Random(number).randbytes(padding)).decode()
    return orjson.dumps(
        {
            "EventName": "TaskFinish",
            "JobsDetail": {
                "JobId": f"j{number:032x}",
                "State": "Success",
                "Tag": "Transcode",
                "Operation": {"UserData": user_data},
            },
        }
    )


async def store(inbox, body: bytes, handlers=("a",)):
    events = parse_callback(body)
    return await inbox.store(
        Receipt(body, "http", now(), "r"), [(e, list(handlers)) for e in events]
    )


async def handle_all(inbox, handler: str = "a") -> None:
    while claims := await inbox.claim(handler, 500, 30):
        for claim in claims:
            await inbox.finish(claim, "done", started_at=now())


async def test_the_pruner_removes_what_the_clock_says_is_old(inbox):
    for number in range(30):
        await store(inbox, callback(number), handlers=["a"] if number < 20 else ["waiting"])
    await handle_all(inbox)
    registry = CollectorRegistry()
    pruner = Pruner(inbox, RetentionConfig(), registry)

    assert not await pruner.prune()  # nothing is 30 days old yet
    in_a_month = now() + 31 * DAY
    planned = await inbox.prunable(retention_cutoffs(RetentionConfig(), in_a_month))
    assert (planned.events, planned.receipts) == (20, 20)
    batches = []
    pruned = await pruner.prune(now=in_a_month, progress=batches.append)
    assert (pruned.events, pruned.receipts) == (20, 20)
    assert sum(batch.events for batch in batches) == 20
    assert registry.get_sample_value("ci_receiver_pruned_total", {"what": "events"}) == 20
    assert registry.get_sample_value("ci_receiver_pruned_total", {"what": "bytes"}) == pruned.bytes
    left = await inbox.events(limit=100)
    assert len(left) == 10
    assert {run.handler for event in left for run in event.runs} == {"waiting"}


async def test_a_retention_of_zero_keeps_for_ever(inbox):
    await store(inbox, callback(1))
    await handle_all(inbox)
    keep = RetentionConfig(events=0, bodies=0, refused=0)
    assert not await Pruner(inbox, keep).prune(now=now() + 3650 * DAY)
    assert len(await inbox.events()) == 1


async def test_pruning_gives_the_space_back_to_the_file_system(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=1024)
    await inbox.open()
    try:
        for number in range(2000):
            await store(inbox, callback(number, padding=2000))
        await handle_all(inbox)
        full = (tmp_path / "inbox.db").stat().st_size
        assert full > 4_000_000
        pruned = await Pruner(inbox, RetentionConfig()).prune(now=now() + 31 * DAY)
        assert pruned.events == 2000
    finally:
        await inbox.close()  # a clean close also folds the WAL back in
    assert (tmp_path / "inbox.db").stat().st_size < full / 10
    connection = sqlite3.connect(tmp_path / "inbox.db")
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    connection.close()


@pytest.fixture
def short_retention(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[dispatch]
poll_interval = 0.1
[retention]
events = "2s"
bodies = "1s"
refused = "1s"
interval = "1s"
"""
    )
    return config


def listed(config) -> list[str]:
    result = cli(config, "events", "list", "--json")
    return [orjson.loads(line)["id"] for line in result.stdout.splitlines()]


def test_a_running_receiver_prunes_in_the_background(short_retention):
    receiver = Receiver(short_retention).start()
    try:
        assert receiver.post(load("transcode.xml")).status_code == 200
        assert receiver.post(b"not a callback").status_code == 400
        wait_until(lambda: listed(short_retention) == [], timeout=20)
        # Meanwhile and after, callbacks are taken as ever.
        assert receiver.post(load("smartcover.xml")).status_code == 200
        assert "job:j6842765cf84611ecb8546d80f2baf56f:Success" in listed(short_retention)
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
    assert b"pruned the inbox" in receiver.log().encode()


def test_prune_by_hand_reports_rows_and_bytes(short_retention):
    receiver = Receiver(short_retention)
    # Long intervals: only the command prunes in this test.
    short_retention.write_text(short_retention.read_text().replace('interval = "1s"', ""))
    receiver.start()
    try:
        assert receiver.post(load("transcode.xml")).status_code == 200
        wait_until(lambda: listed(short_retention) != [])
        wait_until(lambda: b"done" in cli(short_retention, "events", "list").stdout)
    finally:
        receiver.terminate()
    wait_until(
        lambda: b"would remove 1 event(s)" in cli(short_retention, "prune", "--dry-run").stdout
    )
    dry = cli(short_retention, "prune", "--dry-run").stdout.decode()
    assert "1 receipt(s)" in dry
    assert "bytes" in dry or "KiB" in dry
    assert listed(short_retention) != []
    done = cli(short_retention, "prune")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"removed 1 event(s), 1 receipt(s)")
    assert listed(short_retention) == []
    assert cli(short_retention, "prune").stdout.startswith(b"removed 0 event(s)")
