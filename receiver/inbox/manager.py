"""The inbox's rules, once for both backends, over a `Connector` that only runs SQL.

What a stored callback becomes (its events new, duplicate or in place of a forged one,
their runs pending or held), what a replay requeues, what retention selects and in which
order, how runs, receipts, counts and traffic are read back: each is written here once,
from the statements of `query.py`. `InboxReader` reads (what the inspection commands
open); `InboxManager` is the whole inbox.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import orjson

from receiver.callback.event import Event
from receiver.ids import new_id, process_of
from receiver.inbox import query
from receiver.inbox.connector import Connector, Delivered, Delivery, Finished
from receiver.inbox.query import RUN_STATUS, Offload, Statement, Tx, Work
from receiver.inbox.records import (
    EVENT_WIDTH,
    Documents,
    as_datetime,
    event_row,
    materialize,
    stored_body,
)
from receiver.inbox.roles import StateChange
from receiver.inbox.types import (
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
    Leases,
    Outcome,
    Pruned,
    Receipt,
    ReceiptOutcome,
    ReceiptSummary,
    RejectedReceipt,
    RunState,
    RunStatus,
    Stored,
    ToStore,
    Traffic,
)


def new_runs(handlers: list[str], verify: bool) -> list[tuple[str, RunStatus]]:
    """(handler, status) of a new event's runs: pending, or held behind its verification."""
    if not verify:
        return [(name, "pending") for name in handlers]
    return [(VERIFY_RUN, "pending"), *((name, "held") for name in handlers)]


NO_LEASES: Leases = {}


# How long a write that went through vouches for the inbox in ping(): readiness probes
# add no write of their own to a busy inbox.
PING_FRESH_SECONDS = 5.0


T = TypeVar("T")


class InboxReader:
    """The inbox as the inspection commands open it: reading only."""

    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    async def open(self, waiting: Callable[[], None] | None = None) -> None:
        await self.connector.open(waiting)

    async def close(self) -> None:
        await self.connector.close()

    async def events(
        self, filter: EventFilter | None = None, *, limit: int = 50, before: int | None = None
    ) -> list[EventSummary]:
        def events(tx: Tx) -> Work[list[EventSummary]]:
            rows = yield query.events(tx, filter, limit, before)
            runs = yield from _runs(tx, [row[1] for row in rows])
            return [_event_summary(row, runs.get(row[1], [])) for row in rows]

        return await self.connector.read(events)

    async def event_ids(
        self,
        filter: EventFilter | None = None,
        *,
        limit: int = 1000,
        after: int = 0,
        through: int | None = None,
    ) -> list[tuple[int, str]]:
        rows = await self.connector.read_one(
            lambda tx: query.event_ids(tx, filter, limit, after, through)
        )
        return [(row[0], row[1]) for row in rows]

    async def matching(self, filter: EventFilter | None = None) -> tuple[int, int]:
        rows = await self.connector.read_one(lambda tx: query.matching(tx, filter))
        count, newest = rows[0]
        return int(count), int(newest or 0)

    async def event(self, event_id: str) -> EventDetail | None:
        def event(tx: Tx) -> Work[tuple[Any, ...] | None]:
            rows = yield query.load(tx, [event_id])
            if not rows:
                return None
            attempts = _attempts((yield query.ATTEMPTS(tx, event_id)))
            runs = yield from _runs(tx, [event_id])
            return (*rows[0], runs.get(tx.dialect.text(event_id), []), attempts)

        found = await self.connector.read(event)
        if found is None:
            return None
        request_id, runs, attempts = found[EVENT_WIDTH:]
        return EventDetail(Documents().event(found), found[2], request_id, runs, attempts)

    async def known(self, event_ids: list[str], *, forged: bool = True) -> set[str]:
        def known(tx: Tx) -> Work[set[str]]:
            found: set[str] = set()
            for chunk in tx.chunks(event_ids):
                found.update(row[0] for row in (yield query.known(tx, chunk, forged)))
            as_stored = tx.dialect.text
            return {event_id for event_id in event_ids if as_stored(event_id) in found}

        return await self.connector.read(known) if event_ids else set()

    async def receipts(
        self, *, limit: int = 50, outcome: ReceiptOutcome | None = None, before: int | None = None
    ) -> list[ReceiptSummary]:
        rows = await self.connector.read_one(lambda tx: query.receipts(tx, limit, outcome, before))
        return [_receipt_summary(row) for row in rows]

    async def receipt(self, receipt_id: int) -> Receipt | None:
        row = await self.connector.read_one(lambda tx: query.RECEIPT(tx, receipt_id))
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
        rows = await self.connector.read_one(lambda tx: query.rejected(tx, limit, before, preview))
        return [_rejected(row) for row in rows]

    async def backlog(self) -> dict[str, Backlog]:
        return query.backlogs(await self.connector.read_one(query.BACKLOG))

    async def counts(self, since: datetime) -> Counts:
        def counts(tx: Tx) -> Work[Counts]:
            grouped: list[dict[str, int]] = []
            for statement in query.COUNTS:
                rows = yield statement(tx, tx.time(since))
                grouped.append({str(key): count for key, count in rows})
            runs: dict[str, dict[str, int]] = {}
            for handler, status, count in (yield query.RUNS_BY_STATUS(tx, tx.time(since))):
                runs.setdefault(handler, {})[status] = count
            receipts, tags, states, verdicts = grouped
            return Counts(receipts, tags, states, verdicts, runs)

        return await self.connector.read(counts)

    async def traffic(self, since: datetime, *, step: int = 60) -> Traffic:
        # Passes over two tables: side by side (reader threads, connections of their own).
        steps, tallied, verdicts = await asyncio.gather(
            self.connector.read_one(lambda tx: query.CALLBACKS_PER_STEP(tx, step, tx.time(since))),
            self.connector.read_one(lambda tx: query.EVENTS_BY_TAG_AND_STATE(tx, tx.time(since))),
            self.connector.read_one(lambda tx: query.VERDICTS(tx, tx.time(since))),
        )
        tags, states = query.tallies(tallied)
        found = [(as_datetime(bucket * step), outcome, count) for bucket, outcome, count in steps]
        return Traffic(step, found, tags, states, {str(v): count for v, count in verdicts})

    async def load(self, event_ids: list[str]) -> list[Event]:
        if not event_ids:
            return []

        def load(tx: Tx) -> Work[list[Any]]:
            rows: list[Any] = []
            for chunk in tx.chunks(event_ids):
                rows += yield query.load(tx, chunk)
            return rows

        rows = await self.connector.read(load)
        # Decoding bodies is work for the CPU: not on the event loop. One `Documents` for
        # the read: each receipt's body is decoded once for its events.
        documents = Documents()
        return await asyncio.to_thread(lambda: [documents.event(row) for row in rows])

    async def size(self) -> int:
        return await self.connector.size()

    async def states(self, prefix: str) -> dict[str, str]:
        rows = await self.connector.read_one(lambda tx: query.STATES(tx, len(prefix), prefix))
        return {row[0]: row[1] for row in rows}

    async def prunable(self, cutoffs: Cutoffs) -> Pruned:
        return await self.connector.read(lambda tx: _pruning(tx, cutoffs, None))


class InboxManager(InboxReader):
    """The whole inbox: `InboxReader`, and storing, the run queue, upkeep and state."""

    def __init__(self, connector: Connector, *, rejected_body_bytes: int) -> None:
        super().__init__(connector)
        self._rejected_body_bytes = rejected_body_bytes

    # --- storing -------------------------------------------------------------------

    async def store(
        self,
        receipt: Receipt,
        routed: list[tuple[Event, list[str]]],
        *,
        verify: bool = False,
        leases: Leases = NO_LEASES,
    ) -> Stored:
        # Awaited alone (no gather): its caller goes on as soon as it is committed, before
        # the writer's next batch runs (writer.py).
        delivery = _delivery(receipt, routed, verify, leases)
        delivered = await self.connector.store(delivery)
        return _stored(delivery, delivered, self.connector.dialect.text)

    async def store_many(self, items: list[ToStore]) -> list[Stored | BaseException]:
        deliveries = [_delivery(*item) for item in items]
        results = await self.connector.store_many(deliveries)
        as_stored = self.connector.dialect.text
        return [
            result if isinstance(result, BaseException) else _stored(delivery, result, as_stored)
            for delivery, result in zip(deliveries, results, strict=True)
        ]

    async def reject(
        self, receipt: Receipt, reason: str, detail: str, *, size: int | None = None
    ) -> int:
        kept = receipt.body[: self._rejected_body_bytes]
        whole = len(receipt.body) if size is None else size
        headers, meta = orjson.dumps(receipt.headers), orjson.dumps(receipt.source_meta)

        def reject(tx: Tx) -> Statement:
            received_at = tx.time(receipt.received_at)
            return query.REJECT(
                tx, received_at, receipt.source, receipt.request_id, headers, meta, kept, whole,
                reason, detail,
            )  # fmt: skip

        return int(await self.connector.execute(reject))

    async def settle(self, event_id: str, genuine: bool) -> int:
        settle = query.SETTLE_GENUINE if genuine else query.SETTLE_FORGED
        return int(await self.connector.execute(lambda tx: settle(tx, event_id)))

    async def hasten(self, handler: str) -> int:
        return int(await self.connector.execute(lambda tx: query.HASTEN(tx, handler)))

    async def ping(self) -> None:
        # A write that went through a moment ago, and no failure since, says as much as
        # one of our own would: readiness probes then add no write to a busy inbox.
        connector = self.connector
        if (
            time.monotonic() - connector.last_write < PING_FRESH_SECONDS
            and connector.last_write > connector.last_failure
        ):
            return
        try:
            await self.connector.execute(lambda tx: query.HEARTBEAT(tx, str(time.time())))
        except InboxUnavailable:  # away: where, why and since when
            raise
        except Exception as exc:
            raise self.connector.unwritable(exc) from exc

    # --- the run queue -------------------------------------------------------------

    async def claim(
        self,
        handler: str,
        limit: int,
        lease_seconds: float,
        known: Mapping[str, Event] | None = None,
    ) -> list[Claim]:
        token = new_id()
        known = known or {}
        leased = await self.connector.lease(handler, limit, lease_seconds, token)
        # Events the caller holds are not read back: neither their row nor the body. Taken
        # from `known` now: the caller may let go of some while the others are read.
        held = {event_id: known.get(event_id) for event_id, _, _ in leased}
        unknown = [event_id for event_id, event in held.items() if event is None]
        rows = await self.connector.read_one(lambda tx: query.load(tx, unknown)) if unknown else []
        documents = Documents()
        read = {row[0]: documents.event(row) for row in rows}
        claims = []
        for event_id, attempts, request_id in leased:
            event = held[event_id] or read.get(event_id)
            if event is not None:  # else removed since: nothing left to run
                claims.append(Claim(event, handler, attempts, token, request_id))
        return claims

    async def finish(
        self,
        claim: Claim,
        outcome: Outcome,
        *,
        started_at: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> bool:
        counted = int(outcome != "released")  # a run interrupted by shutdown is no attempt
        finished = Finished(
            claim.event.id,
            claim.handler,
            claim.lease_token,
            RUN_STATUS[outcome],
            counted,
            retry_at,
            error,
            claim.attempts + counted,
            started_at,
            outcome,
        )
        return await self.connector.finish(finished)

    async def release(self, lease_token: str) -> int:
        return int(await self.connector.execute(lambda tx: query.RELEASE(tx, lease_token)))

    async def release_claims(self, claims: Sequence[Claim]) -> int:
        # A batch gathers the runs of several claims: each lease its own statement.
        by_lease: dict[tuple[str, str], list[str]] = {}
        for claim in claims:
            by_lease.setdefault((claim.lease_token, claim.handler), []).append(claim.event.id)

        def release(tx: Tx) -> Work[int]:
            released = 0
            for (token, handler), ids in by_lease.items():
                released += yield query.release_runs(tx, token, handler, ids)
            return released

        return await self.connector.write(release) if by_lease else 0

    async def next_due(self, handlers: list[str]) -> datetime | None:
        if not handlers:
            return None
        # Leases may be on the database's clock, which this host's may differ from: how
        # far away the next run is, not when.
        seconds = await self.connector.read_one(lambda tx: query.next_due(tx, handlers))
        if seconds is None:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=float(seconds))

    def watch(self, wake: Callable[[], None]) -> None:
        self.connector.watch(wake)

    async def requeue(
        self,
        event_ids: list[str] | None,
        handlers: list[str] | None,
        *,
        among: list[str] | None = None,
        dead_only: bool,
        dry_run: bool = False,
        release: bool | None = None,
    ) -> int:
        vouched = event_ids is not None if release is None else release
        if among is not None and not (handlers or among):
            return 0  # the runs of no handler

        def requeue(tx: Tx) -> Work[int]:
            yield _savepoint("SAVEPOINT requeue")
            total = 0
            for chunk in [None] if event_ids is None else tx.chunks(event_ids):
                if handlers and not dead_only:
                    # Named handlers: create the runs that do not exist yet, reset the others.
                    for handler in handlers:
                        total += yield query.requeue_runs(tx, chunk, handler, vouched)
                else:
                    total += yield query.requeue_existing(
                        tx, chunk, handlers or among, dead_only, vouched
                    )
            if dry_run:
                yield _savepoint("ROLLBACK TO SAVEPOINT requeue")
            yield _savepoint("RELEASE SAVEPOINT requeue")
            return total

        return await self.connector.write(requeue)

    async def runs_by_handler(self, event_ids: list[str], dead_only: bool) -> dict[str, int]:
        def count(tx: Tx) -> Work[dict[str, int]]:
            counts: dict[str, int] = {}
            for chunk in tx.chunks(event_ids):
                for handler, found in (yield query.runs_by_handler(tx, chunk, dead_only)):
                    counts[handler] = counts.get(handler, 0) + found
            return counts

        return await self.connector.read(count) if event_ids else {}

    # --- upkeep --------------------------------------------------------------------

    async def prune(self, cutoffs: Cutoffs, *, limit: int = 500) -> Pruned:
        # The JSON of the events whose bodies go next is decoded off the event loop, and
        # written in the same transaction as the bodies are dropped.
        lock = self.connector.dialect.try_lock
        before = cutoffs.bodies
        data: list[tuple[bytes, str, int]] = []
        if before is not None and lock is None:
            # SQLite: its writer's batch cannot wait for a thread: read and decoded first.
            rows = await self.connector.read_one(
                lambda tx: query.LOSING_BODIES(tx, tx.time(before), limit)
            )
            data = await asyncio.to_thread(materialize, rows) if rows else []

        def prune(tx: Tx) -> Work[Pruned]:
            kept = data
            if lock is not None:
                # One process prunes at a time: two deleting the same rows in another
                # order could deadlock. The others do nothing this time, not even read.
                if not (yield Statement(lock, (), "value")):
                    return Pruned()
                if before is not None:
                    rows = yield query.LOSING_BODIES(tx, tx.time(before), limit)
                    kept = (yield Offload(materialize, rows)) if rows else []
            if kept:
                yield query.KEEP_DATA(tx, *kept)
            return (yield from _pruning(tx, cutoffs, limit))

        return await self.connector.write(prune)

    async def compact(self) -> None:
        await self.connector.compact()

    # --- kept state ----------------------------------------------------------------

    async def get_state(self, key: str) -> str | None:
        value: str | None = await self.connector.read_one(lambda tx: query.GET_STATE(tx, key))
        return value

    async def set_state(self, key: str, value: str) -> None:
        await self.connector.execute(lambda tx: query.SET_STATE(tx, key, value))

    async def delete_state(self, key: str) -> None:
        await self.connector.execute(lambda tx: query.DELETE_STATE(tx, key))

    async def update_state(self, key: str, change: StateChange[T]) -> T:
        def update(tx: Tx) -> Work[T]:
            # The row made if missing, and locked (PostgreSQL) until the commit.
            value, now = yield query.LOCK_STATE(tx, key)
            new, result = change(value or None, as_datetime(now).timestamp())
            if new != value:
                yield query.SET_STATE(tx, key, new)
            return result

        return await self.connector.write(update)


def _delivery(
    receipt: Receipt, routed: list[tuple[Event, list[str]]], verify: bool, leases: Leases
) -> Delivery:
    """A callback's rows, made on the event loop before the write: a pending run with a
    lease is stored leased."""
    events = []
    for event, handlers in routed:
        runs = [
            (name, status, leases.get((event.id, name)) if leases and status == "pending" else None)
            for name, status in new_runs(handlers, verify)
        ]
        events.append((event_row(event), runs))
    return Delivery(receipt, events)


def _event_summary(row: Sequence[Any], runs: list[RunState]) -> EventSummary:
    """An event from a row of `query.SUMMARY_COLUMNS`, and its runs."""
    (
        seq,
        event_id,
        received_at,
        kind,
        event_name,
        tag,
        state,
        job_id,
        bucket,
        key,
        verdict,
        source,
    ) = row
    return EventSummary(
        seq, event_id, as_datetime(received_at), kind, event_name, tag, state, job_id, bucket,
        key, verdict, source, runs,
    )  # fmt: skip


def _receipt_summary(row: Sequence[Any]) -> ReceiptSummary:
    receipt_id, received_at, source, outcome, size, reason, detail, event_ids = row
    return ReceiptSummary(
        receipt_id, as_datetime(received_at), source, outcome, size, reason, detail,
        orjson.loads(event_ids),
    )  # fmt: skip


def _rejected(row: Sequence[Any]) -> RejectedReceipt:
    receipt_id, received_at, source, request_id, size, kept, reason, detail = row[:8]
    return RejectedReceipt(
        receipt_id, as_datetime(received_at), source, request_id, size, kept, reason, detail,
        orjson.loads(row[8]), orjson.loads(row[9]), bytes(row[10] or b""),
    )  # fmt: skip


def _savepoint(text: str) -> Statement:
    return Statement(text, (), "none")


def _runs(tx: Tx, event_ids: Sequence[str]) -> Work[dict[str, list[RunState]]]:
    found: dict[str, list[RunState]] = {}
    for chunk in tx.chunks(event_ids):
        for row in (yield query.runs(tx, chunk)):
            event_id, handler, status, attempts, due, error, lease, leased_at = row
            due_at = as_datetime(due) if status == "pending" else None
            run = RunState(handler, status, attempts, due_at, error)
            if lease is not None:  # a lease is taken with the run's time set
                run.leased_by, run.leased_since = process_of(lease), as_datetime(leased_at)
            found.setdefault(event_id, []).append(run)
    return found


def _attempts(rows: Sequence[Sequence[Any]]) -> list[Attempt]:
    """Attempts in the order made, numbered per handler across replays. A replay starts
    again the count a run keeps (what `max_attempts` measures), so the number stored
    with an attempt falls back there: below the one that would follow, it marks the
    first attempt after a replay. (A run released at shutdown is no attempt: it keeps
    the number before it.)"""
    made: dict[str, int] = {}  # attempts per handler, across replays
    last: dict[str, int] = {}  # the number stored with the handler's latest
    found = []
    for handler, number, started, finished, outcome, error in rows:
        counted = int(outcome != "released")
        replayed = handler in last and number < last[handler] + counted
        last[handler] = number
        made[handler] = made.get(handler, 0) + counted
        started_at, finished_at = as_datetime(started), as_datetime(finished)
        found.append(
            Attempt(handler, made[handler], started_at, finished_at, outcome, error, replayed)
        )
    return found


def _stored(delivery: Delivery, delivered: Delivered, as_stored: Callable[[str], str]) -> Stored:
    ids = [columns[0] for columns, _ in delivery.events]
    new_ids = set(delivered.stored)
    new = [event_id for event_id in ids if as_stored(event_id) in new_ids]
    duplicates = [event_id for event_id in ids if as_stored(event_id) not in new_ids]
    # One callback naming an event twice stores it once: the second is a duplicate.
    for event_id in set(new):
        while new.count(event_id) > 1:
            new.remove(event_id)
            duplicates.append(event_id)
    return Stored(delivered.receipt_id, ids, new, duplicates)


def _pruning(tx: Tx, cutoffs: Cutoffs, limit: int | None) -> Work[Pruned]:
    """One batch of retention (`limit` None: everything, counted and left in place)."""
    counting = limit is None
    found = Pruned()
    if cutoffs.events is not None:
        events = yield query.FINISHED_EVENTS(tx, tx.time(cutoffs.events), tx.limit(limit))
        found.events = len(events)
        found.bytes += sum(row[1] for row in events)
        if not counting:
            for chunk in tx.chunks([row[0] for row in events]):
                for table in ("runs", "attempts", "events"):
                    yield query.delete_of_events(tx, table, chunk)
        # A receipt goes with the last of its events; a duplicate's has none of its own.
        eventless = query.EVENTLESS_RECEIPTS[counting]
        receipts = yield eventless(tx, tx.time(cutoffs.events), tx.limit(limit))
        found += yield from _remove_receipts(tx, receipts, counting)
    if cutoffs.refused is not None:
        refused = yield query.REFUSED_RECEIPTS(tx, tx.time(cutoffs.refused), tx.limit(limit))
        found += yield from _remove_receipts(tx, refused, counting)
    if cutoffs.bodies is not None:
        droppable = query.DROPPABLE_BODIES[counting]
        bodies = yield droppable(tx, tx.time(cutoffs.bodies), tx.limit(limit))
        found.bodies = len(bodies)
        found.bytes += sum(row[1] for row in bodies)
        if not counting:
            for chunk in tx.chunks([row[0] for row in bodies]):
                yield query.drop_bodies(tx, chunk)
    return found


def _remove_receipts(tx: Tx, rows: Sequence[Any], counting: bool) -> Work[Pruned]:
    if not counting:
        for chunk in tx.chunks([row[0] for row in rows]):
            yield query.delete_receipts(tx, chunk)
    return Pruned(receipts=len(rows), bytes=sum(row[1] for row in rows))
