"""`inbox copy`: an SQLite inbox into a PostgreSQL one, to move onto PostgreSQL without
leaving anything behind (callbacks, events, handler progress, the reconciler's cursor).

The SQLite file is only read (as the inspection commands read it: a receiver may still
be running on it). Receipts are copied oldest first in batches, each batch with its
events, their runs and attempts, in one PostgreSQL transaction. Copying again adds only
what is new, so a copy cut short is simply run again, and a file that kept receiving
meanwhile can be copied once more at the switch-over:

- a receipt keeps where it came from in `origin` (unique): its id, request id and
  arrival time in the file, which no other receipt of any file shares, so the files of
  several hosts can go into one PostgreSQL inbox;
- an event is keyed by its id: one already there (copied before, or received by a
  receiver on PostgreSQL) is left as it is;
- a run is keyed by (event, handler): copied when missing, and brought up to date when
  the file's was updated later than PostgreSQL's (the old receiver ran it since the last
  copy); a run that receivers on PostgreSQL moved on is left alone;
- an attempt is keyed by (event, handler, number, start time);
- a state value (a reconcile cursor) is copied only when PostgreSQL has none.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from receiver.inbox.postgres import COMMAND_TIMEOUT, text
from receiver.inbox.postgres_schema import setup
from receiver.inbox.reach import cannot_connect
from receiver.inbox.reader import Reader
from receiver.inbox.sqlite_schema import check_readable

BATCH = 500
TABLES = ("receipts", "events", "runs", "attempts", "state")

COPY_RECEIPTS = """
INSERT INTO receipts (received_at, source, request_id, headers, source_meta, body, size,
    outcome, error_reason, error_detail, event_ids, origin)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bytea[], $5::bytea[],
    $6::bytea[], $7::integer[], $8::text[], $9::text[], $10::text[], $11::bytea[], $12::text[])
ON CONFLICT (origin) WHERE origin IS NOT NULL DO NOTHING
RETURNING 1
"""

COPY_EVENTS = """
INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id, tag, state, bucket,
    key, data, verdict)
SELECT e.id, r.id, e.received_at, e.kind, e.event_name, e.job_id, e.tag, e.state, e.bucket,
    e.key, e.data, e.verdict
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[], $12::text[]) WITH ORDINALITY
    AS e(id, origin, received_at, kind, event_name, job_id, tag, state, bucket, key, data,
        verdict, n)
JOIN receipts r ON r.origin = e.origin
ORDER BY e.n
ON CONFLICT (id) DO NOTHING
RETURNING 1
"""

# xmax is 0 on a row this statement inserted, and set on one it updated.
COPY_RUNS = """
INSERT INTO runs (event_id, handler, status, attempts, due_at, lease_until, lease_token,
    last_error, updated_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::timestamptz[],
    $6::timestamptz[], $7::text[], $8::text[], $9::timestamptz[])
ON CONFLICT (event_id, handler) DO UPDATE SET status = excluded.status,
    attempts = excluded.attempts, due_at = excluded.due_at,
    lease_until = excluded.lease_until, lease_token = excluded.lease_token,
    last_error = excluded.last_error, updated_at = excluded.updated_at
WHERE runs.updated_at < excluded.updated_at
RETURNING xmax = 0
"""

COPY_ATTEMPTS = """
INSERT INTO attempts (event_id, handler, number, started_at, finished_at, outcome, error)
SELECT a.* FROM unnest($1::text[], $2::text[], $3::integer[], $4::timestamptz[],
    $5::timestamptz[], $6::text[], $7::text[])
    AS a(event_id, handler, number, started_at, finished_at, outcome, error)
WHERE NOT EXISTS (
    SELECT 1 FROM attempts b WHERE b.event_id = a.event_id AND b.handler = a.handler
        AND b.number = a.number AND b.started_at = a.started_at
)
"""

COPY_STATE = """
INSERT INTO state SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (key) DO NOTHING
RETURNING 1
"""


@dataclass(slots=True)
class Tally:
    """Rows of one table: copied, brought up to date (runs), or already there."""

    copied: int = 0
    updated: int = 0
    present: int = 0

    def add(self, total: int, copied: int, updated: int = 0) -> None:
        self.copied += copied
        self.updated += updated
        self.present += total - copied - updated


@dataclass(slots=True)
class CopyReport:
    tables: dict[str, Tally] = field(default_factory=lambda: {name: Tally() for name in TABLES})


async def copy_inbox(
    source: Path,
    url: str,
    schema: str,
    *,
    batch: int = BATCH,
    on_total: Callable[[int], None] = lambda total: None,
    on_batch: Callable[[int], None] = lambda receipts: None,
) -> CopyReport:
    """Copy the SQLite inbox at `source` into the PostgreSQL inbox at `url` / `schema`
    (created when missing). `on_total` hears how many receipts there are, `on_batch`
    how many each batch held."""
    if not source.exists():
        raise FileNotFoundError(f"no SQLite inbox at {source}")
    reader = Reader(source)
    try:
        await reader.run(check_readable)
        on_total(await reader.run(_count_receipts))
        target = await _connect(url, schema)
        try:
            return await _copy(reader, target, batch, on_batch)
        finally:
            await target.close()
    finally:
        reader.close()


async def _connect(url: str, schema: str) -> asyncpg.Connection:
    try:
        connection = await asyncpg.connect(
            url,
            timeout=COMMAND_TIMEOUT,
            server_settings={"search_path": schema, "application_name": "ci-receiver copy"},
        )
    except Exception as exc:
        raise cannot_connect(url, exc) from None
    try:
        await setup(connection, schema)
    except BaseException:
        await connection.close()
        raise
    return connection


async def _copy(
    reader: Reader,
    target: asyncpg.Connection,
    batch: int,
    on_batch: Callable[[int], None],
) -> CopyReport:
    report = CopyReport()
    tables = report.tables
    after = 0
    while True:
        rows = await reader.run(functools.partial(_read_batch, after=after, limit=batch))
        if not rows.receipts:
            break
        async with target.transaction():
            copied = await target.fetch(COPY_RECEIPTS, *_columns(rows.receipts, 12))
            tables["receipts"].add(len(rows.receipts), len(copied))
            copied = await target.fetch(COPY_EVENTS, *_columns(rows.events, 12))
            tables["events"].add(len(rows.events), len(copied))
            inserted = [row[0] for row in await target.fetch(COPY_RUNS, *_columns(rows.runs, 9))]
            tables["runs"].add(len(rows.runs), inserted.count(True), inserted.count(False))
            status = await target.execute(COPY_ATTEMPTS, *_columns(rows.attempts, 7))
            tables["attempts"].add(len(rows.attempts), int(status.rsplit(" ", 1)[-1]))
        after = rows.last_id
        on_batch(len(rows.receipts))
    state = await reader.run(_read_state)
    copied = await target.fetch(COPY_STATE, *_columns([(text(k), text(v)) for k, v in state], 2))
    tables["state"].add(len(state), len(copied))
    return report


@dataclass(slots=True)
class _Batch:
    last_id: int
    receipts: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    runs: list[tuple[Any, ...]]
    attempts: list[tuple[Any, ...]]


def _count_receipts(connection: sqlite3.Connection) -> int:
    return int(connection.execute("SELECT count(*) FROM receipts").fetchone()[0])


def _read_state(connection: sqlite3.Connection) -> list[tuple[str, str]]:
    return connection.execute("SELECT key, value FROM state").fetchall()


def _read_batch(connection: sqlite3.Connection, *, after: int, limit: int) -> _Batch:
    """The next receipts after id `after`, with their events, runs and attempts, as the
    PostgreSQL columns take them (one read transaction: one snapshot). Bodies and events'
    JSON go as the file keeps them (compressed, NULL while rebuilt from the body, or as an
    older version kept them): the PostgreSQL inbox reads them the same way (records.py)."""
    receipts = connection.execute(
        "SELECT id, received_at, source, request_id, headers, source_meta, body, size, outcome,"
        " error_reason, error_detail, event_ids FROM receipts WHERE id > ? ORDER BY id LIMIT ?",
        (after, limit),
    ).fetchall()
    if not receipts:
        return _Batch(after, [], [], [], [])
    origins = {row[0]: _origin(row[0], row[3], row[1]) for row in receipts}
    events = _select(
        connection,
        "SELECT id, receipt_id, received_at, kind, event_name, job_id, tag, state, bucket, key,"
        " data, verdict FROM events WHERE receipt_id IN ({}) ORDER BY seq",
        list(origins),
    )
    event_ids = [row[0] for row in events]
    runs = _select(
        connection,
        "SELECT event_id, handler, status, attempts, due_at, lease_until, lease_token,"
        " last_error, updated_at FROM runs WHERE event_id IN ({})",
        event_ids,
    )
    attempts = _select(
        connection,
        "SELECT event_id, handler, number, started_at, finished_at, outcome, error"
        " FROM attempts WHERE event_id IN ({}) ORDER BY id",
        event_ids,
    )
    return _Batch(
        receipts[-1][0],
        [
            (_time(at), source, text(request), _bytes(headers), _bytes(meta), _bytes(body), size,
             outcome, text(reason), text(detail), _bytes(ids), origins[receipt_id])
            for (receipt_id, at, source, request, headers, meta, body, size, outcome, reason,
                 detail, ids) in receipts
        ],
        [
            (text(event_id), origins[receipt_id], _time(at), kind, text(name), text(job),
             text(tag), text(state), text(bucket), text(key), _bytes(data), verdict)
            for (event_id, receipt_id, at, kind, name, job, tag, state, bucket, key, data,
                 verdict) in events
        ],
        [
            (text(event_id), handler, status, attempts_made, _time(due), _time(lease), lease_token,
             text(error), _time(updated))
            for (event_id, handler, status, attempts_made, due, lease, lease_token, error,
                 updated) in runs
        ],
        [
            (text(event_id), handler, number, _time(started), _time(finished), outcome,
             text(error))
            for event_id, handler, number, started, finished, outcome, error in attempts
        ],
    )  # fmt: skip


def _select(connection: sqlite3.Connection, sql: str, keys: Sequence[Any]) -> list[tuple[Any, ...]]:
    """`sql` with its `IN ({})` list filled, in chunks SQLite's parameter limit allows."""
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(keys, BATCH):
        rows += connection.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
    return rows


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _origin(receipt_id: int, request_id: str | None, received_at: float) -> str:
    """Where a copied receipt came from: no other receipt of any inbox has the same."""
    return f"sqlite:{receipt_id}:{round(received_at * 1_000_000)}:{request_id or ''}"


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as the column arrays that `unnest` takes."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc)


def _bytes(value: bytes | str | None) -> bytes | None:
    # An older inbox may hold JSON as text where this one writes bytes.
    return value.encode() if isinstance(value, str) else value
