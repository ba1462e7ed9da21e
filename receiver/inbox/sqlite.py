"""The SQLite inbox: a WAL database in the data folder, written through group commit.

`synchronous=full` (the default) fsyncs the WAL on every commit, so an answered
callback survives a power cut; `normal` survives a crash of the process but may lose
the last commits on power loss, for fewer fsyncs.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from receiver.ids import new_id
from receiver.inbox import (
    Attempt,
    Claim,
    EventDetail,
    EventSummary,
    Outcome,
    Receipt,
    ReceiptSummary,
    RunState,
    RunStatus,
    Stored,
)
from receiver.inbox.writer import Writer
from receiver.model import Event

SCHEMA_VERSION = 1
PING_FRESH_SECONDS = 5.0
# State keys share the meta table with the schema version: a prefix keeps them apart.
_STATE_PREFIX = "state:"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    source TEXT NOT NULL,
    request_id TEXT,
    headers BLOB NOT NULL,
    source_meta BLOB NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_reason TEXT,
    error_detail TEXT,
    event_ids BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_outcome ON receipts (outcome, id);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    receipt_id INTEGER NOT NULL REFERENCES receipts (id),
    received_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_name TEXT,
    job_id TEXT,
    tag TEXT,
    state TEXT,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id);
CREATE TABLE IF NOT EXISTS runs (
    event_id TEXT NOT NULL REFERENCES events (id),
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


def _setup(connection: sqlite3.Connection) -> None:
    connection.executescript(SCHEMA)
    row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        connection.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) > SCHEMA_VERSION:
        raise RuntimeError(
            f"the inbox was written by a newer ci-receiver (schema {row[0]}, this one knows"
            f" {SCHEMA_VERSION}); upgrade ci-receiver"
        )


class SqliteInbox:
    def __init__(self, path: Path, *, synchronous: str = "full", rejected_body_bytes: int) -> None:
        self.path = path
        self._rejected_body_bytes = rejected_body_bytes
        self._writer = Writer(path, synchronous=synchronous, setup=_setup)

    @property
    def commits(self) -> int:
        return self._writer.commits

    async def open(self) -> None:
        await self._writer.start()

    async def close(self) -> None:
        await self._writer.stop()

    # --- ingest --------------------------------------------------------------------

    async def store(self, receipt: Receipt, routed: list[tuple[Event, list[str]]]) -> Stored:
        rows = [
            (e.id, e.kind, e.event_name, e.job_id, e.tag, e.state, e.to_json(), handlers)
            for e, handlers in routed
        ]
        receipt_row = _receipt_row(receipt, receipt.body, len(receipt.body))

        def store(connection: sqlite3.Connection) -> Stored:
            now = time.time()
            receipt_id = connection.execute(
                "INSERT INTO receipts (received_at, source, request_id, headers, source_meta,"
                " body, size, outcome, event_ids) VALUES (?, ?, ?, ?, ?, ?, ?, 'accepted', ?)",
                (*receipt_row, orjson.dumps([row[0] for row in rows])),
            ).lastrowid
            assert receipt_id is not None
            new, duplicates = [], []
            for event_id, kind, name, job_id, tag, state, data, handlers in rows:
                inserted = connection.execute(
                    "INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id,"
                    " tag, state, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (id) DO NOTHING RETURNING id",
                    (event_id, receipt_id, receipt_row[0], kind, name, job_id, tag, state, data),
                ).fetchone()
                if inserted is None:
                    duplicates.append(event_id)
                    continue
                new.append(event_id)
                connection.executemany(
                    "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                    " VALUES (?, ?, 'pending', ?, ?)",
                    [(event_id, handler, now, now) for handler in handlers],
                )
            if not new:
                connection.execute(
                    "UPDATE receipts SET outcome = 'duplicate' WHERE id = ?", (receipt_id,)
                )
            return Stored(receipt_id, [row[0] for row in rows], new, duplicates)

        return await self._writer.submit(store)

    async def reject(
        self, receipt: Receipt, reason: str, detail: str, *, size: int | None = None
    ) -> int:
        kept = receipt.body[: self._rejected_body_bytes]
        row = _receipt_row(receipt, kept, len(receipt.body) if size is None else size)

        def reject(connection: sqlite3.Connection) -> int:
            receipt_id = connection.execute(
                "INSERT INTO receipts (received_at, source, request_id, headers, source_meta,"
                " body, size, outcome, event_ids, error_reason, error_detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'rejected', '[]', ?, ?)",
                (*row, reason, detail),
            ).lastrowid
            assert receipt_id is not None
            return receipt_id

        return await self._writer.submit(reject)

    # --- dispatch ------------------------------------------------------------------

    async def claim(
        self,
        handler: str,
        limit: int,
        lease_seconds: float,
        known: Mapping[str, Event] | None = None,
    ) -> list[Claim]:
        token = new_id()
        known = known or {}

        def claim(connection: sqlite3.Connection) -> list[Claim]:
            now = time.time()
            leased = connection.execute(
                "UPDATE runs SET lease_until = ?, lease_token = ?, updated_at = ?"
                " WHERE rowid IN (SELECT rowid FROM runs WHERE handler = ? AND status = 'pending'"
                " AND due_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
                " ORDER BY due_at LIMIT ?) RETURNING event_id, attempts",
                (now + lease_seconds, token, now, handler, now, now, limit),
            ).fetchall()
            if not leased:
                return []
            attempts = dict(leased)
            request_ids = dict(
                connection.execute(
                    "SELECT e.id, r.request_id FROM events e JOIN receipts r"
                    f" ON r.id = e.receipt_id WHERE e.id IN ({_marks(attempts)})",
                    list(attempts),
                )
            )
            # Operations run on the event loop, so `known` cannot change while this runs:
            # the events it holds are neither read back nor decoded.
            events = {event_id: known[event_id] for event_id in attempts if event_id in known}
            unknown = [event_id for event_id in attempts if event_id not in events]
            if unknown:
                events.update(
                    (event_id, Event.from_json(data))
                    for event_id, data in connection.execute(
                        f"SELECT id, data FROM events WHERE id IN ({_marks(unknown)})", unknown
                    )
                )
            return [
                Claim(events[event_id], handler, count, token, request_ids.get(event_id))
                for event_id, count in attempts.items()
            ]

        return await self._writer.submit(claim)

    async def finish(
        self,
        claim: Claim,
        outcome: Outcome,
        *,
        started_at: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> bool:
        counted = outcome != "released"  # a run interrupted by shutdown is not an attempt
        status = {"done": "done", "dead": "dead", "retry": "pending", "released": "pending"}[
            outcome
        ]
        started = started_at.timestamp()
        due = retry_at.timestamp() if retry_at else None
        key = (claim.event.id, claim.handler, claim.lease_token)

        def finish(connection: sqlite3.Connection) -> bool:
            now = time.time()
            updated = connection.execute(
                "UPDATE runs SET status = ?, attempts = attempts + ?, due_at = ?,"
                " lease_until = NULL, lease_token = NULL, last_error = ?, updated_at = ?"
                " WHERE event_id = ? AND handler = ? AND lease_token = ?",
                (status, int(counted), due or now, error, now, *key),
            ).rowcount
            if not updated:
                return False
            connection.execute(
                "INSERT INTO attempts (event_id, handler, number, started_at, finished_at,"
                " outcome, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key[:2], claim.attempts + int(counted), started, now, outcome, error),
            )
            return True

        return await self._writer.submit(finish)

    async def next_due(self, handlers: list[str]) -> datetime | None:
        marks = ",".join("?" * len(handlers))

        def next_due(connection: sqlite3.Connection) -> float | None:
            return connection.execute(
                "SELECT MIN(MAX(due_at, COALESCE(lease_until, 0))) FROM runs"
                f" WHERE status = 'pending' AND handler IN ({marks})",
                handlers,
            ).fetchone()[0]

        due = await self._writer.submit(next_due) if handlers else None
        return _datetime(due) if due is not None else None

    async def ping(self) -> None:
        # A commit that went through a moment ago says as much as a write of our own
        # would; readiness probes then add no fsync to a busy inbox.
        if time.monotonic() - self._writer.last_commit < PING_FRESH_SECONDS:
            return

        def ping(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (str(time.time()),)
            )

        await self._writer.submit(ping)

    # --- replay --------------------------------------------------------------------

    async def requeue(
        self, event_ids: list[str] | None, handlers: list[str] | None, *, dead_only: bool
    ) -> int:
        def requeue(connection: sqlite3.Connection) -> int:
            now = time.time()
            selected = "SELECT id FROM events" + (
                f" WHERE id IN ({','.join('?' * len(event_ids))})" if event_ids else ""
            )
            arguments: list[Any] = list(event_ids or ())
            if handlers and not dead_only:
                # Named handlers: create the runs that do not exist yet, reset the others.
                total = 0
                for handler in handlers:
                    total += connection.execute(
                        "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                        f" SELECT id, ?, 'pending', ?, ? FROM ({selected}) WHERE true"
                        " ON CONFLICT (event_id, handler) DO UPDATE SET status = 'pending',"
                        " attempts = 0, due_at = excluded.due_at, last_error = NULL,"
                        " lease_until = NULL, lease_token = NULL,"
                        " updated_at = excluded.updated_at"
                        " WHERE runs.lease_until IS NULL OR runs.lease_until <= excluded.due_at",
                        (handler, now, now, *arguments),
                    ).rowcount
                return total
            conditions = ["(lease_until IS NULL OR lease_until <= ?)"]
            values: list[Any] = [now]
            if dead_only:
                conditions.append("status = 'dead'")
            if event_ids:
                conditions.append(f"event_id IN ({selected})")
                values += arguments
            if handlers:
                conditions.append(f"handler IN ({','.join('?' * len(handlers))})")
                values += handlers
            return connection.execute(
                "UPDATE runs SET status = 'pending', attempts = 0, due_at = ?, last_error = NULL,"
                " lease_until = NULL, lease_token = NULL,"
                f" updated_at = ? WHERE {' AND '.join(conditions)}",
                (now, now, *values),
            ).rowcount

        return await self._writer.submit(requeue)

    # --- inspection ----------------------------------------------------------------

    async def events(
        self,
        *,
        limit: int = 50,
        kind: str | None = None,
        tag: str | None = None,
        state: str | None = None,
        job_id: str | None = None,
        status: RunStatus | None = None,
    ) -> list[EventSummary]:
        conditions, values = [], []
        for column, value in (("kind", kind), ("tag", tag), ("state", state), ("job_id", job_id)):
            if value is not None:
                conditions.append(f"e.{column} = ?")
                values.append(value)
        if status is not None:
            conditions.append(
                "EXISTS (SELECT 1 FROM runs r WHERE r.event_id = e.id AND r.status = ?)"
            )
            values.append(status)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""

        def events(connection: sqlite3.Connection) -> list[EventSummary]:
            found = connection.execute(
                "SELECT e.id, e.received_at, e.kind, e.event_name, e.tag, e.state, e.job_id"
                f" FROM events e {where} ORDER BY e.rowid DESC LIMIT ?",
                (*values, limit),
            ).fetchall()
            return [
                EventSummary(
                    row[0], datetime.fromisoformat(row[1]), *row[2:], _runs(connection, row[0])
                )
                for row in found
            ]

        return await self._writer.submit(events)

    async def event(self, event_id: str) -> EventDetail | None:
        def event(connection: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = connection.execute(
                "SELECT e.data, e.receipt_id, r.request_id FROM events e"
                " JOIN receipts r ON r.id = e.receipt_id WHERE e.id = ?",
                (event_id,),
            ).fetchone()
            if row is None:
                return None
            attempts = [
                Attempt(h, n, _datetime(s), _datetime(f), o, err)
                for h, n, s, f, o, err in connection.execute(
                    "SELECT handler, number, started_at, finished_at, outcome, error"
                    " FROM attempts WHERE event_id = ? ORDER BY id",
                    (event_id,),
                )
            ]
            return (*row, _runs(connection, event_id), attempts)

        found = await self._writer.submit(event)
        if found is None:
            return None
        data, receipt_id, request_id, runs, attempts = found
        return EventDetail(Event.from_json(data), receipt_id, request_id, runs, attempts)

    async def receipts(
        self, *, limit: int = 50, outcome: str | None = None
    ) -> list[ReceiptSummary]:
        def receipts(connection: sqlite3.Connection) -> list[ReceiptSummary]:
            rows = connection.execute(
                "SELECT id, received_at, source, outcome, size, error_reason, error_detail,"
                " event_ids FROM receipts"
                + (" WHERE outcome = ?" if outcome else "")
                + " ORDER BY id DESC LIMIT ?",
                (outcome, limit) if outcome else (limit,),
            ).fetchall()
            return [
                ReceiptSummary(
                    row[0], datetime.fromisoformat(row[1]), *row[2:7], orjson.loads(row[7])
                )
                for row in rows
            ]

        return await self._writer.submit(receipts)

    async def receipt(self, receipt_id: int) -> Receipt | None:
        def body(connection: sqlite3.Connection) -> tuple[Any, ...] | None:
            return connection.execute(
                "SELECT body, source, received_at, request_id, headers, source_meta, size"
                " FROM receipts WHERE id = ?",
                (receipt_id,),
            ).fetchone()

        row = await self._writer.submit(body)
        if row is None:
            return None
        body, source, received_at, request_id, headers, meta, size = row
        return Receipt(
            body,
            source,
            datetime.fromisoformat(received_at),
            request_id or "",
            orjson.loads(headers),
            orjson.loads(meta),
            cut_from=size if size > len(body) else None,
        )

    async def pending_counts(self) -> dict[str, int]:
        def counts(connection: sqlite3.Connection) -> dict[str, int]:
            return dict(
                connection.execute(
                    "SELECT handler, COUNT(*) FROM runs WHERE status = 'pending' GROUP BY handler"
                ).fetchall()
            )

        return await self._writer.submit(counts)

    # --- known ids and small durable state -------------------------------------------

    async def known(self, event_ids: list[str]) -> set[str]:
        def known(connection: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(event_ids), 500):  # below SQLite's variable limit
                chunk = event_ids[start : start + 500]
                found.update(
                    row[0]
                    for row in connection.execute(
                        f"SELECT id FROM events WHERE id IN ({_marks(chunk)})", chunk
                    )
                )
            return found

        return await self._writer.submit(known) if event_ids else set()

    async def get_state(self, key: str) -> str | None:
        def get(connection: sqlite3.Connection) -> str | None:
            row = connection.execute(
                "SELECT value FROM meta WHERE key = ?", (_STATE_PREFIX + key,)
            ).fetchone()
            return row[0] if row else None

        return await self._writer.submit(get)

    async def set_state(self, key: str, value: str) -> None:
        def set_(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (_STATE_PREFIX + key, value)
            )

        await self._writer.submit(set_)


def _receipt_row(receipt: Receipt, body: bytes, size: int) -> tuple[Any, ...]:
    return (
        receipt.received_at.isoformat(),
        receipt.source,
        receipt.request_id,
        orjson.dumps(receipt.headers),
        orjson.dumps(receipt.source_meta),
        body,
        size,
    )


def _marks(values: Any) -> str:
    return ",".join("?" * len(values))


def _runs(connection: sqlite3.Connection, event_id: str) -> list[RunState]:
    return [
        RunState(handler, status, attempts, _datetime(due) if status == "pending" else None, error)
        for handler, status, attempts, due, error in connection.execute(
            "SELECT handler, status, attempts, due_at, last_error FROM runs"
            " WHERE event_id = ? ORDER BY handler",
            (event_id,),
        )
    ]


def _datetime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, timezone.utc)
