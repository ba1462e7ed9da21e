"""An inbox an earlier schema wrote (SQLite 2, PostgreSQL 1: bodies uncompressed, each
event's JSON in its row; SQLite 3: full indexes where 4 has partial ones; SQLite 4,
PostgreSQL 3: bodies zlib-packed), migrated when a receiver starts on it: everything it
held is found again, and it goes on taking callbacks the new way.

The old tables are made here from the old DDL, as the previous version wrote them, with
rows as its `store` wrote them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import zlib
from datetime import datetime, timedelta, timezone

import asyncpg
import orjson
import pytest

from receiver import parse_callback
from receiver.inbox import (
    Cutoffs,
    EventFilter,
    Receipt,
    SchemaError,
    postgres_schema,
    sqlite_schema,
)
from receiver.inbox.postgres import PostgresInbox
from receiver.inbox.records import PACKED, PACKED_ZLIB, VERDICTS_TO_FILL, event_data
from receiver.inbox.sqlite import SqliteInbox
from tests.support.callbacks import load

# (The `postgres_schema` fixture hides the module's name in the tests that take it.)
POSTGRES_VERSION = postgres_schema.SCHEMA_VERSION

NAMES = ["transcode.xml", "smartcover.json", "two_jobs.xml", "workflow_finish.xml"]
HEADERS = {"content-type": "application/xml"}
DAY = timedelta(days=1)

# The previous version's DDL, verbatim.
SQLITE_SCHEMA_2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    source TEXT NOT NULL,
    request_id TEXT,
    headers BLOB NOT NULL,
    source_meta BLOB NOT NULL,
    body BLOB,
    size INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_reason TEXT,
    error_detail TEXT,
    event_ids BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_outcome ON receipts (outcome, id);
CREATE INDEX IF NOT EXISTS receipts_time ON receipts (received_at);
-- The overview's callbacks per minute by outcome, read from the index alone.
CREATE INDEX IF NOT EXISTS receipts_time_outcome ON receipts (received_at, outcome);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    receipt_id INTEGER NOT NULL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL,
    event_name TEXT,
    job_id TEXT,
    tag TEXT,
    state TEXT,
    bucket TEXT,
    key TEXT,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE INDEX IF NOT EXISTS events_time ON events (received_at);
-- The overview's events by tag and state, read from the index alone.
CREATE INDEX IF NOT EXISTS events_time_tally ON events (received_at, tag, event_name, kind, state);
CREATE INDEX IF NOT EXISTS events_receipt ON events (receipt_id);
CREATE TABLE IF NOT EXISTS runs (
    event_id TEXT NOT NULL,
    handler TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    lease_until REAL,
    lease_token TEXT,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (event_id, handler)
);
CREATE INDEX IF NOT EXISTS runs_due ON runs (handler, due_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, handler);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    handler TEXT NOT NULL,
    number INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS attempts_event ON attempts (event_id);
"""


POSTGRES_SCHEMA_1 = [
    "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS state (key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS receipts (
        id bigserial PRIMARY KEY,
        received_at timestamptz NOT NULL,
        source text NOT NULL,
        request_id text,
        headers bytea NOT NULL,
        source_meta bytea NOT NULL,
        body bytea,
        size integer NOT NULL,
        outcome text NOT NULL,
        error_reason text,
        error_detail text,
        event_ids bytea NOT NULL,
        -- Where a receipt copied from another inbox came from (`inbox copy`), so that
        -- copying again adds nothing.
        origin text UNIQUE
    )""",
    "CREATE INDEX IF NOT EXISTS receipts_outcome ON receipts (outcome, id)",
    "CREATE INDEX IF NOT EXISTS receipts_time ON receipts (received_at)",
    # The overview's callbacks per minute by outcome, read from the index alone.
    "CREATE INDEX IF NOT EXISTS receipts_time_outcome ON receipts (received_at, outcome)",
    """CREATE TABLE IF NOT EXISTS events (
        seq bigserial UNIQUE,
        id text PRIMARY KEY,
        receipt_id bigint NOT NULL,
        received_at timestamptz NOT NULL,
        kind text NOT NULL,
        event_name text,
        job_id text,
        tag text,
        state text,
        bucket text,
        key text,
        data bytea NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id)",
    "CREATE INDEX IF NOT EXISTS events_time ON events (received_at)",
    # The overview's events by tag and state, read from the index alone.
    "CREATE INDEX IF NOT EXISTS events_time_tally"
    " ON events (received_at, tag, event_name, kind, state)",
    "CREATE INDEX IF NOT EXISTS events_receipt ON events (receipt_id)",
    """CREATE TABLE IF NOT EXISTS runs (
        event_id text NOT NULL,
        handler text NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        due_at timestamptz NOT NULL,
        lease_until timestamptz,
        lease_token text,
        last_error text,
        updated_at timestamptz NOT NULL,
        PRIMARY KEY (event_id, handler)
    )""",
    "CREATE INDEX IF NOT EXISTS runs_due ON runs (handler, due_at) WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS runs_status ON runs (status, handler)",
    """CREATE TABLE IF NOT EXISTS attempts (
        id bigserial PRIMARY KEY,
        event_id text NOT NULL,
        handler text NOT NULL,
        number integer NOT NULL,
        started_at timestamptz NOT NULL,
        finished_at timestamptz NOT NULL,
        outcome text NOT NULL,
        error text
    )""",
    "CREATE INDEX IF NOT EXISTS attempts_event ON attempts (event_id)",
]


def old_rows(days_ago: float = 10) -> tuple[list, list]:
    """(receipts, events) as the previous version stored them: the first event of each
    callback handled, the others pending; then a refused body."""
    received = datetime.now(timezone.utc) - days_ago * DAY
    receipts, events = [], []
    for number, name in enumerate(NAMES, start=1):
        body = load(name)
        parsed = parse_callback(
            body, HEADERS, source_meta={"request_id": "r"}, received_at=received
        )
        ids = [e.id for e in parsed]
        receipts.append((number, received, body, len(body), "accepted", ids))
        for index, event in enumerate(parsed):
            events.append((number, event, "done" if index == 0 else "pending"))
    receipts.append((99, received, b"\x00z not compressed", 18, "rejected", []))
    return receipts, events


def event_row(event):
    source = event.input
    return (event.kind, event.event_name, event.job_id, event.tag, event.state,
            source.bucket if source else None, source.key if source else None,
            event_data(event))  # fmt: skip


async def check_migrated(inbox, events) -> None:
    """Everything the old inbox held is there, whole; new callbacks are stored lean."""
    for receipt_id, event, status in events:
        detail = await inbox.event(event.id)
        assert detail.event == event  # `raw` rebuilt from the body as the old inbox kept it
        assert detail.receipt_id == receipt_id
        assert [(r.handler, r.status) for r in detail.runs] == [("a", status)]
        assert (await inbox.receipt(receipt_id)).body == load(NAMES[receipt_id - 1])
    pending = {e.id: e for _, e, status in events if status == "pending"}
    claims = await inbox.claim("a", 100, 30)
    assert {c.event.id: c.event for c in claims} == pending  # handlers get them whole
    assert sorted(await inbox.load(list(pending)), key=lambda e: e.id) == sorted(
        pending.values(), key=lambda e: e.id
    )
    assert (await inbox.receipt(99)).body == b"\x00z not compressed"  # refused: as it came
    (rejected,) = await inbox.rejected()
    assert rejected.preview == b"\x00z not compressed"
    # The new way beside the old rows: a known callback is a duplicate, a new one lean.
    arrived = Receipt(load("transcode.xml"), "http", datetime.now(timezone.utc), "r", HEADERS)
    assert (
        await inbox.store(arrived, [(e, ["a"]) for e in parse_callback(arrived.body)])
    ).duplicates
    body = load("snapshot.xml")
    arrived = Receipt(body, "http", datetime.now(timezone.utc), "r", HEADERS, {"x": 1})
    new = parse_callback(body, HEADERS, source_meta={"x": 1}, received_at=arrived.received_at)
    stored = await inbox.store(arrived, [(e, ["a"]) for e in new])
    assert (await inbox.event(stored.new[0])).event == new[0]
    # Retention drops the old bodies; the old events keep their JSON, without the document.
    for claim in claims:
        await inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))
    now = datetime.now(timezone.utc)
    pruned = await inbox.prune(Cutoffs(events=now - 30 * DAY, bodies=now - 7 * DAY, refused=None))
    assert pruned.bodies == len(NAMES)
    for _, event, _ in events:
        found = (await inbox.event(event.id)).event
        assert (found.raw, found.tag, found.input) == ({}, event.tag, event.input)


# --- SQLite 2 -> 3 ----------------------------------------------------------------------


def write_sqlite_2(path) -> list:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
    connection.executescript(SQLITE_SCHEMA_2)
    connection.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    receipts, events = old_rows()
    for number, received, body, size, outcome, ids in receipts:
        connection.execute(
            "INSERT INTO receipts (id, received_at, source, request_id, headers, source_meta,"
            " body, size, outcome, error_reason, event_ids) VALUES (?, ?, 'http', 'r', ?, ?,"
            " ?, ?, ?, ?, ?)",
            (number, received.timestamp(), orjson.dumps(HEADERS),
             orjson.dumps({"request_id": "r"}), body, size, outcome,
             "not_xml_or_json" if outcome == "rejected" else None, orjson.dumps(ids)),
        )  # fmt: skip
    for number, event, status in events:
        connection.execute(
            "INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id, tag,"
            " state, bucket, key, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (event.id, number, event.received_at.timestamp(), *event_row(event)),
        )
        connection.execute(
            "INSERT INTO runs (event_id, handler, status, attempts, due_at, updated_at)"
            " VALUES (?, 'a', ?, ?, 0, 0)",
            (event.id, status, int(status == "done")),
        )
    connection.commit()
    connection.close()
    return events


async def test_an_inbox_of_sqlite_schema_2_is_migrated_on_start(tmp_path):
    path = tmp_path / "inbox.db"
    events = write_sqlite_2(path)
    inbox = SqliteInbox(path, rejected_body_bytes=1024)
    await inbox.open()
    try:
        await check_migrated(inbox, events)
    finally:
        await inbox.close()
    connection = sqlite3.connect(path)
    try:
        assert connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone() == (str(sqlite_schema.SCHEMA_VERSION),)
        # An earlier version's inbox, unmarked, recognised and marked as ci-receiver's.
        assert connection.execute("SELECT value FROM meta WHERE key = 'created_by'").fetchone() == (
            "ci-receiver",
        )
        indexes = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert not {"events_time", "receipts_time", "runs_status", "receipts_outcome"} & indexes
        assert {"events_job", "events_time_tally", "events_receipt"} <= indexes
        assert {"runs_open", "receipts_unaccepted"} <= indexes
        # The new callback: its body compressed, its event without JSON.
        (body, data) = connection.execute(
            "SELECT r.body, e.data FROM receipts r JOIN events e ON e.receipt_id = r.id"
            " WHERE r.id = (SELECT MAX(id) FROM receipts)"
        ).fetchone()
        assert body.startswith(PACKED)
        assert data is None
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        connection.close()


# --- PostgreSQL 1 -> 2 ------------------------------------------------------------------


async def write_postgres_1(url: str, schema: str, users: tuple[str, ...] = ()) -> list:
    """An inbox of schema 1, written after `users`' statements (a user's own tables)."""
    connection = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        await connection.execute(f'CREATE SCHEMA "{schema}"')
        for statement in (*users, *POSTGRES_SCHEMA_1):
            await connection.execute(statement)
        await connection.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        receipts, events = old_rows()
        for number, received, body, size, outcome, ids in receipts:
            await connection.execute(
                "INSERT INTO receipts (id, received_at, source, request_id, headers, source_meta,"
                " body, size, outcome, error_reason, event_ids) VALUES ($1, $2, 'http', 'r', $3,"
                " $4, $5, $6, $7, $8, $9)",
                number, received, orjson.dumps(HEADERS), orjson.dumps({"request_id": "r"}),
                body, size, outcome, "not_xml_or_json" if outcome == "rejected" else None,
                orjson.dumps(ids),
            )  # fmt: skip
        await connection.execute("SELECT setval('receipts_id_seq', 99)")
        for number, event, status in events:
            await connection.execute(
                "INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id, tag,"
                " state, bucket, key, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                event.id, number, event.received_at, *event_row(event),
            )  # fmt: skip
            await connection.execute(
                "INSERT INTO runs (event_id, handler, status, attempts, due_at, updated_at)"
                " VALUES ($1, 'a', $2, $3, now(), now())",
                event.id, status, int(status == "done"),
            )  # fmt: skip
    finally:
        await connection.close()
    return events


async def test_an_inbox_of_postgres_schema_1_is_migrated_on_start(postgres_schema):
    url, schema = postgres_schema
    events = await write_postgres_1(url, schema)
    replicas = [
        PostgresInbox(url, schema=schema, pool_size=2, rejected_body_bytes=1024) for _ in range(3)
    ]
    # Replicas starting at once: one migrates, under the advisory lock, the others find it done.
    await asyncio.gather(*(replica.open() for replica in replicas))
    try:
        await check_migrated(replicas[0], events)
    finally:
        for replica in replicas:
            await replica.close()
    connection = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        assert await connection.fetchval(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ) == str(POSTGRES_VERSION)
        # An earlier version's inbox, unmarked, recognised and marked as ci-receiver's.
        assert (
            await connection.fetchval("SELECT value FROM meta WHERE key = 'created_by'")
            == "ci-receiver"
        )
        indexes = {row[0] for row in await connection.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema
        )}  # fmt: skip
        retired = {"events_time", "receipts_time", "runs_status", "receipts_outcome"}
        assert not (retired | {"receipts_origin_key"}) & indexes
        assert {"runs_open", "receipts_unaccepted", "receipts_origin"} <= indexes
        assert await connection.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'runs'::regclass"
        ) == ["fillfactor=70"]
        body, data = await connection.fetchrow(
            "SELECT r.body, e.data FROM receipts r JOIN events e ON e.receipt_id = r.id"
            " WHERE r.id = (SELECT MAX(id) FROM receipts)"
        )
        assert body.startswith(PACKED)
        assert data is None
    finally:
        await connection.close()


async def test_a_users_index_of_a_retired_name_outlives_the_migration(postgres_schema):
    """In a shared schema a user's index may hold a name an older inbox's index would have
    had (so it was never made): the migration retires the inbox's indexes only."""
    url, schema = postgres_schema
    users = (
        "CREATE TABLE orders (id int PRIMARY KEY, status text)",
        "CREATE INDEX runs_status ON orders (status)",
        "CREATE INDEX receipts_time ON orders (id, status)",
    )
    await write_postgres_1(url, schema, users)
    inbox = PostgresInbox(url, schema=schema, pool_size=2, rejected_body_bytes=1024)
    await inbox.open()
    await inbox.close()
    connection = await asyncpg.connect(url)
    try:
        kept = await connection.fetch(
            "SELECT indexname, tablename FROM pg_indexes WHERE schemaname = $1"
            " AND indexname IN ('runs_status', 'receipts_time') ORDER BY 1",
            schema,
        )
    finally:
        await connection.close()
    assert [tuple(row) for row in kept] == [("receipts_time", "orders"), ("runs_status", "orders")]


# --- SQLite 3 -> 4: indexes only -------------------------------------------------------


async def test_an_inbox_of_sqlite_schema_3_gets_its_partial_indexes(tmp_path):
    """Schema 3 differed from 4 only in two full indexes, made here as 3 had them."""
    path = tmp_path / "inbox.db"
    inbox = SqliteInbox(path, rejected_body_bytes=1024)
    await inbox.open()
    body = load("transcode.xml")
    received = datetime.now(timezone.utc)
    await inbox.store(
        Receipt(body, "http", received, "r", HEADERS, {}),
        [(event, ["a"]) for event in parse_callback(body, HEADERS)],
    )
    await inbox.close()
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        DROP INDEX runs_open;
        DROP INDEX receipts_unaccepted;
        CREATE INDEX receipts_outcome ON receipts (outcome, id);
        CREATE INDEX runs_status ON runs (status, handler);
        UPDATE meta SET value = '3' WHERE key = 'schema_version';
        """
    )
    connection.close()
    inbox = SqliteInbox(path, rejected_body_bytes=1024)
    await inbox.open()
    try:
        backlog = await inbox.backlog()
        assert backlog["a"].pending == 1  # read through runs_open
    finally:
        await inbox.close()
    connection = sqlite3.connect(path)
    try:
        indexes = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
        )}  # fmt: skip
        assert {"runs_open", "receipts_unaccepted"} <= indexes
        assert not {"runs_status", "receipts_outcome"} & indexes
        assert connection.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone() == (str(sqlite_schema.SCHEMA_VERSION),)
    finally:
        connection.close()


# --- SQLite 4 -> 5, PostgreSQL 3 -> 4: zlib bodies -------------------------------------

# The last versions that packed bodies with zlib; their tables are this version's.
ZLIB_VERSION = {"sqlite": 4, "postgresql": 3}


async def write_zlib_inbox(place) -> list:
    """The rows of `old_rows` as the last zlib version's `store` wrote them: bodies
    `PACKED_ZLIB` + zlib level 1, events without JSON. Its tables are this version's:
    made by opening the inbox, then the version put back."""
    await (await place.open()).close()
    sqlite = place.backend == "sqlite"

    def at(moment: datetime) -> float | datetime:
        return moment.timestamp() if sqlite else moment

    receipts, events = old_rows()
    for number, received, body, size, outcome, ids in receipts:
        kept = body if outcome == "rejected" else PACKED_ZLIB + zlib.compress(body, 1)
        await place.sql(
            "INSERT INTO receipts (id, received_at, source, request_id, headers, source_meta,"
            " body, size, outcome, error_reason, event_ids) VALUES (?, ?, 'http', 'r', ?, ?,"
            " ?, ?, ?, ?, ?)",
            number, at(received), orjson.dumps(HEADERS), orjson.dumps({"request_id": "r"}),
            kept, size, outcome, "not_xml_or_json" if outcome == "rejected" else None,
            orjson.dumps(ids),
        )  # fmt: skip
    if not sqlite:
        await place.sql("SELECT setval('receipts_id_seq', 99)")
    for number, event, status in events:
        await place.sql(
            "INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id, tag,"
            " state, bucket, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            event.id, number, at(event.received_at), *event_row(event)[:-1],
        )  # fmt: skip
        await place.sql(
            "INSERT INTO runs (event_id, handler, status, attempts, due_at, updated_at)"
            " VALUES (?, 'a', ?, ?, ?, ?)",
            event.id, status, int(status == "done"), at(event.received_at), at(event.received_at),
        )  # fmt: skip
    version = str(ZLIB_VERSION[place.backend])
    await place.sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", version)
    return events


async def test_an_inbox_of_zlib_bodies_is_migrated_and_keeps_them(inbox_place, monkeypatch):
    events = await write_zlib_inbox(inbox_place)
    inbox = await inbox_place.open()
    schema = sqlite_schema if inbox_place.backend == "sqlite" else postgres_schema
    version = "SELECT value FROM meta WHERE key = 'schema_version'"
    assert await inbox_place.sql(version) == [(str(schema.SCHEMA_VERSION),)]
    # Nothing rewritten: the old bodies stay zlib, and read back as they arrived.
    old = await inbox_place.sql("SELECT body FROM receipts WHERE outcome = 'accepted'")
    assert len(old) == len(NAMES)
    assert all(body.startswith(PACKED_ZLIB) for (body,) in old)
    await check_migrated(inbox, events)
    (newest,) = await inbox_place.sql("SELECT body FROM receipts ORDER BY id DESC LIMIT 1")
    assert newest[0].startswith(PACKED)
    # The ci-receiver of the zlib version refuses the inbox now: it would not read the
    # new bodies.
    monkeypatch.setattr(schema, "SCHEMA_VERSION", ZLIB_VERSION[inbox_place.backend])
    with pytest.raises(SchemaError, match="newer ci-receiver"):
        await inbox_place.open()


# --- SQLite 5 -> 6, PostgreSQL 4 -> 5: verdicts in a column -----------------------------

# The last versions that kept no verdict; their tables are this version's but for it.
VERDICTLESS_VERSION = {"sqlite": 5, "postgresql": 4}


async def test_the_moderation_events_of_an_older_inbox_get_their_verdicts(inbox_place):
    inbox = await inbox_place.open()
    received = datetime.now(timezone.utc)
    for name in ("moderation_video_detail.json", "moderation_document_detail.json", NAMES[0]):
        body = load(name)
        await inbox.store(
            Receipt(body, "http", received, "r", HEADERS, {}),
            [(event, ["a"]) for event in parse_callback(body, HEADERS)],
        )
    expected = await inbox_place.sql("SELECT id, verdict FROM events ORDER BY seq")
    assert "violation" in {verdict for _, verdict in expected}
    await inbox.close()
    if inbox_place.backend == "sqlite":
        await inbox_place.sql("DROP INDEX events_verdict")
    await inbox_place.sql("ALTER TABLE events DROP COLUMN verdict")
    version = str(VERDICTLESS_VERSION[inbox_place.backend])
    await inbox_place.sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", version)

    inbox = await inbox_place.open()
    assert await inbox_place.sql("SELECT id, verdict FROM events ORDER BY seq") == expected
    found = await inbox.events(EventFilter(verdict="violation"), limit=10)
    assert [summary.id for summary in found] == [i for i, v in expected if v == "violation"]
    assert await inbox_place.sql("SELECT key FROM state WHERE key LIKE 'inbox:%'") == []
    await inbox.close()

    # A process stopped half-way: the next start fills in what is left, and only that.
    seqs = await inbox_place.sql("SELECT seq FROM events WHERE kind = 'moderation' ORDER BY seq")
    await inbox_place.sql("UPDATE events SET verdict = NULL")
    plan = orjson.dumps({"after": seqs[0][0], "through": seqs[-1][0]}).decode()
    await inbox_place.sql("INSERT INTO state VALUES (?, ?)", VERDICTS_TO_FILL, plan)
    await inbox_place.open()
    first, *rest = [(i, v) for i, v in expected if v is not None]
    after = await inbox_place.sql("SELECT id, verdict FROM events WHERE verdict IS NOT NULL")
    assert sorted(after) == sorted(rest)
    assert first not in after
