"""`ci-receiver inbox copy`: an SQLite inbox moved into PostgreSQL, as a user does it, and
a receiver started on PostgreSQL carrying on where the old one stopped."""

from __future__ import annotations

import asyncio
import sqlite3
import zlib
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
from sqlalchemy import make_url

from receiver import parse_callback
from receiver.config import Config
from receiver.inbox import EventDetail, Inbox, Receipt
from receiver.inbox.factory import open_inbox
from receiver.inbox.records import PACKED, PACKED_ZLIB, unpack
from tests.support.handler_doubles import recorded
from tests.support.installations import ci_receiver
from tests.support.processes import Receiver
from tests.support.shared_inbox import SharedInbox
from tests.support.waiting import wait_until

CALLBACKS = 7


def callback(n: int) -> bytes:
    detail = {"JobId": f"j{n:032x}", "State": "Success", "Tag": "Transcode", "Code": "Success"}
    return orjson.dumps({"EventName": "TaskFinish", "JobsDetail": detail})


def write_config(folder: Path, shared: SharedInbox | None = None) -> Path:
    """The old receiver's config (SQLite in data_dir), or the same with `[inbox] url`."""
    path = folder / ("postgres.toml" if shared else "sqlite.toml")
    path.write_text(
        f"""
data_dir = "{folder / "data"}"
[log]
format = "json"
[http]
access_log = false
[dispatch]
poll_interval = 0.2
[handlers.recorder]
type = "tests.support.handler_doubles:Recorder"
path = "{folder / "recorded.jsonl"}"
timeout = 2
[handlers.archive]
type = "log"
{shared.toml() if shared else ""}
"""
    )
    return path


async def store(inbox: Inbox, n: int) -> str:
    body = callback(n)
    routed = [(event, ["recorder", "archive"]) for event in parse_callback(body)]
    receipt = Receipt(body, "http", datetime.now(timezone.utc), f"request-{n}")
    return (await inbox.store(receipt, routed)).ids[0]


async def run(inbox: Inbox, handler: str, outcome: str, count: int) -> list[str]:
    """Attempt `count` due runs of `handler` with this outcome, as a dispatcher would."""
    ids = []
    for claim in await inbox.claim(handler, count, 30):
        retry_at = datetime.now(timezone.utc) - timedelta(seconds=1)
        error = None if outcome == "done" else f"{outcome} on purpose"
        await inbox.finish(
            claim,
            outcome,  # type: ignore[arg-type]
            started_at=datetime.now(timezone.utc),
            error=error,
            retry_at=retry_at if outcome == "retry" else None,
        )
        ids.append(claim.event.id)
    return ids


def old_inbox(folder: Path) -> Inbox:
    return open_inbox(Config(data_dir=folder / "data"))


def fill_old_inbox(folder: Path) -> dict[str, list[str]]:
    """What a receiver on SQLite left: handled, dead, retried and pending runs, a
    rejected body, a reconcile cursor."""

    async def fill() -> dict[str, list[str]]:
        inbox = old_inbox(folder)
        await inbox.open()
        try:
            ids = [await store(inbox, n) for n in range(CALLBACKS)]
            await inbox.store(
                Receipt(callback(0), "tdmq", datetime.now(timezone.utc), "again"),
                [(event, ["recorder"]) for event in parse_callback(callback(0))],
            )  # a duplicate receipt
            await inbox.reject(
                Receipt(b"<Response><Jobs", "http", datetime.now(timezone.utc), "bad"),
                "malformed_xml",
                "cut short",
            )
            await inbox.set_state("reconcile:media-1250000000", "2026-11-01T00:00:00+00:00")
            archived = await run(inbox, "archive", "done", CALLBACKS)
            dead = await run(inbox, "recorder", "dead", 2)
            retried = await run(inbox, "recorder", "retry", 1)
            return {"all": ids, "archived": archived, "dead": dead, "retried": retried}
        finally:
            await inbox.close()

    return asyncio.run(fill())


def details(inbox: Inbox, ids: list[str]) -> dict[str, EventDetail | None]:
    async def read() -> dict[str, EventDetail | None]:
        await inbox.open()
        try:
            return {event_id: await inbox.event(event_id) for event_id in ids}
        finally:
            await inbox.close()

    return asyncio.run(read())


def comparable(detail: EventDetail | None) -> dict:
    assert detail is not None
    runs = sorted((r.handler, r.status, r.attempts, r.last_error) for r in detail.runs)
    attempts = [(a.handler, a.number, a.outcome, a.error, a.started_at) for a in detail.attempts]
    return {"event": detail.event.to_dict(), "runs": runs, "attempts": attempts}


def copy(config: Path, shared: SharedInbox, *extra: str) -> dict[str, str]:
    result = ci_receiver(
        "inbox", "copy", "--config", str(config), "--to", shared.url,
        "--postgres-schema", shared.schema, "--batch", "3", *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split(maxsplit=1)[1] for line in result.stdout.splitlines()}


def test_copy_moves_everything_and_copying_again_adds_nothing(tmp_path, shared_inbox):
    made = fill_old_inbox(tmp_path)
    config = write_config(tmp_path)

    first = copy(config, shared_inbox)
    assert first == {
        "receipts": "9 copied, 0 already there",
        "events": f"{CALLBACKS} copied, 0 already there",
        "runs": f"{2 * CALLBACKS} copied, 0 brought up to date, 0 already there",
        "attempts": f"{CALLBACKS + 3} copied, 0 already there",
        "state": "1 copied, 0 already there",
    }
    moved = open_inbox(
        Config(inbox={"url": shared_inbox.url, "postgres_schema": shared_inbox.schema})
    )
    before = details(old_inbox(tmp_path), made["all"])
    after = details(moved, made["all"])
    for event_id in made["all"]:  # the same events, runs and attempts, raw documents too
        assert comparable(after[event_id]) == comparable(before[event_id])

    again = copy(config, shared_inbox)
    assert again == {
        "receipts": "0 copied, 9 already there",
        "events": f"0 copied, {CALLBACKS} already there",
        "runs": f"0 copied, 0 brought up to date, {2 * CALLBACKS} already there",
        "attempts": f"0 copied, {CALLBACKS + 3} already there",
        "state": "0 copied, 1 already there",
    }
    assert shared_inbox.count("SELECT count(*) FROM receipts") == 9
    assert shared_inbox.count("SELECT count(*) FROM attempts") == CALLBACKS + 3


def bodies(inbox: Inbox) -> dict[str, bytes]:
    """Each receipt's body as the inbox gives it back, by request id."""

    async def read() -> dict[str, bytes]:
        await inbox.open()
        try:
            found = {}
            for summary in await inbox.receipts(limit=100):
                kept = await inbox.receipt(summary.id)
                assert kept is not None
                found[kept.request_id] = kept.body
            return found
        finally:
            await inbox.close()

    return asyncio.run(read())


def test_copy_carries_bodies_as_the_file_keeps_them(tmp_path, shared_inbox):
    """zstd bodies, and zlib ones that a file of an earlier version kept (migrated, they
    stay zlib), go across as they are: the PostgreSQL inbox reads both."""
    fill_old_inbox(tmp_path)
    connection = sqlite3.connect(Config(data_dir=tmp_path / "data").inbox_path)
    with connection:
        receipt_id, body = connection.execute(
            "SELECT id, body FROM receipts WHERE outcome = 'accepted' ORDER BY id LIMIT 1"
        ).fetchone()
        old = PACKED_ZLIB + zlib.compress(unpack(body) or b"", 1)
        connection.execute("UPDATE receipts SET body = ? WHERE id = ?", (old, receipt_id))
        kept = dict(connection.execute("SELECT id, body FROM receipts"))
    connection.close()
    # The callbacks and the duplicate receipt zstd but the first, the refused body as it came.
    prefixes = Counter(body[:2] for body in kept.values())
    assert prefixes == {PACKED: CALLBACKS, PACKED_ZLIB: 1, b"<R": 1}
    copy(write_config(tmp_path), shared_inbox)
    copied = shared_inbox.query("SELECT origin, body FROM receipts")
    assert {int(origin.split(":")[1]): body for origin, body in copied} == kept
    moved = open_inbox(
        Config(inbox={"url": shared_inbox.url, "postgres_schema": shared_inbox.schema})
    )
    read = bodies(moved)
    assert read == bodies(old_inbox(tmp_path))
    assert read["request-0"] == callback(0)  # the zlib one


def test_a_last_copy_brings_what_the_old_receiver_did_since(tmp_path, shared_inbox):
    fill_old_inbox(tmp_path)
    config = write_config(tmp_path)
    copy(config, shared_inbox)

    async def carry_on() -> list[str]:
        inbox = old_inbox(tmp_path)
        await inbox.open()
        try:
            await store(inbox, 100)
            return await run(inbox, "recorder", "done", 1)
        finally:
            await inbox.close()

    (finished,) = asyncio.run(carry_on())
    last = copy(config, shared_inbox)
    assert last["receipts"] == "1 copied, 9 already there"
    assert last["events"] == f"1 copied, {CALLBACKS} already there"
    # The new event's two runs, and the run the old receiver finished since.
    assert last["runs"] == f"2 copied, 1 brought up to date, {2 * CALLBACKS - 1} already there"
    assert shared_inbox.query(
        "SELECT status FROM runs WHERE event_id = $1 AND handler = 'recorder'", finished
    ) == [("done",)]


def test_a_receiver_on_the_copy_carries_on(tmp_path, shared_inbox):
    made = fill_old_inbox(tmp_path)
    copy(write_config(tmp_path), shared_inbox)
    config = write_config(tmp_path, shared_inbox)

    listed = ci_receiver("events", "list", "--json", "--limit", "100", "--config", str(config))
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(made["all"])
    dead = {row["id"] for row in rows if row["handlers"]["recorder"]["status"] == "dead"}
    assert dead == set(made["dead"])
    rejected = ci_receiver("events", "rejected", "--config", str(config)).stdout
    assert "malformed_xml: cut short" in rejected

    receiver = Receiver(config).start()
    try:
        pending = set(made["all"]) - set(made["dead"])  # the retried one included
        wait_until(lambda: set(recorded(tmp_path / "recorded.jsonl")) == pending, what="run")
        assert sorted(recorded(tmp_path / "recorded.jsonl")) == sorted(pending)
        # A callback that reached the old receiver is a duplicate for the new one.
        answer = receiver.post(callback(3)).json()
        assert (answer["accepted"], answer["duplicates"]) == (0, 1)
        assert receiver.terminate() == 0
    finally:
        receiver.stop()


def test_copy_refuses_what_it_cannot_use(tmp_path, shared_inbox):
    config = write_config(tmp_path)
    missing = ci_receiver("inbox", "copy", "--config", str(config), "--to", shared_inbox.url)
    assert missing.returncode != 0
    assert "no SQLite inbox at" in missing.stderr
    fill_old_inbox(tmp_path)
    no_target = ci_receiver("inbox", "copy", "--config", str(config))
    assert no_target.returncode != 0
    assert "--to postgresql://" in no_target.stderr
    wrong = ci_receiver("inbox", "copy", "--config", str(config), "--to", "mysql://x@y/z")
    assert wrong.returncode != 0
    assert "a postgresql:// URL" in wrong.stderr


def test_copy_never_prints_the_password(tmp_path, shared_inbox):
    fill_old_inbox(tmp_path)
    password = "s3cret-Pa55"
    url = make_url(shared_inbox.url).set(password=password).render_as_string(hide_password=False)
    result = ci_receiver(
        "inbox", "copy", "--config", str(write_config(tmp_path)), "--to", url,
        "--postgres-schema", shared_inbox.schema,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # trust auth: any password will do
    assert password not in result.stdout + result.stderr
