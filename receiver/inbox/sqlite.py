"""The SQLite inbox: a WAL database in the data folder, the embedded default.

Writes go through group commit on the event loop (`writer.py`); reads run on
connections of their own on helper threads (`reader.py`), so neither waits for the
other. `synchronous=full` (the default) fsyncs the WAL on every commit, so an answered
callback survives a power cut; `normal` survives a crash of the process but may lose
the last commits on power loss, for fewer fsyncs. Several processes on one host may
share the file; SQLite serializes their writes.

The connector runs the inbox's statements (`query.py`) for its rules (`manager.py`),
but for the hot path, which it writes here: a callback stored and an outcome recorded
statement by statement on its writer (PostgreSQL does each in one statement), and runs
claimed by rowid. Times are seconds since the epoch, on this host's clock.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from receiver.inbox.connector import Delivered, Delivery, Finished
from receiver.inbox.manager import InboxManager, InboxReader
from receiver.inbox.query import FORGED_EVENT, Dialect, Offload, Statement, Tx, Work, glob_to_sqlite
from receiver.inbox.reader import Reader
from receiver.inbox.records import pack
from receiver.inbox.sqlite_schema import SCHEMA_VERSION, check_readable, owned, setup, version
from receiver.inbox.types import InboxUnavailable, Lease, SchemaError
from receiver.inbox.writer import Writer

T = TypeVar("T")

# Pages (of 4 KiB) handed back to the file system per step of compact().
COMPACT_PAGES = 2048

DIALECT = Dialect(
    placeholder=lambda n: f"?{n}",
    glob=lambda column, param: f"{column} GLOB {param}",
    glob_pattern=glob_to_sqlite,
    time=lambda moment: moment.timestamp(),
    clock=time.time,
    no_limit=-1,
    length="LENGTH",
    greatest="MAX",
    seconds=lambda difference: f"({difference})",
    steps=lambda column, step: f"CAST({column} / {step} AS INTEGER)",
    # SQLite allows 32766 parameters: stay far below.
    chunk=500,
    try_lock=None,
    text=lambda value: value,
    # SQLite's lower() lowers ASCII letters only (without the ICU extension).
    fold=lambda expression: f"lower({expression})",
)

# Due pending runs leased by rowid: one writer at a time, so no row is leased twice.
LEASE = (
    "UPDATE runs SET lease_until = ?, lease_token = ?, updated_at = ?"
    " WHERE rowid IN (SELECT rowid FROM runs WHERE handler = ? AND status = 'pending'"
    " AND due_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
    " ORDER BY due_at LIMIT ?) RETURNING event_id, attempts, (SELECT r.request_id"
    " FROM events e JOIN receipts r ON r.id = e.receipt_id WHERE e.id = runs.event_id)"
)

# A callback stored (`store_delivery`): its receipt, then each event new (or in place of a stored
# one that verification found forged, its runs afresh) with its runs; a receipt none of
# whose events is new is a duplicate's. PostgreSQL does the same in one statement.
ACCEPT = (
    "INSERT INTO receipts (received_at, source, request_id, headers, source_meta, body, size,"
    " outcome, event_ids) VALUES (?, ?, ?, ?, ?, ?, ?, 'accepted', ?) RETURNING id"
)
# No JSON (`data`): the event is rebuilt from the receipt's body (records.py).
INSERT_EVENT = (
    "INSERT INTO events (id, kind, event_name, job_id, tag, state, bucket, key, verdict,"
    " receipt_id, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING RETURNING id"
)
REPLACE_FORGED = (
    "UPDATE events SET kind = ?, event_name = ?, job_id = ?, tag = ?, state = ?, bucket = ?,"
    " key = ?, verdict = ?, data = NULL, receipt_id = ?, received_at = ?"
    f" WHERE id = ? AND {FORGED_EVENT.replace('e.id', 'events.id')}"
)
DELETE_RUNS = "DELETE FROM runs WHERE event_id = ?"
INSERT_RUN = (
    "INSERT INTO runs (event_id, handler, status, due_at, updated_at, lease_until, lease_token)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
MARK_DUPLICATE = "UPDATE receipts SET outcome = 'duplicate' WHERE id = ?"

# An outcome recorded (`record_outcome`): the run, while its lease is held, then the attempt.
FINISH_RUN = (
    "UPDATE runs SET status = ?, attempts = attempts + ?, due_at = ?, lease_until = NULL,"
    " lease_token = NULL, last_error = ?, updated_at = ?"
    " WHERE event_id = ? AND handler = ? AND lease_token = ?"
)
RECORD_ATTEMPT = (
    "INSERT INTO attempts (event_id, handler, number, started_at, finished_at, outcome, error)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def run(connection: sqlite3.Connection, work: Callable[[Tx], Work[T]]) -> T:
    """Run a unit of work's statements one after the other on `connection`."""
    steps = work(Tx(DIALECT))
    result: Any = None
    while True:
        try:
            step = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if isinstance(step, Offload):
            result = step.function(step.argument)
        else:
            result = execute(connection, step)


def execute(connection: sqlite3.Connection, statement: Statement) -> Any:
    if statement.fetch == "many":
        connection.executemany(statement.text, statement.args)
        return None
    cursor = connection.execute(statement.text, statement.args)
    if statement.fetch == "rows":
        return cursor.fetchall()
    if statement.fetch == "row":
        return cursor.fetchone()
    if statement.fetch == "value":
        row = cursor.fetchone()
        return row[0] if row is not None else None
    if statement.fetch == "count":
        return cursor.rowcount
    return None


def store_delivery(connection: sqlite3.Connection, delivery: Delivery) -> Delivered:
    receipt = delivery.receipt
    now, received_at = time.time(), receipt.received_at.timestamp()
    headers, meta = orjson.dumps(receipt.headers), orjson.dumps(receipt.source_meta)
    ids = orjson.dumps([row[0] for row, _ in delivery.events])
    body = pack(receipt.body)  # on the writer's thread
    arguments = (received_at, receipt.source, receipt.request_id, headers, meta, body)
    (receipt_id,) = connection.execute(ACCEPT, (*arguments, len(receipt.body), ids)).fetchone()
    stored = []
    for row, runs in delivery.events:
        event_id = row[0]
        if connection.execute(INSERT_EVENT, (*row, receipt_id, received_at)).fetchone() is None:
            # Stored already: a duplicate, unless verification found the stored one
            # forged: this delivery takes its place, its runs afresh.
            replacing = (*row[1:], receipt_id, received_at, event_id)
            if not connection.execute(REPLACE_FORGED, replacing).rowcount:
                continue
            connection.execute(DELETE_RUNS, (event_id,))
        stored.append(event_id)
        connection.executemany(
            INSERT_RUN,
            [
                (event_id, handler, status, now, now, *_leased(lease, now))
                for handler, status, lease in runs
            ],
        )
    if not stored:
        connection.execute(MARK_DUPLICATE, (receipt_id,))
    return Delivered(receipt_id, stored)


def _leased(lease: Lease | None, now: float) -> tuple[float | None, str | None]:
    """A new run's `lease_until` and `lease_token`."""
    return (None, None) if lease is None else (now + lease.seconds, lease.token)


def record_outcome(connection: sqlite3.Connection, finished: Finished) -> bool:
    event_id, handler, token, status, counted, retry_at, error, number, started_at, outcome = (
        finished
    )
    now = time.time()
    due = retry_at.timestamp() if retry_at is not None else now
    updating = (status, counted, due, error, now, event_id, handler, token)
    if not connection.execute(FINISH_RUN, updating).rowcount:
        return False
    recording = (event_id, handler, number, started_at.timestamp(), now, outcome, error)
    connection.execute(RECORD_ATTEMPT, recording)
    return True


class SqliteConnector:
    dialect = DIALECT

    def __init__(self, path: Path, *, synchronous: str = "full", read_only: bool = False) -> None:
        self.path = path
        self.writer = None if read_only else Writer(path, synchronous=synchronous, setup=setup)
        self.reader = Reader(path)

    @property
    def _write(self) -> Writer:
        if self.writer is None:  # an `InboxReader` never writes
            raise RuntimeError("this inbox was opened read-only")
        return self.writer

    async def open(self, waiting: Callable[[], None] | None) -> None:
        """Opens at once, or fails: a file has no server to wait for (`waiting` unused)."""
        if self.writer is not None:
            await self.writer.start()
            return
        if not self.path.exists():
            raise FileNotFoundError(f"no inbox at {self.path} (nothing received yet?)")
        await self.reader.run(check_readable)

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
        self.reader.close()

    async def read(self, work: Callable[[Tx], Work[T]]) -> T:
        return await self.reader.run(lambda connection: run(connection, work))

    async def read_one(self, statement: Callable[[Tx], Statement]) -> Any:
        return await self.reader.run(lambda connection: execute(connection, statement(Tx(DIALECT))))

    async def write(self, work: Callable[[Tx], Work[T]]) -> T:
        return await self._write.submit(lambda connection: run(connection, work))

    async def execute(self, statement: Callable[[Tx], Statement]) -> Any:
        return await self._write.submit(
            lambda connection: execute(connection, statement(Tx(DIALECT)))
        )

    async def store(self, delivery: Delivery) -> Delivered:
        return await self._write.submit(_storing(delivery))

    async def store_many(self, deliveries: list[Delivery]) -> list[Delivered | BaseException]:
        # Submitted together: they go in one batch, each rolled back alone should it fail.
        futures = self._write.submit_many([_storing(delivery) for delivery in deliveries])
        results: list[Delivered | BaseException] = await asyncio.gather(
            *futures, return_exceptions=True
        )
        return results

    async def finish(self, finished: Finished) -> bool:
        return await self._write.submit(
            lambda connection: record_outcome(connection, finished), bookkeeping=True
        )

    async def lease(
        self, handler: str, limit: int, lease_seconds: float, token: str
    ) -> list[tuple[str, int, str | None]]:
        def lease(connection: sqlite3.Connection) -> list[tuple[str, int, str | None]]:
            now = time.time()
            arguments = (now + lease_seconds, token, now, handler, now, now, limit)
            return connection.execute(LEASE, arguments).fetchall()

        return await self._write.submit(lease, bookkeeping=True)

    def watch(self, wake: Callable[[], None]) -> None:
        """Other processes on the file cannot tell this one: dispatch polls."""

    @property
    def last_write(self) -> float:
        return self._write.last_commit

    @property
    def last_failure(self) -> float:
        return self._write.last_failure_at

    def unwritable(self, error: Exception) -> InboxUnavailable:
        return InboxUnavailable(f"not writable: {error}")

    async def size(self) -> int:
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return sum(path.stat().st_size for path in files if path.exists())

    async def compact(self) -> None:
        def step(connection: sqlite3.Connection) -> bool:
            """Hand back some free pages; True while some are left and it helped."""
            before = connection.execute("PRAGMA freelist_count").fetchone()[0]
            connection.execute(f"PRAGMA incremental_vacuum({COMPACT_PAGES})")
            after = connection.execute("PRAGMA freelist_count").fetchone()[0]
            return bool(0 < after < before)  # no progress: a file without incremental vacuum

        # Small steps, each its own commit: callbacks keep being stored in between.
        while await self._write.submit(step):
            pass


def _storing(delivery: Delivery) -> Callable[[sqlite3.Connection], Delivered]:
    return lambda connection: store_delivery(connection, delivery)


class SqliteInbox(InboxManager):
    """The whole inbox in the SQLite file at `path`."""

    connector: SqliteConnector

    def __init__(self, path: Path, *, synchronous: str = "full", rejected_body_bytes: int) -> None:
        super().__init__(
            SqliteConnector(path, synchronous=synchronous),
            rejected_body_bytes=rejected_body_bytes,
        )

    @property
    def commits(self) -> int:
        """Batches committed, for tests and benchmarks."""
        return self.connector._write.commits


class SqliteReader(InboxReader):
    """The SQLite inbox at `path`, read by the inspection commands: nothing is changed
    and no lock taken that a running receiver could wait for."""

    def __init__(self, path: Path) -> None:
        super().__init__(SqliteConnector(path, read_only=True))


async def probe(path: Path) -> str:
    """Say what the file holds, or that it will be created; nothing is changed."""
    if not path.exists():
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is None or not os.access(folder, os.W_OK):
            raise InboxUnavailable(f"cannot create {path}: {folder} is not writable")
        return f"SQLite: {path} is created at the first start"
    reader = Reader(path)
    try:
        await reader.run(owned)
        found = await reader.run(version)
    finally:
        reader.close()
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaError(f"{path} was written by a newer ci-receiver (schema {found})")
    return f"SQLite: {path}, schema version {found} (this ci-receiver writes {SCHEMA_VERSION})"
