"""The SQLite inbox: what it stores, deduplicates, leases and gives back."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timezone

import orjson
import pytest

from receiver import parse_callback
from receiver.inbox import Receipt
from receiver.inbox.sqlite import SqliteInbox
from tests.callbacks import load


@pytest.fixture
async def inbox(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=16)
    await inbox.open()
    yield inbox
    await inbox.close()


def receipt(body: bytes, request_id: str = "r") -> Receipt:
    return Receipt(
        body,
        "http",
        datetime.now(timezone.utc),
        request_id,
        headers={"content-type": "application/xml"},
        source_meta={"request_id": request_id},
    )


async def store(inbox, name: str, handlers=("a", "b"), request_id: str = "r"):
    body = load(name)
    return await inbox.store(
        receipt(body, request_id), [(e, list(handlers)) for e in parse_callback(body)]
    )


async def test_an_event_is_stored_once_with_one_pending_run_per_handler(inbox):
    first = await store(inbox, "transcode.xml")
    again = await store(inbox, "transcode.xml")
    assert first.new == first.ids == ["job:j68427030f84611ecb8546d80f2baf56f:Success"]
    assert (again.new, again.duplicates) == ([], first.ids)
    detail = await inbox.event(first.ids[0])
    assert [(r.handler, r.status, r.attempts) for r in detail.runs] == [
        ("a", "pending", 0),
        ("b", "pending", 0),
    ]
    # The stored event is the parsed one, received_at included.
    parsed = parse_callback(load("transcode.xml"))[0]
    parsed.received_at = detail.event.received_at
    assert detail.event == parsed
    # Both deliveries are kept as receipts: the second is marked a duplicate.
    receipts = await inbox.receipts()
    assert [(r.outcome, r.event_ids) for r in receipts] == [
        ("duplicate", first.ids),
        ("accepted", first.ids),
    ]


async def test_the_same_job_in_xml_and_json_is_one_event(inbox):
    xml = await store(inbox, "smartcover.xml")
    json = await store(inbox, "smartcover.json")
    assert json.duplicates == xml.new


async def test_a_callback_with_a_new_and_a_known_event(inbox):
    await store(inbox, "smartcover.xml")
    known = {"JobId": "j6842765cf84611ecb8546d80f2baf56f", "State": "Success"}
    body = orjson.dumps({"JobsDetail": [known, {"JobId": "jnew", "State": "Success"}]})
    stored = await inbox.store(receipt(body), [(e, ["a"]) for e in parse_callback(body)])
    assert stored.ids == ["job:j6842765cf84611ecb8546d80f2baf56f:Success", "job:jnew:Success"]
    assert (stored.new, stored.duplicates) == (["job:jnew:Success"], stored.ids[:1])


async def test_concurrent_stores_share_commits(inbox):
    bodies = [
        b'{"JobsDetail": {"JobId": "j%d", "State": "Success", "Tag": "Transcode"}}' % n
        for n in range(200)
    ]
    before = inbox.commits
    results = await asyncio.gather(
        *[inbox.store(receipt(b), [(e, ["a"]) for e in parse_callback(b)]) for b in bodies]
    )
    assert sum(len(r.new) for r in results) == 200
    assert inbox.commits - before < 200  # group commit: several stores per fsync
    assert len(await inbox.events(limit=1000)) == 200


async def test_one_failing_operation_does_not_sink_its_batch(inbox):
    async def broken() -> None:
        def fail(connection: sqlite3.Connection) -> None:
            connection.execute("INSERT INTO runs (event_id) VALUES (NULL)")  # violates NOT NULL

        await inbox._writer.submit(fail)

    before = inbox.commits
    results = await asyncio.gather(broken(), store(inbox, "transcode.xml"), return_exceptions=True)
    assert isinstance(results[0], sqlite3.IntegrityError)
    assert results[1].new
    assert inbox.commits == before + 1  # one batch, the good operation committed in it


async def test_a_rejected_body_is_kept_up_to_the_bound_with_its_full_size(inbox):
    body = b"<Response>" + b"x" * 100
    receipt_id = await inbox.reject(receipt(body), "malformed_xml", "no end tag")
    (summary,) = await inbox.receipts(outcome="rejected")
    assert (summary.id, summary.size, summary.error_reason) == (
        receipt_id,
        len(body),
        "malformed_xml",
    )
    kept = await inbox.receipt(receipt_id)
    assert kept.body == body[:16]
    assert kept.headers == {"content-type": "application/xml"}


async def test_claims_are_exclusive_until_the_lease_ends(inbox):
    ids = (await store(inbox, "two_jobs.xml", handlers=["a"])).new
    first = await inbox.claim("a", 1, lease_seconds=30)
    second = await inbox.claim("a", 5, lease_seconds=30)
    assert [c.event.id for c in first + second] == ids
    assert await inbox.claim("a", 5, lease_seconds=30) == []
    assert first[0].request_id == "r"
    assert first[0].attempts == 0


async def test_finish_records_the_outcome_and_schedules_a_retry(inbox):
    (event_id,) = (await store(inbox, "transcode.xml", handlers=["a"])).new
    (claim,) = await inbox.claim("a", 1, 30)
    later = datetime(2099, 1, 1, tzinfo=timezone.utc)
    started = datetime.now(timezone.utc)
    assert await inbox.finish(claim, "retry", started_at=started, error="boom", retry_at=later)
    assert await inbox.next_due(["a"]) == later
    assert await inbox.claim("a", 1, 30) == []
    run = (await inbox.event(event_id)).runs[0]
    assert (run.status, run.attempts, run.last_error, run.due_at) == ("pending", 1, "boom", later)


async def test_requeue_named_handlers_backfills_every_event(inbox):
    await store(inbox, "two_jobs.xml", handlers=[])
    await store(inbox, "transcode.xml", handlers=["a"])
    assert await inbox.requeue(None, ["new"], dead_only=False) == 3
    assert await inbox.pending_counts() == {"a": 1, "new": 3}


async def test_requeue_resets_runs_of_chosen_events(inbox):
    (event_id,) = (await store(inbox, "transcode.xml", handlers=["a"])).new
    (claim,) = await inbox.claim("a", 1, 30)
    await inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))
    assert await inbox.requeue([event_id], None, dead_only=True) == 0  # it is not dead
    assert await inbox.requeue([event_id], None, dead_only=False) == 1
    run = (await inbox.event(event_id)).runs[0]
    assert (run.status, run.attempts) == ("pending", 0)


async def test_a_late_report_after_a_requeue_is_refused(inbox):
    (event_id,) = (await store(inbox, "transcode.xml", handlers=["a"])).new
    (claim,) = await inbox.claim("a", 1, lease_seconds=0.05)
    await asyncio.sleep(0.1)  # the lease ends: the process is gone, the run is replayed
    assert await inbox.requeue([event_id], None, dead_only=False) == 1
    assert not await inbox.finish(claim, "dead", started_at=datetime.now(timezone.utc))
    run = (await inbox.event(event_id)).runs[0]
    assert (run.status, run.attempts) == ("pending", 0)


async def test_readiness_pings_write_only_when_nothing_committed_lately(inbox):
    await store(inbox, "transcode.xml")
    before = inbox.commits
    await inbox.ping()
    assert inbox.commits == before  # the store a moment ago showed the inbox takes writes
    inbox._writer.last_commit -= 60
    await inbox.ping()
    assert inbox.commits == before + 1


async def test_a_writer_that_stops_fails_what_waits_instead_of_hanging(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=16)
    await inbox.open()
    waits = inbox._writer.submit(lambda connection: None)
    inbox._writer._task.cancel()  # the writer task ends other than by stop()
    with pytest.raises(Exception, match="the inbox writer stopped"):
        await waits
    with pytest.raises(Exception, match="closed"):
        await store(inbox, "transcode.xml")
    await inbox.close()


async def test_a_leased_run_is_not_requeued_under_its_runner(inbox):
    (event_id,) = (await store(inbox, "transcode.xml", handlers=["a"])).new
    await inbox.claim("a", 1, 30)
    assert await inbox.requeue([event_id], None, dead_only=False) == 0


async def test_events_filter_by_fields_and_run_status(inbox):
    await store(inbox, "transcode.xml")
    await store(inbox, "smartcover_failed.xml")
    await store(inbox, "workflow_finish.xml")
    assert [e.tag for e in await inbox.events(state="Failed")] == ["SmartCover"]
    assert [e.kind for e in await inbox.events(kind="workflow")] == ["workflow"]
    assert len(await inbox.events(status="pending")) == 3
    assert await inbox.events(status="dead") == []


async def test_the_inbox_reopens_with_everything_in_it(tmp_path):
    path = tmp_path / "inbox.db"
    first = SqliteInbox(path, rejected_body_bytes=16)
    await first.open()
    stored = await store(first, "transcode.xml")
    await first.close()
    again = SqliteInbox(path, rejected_body_bytes=16)
    await again.open()
    try:
        assert (await store(again, "transcode.xml")).duplicates == stored.new
        assert await again.pending_counts() == {"a": 1, "b": 1}
    finally:
        await again.close()
