"""The SQLite inbox's tables, created on first start and migrated from older versions.

Times are seconds since the epoch (REAL), so that ranges and orderings are plain number
comparisons. Version 2 keeps each callback's bytes once: events hold their normalized
fields without the decoded document (see `records.py`), where version 1 kept the whole
document in every event. Version 3 keeps the body compressed and no JSON in an event's
row while its receipt keeps the body (`data` NULL: the event is rebuilt from the body),
and drops two indexes that the wider ones starting with the same column serve. Version 4
indexes runs by status and receipts by outcome only where they are not the common case
(done, accepted): those index entries were a tenth of a small callback's bytes and served
no query. Version 5 compresses bodies with zstd where 4 used zlib (records.py `pack`):
its tables are 4's, and bodies written before stay zlib, which `unpack` still reads; the
version says that an older ci-receiver, which reads zlib alone, must not open the file.
Version 6 keeps a moderation event's verdict in a column, for filters and counts.

The inbox is marked as ci-receiver's by a row in `meta` (mark.py); a file that holds
anything else is not touched (receiver/ownership.py).
"""

from __future__ import annotations

import sqlite3
from datetime import datetime

import orjson
import structlog

from receiver.inbox.mark import KEYS, MARK, claim_inbox
from receiver.inbox.records import (
    EVENT_COLUMNS,
    VERDICTS_BATCH,
    VERDICTS_TO_FILL,
    lean,
    verdicts,
)
from receiver.inbox.types import SchemaError
from receiver.ownership import Claim

logger = structlog.get_logger("ci_receiver.inbox")

SCHEMA_VERSION = 6

# The tables of every version (mark.py).
EVERY_VERSION = {"meta", "receipts", "events", "runs", "attempts"}

TABLES = """
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
-- Refused and duplicate receipts by outcome (SQLite uses it for a query that says
-- `outcome <> 'accepted'`).
CREATE INDEX IF NOT EXISTS receipts_unaccepted ON receipts (outcome, id)
    WHERE outcome <> 'accepted';
-- The overview's callbacks per minute by outcome, read from the index alone, and any
-- range of receipts by time.
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
    -- NULL while the receipt keeps the body (the event is rebuilt from it), see records.py
    data BLOB,
    verdict TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
-- The overview's events by tag and state, read from the index alone, and any range of
-- events by time.
CREATE INDEX IF NOT EXISTS events_time_tally ON events (received_at, tag, event_name, kind, state);
CREATE INDEX IF NOT EXISTS events_receipt ON events (receipt_id);
-- A moderation event's verdict (normal, violation, suspected), for filters and the
-- overview's counts, read from the index alone: moderation events only.
CREATE INDEX IF NOT EXISTS events_verdict ON events (received_at, verdict)
    WHERE verdict IS NOT NULL;
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
-- Pending, held, forged and dead runs (SQLite uses it for a query that says
-- `status <> 'done'`).
CREATE INDEX IF NOT EXISTS runs_open ON runs (status, handler) WHERE status <> 'done';
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


def version(connection: sqlite3.Connection) -> int | None:
    """The inbox's schema version; None for a new, empty database."""
    has_meta = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def owned(connection: sqlite3.Connection) -> Claim:
    """Whether the file is ci-receiver's inbox (or empty); `NotOurs` when it is not."""
    names = {
        row[0]
        for row in connection.execute(
            # SQLite's own names begin "sqlite_"; in LIKE a bare "_" is any character,
            # and a user's table "sqlitedata" would pass for none at all.
            "SELECT name FROM sqlite_master"
            " WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        )
    }
    meta = _meta(connection) if "meta" in names else {}
    path = connection.execute("PRAGMA database_list").fetchone()[2]
    return claim_inbox(
        f"the SQLite file {path} (holding {', '.join(sorted(names)[:5])})",
        "inbox.path",
        found=names,
        meta=meta,
        every_version=EVERY_VERSION,
    )


def _meta(connection: sqlite3.Connection) -> dict[str, str]:
    """The rows of `KEYS`, if `meta` is a table of keys and values."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(meta)")}
    if not {"key", "value"} <= columns:
        return {}
    rows = connection.execute(
        f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' for _ in KEYS)})", KEYS
    )
    return {str(key): str(value) for key, value in rows}


def setup(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode, then create the tables or bring an older inbox up to
    date, in one transaction (two processes starting at once on one file: the second
    finds the work done). A file that is not an inbox is left as it is (`owned`)."""
    ownership = owned(connection)
    if ownership == "new":
        # Only a new file takes this without a VACUUM, and only before it turns to WAL:
        # space freed by retention then goes back to the file system in small steps
        # (PRAGMA incremental_vacuum).
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("BEGIN IMMEDIATE")
    try:
        found = version(connection)
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaError(
                f"the inbox was written by a newer ci-receiver (schema {found}, this one"
                f" knows {SCHEMA_VERSION}); upgrade ci-receiver"
            )
        if found == 1:
            _migrate_from_1(connection)
        elif found == 2:
            _migrate_from_2(connection)
        if found is not None and found < 4:
            _script(
                connection,
                "DROP INDEX IF EXISTS runs_status; DROP INDEX IF EXISTS receipts_outcome",
            )
        # From 4 to 5 nothing changes but the version written below.
        if found is not None and found < 6:
            _add_verdict_column(connection)
        _script(connection, TABLES)
        if found is not None and found < 6:
            _plan_verdicts(connection)
        connection.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", MARK)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if ownership == "adopted":
        logger.info("marked the inbox an earlier ci-receiver made as its own")
    if found == 1:
        logger.info("compacting the migrated inbox")
        connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
        connection.execute("VACUUM")
    elif found == 2:
        # The old events table's pages back to the file system (a file made by version 2
        # has incremental vacuum): no rewrite of the whole file.
        connection.execute("PRAGMA incremental_vacuum")
    fill_verdicts(connection)


def _script(connection: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits the transaction under way first.
    for statement in script.split(";"):
        if statement.strip():
            connection.execute(statement)


def check_readable(connection: sqlite3.Connection) -> None:
    """For read-only use: the schema must be this version's, since nothing may change it."""
    owned(connection)
    found = version(connection)
    if found == SCHEMA_VERSION:
        return
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaError(
            f"the inbox was written by a newer ci-receiver (schema {found}, this one knows"
            f" {SCHEMA_VERSION}); upgrade ci-receiver"
        )
    raise SchemaError(
        f"the inbox has schema {found}; start the receiver once (it migrates on start)"
    )


def _migrate_from_1(connection: sqlite3.Connection) -> None:
    """Version 1 kept ISO times as text and the whole document in every event, and
    workflow events without a job id (their RunId is their job id now)."""
    count = connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    logger.info("migrating the inbox to schema 2", events=count)
    connection.create_function("epoch", 1, _epoch, deterministic=True)
    connection.create_function("lean", 1, lean, deterministic=True)
    connection.create_function("input_field", 2, _input_field, deterministic=True)
    connection.create_function("run_id", 1, _run_id, deterministic=True)
    _script(
        connection,
        """
        ALTER TABLE receipts RENAME TO receipts_v1;
        ALTER TABLE events RENAME TO events_v1;
        DROP INDEX IF EXISTS receipts_outcome;
        DROP INDEX IF EXISTS events_job;
        """,
    )
    _script(connection, TABLES)
    _script(
        connection,
        """
        INSERT INTO receipts (id, received_at, source, request_id, headers, source_meta, body,
            size, outcome, error_reason, error_detail, event_ids)
        SELECT id, epoch(received_at), source, request_id, headers, source_meta, body, size,
            outcome, error_reason, error_detail, event_ids FROM receipts_v1;
        INSERT INTO events (seq, id, receipt_id, received_at, kind, event_name, job_id, tag,
            state, bucket, key, data)
        SELECT rowid, id, receipt_id, epoch(received_at), kind, event_name,
            COALESCE(job_id, run_id(data)), tag, state, input_field(data, 'bucket'),
            input_field(data, 'key'), lean(data) FROM events_v1;
        DROP TABLE events_v1;
        DROP TABLE receipts_v1;
        """,
    )


def _migrate_from_2(connection: sqlite3.Connection) -> None:
    """Version 2 required an event's JSON; version 3 leaves it NULL while the body is
    kept, which SQLite cannot change in place: the events table is made again. Its rows
    keep their JSON, and bodies stay uncompressed (`unpack` tells them apart): retention
    removes them in time, and the freed pages serve new rows."""
    count = connection.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    logger.info("migrating the inbox to schema 3", events=count)
    _script(
        connection,
        """
        ALTER TABLE events RENAME TO events_v2;
        DROP INDEX IF EXISTS events_job;
        DROP INDEX IF EXISTS events_time;
        DROP INDEX IF EXISTS events_time_tally;
        DROP INDEX IF EXISTS events_receipt;
        DROP INDEX IF EXISTS receipts_time;
        """,
    )
    _script(connection, TABLES)
    _script(
        connection,
        """
        INSERT INTO events (seq, id, receipt_id, received_at, kind, event_name, job_id, tag,
            state, bucket, key, data)
        SELECT seq, id, receipt_id, received_at, kind, event_name, job_id, tag, state, bucket,
            key, data FROM events_v2;
        DROP TABLE events_v2;
        """,
    )


# The moderation events of a batch to fill in (after, through), to rebuild.
MODERATION_EVENTS = (
    f"SELECT e.seq, {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
    f" WHERE e.kind = 'moderation' AND e.seq > ? AND e.seq <= ? ORDER BY e.seq"
    f" LIMIT {VERDICTS_BATCH}"
)


def _add_verdict_column(connection: sqlite3.Connection) -> None:
    """Version 5 kept no verdict: the column is added (to the catalog alone)."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
    if "verdict" not in columns:  # the tables of a migration from 1 or 2 have it
        connection.execute("ALTER TABLE events ADD COLUMN verdict TEXT")


def _plan_verdicts(connection: sqlite3.Connection) -> None:
    """The moderation events stored so far get their verdicts after the migration
    (`fill_verdicts`): those stored from now on have theirs."""
    (through,) = connection.execute(
        "SELECT coalesce(max(seq), 0) FROM events WHERE kind = 'moderation'"
    ).fetchone()
    if through:
        plan = orjson.dumps({"after": 0, "through": through}).decode()
        connection.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (VERDICTS_TO_FILL, plan))


def fill_verdicts(connection: sqlite3.Connection) -> None:
    """Fill in the verdicts a migration left to fill, a batch per transaction, so that
    the other processes on the file wait for one batch at most, and a process stopped
    half-way leaves the rest to the next start."""
    logged = False
    while True:
        connection.execute("BEGIN IMMEDIATE")
        try:
            row = connection.execute(
                "SELECT value FROM state WHERE key = ?", (VERDICTS_TO_FILL,)
            ).fetchone()
            if row is None:
                connection.execute("COMMIT")
                return
            plan = orjson.loads(row[0])
            if not logged:
                logger.info("filling in the verdicts of the inbox's moderation events", **plan)
                logged = True
            rows = connection.execute(MODERATION_EVENTS, (plan["after"], plan["through"]))
            batch = rows.fetchall()
            update = "UPDATE events SET verdict = ? WHERE id = ?"
            connection.executemany(update, verdicts([row[1:] for row in batch]))
            if batch:
                plan["after"] = batch[-1][0]
                connection.execute(
                    "UPDATE state SET value = ? WHERE key = ?",
                    (orjson.dumps(plan).decode(), VERDICTS_TO_FILL),
                )
            else:
                connection.execute("DELETE FROM state WHERE key = ?", (VERDICTS_TO_FILL,))
                logger.info("the inbox's moderation events have their verdicts")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _input_field(data: bytes, name: str) -> str | None:
    source = orjson.loads(data).get("input") or {}
    return source.get(name)


def _run_id(data: bytes) -> str | None:
    fields = orjson.loads(data)
    if fields.get("kind") != "workflow":
        return None
    return (fields.get("workflow") or {}).get("run_id")
