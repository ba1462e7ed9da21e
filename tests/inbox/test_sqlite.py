"""What only the SQLite inbox does: group commit, its writer, reads beside writes, and
migrating an inbox an older ci-receiver wrote."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import datetime, timezone

import orjson
import pytest

from receiver import parse_callback
from receiver.inbox import EventFilter, Receipt
from receiver.inbox.sqlite import SqliteInbox, SqliteReader
from tests.support.callbacks import load


@pytest.fixture
async def inbox(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=16)
    await inbox.open()
    yield inbox
    await inbox.close()


def receipt(body: bytes) -> Receipt:
    return Receipt(body, "http", datetime.now(timezone.utc), "r", {}, {"request_id": "r"})


async def store(inbox, name: str):
    body = load(name)
    return await inbox.store(receipt(body), [(e, ["a"]) for e in parse_callback(body)])


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


async def test_a_stored_callbacks_caller_goes_on_before_the_next_batch_runs(inbox):
    # An ingest hands its new events to the dispatcher then: a claim in the next batch
    # finds them in memory rather than reading them back (writer.py).
    order = []

    async def storing():
        await store(inbox, "transcode.xml")
        order.append("stored")

    async def next_batch():
        await asyncio.sleep(0)  # queued while the store's batch commits
        await inbox.connector.writer.submit(lambda connection: order.append("next batch"))

    await asyncio.gather(storing(), next_batch())
    assert order == ["stored", "next batch"]


async def test_one_failing_operation_does_not_sink_its_batch(inbox):
    async def broken() -> None:
        def fail(connection: sqlite3.Connection) -> None:
            connection.execute("INSERT INTO runs (event_id) VALUES (NULL)")  # violates NOT NULL

        await inbox.connector.writer.submit(fail)

    before = inbox.commits
    results = await asyncio.gather(broken(), store(inbox, "transcode.xml"), return_exceptions=True)
    assert isinstance(results[0], sqlite3.IntegrityError)
    assert results[1].new
    assert inbox.commits == before + 1  # one batch, the good operation committed in it


async def test_only_a_batch_of_bookkeeping_alone_commits_without_its_own_fsync(inbox):
    def level(connection: sqlite3.Connection) -> int:
        return connection.execute("PRAGMA synchronous").fetchone()[0]

    writer = inbox.connector.writer
    normal, full = 1, 2
    assert await writer.submit(level, bookkeeping=True) == normal
    assert await writer.submit(level) == full
    # A callback's commit beside bookkeeping syncs both.
    mixed = await asyncio.gather(writer.submit(level, bookkeeping=True), writer.submit(level))
    assert mixed == [full, full]
    # What dispatch records is bookkeeping; a callback is not.
    await store(inbox, "transcode.xml")
    (claim,) = await inbox.claim("a", 1, 30)
    assert await writer.submit(level, bookkeeping=True) == normal
    claimed = writer.submit(level, bookkeeping=True)
    finished = inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))
    assert await asyncio.gather(claimed, finished) == [normal, True]


async def test_an_inbox_set_to_normal_stays_normal(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", synchronous="normal", rejected_body_bytes=16)
    await inbox.open()
    try:
        level = await inbox.connector.writer.submit(
            lambda connection: connection.execute("PRAGMA synchronous").fetchone()[0]
        )
        assert level == 1
    finally:
        await inbox.close()


async def test_readiness_pings_write_only_when_nothing_committed_lately(inbox):
    await store(inbox, "transcode.xml")
    before = inbox.commits
    await inbox.ping()
    assert inbox.commits == before  # the store a moment ago showed the inbox takes writes
    inbox.connector.writer.last_commit -= 60
    await inbox.ping()
    assert inbox.commits == before + 1


async def test_a_writer_that_stops_fails_what_waits_instead_of_hanging(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=16)
    await inbox.open()
    waits = inbox.connector.writer.submit(lambda connection: None)
    inbox.connector.writer._task.cancel()  # the writer task ends other than by stop()
    with pytest.raises(Exception, match="the inbox writer stopped"):
        await waits
    with pytest.raises(Exception, match="closed"):
        await store(inbox, "transcode.xml")
    with pytest.raises(Exception, match="closed"):
        await inbox.ping()
    await inbox.close()


async def test_a_long_read_holds_up_no_write(inbox):
    for n in range(50):
        body = b'{"JobsDetail": {"JobId": "j%d", "State": "Success"}}' % n
        await inbox.store(receipt(body), [(e, ["a"]) for e in parse_callback(body)])
    reading, release = threading.Event(), threading.Event()

    def slow_read(connection: sqlite3.Connection) -> int:
        count = connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        reading.set()
        release.wait(10)  # a read transaction held open, as a long list would
        return count

    read = asyncio.ensure_future(inbox.connector.reader.run(slow_read))
    await asyncio.to_thread(reading.wait, 10)
    began = time.monotonic()
    stored = await store(inbox, "transcode.xml")
    assert stored.new
    assert time.monotonic() - began < 5  # not held up by the open read
    release.set()
    assert await read == 50  # the read saw its own snapshot


async def test_reads_of_the_uncommon_runs_and_receipts_use_their_partial_indexes(tmp_path):
    """runs_open and receipts_unaccepted hold only what is not done / not accepted, and
    SQLite uses a partial index only when the query itself says so: each read that lists
    dead runs or refused receipts is planned with the index, not a scan of every row."""
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=16)
    statements: list[str] = []
    connect = inbox.connector.reader._connect

    def traced() -> sqlite3.Connection:
        connection = connect()
        connection.set_trace_callback(statements.append)  # with its parameters bound
        return connection

    inbox.connector.reader._connect = traced  # type: ignore[method-assign]
    await inbox.open()
    try:
        await store(inbox, "transcode.xml")
        await inbox.backlog()
        await inbox.events(EventFilter(status="dead", handler="a"))
        await inbox.receipts(outcome="rejected")
        await inbox.rejected()
    finally:
        await inbox.close()
    plans = {}
    connection = sqlite3.connect(tmp_path / "inbox.db")
    for statement in statements:
        if statement.lstrip().upper().startswith("SELECT"):
            plan = connection.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
            plans[statement] = " | ".join(row[3] for row in plan)
    connection.close()
    used = {index for plan in plans.values() for index in ("runs_open", "receipts_unaccepted")
            if index in plan}  # fmt: skip
    assert used == {"runs_open", "receipts_unaccepted"}, plans
    for statement, plan in plans.items():
        if "FROM runs" in statement and "'dead'" in statement:
            assert "runs_open" in plan, plan
        if "FROM receipts" in statement and "'rejected'" in statement:
            assert "receipts_unaccepted" in plan, plan


async def test_a_read_only_inbox_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no inbox"):
        await SqliteReader(tmp_path / "none.db").open()


# --- migration from schema 1 -----------------------------------------------------------

SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE receipts (id INTEGER PRIMARY KEY, received_at TEXT NOT NULL,
    source TEXT NOT NULL, request_id TEXT, headers BLOB NOT NULL, source_meta BLOB NOT NULL,
    body BLOB NOT NULL, size INTEGER NOT NULL, outcome TEXT NOT NULL, error_reason TEXT,
    error_detail TEXT, event_ids BLOB NOT NULL);
CREATE INDEX receipts_outcome ON receipts (outcome, id);
CREATE TABLE events (id TEXT PRIMARY KEY, receipt_id INTEGER NOT NULL REFERENCES receipts (id),
    received_at TEXT NOT NULL, kind TEXT NOT NULL, event_name TEXT, job_id TEXT, tag TEXT,
    state TEXT, data BLOB NOT NULL);
CREATE INDEX events_job ON events (job_id);
CREATE TABLE runs (event_id TEXT NOT NULL REFERENCES events (id), handler TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, due_at REAL NOT NULL,
    lease_until REAL, lease_token TEXT, last_error TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (event_id, handler));
CREATE INDEX runs_due ON runs (handler, due_at) WHERE status = 'pending';
CREATE INDEX runs_status ON runs (status, handler);
CREATE TABLE attempts (id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, handler TEXT NOT NULL,
    number INTEGER NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL,
    outcome TEXT NOT NULL, error TEXT);
CREATE INDEX attempts_event ON attempts (event_id);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def write_schema_1(path, names: list[str]) -> list:
    """An inbox as ci-receiver 0.1 wrote it: ISO times, the whole event in `data`."""
    connection = sqlite3.connect(path)
    connection.executescript(SCHEMA_1)
    stored = []
    for number, name in enumerate(names, start=1):
        body = load(name)
        events = parse_callback(body)
        received = events[0].received_at.isoformat()
        ids = [e.id for e in events]
        connection.execute(
            "INSERT INTO receipts VALUES (?, ?, 'http', 'r', '{}', '{}', ?, ?, 'accepted',"
            " NULL, NULL, ?)",
            (number, received, body, len(body), orjson.dumps(ids)),
        )
        for event in events:
            # Version 1 gave workflow events no job id (now their RunId).
            job_id = None if event.kind == "workflow" else event.job_id
            data = {**orjson.loads(event.to_json()), "job_id": job_id}
            connection.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event.id, number, received, event.kind, event.event_name, job_id,
                 event.tag, event.state, orjson.dumps(data)),
            )  # fmt: skip
            connection.execute(
                "INSERT INTO runs VALUES (?, 'a', 'done', 1, 0, NULL, NULL, NULL, 0)", (event.id,)
            )
            stored.append(event)
    connection.execute("INSERT INTO receipts VALUES (99, ?, 'http', 'r', '{}', '{}', 'x', 1,"
                       " 'rejected', 'not_xml_or_json', 'x', '[]')", (received,))  # fmt: skip
    connection.commit()
    connection.close()
    return stored


async def test_an_inbox_of_schema_1_is_migrated_on_start_and_shrinks(tmp_path):
    path = tmp_path / "inbox.db"
    names = ["transcode.xml", "smartcover.json", "two_jobs.xml", "workflow_finish.xml"]
    before = write_schema_1(path, names)
    event_bytes_before = event_bytes(path)
    inbox = SqliteInbox(path, rejected_body_bytes=1024)
    await inbox.open()
    try:
        # The events no longer carry a copy of each callback's document.
        assert event_bytes(path) < event_bytes_before / 2
        for event in before:
            detail = await inbox.event(event.id)
            assert detail.event == event  # the document is rebuilt from the kept body
            assert [(r.handler, r.status) for r in detail.runs] == [("a", "done")]
        (workflow,) = [e for e in before if e.kind == "workflow"]
        (found,) = await inbox.events(EventFilter(job_id=workflow.workflow.run_id))
        assert found.id == workflow.id  # older workflow events are found by their RunId
        listed = await inbox.events(EventFilter(tag="Transcode"))
        assert {e.key for e in listed} == {e.input.key for e in before if e.tag == "Transcode"}
        assert [r.error_reason for r in await inbox.receipts(outcome="rejected")] == [
            "not_xml_or_json"
        ]
        # Work goes on in the migrated inbox: a known callback is a duplicate.
        assert (await store(inbox, "transcode.xml")).duplicates
        assert (await store(inbox, "snapshot.xml")).new
    finally:
        await inbox.close()
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    connection.close()


def event_bytes(path) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT SUM(LENGTH(data)) FROM events").fetchone()[0]
    finally:
        connection.close()
