"""The SQLite inbox: a WAL database in the data folder, the embedded default.

Writes go through group commit on the event loop (`writer.py`); reads run on
connections of their own on helper threads (`reader.py`), so neither waits for the
other. `synchronous=full` (the default) fsyncs the WAL on every commit, so an answered
callback survives a power cut; `normal` survives a crash of the process but may lose
the last commits on power loss, for fewer fsyncs. Several processes on one host may
share the file; SQLite serializes their writes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from receiver.callback.event import Event
from receiver.ids import new_id
from receiver.inbox import (
    VERIFY_RUN,
    Attempt,
    Backlog,
    Claim,
    Counts,
    Cutoffs,
    EventDetail,
    EventFilter,
    EventSummary,
    InboxUnavailable,
    Outcome,
    Pruned,
    Receipt,
    ReceiptOutcome,
    ReceiptSummary,
    RejectedReceipt,
    RunState,
    SchemaError,
    Stored,
    ToStore,
    Traffic,
    new_runs,
)
from receiver.inbox.query import (
    BACKLOG,
    FORGED_EVENT,
    RUN_STATUS,
    SUMMARY_COLUMNS,
    UNFINISHED_RUN,
    Dialect,
    backlogs,
    bodies_to_drop,
    event_conditions,
    glob_to_sqlite,
    tallies,
)
from receiver.inbox.reader import Reader
from receiver.inbox.records import (
    EVENT_COLUMNS,
    EVENT_WIDTH,
    Documents,
    as_datetime,
    event_row,
    materialize,
    pack,
    stored_body,
)
from receiver.inbox.sqlite_schema import SCHEMA_VERSION, check_readable, owned, setup, version
from receiver.inbox.writer import Writer

PING_FRESH_SECONDS = 5.0
# Pages (of 4 KiB) handed back to the file system per step of compact().
COMPACT_PAGES = 2048
# Ids per `IN (...)` list: SQLite allows 32766 parameters; stay far below.
CHUNK = 500

DIALECT = Dialect(
    placeholder=lambda n: "?",
    glob=lambda column, param: f"{column} GLOB {param}",
    glob_pattern=glob_to_sqlite,
    time=lambda moment: moment.timestamp(),
)
BODIES_TO_DROP = bodies_to_drop("?")


class SqliteInbox:
    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        rejected_body_bytes: int,
        read_only: bool = False,
    ) -> None:
        self.path = path
        self._rejected_body_bytes = rejected_body_bytes
        self._writer = None if read_only else Writer(path, synchronous=synchronous, setup=setup)
        self._reader = Reader(path)

    @property
    def commits(self) -> int:
        return self._write.commits

    @property
    def _write(self) -> Writer:
        if self._writer is None:
            raise RuntimeError("this inbox was opened read-only")
        return self._writer

    async def open(self, waiting: Callable[[], None] | None = None) -> None:
        """Opens at once, or fails: a file has no server to wait for (`waiting` unused)."""
        if self._writer is not None:
            await self._writer.start()
            return
        if not self.path.exists():
            raise FileNotFoundError(f"no inbox at {self.path} (nothing received yet?)")
        await self._reader.run(check_readable)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.stop()
        self._reader.close()

    # --- ingest --------------------------------------------------------------------

    async def store(
        self, receipt: Receipt, routed: list[tuple[Event, list[str]]], *, verify: bool = False
    ) -> Stored:
        return await self._write.submit(_storing(receipt, routed, verify))

    async def store_many(self, items: list[ToStore]) -> list[Stored | BaseException]:
        futures = self._write.submit_many([_storing(*item) for item in items])
        return await asyncio.gather(*futures, return_exceptions=True)

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

        return await self._write.submit(reject)

    async def settle(self, event_id: str, genuine: bool) -> int:
        status = "pending" if genuine else "forged"

        def settle(connection: sqlite3.Connection) -> int:
            now = time.time()
            return connection.execute(
                "UPDATE runs SET status = ?, due_at = ?, updated_at = ?"
                " WHERE event_id = ? AND status = 'held'",
                (status, now, now, event_id),
            ).rowcount

        return await self._write.submit(settle)

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

        def claim(connection: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            now = time.time()
            leased = connection.execute(
                "UPDATE runs SET lease_until = ?, lease_token = ?, updated_at = ?"
                " WHERE rowid IN (SELECT rowid FROM runs WHERE handler = ? AND status = 'pending'"
                " AND due_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
                " ORDER BY due_at LIMIT ?) RETURNING event_id, attempts",
                (now + lease_seconds, token, now, handler, now, now, limit),
            ).fetchall()
            if not leased:
                return [], []
            # `known` cannot change while this runs (operations run on the event loop):
            # the events it holds are neither read back nor decoded.
            # Of those, only the request id is read: the row and the body stay on disk.
            unknown = [event_id for event_id, _ in leased if event_id not in known]
            ids = [event_id for event_id, _ in leased if event_id in known]
            rows: list[Any] = []
            if ids:
                rows = connection.execute(
                    "SELECT e.id, r.request_id FROM events e JOIN receipts r"
                    f" ON r.id = e.receipt_id WHERE e.id IN ({_marks(ids)})",
                    ids,
                ).fetchall()
            if unknown:
                rows += connection.execute(
                    f"SELECT e.id, r.request_id, {EVENT_COLUMNS}"
                    " FROM events e JOIN receipts r ON r.id = e.receipt_id"
                    f" WHERE e.id IN ({_marks(unknown)})",
                    unknown,
                ).fetchall()
            return leased, rows

        leased, rows = await self._write.submit(claim, bookkeeping=True)
        # Decoding what was read back happens after the commit, not under the write lock.
        documents = Documents()
        found: dict[str, tuple[Event, str | None]] = {}
        for row in rows:
            if len(row) == 2:
                found[row[0]] = (known[row[0]], row[1])
            else:
                found[row[0]] = (documents.event(row[2:]), row[1])
        return [
            Claim(found[event_id][0], handler, attempts, token, found[event_id][1])
            for event_id, attempts in leased
            if event_id in found
        ]

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
        status = RUN_STATUS[outcome]
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

        return await self._write.submit(finish, bookkeeping=True)

    async def next_due(self, handlers: list[str]) -> datetime | None:
        if not handlers:
            return None

        def next_due(connection: sqlite3.Connection) -> float | None:
            return connection.execute(
                "SELECT MIN(MAX(due_at, COALESCE(lease_until, 0))) FROM runs"
                f" WHERE status = 'pending' AND handler IN ({_marks(handlers)})",
                handlers,
            ).fetchone()[0]

        due = await self._reader.run(next_due)
        return as_datetime(due) if due is not None else None

    def watch(self, wake: Callable[[], None]) -> None:
        """Other processes on the file cannot tell this one: dispatch polls."""

    async def ping(self) -> None:
        writer = self._write
        # A commit that went through a moment ago, and no failure since, says as much as
        # a write of our own would; readiness probes then add no fsync to a busy inbox.
        recent = time.monotonic() - writer.last_commit < PING_FRESH_SECONDS
        if recent and writer.last_commit > writer.last_failure_at:
            return

        def ping(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (str(time.time()),)
            )

        try:
            await writer.submit(ping)
        except Exception as exc:
            raise InboxUnavailable(f"not writable: {exc}") from exc

    # --- replay --------------------------------------------------------------------

    async def requeue(
        self,
        event_ids: list[str] | None,
        handlers: list[str] | None,
        *,
        dead_only: bool,
        dry_run: bool = False,
        release: bool | None = None,
    ) -> int:
        vouched = event_ids is not None if release is None else release

        def requeue(connection: sqlite3.Connection) -> int:
            now = time.time()
            connection.execute("SAVEPOINT requeue")
            total = 0
            for chunk in _chunks(event_ids):
                total += _requeue(connection, now, chunk, handlers, dead_only, vouched)
            if dry_run:
                connection.execute("ROLLBACK TO requeue")
            connection.execute("RELEASE requeue")
            return total

        return await self._write.submit(requeue)

    # --- reading -------------------------------------------------------------------

    async def events(
        self, filter: EventFilter | None = None, *, limit: int = 50, before: int | None = None
    ) -> list[EventSummary]:
        found = event_conditions(filter, DIALECT)
        if before is not None:
            found.add(f"e.seq < {found.param(before)}")

        def events(connection: sqlite3.Connection) -> list[EventSummary]:
            rows = connection.execute(
                f"SELECT {SUMMARY_COLUMNS} FROM events e {found.where()}"
                " ORDER BY e.seq DESC LIMIT ?",
                (*found.values, limit),
            ).fetchall()
            runs = _runs(connection, [row[1] for row in rows])
            return [
                EventSummary(row[0], row[1], as_datetime(row[2]), *row[3:], runs.get(row[1], []))
                for row in rows
            ]

        return await self._reader.run(events)

    async def event_ids(
        self, filter: EventFilter | None = None, *, limit: int = 1000, after: int = 0
    ) -> list[tuple[int, str]]:
        found = event_conditions(filter, DIALECT)
        found.add(f"e.seq > {found.param(after)}")

        def event_ids(connection: sqlite3.Connection) -> list[tuple[int, str]]:
            return connection.execute(
                f"SELECT e.seq, e.id FROM events e {found.where()} ORDER BY e.seq LIMIT ?",
                (*found.values, limit),
            ).fetchall()

        return await self._reader.run(event_ids)

    async def event(self, event_id: str) -> EventDetail | None:
        def event(connection: sqlite3.Connection) -> tuple[Any, ...] | None:
            row = connection.execute(
                f"SELECT {EVENT_COLUMNS}, r.request_id FROM events e"
                " JOIN receipts r ON r.id = e.receipt_id WHERE e.id = ?",
                (event_id,),
            ).fetchone()
            if row is None:
                return None
            attempts = [
                Attempt(h, n, as_datetime(s), as_datetime(f), o, err)
                for h, n, s, f, o, err in connection.execute(
                    "SELECT handler, number, started_at, finished_at, outcome, error"
                    " FROM attempts WHERE event_id = ? ORDER BY id",
                    (event_id,),
                )
            ]
            return (*row, _runs(connection, [event_id]).get(event_id, []), attempts)

        found = await self._reader.run(event)
        if found is None:
            return None
        event = Documents().event(found)
        request_id, runs, attempts = found[EVENT_WIDTH:]
        return EventDetail(event, found[2], request_id, runs, attempts)

    async def known(self, event_ids: list[str], *, forged: bool = True) -> set[str]:
        unforged = "" if forged else f" AND NOT {FORGED_EVENT}"

        def known(connection: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(event_ids):
                found.update(
                    row[0]
                    for row in connection.execute(
                        f"SELECT id FROM events e WHERE id IN ({_marks(chunk)}){unforged}", chunk
                    )
                )
            return found

        return await self._reader.run(known) if event_ids else set()

    async def receipts(
        self, *, limit: int = 50, outcome: ReceiptOutcome | None = None, before: int | None = None
    ) -> list[ReceiptSummary]:
        conditions, values = [], []
        if outcome is not None:
            # receipts_unaccepted serves the other outcomes, when told so
            unaccepted = "" if outcome == "accepted" else "outcome <> 'accepted' AND "
            conditions.append(f"{unaccepted}outcome = ?")
            values.append(outcome)
        if before is not None:
            conditions.append("id < ?")
            values.append(before)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""

        def receipts(connection: sqlite3.Connection) -> list[ReceiptSummary]:
            rows = connection.execute(
                "SELECT id, received_at, source, outcome, size, error_reason, error_detail,"
                f" event_ids FROM receipts {where} ORDER BY id DESC LIMIT ?",
                (*values, limit),
            ).fetchall()
            return [
                ReceiptSummary(row[0], as_datetime(row[1]), *row[2:7], orjson.loads(row[7]))
                for row in rows
            ]

        return await self._reader.run(receipts)

    async def receipt(self, receipt_id: int) -> Receipt | None:
        def receipt(connection: sqlite3.Connection) -> tuple[Any, ...] | None:
            return connection.execute(
                "SELECT body, source, received_at, request_id, headers, source_meta, size,"
                " outcome FROM receipts WHERE id = ?",
                (receipt_id,),
            ).fetchone()

        row = await self._reader.run(receipt)
        if row is None:
            return None
        kept, source, received_at, request_id, headers, meta, size, outcome = row
        body = stored_body(kept, outcome)
        return Receipt(
            body,
            source,
            as_datetime(received_at),
            request_id or "",
            orjson.loads(headers),
            orjson.loads(meta),
            cut_from=size if size > len(body) else None,
        )

    async def rejected(
        self, *, limit: int = 50, before: int | None = None, preview: int = 512
    ) -> list[RejectedReceipt]:
        def rejected(connection: sqlite3.Connection) -> list[RejectedReceipt]:
            rows = connection.execute(
                "SELECT id, received_at, source, request_id, size, COALESCE(LENGTH(body), 0),"
                " error_reason, error_detail, headers, source_meta, substr(body, 1, ?)"
                " FROM receipts WHERE outcome <> 'accepted' AND outcome = 'rejected' AND id < ?"
                " ORDER BY id DESC LIMIT ?",
                (preview, before if before is not None else 1 << 62, limit),
            ).fetchall()
            return [
                RejectedReceipt(
                    *row[:1], as_datetime(row[1]), *row[2:8], orjson.loads(row[8]),
                    orjson.loads(row[9]), bytes(row[10] or b""),
                )
                for row in rows
            ]  # fmt: skip

        return await self._reader.run(rejected)

    async def backlog(self) -> dict[str, Backlog]:
        def backlog(connection: sqlite3.Connection) -> dict[str, Backlog]:
            return backlogs(connection.execute(BACKLOG))

        return await self._reader.run(backlog)

    async def counts(self, since: datetime) -> Counts:
        start = since.timestamp()

        def counts(connection: sqlite3.Connection) -> Counts:
            def grouped(sql: str) -> dict[str, int]:
                return {str(key): count for key, count in connection.execute(sql, (start,))}

            runs: dict[str, dict[str, int]] = {}
            for handler, status, count in connection.execute(
                "SELECT r.handler, r.status, COUNT(*) FROM events e JOIN runs r"
                " ON r.event_id = e.id WHERE e.received_at >= ? GROUP BY 1, 2",
                (start,),
            ):
                runs.setdefault(handler, {})[status] = count
            return Counts(
                receipts=grouped(
                    "SELECT outcome, COUNT(*) FROM receipts WHERE received_at >= ? GROUP BY 1"
                ),
                tags=grouped(
                    "SELECT COALESCE(tag, event_name, kind), COUNT(*) FROM events"
                    " WHERE received_at >= ? GROUP BY 1"
                ),
                states=grouped(
                    "SELECT COALESCE(state, '-'), COUNT(*) FROM events"
                    " WHERE received_at >= ? GROUP BY 1"
                ),
                runs=runs,
            )

        return await self._reader.run(counts)

    async def traffic(self, since: datetime, *, step: int = 60) -> Traffic:
        start = since.timestamp()

        def callbacks(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(
                "SELECT CAST(received_at / ? AS INTEGER), outcome, COUNT(*) FROM receipts"
                " WHERE received_at >= ? GROUP BY 1, 2 ORDER BY 1, 2",
                (step, start),
            ).fetchall()

        def events(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return connection.execute(
                "SELECT COALESCE(tag, event_name, kind), COALESCE(state, '-'), COUNT(*)"
                " FROM events WHERE received_at >= ? GROUP BY 1, 2",
                (start,),
            ).fetchall()

        # Two passes over two tables: side by side, on the reader's two threads.
        steps, tallied = await asyncio.gather(self._reader.run(callbacks), self._reader.run(events))
        tags, states = tallies(tallied)
        found = [(as_datetime(bucket * step), outcome, count) for bucket, outcome, count in steps]
        return Traffic(step, found, tags, states)

    async def load(self, event_ids: list[str]) -> list[Event]:
        def load(connection: sqlite3.Connection) -> list[Event]:
            # Rebuilt on the reader's thread: decoding bodies is work for the CPU.
            documents, found = Documents(), []
            for chunk in _chunks(event_ids):
                found += [
                    documents.event(row)
                    for row in connection.execute(
                        f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r"
                        f" ON r.id = e.receipt_id WHERE e.id IN ({_marks(chunk)})",
                        chunk,
                    )
                ]
            return found

        return await self._reader.run(load) if event_ids else []

    async def size(self) -> int:
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return sum(path.stat().st_size for path in files if path.exists())

    # --- retention -----------------------------------------------------------------

    async def prune(self, cutoffs: Cutoffs, *, limit: int = 500, dry_run: bool = False) -> Pruned:
        def prune(connection: sqlite3.Connection) -> Pruned:
            return _prune(connection, cutoffs, limit, dry_run)

        if dry_run:
            return await self._reader.run(prune)
        if cutoffs.bodies is None:
            return await self._write.submit(prune)
        # The JSON of the events whose bodies go next: decoded on a reader's thread, then
        # written in the same commit as the bodies are dropped.
        before = cutoffs.bodies.timestamp()
        data = await self._reader.run(lambda connection: _losing_bodies(connection, before, limit))

        def keep_and_prune(connection: sqlite3.Connection) -> Pruned:
            connection.executemany(
                "UPDATE events SET data = ? WHERE id = ? AND receipt_id = ? AND data IS NULL", data
            )
            return _prune(connection, cutoffs, limit, dry_run)

        return await self._write.submit(keep_and_prune)

    async def compact(self) -> None:
        def step(connection: sqlite3.Connection) -> bool:
            """Hand back some free pages; True while some are left and it helped."""
            before = connection.execute("PRAGMA freelist_count").fetchone()[0]
            connection.execute(f"PRAGMA incremental_vacuum({COMPACT_PAGES})")
            after = connection.execute("PRAGMA freelist_count").fetchone()[0]
            return 0 < after < before  # no progress: a file without incremental vacuum

        # Small steps, each its own commit: callbacks keep being stored in between.
        while await self._write.submit(step):
            pass

    # --- state ---------------------------------------------------------------------

    async def get_state(self, key: str) -> str | None:
        def get(connection: sqlite3.Connection) -> str | None:
            row = connection.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return row[0] if row else None

        return await self._reader.run(get)

    async def set_state(self, key: str, value: str) -> None:
        def put(connection: sqlite3.Connection) -> None:
            connection.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, value))

        await self._write.submit(put)

    async def states(self, prefix: str) -> dict[str, str]:
        def states(connection: sqlite3.Connection) -> dict[str, str]:
            return dict(
                connection.execute(
                    "SELECT key, value FROM state WHERE substr(key, 1, ?) = ?",
                    (len(prefix), prefix),
                ).fetchall()
            )

        return await self._reader.run(states)

    async def delete_state(self, key: str) -> None:
        def delete(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM state WHERE key = ?", (key,))

        await self._write.submit(delete)


def _prune(connection: sqlite3.Connection, cutoffs: Cutoffs, limit: int, dry_run: bool) -> Pruned:
    """One batch of retention; with `dry_run`, the count of everything it would take."""
    found = Pruned()
    batch = -1 if dry_run else limit  # LIMIT -1: no limit
    unfinished = UNFINISHED_RUN
    if cutoffs.events is not None:
        before = cutoffs.events.timestamp()
        events = connection.execute(
            f"SELECT e.seq, e.id, COALESCE(LENGTH(e.data), 0) FROM events e WHERE e.received_at < ?"
            f" AND NOT {unfinished} ORDER BY e.received_at LIMIT ?",
            (before, batch),
        ).fetchall()
        found.events = len(events)
        found.bytes += sum(row[2] for row in events)
        ids = [row[1] for row in events]
        if not dry_run:
            for chunk in _chunks(ids):
                assert chunk is not None
                for table in ("runs", "attempts"):
                    connection.execute(
                        f"DELETE FROM {table} WHERE event_id IN ({_marks(chunk)})", chunk
                    )
                connection.execute(f"DELETE FROM events WHERE id IN ({_marks(chunk)})", chunk)
        # A receipt goes with the last of its events; a duplicate's has none of its own.
        receipts = connection.execute(
            "SELECT id, COALESCE(LENGTH(body), 0) FROM receipts WHERE received_at < ?"
            " AND outcome != 'rejected' AND NOT EXISTS (SELECT 1 FROM events e"
            f" WHERE e.receipt_id = receipts.id{' AND ' + unfinished if dry_run else ''})"
            " ORDER BY received_at LIMIT ?",
            (before, batch),
        ).fetchall()
        found += _remove_receipts(connection, receipts, dry_run)
    if cutoffs.refused is not None:
        refused = connection.execute(
            "SELECT id, COALESCE(LENGTH(body), 0) FROM receipts WHERE received_at < ?"
            " AND outcome = 'rejected' ORDER BY received_at LIMIT ?",
            (cutoffs.refused.timestamp(), batch),
        ).fetchall()
        found += _remove_receipts(connection, refused, dry_run)
    if cutoffs.bodies is not None:
        # Not a body an event is still rebuilt from (`_losing_bodies` first gives them JSON).
        lean = "" if dry_run else " OR e.data IS NULL"
        bodies = connection.execute(
            f"SELECT id, LENGTH(body) FROM receipts WHERE {BODIES_TO_DROP} AND NOT EXISTS"
            f" (SELECT 1 FROM events e WHERE e.receipt_id = receipts.id AND ({unfinished}{lean}))"
            " ORDER BY received_at LIMIT ?",
            (cutoffs.bodies.timestamp(), batch),
        ).fetchall()
        found.bodies = len(bodies)
        found.bytes += sum(row[1] for row in bodies)
        if not dry_run:
            connection.executemany(
                "UPDATE receipts SET body = NULL WHERE id = ?", [(row[0],) for row in bodies]
            )
    return found


def _losing_bodies(
    connection: sqlite3.Connection, before: float, limit: int
) -> list[tuple[bytes, str, int]]:
    """(data, id, receipt id) for the events without JSON of the next receipts whose
    bodies retention drops (see `_prune`): what their rows keep once the body is gone."""
    rows = connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
        " WHERE e.data IS NULL AND e.receipt_id IN (SELECT id FROM receipts"
        f" WHERE {BODIES_TO_DROP} AND NOT EXISTS (SELECT 1 FROM events e"
        f" WHERE e.receipt_id = receipts.id AND {UNFINISHED_RUN})"
        " ORDER BY received_at LIMIT ?)",
        (before, limit),
    ).fetchall()
    return materialize(rows)


def _remove_receipts(
    connection: sqlite3.Connection, rows: list[tuple[int, int]], dry_run: bool
) -> Pruned:
    if not dry_run:
        connection.executemany("DELETE FROM receipts WHERE id = ?", [(row[0],) for row in rows])
    return Pruned(receipts=len(rows), bytes=sum(row[1] for row in rows))


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


def _replace_forged(
    connection: sqlite3.Connection, columns: list[Any], receipt_id: int, received_at: float
) -> bool:
    """Put this delivery in place of a stored event of its id that was found forged, its
    runs cleared for the new ones; False when the stored one is not forged."""
    event_id, *fields = columns
    replaced = connection.execute(
        "UPDATE events SET kind = ?, event_name = ?, job_id = ?, tag = ?, state = ?,"
        " bucket = ?, key = ?, data = NULL, receipt_id = ?, received_at = ? WHERE id = ?"
        " AND EXISTS (SELECT 1 FROM runs f WHERE f.event_id = events.id"
        " AND f.status = 'forged')",
        (*fields, receipt_id, received_at, event_id),
    ).rowcount
    if replaced:
        connection.execute("DELETE FROM runs WHERE event_id = ?", (event_id,))
    return bool(replaced)


def _requeue(
    connection: sqlite3.Connection,
    now: float,
    event_ids: list[str] | None,
    handlers: list[str] | None,
    dead_only: bool,
    release: bool,
) -> int:
    chosen = []
    arguments: list[Any] = list(event_ids or ())
    if event_ids:
        chosen.append(f"id IN ({_marks(event_ids)})")
    # Events released (named by the user) run whatever verification said; otherwise a
    # held event's new runs wait with its others, and a forged event is left alone.
    status = "'pending'"
    if not release:
        chosen.append(
            "NOT EXISTS (SELECT 1 FROM runs f WHERE f.event_id = events.id AND f.status = 'forged')"
        )
        status = (
            "CASE WHEN EXISTS (SELECT 1 FROM runs h WHERE h.event_id = s.id"
            " AND h.status = 'held') THEN 'held' ELSE 'pending' END"
        )
    selected = "SELECT id FROM events" + (f" WHERE {' AND '.join(chosen)}" if chosen else "")
    if handlers and not dead_only:
        # Named handlers: create the runs that do not exist yet, reset the others.
        total = 0
        for handler in handlers:
            total += connection.execute(
                "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                f" SELECT s.id, ?, {status}, ?, ? FROM ({selected}) s WHERE true"
                " ON CONFLICT (event_id, handler) DO UPDATE SET status = excluded.status,"
                " attempts = 0, due_at = excluded.due_at, last_error = NULL,"
                " lease_until = NULL, lease_token = NULL, updated_at = excluded.updated_at"
                " WHERE runs.lease_until IS NULL OR runs.lease_until <= excluded.due_at",
                (handler, now, now, *arguments),
            ).rowcount
        return total
    conditions = ["(lease_until IS NULL OR lease_until <= ?)"]
    values: list[Any] = [now]
    if dead_only:
        conditions.append("status = 'dead'")
    if event_ids:
        conditions.append(f"event_id IN ({_marks(event_ids)})")
        values += arguments
    if not release:
        conditions.append("status NOT IN ('held', 'forged')")
    if handlers:
        conditions.append(f"handler IN ({_marks(handlers)})")
        values += handlers
    else:
        conditions.append("handler <> ?")
        values.append(VERIFY_RUN)
    return connection.execute(
        "UPDATE runs SET status = 'pending', attempts = 0, due_at = ?, last_error = NULL,"
        " lease_until = NULL, lease_token = NULL,"
        f" updated_at = ? WHERE {' AND '.join(conditions)}",
        (now, now, *values),
    ).rowcount


def _storing(
    receipt: Receipt, routed: list[tuple[Event, list[str]]], verify: bool
) -> Callable[[sqlite3.Connection], Stored]:
    """The write operation that stores a callback (see `Inbox.store`): the rows are made
    here, on the event loop, before the write."""
    rows = [(*event_row(event), handlers) for event, handlers in routed]
    ids = [row[0] for row in rows]
    receipt_row = _receipt_row(receipt, pack(receipt.body), len(receipt.body))
    received_at = receipt_row[0]

    def store(connection: sqlite3.Connection) -> Stored:
        now = time.time()
        receipt_id = connection.execute(
            "INSERT INTO receipts (received_at, source, request_id, headers, source_meta,"
            " body, size, outcome, event_ids) VALUES (?, ?, ?, ?, ?, ?, ?, 'accepted', ?)",
            (*receipt_row, orjson.dumps(ids)),
        ).lastrowid
        new, duplicates = [], []
        for *columns, handlers in rows:
            inserted = connection.execute(
                # No JSON (`data`): the event is rebuilt from the receipt's body.
                "INSERT INTO events (id, kind, event_name, job_id, tag, state, bucket, key,"
                " receipt_id, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING RETURNING id",
                (*columns, receipt_id, received_at),
            ).fetchone()
            if inserted is None and not _replace_forged(
                connection, columns, receipt_id, received_at
            ):
                duplicates.append(columns[0])
                continue
            new.append(columns[0])
            connection.executemany(
                "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(columns[0], *run, now, now) for run in new_runs(handlers, verify)],
            )
        if not new:
            connection.execute(
                "UPDATE receipts SET outcome = 'duplicate' WHERE id = ?", (receipt_id,)
            )
        assert receipt_id is not None
        return Stored(receipt_id, ids, new, duplicates)

    return store


def _receipt_row(receipt: Receipt, body: bytes, size: int) -> tuple[Any, ...]:
    return (
        receipt.received_at.timestamp(),
        receipt.source,
        receipt.request_id,
        orjson.dumps(receipt.headers),
        orjson.dumps(receipt.source_meta),
        body,
        size,
    )


def _marks(values: Any) -> str:
    return ",".join("?" * len(values))


def _chunks(values: list[str] | None) -> list[list[str] | None]:
    """`IN (...)` lists of a bounded size; None (every event) stays one unbounded chunk."""
    if values is None:
        return [None]
    return [values[i : i + CHUNK] for i in range(0, len(values), CHUNK)]


def _runs(connection: sqlite3.Connection, event_ids: list[str]) -> dict[str, list[RunState]]:
    found: dict[str, list[RunState]] = {}
    for chunk in _chunks(event_ids):
        assert chunk is not None
        for event_id, handler, status, attempts, due, error in connection.execute(
            "SELECT event_id, handler, status, attempts, due_at, last_error FROM runs"
            f" WHERE event_id IN ({_marks(chunk)}) ORDER BY handler",
            chunk,
        ):
            due_at = as_datetime(due) if status == "pending" else None
            found.setdefault(event_id, []).append(
                RunState(handler, status, attempts, due_at, error)
            )
    return found
