"""The inbox's known ids and small durable state: what the reconciler asks of it."""

from __future__ import annotations

from datetime import datetime, timezone

from receiver import parse_callback
from receiver.inbox import Receipt
from receiver.inbox.sqlite import SqliteInbox
from tests.callbacks import load


async def test_known_names_only_the_stored_ids(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=16)
    await inbox.open()
    try:
        body = load("two_jobs.xml")
        events = parse_callback(body)
        receipt = Receipt(body, "http", datetime.now(timezone.utc), "r")
        await inbox.store(receipt, [(event, []) for event in events])
        stored = [event.id for event in events]
        # More ids than one SQL statement takes, most of them unknown.
        asked = [*stored, *(f"job:j{n:032x}:Success" for n in range(1200))]
        assert await inbox.known(asked) == set(stored)
        assert await inbox.known([]) == set()
    finally:
        await inbox.close()


async def test_state_survives_a_reopen_and_is_apart_from_the_schema(tmp_path):
    path = tmp_path / "inbox.db"
    inbox = SqliteInbox(path, rejected_body_bytes=16)
    await inbox.open()
    assert await inbox.get_state("reconcile:b:Transcode") is None
    await inbox.set_state("reconcile:b:Transcode", "2026-11-22T10:00:00+00:00")
    await inbox.set_state("reconcile:b:Transcode", "2026-11-22T10:05:00+00:00")
    # A state key named like an inbox setting does not touch that setting.
    await inbox.set_state("schema_version", "999")
    await inbox.close()

    inbox = SqliteInbox(path, rejected_body_bytes=16)
    await inbox.open()  # would refuse a schema it does not know
    try:
        assert await inbox.get_state("reconcile:b:Transcode") == "2026-11-22T10:05:00+00:00"
        assert await inbox.get_state("schema_version") == "999"
    finally:
        await inbox.close()
