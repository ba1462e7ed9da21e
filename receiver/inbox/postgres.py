"""The PostgreSQL inbox: one database shared by any number of receivers and consumers.

- **Dedup across replicas**: events are inserted `ON CONFLICT (id) DO NOTHING`; two
  replicas storing the same id at once: the second waits for the first to commit and
  finds a duplicate, never an error.
- **One round trip per callback**: the receipt, its new events and their runs go in
  one statement (`STORE`), which also notifies the other replicas.
- **Claims** take due runs `FOR UPDATE SKIP LOCKED` under a lease measured on the
  database's clock, so replicas never wait for each other's claims, and a replica that
  dies mid-attempt leaves its runs to the others when the lease ends.
- **Wake-ups**: every replica LISTENs on its schema's channel (`ci_receiver_work.<schema>`);
  a store or a replay notifies it, so an idle replica starts new work within
  moments (polling stays as the fallback).
- **Failures**: the database restarting or unreachable makes operations raise
  `InboxUnavailable` saying where and since when (callers answer 503 or leave the
  message unacked), logged once as it goes and once as it comes back (`reach.py`); the
  pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import structlog
from prometheus_client import CollectorRegistry

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
from receiver.inbox.group_commit import GroupCommit
from receiver.inbox.postgres_schema import SCHEMA_VERSION, check_readable, setup
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
    glob_to_like,
    tallies,
)
from receiver.inbox.reach import Location, Reach, cannot_connect, describe, quiet_pool_floor
from receiver.inbox.records import (
    EVENT_COLUMNS,
    EVENT_WIDTH,
    Documents,
    event_row,
    materialize,
    pack,
    stored_body,
)

logger = structlog.get_logger("ci_receiver.inbox")

# Notifications are database-wide: each schema's inbox has a channel of its own, so that
# deployments sharing a database do not wake each other (a name is cut at 63 characters).
CHANNEL_PREFIX = "ci_receiver_work."
CHANNEL = f"left('{CHANNEL_PREFIX}' || current_schema(), 63)"  # in SQL, on the inbox's path


class _PooledConnection(asyncpg.Connection):
    """A connection of the inbox's pool, returned to it without asyncpg's reset query.

    Statements on pooled connections take no session state (no session advisory lock,
    cursor, LISTEN or SET: the schema's lock and the listener have connections of their
    own), so `RESET ALL; UNLISTEN *; ...` after every statement was a round trip for
    nothing. asyncpg still rolls back a transaction left open."""

    def get_reset_query(self) -> str:
        return ""


class _Pool:
    """The inbox's pool, as its statements use it: each use tells `Reach` whether the
    server answered (a failure to reach it raised as `InboxUnavailable`)."""

    __slots__ = ("_pool", "_reach")

    def __init__(self, pool: asyncpg.Pool, reach: Reach) -> None:
        self._pool = pool
        self._reach = reach

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        with self._reach:
            return await self._pool.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        with self._reach:
            return await self._pool.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        with self._reach:
            return await self._pool.fetchval(query, *args)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        with self._reach:
            async with self._pool.acquire() as connection:
                yield connection

    async def close(self) -> None:
        await self._pool.close()


def channel(schema: str) -> str:
    """The channel that `CHANNEL` names on a connection whose search_path is `schema`."""
    return f"{CHANNEL_PREFIX}{schema}"[:63]


# Seconds any one statement may take before it counts as a failure (a database that
# stopped answering must not hold a callback's answer for ever).
COMMAND_TIMEOUT = 10.0
PING_FRESH_SECONDS = 5.0
# How often the listening connection is checked: a connection that died quietly (a
# network cut) is only noticed when used.
LISTEN_CHECK_SECONDS = 15.0
RETRY_MAX_SECONDS = 30.0
# A service waiting for its database already listens, answering 503: once the database
# is back, it takes callbacks again within this many seconds.
OPEN_RETRY_MAX_SECONDS = 5.0
# Errors that waiting will not mend: refused credentials, no such database.
FATAL_CONNECT_ERRORS = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InsufficientPrivilegeError,
)

DIALECT = Dialect(
    placeholder=lambda n: f"${n}",
    glob=lambda column, param: f"{column} LIKE {param}",
    glob_pattern=glob_to_like,
    time=lambda moment: moment,
)
BODIES_TO_DROP = bodies_to_drop("$1")

STORE = f"""
WITH receipt AS (SELECT nextval('receipts_id_seq') AS id),
inserted AS (
    -- No JSON (`data`): the event is rebuilt from the receipt's body (records.py).
    INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id, tag, state,
        bucket, key)
    SELECT e.id, receipt.id, $1, e.kind, e.event_name, e.job_id, e.tag, e.state, e.bucket,
        e.key
    FROM receipt, unnest($9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
        $14::text[], $15::text[], $16::text[]) WITH ORDINALITY
        AS e(id, kind, event_name, job_id, tag, state, bucket, key, n)
    ORDER BY e.n
    ON CONFLICT (id) DO NOTHING
    RETURNING id
),
new_runs AS (
    INSERT INTO runs (event_id, handler, status, due_at, updated_at)
    SELECT DISTINCT r.event_id, r.handler, r.status, now(), now()
    FROM unnest($17::text[], $18::text[], $19::text[]) AS r(event_id, handler, status)
    JOIN inserted ON inserted.id = r.event_id
    RETURNING 1
),
kept AS (
    INSERT INTO receipts (id, received_at, source, request_id, headers, source_meta, body,
        size, outcome, event_ids)
    SELECT receipt.id, $1, $2, $3, $4, $5, $6, $7,
        CASE WHEN EXISTS (SELECT 1 FROM inserted) THEN 'accepted' ELSE 'duplicate' END, $8
    FROM receipt
    RETURNING id
),
notified AS (SELECT pg_notify({CHANNEL}, '') WHERE EXISTS (SELECT 1 FROM new_runs))
SELECT (SELECT id FROM kept), ARRAY(SELECT id FROM inserted), (SELECT count(*) FROM notified),
    -- Ids already taken by an event found forged: this delivery is to replace it.
    ARRAY(SELECT u.id FROM unnest($9::text[]) AS u(id) WHERE u.id NOT IN
        (SELECT id FROM inserted) AND {FORGED_EVENT.replace("e.id", "u.id")})
"""

# A delivery in place of a stored event of its id that was found forged; its runs are
# cleared for the new ones.
REPLACE_FORGED = """
UPDATE events SET kind = $2, event_name = $3, job_id = $4, tag = $5, state = $6,
    bucket = $7, key = $8, data = NULL, receipt_id = $9, received_at = $10
WHERE id = $1 AND EXISTS (SELECT 1 FROM runs f WHERE f.event_id = events.id
    AND f.status = 'forged')
"""

CLAIM = """
WITH due AS (
    SELECT event_id FROM runs
    WHERE handler = $1 AND status = 'pending' AND due_at <= now()
        AND (lease_until IS NULL OR lease_until <= now())
    ORDER BY due_at LIMIT $2
    FOR UPDATE SKIP LOCKED
),
leased AS (
    UPDATE runs SET lease_until = now() + make_interval(secs => $3), lease_token = $4,
        updated_at = now()
    FROM due WHERE runs.event_id = due.event_id AND runs.handler = $1
    RETURNING runs.event_id, runs.attempts
)
SELECT l.event_id, l.attempts, r.request_id
FROM leased l JOIN events e ON e.id = l.event_id JOIN receipts r ON r.id = e.receipt_id
"""

# The stored events of claims the caller does not hold in memory (after a restart, or
# runs made due by another process or a replay).
CLAIMED_EVENTS = f"""
SELECT {EVENT_COLUMNS}
FROM events e JOIN receipts r ON r.id = e.receipt_id WHERE e.id = ANY($1::text[])
"""

# The outcomes of many claims in one statement: each run updated only while its lease is
# still held, an attempt recorded for each one updated; the positions of those updated
# come back. Rows are locked in key order, so that two batches never wait on each other.
FINISH = """
WITH o AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
        $6::timestamptz[], $7::text[], $8::int[], $9::timestamptz[], $10::text[])
        WITH ORDINALITY AS o(event_id, handler, token, status, counted, retry_at, error,
            number, started_at, outcome, n)
),
locked AS (
    SELECT r.event_id, r.handler, o.n FROM runs r
    JOIN o ON r.event_id = o.event_id AND r.handler = o.handler AND r.lease_token = o.token
    ORDER BY r.event_id, r.handler FOR UPDATE OF r
),
updated AS (
    UPDATE runs SET status = o.status, attempts = runs.attempts + o.counted,
        due_at = COALESCE(o.retry_at, now()), lease_until = NULL, lease_token = NULL,
        last_error = o.error, updated_at = now()
    FROM locked JOIN o ON o.n = locked.n
    WHERE runs.event_id = locked.event_id AND runs.handler = locked.handler
        AND runs.lease_token = o.token
    RETURNING o.n
),
recorded AS (
    INSERT INTO attempts (event_id, handler, number, started_at, finished_at, outcome, error)
    SELECT o.event_id, o.handler, o.number, o.started_at, now(), o.outcome, o.error
    FROM o JOIN updated ON updated.n = o.n ORDER BY o.n
)
SELECT array_agg(n) FROM updated
"""


class PostgresInbox:
    def __init__(
        self,
        url: str,
        *,
        schema: str,
        pool_size: int,
        rejected_body_bytes: int,
        read_only: bool = False,
        wait: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._rejected_body_bytes = rejected_body_bytes
        self._read_only = read_only
        self._wait = wait
        # A service's inbox (`wait`) logs its outages; a command says why it failed.
        self._reach = Reach(Location.of(url), log=wait, registry=registry)
        quiet_pool_floor()
        self._pool: _Pool | None = None
        self._watchers: list[Callable[[], None]] = []
        self._listening: asyncio.Task[None] | None = None
        self._last_write = 0.0
        self._last_failure = 0.0
        # The callbacks being stored at one moment, committed together.
        self._stores = GroupCommit(
            self._store_rows, lambda arguments: self._write(STORE, *arguments)
        )
        # Outcomes waiting for their batch's statement, and its future (see finish()).
        self._outcomes: list[tuple[Any, ...]] | None = None
        self._recorded: asyncio.Future[set[int]] | None = None

    # --- connections ---------------------------------------------------------------

    async def open(self, waiting: Callable[[], None] | None = None) -> None:
        """With `wait`, a server that cannot be reached is waited for (its absence logged
        once, `waiting` called once); otherwise, and for errors that waiting will not
        mend, raise at once."""
        delay = 1.0
        where = self._reach.location
        while True:
            try:
                with self._reach:
                    await self._open()
                return
            except FATAL_CONNECT_ERRORS as exc:
                raise InboxUnavailable(f"PostgreSQL at {where} refused: {exc}") from None
            except asyncpg.InterfaceError as exc:  # a URL or setting asyncpg cannot use
                raise InboxUnavailable(f"cannot use inbox.url: {exc}") from None
            except asyncpg.PostgresError as exc:
                raise InboxUnavailable(
                    f"cannot open the PostgreSQL inbox at {where}: {describe(exc)}"
                ) from None
            except InboxUnavailable:  # not reached (reach.py)
                if not self._wait:
                    raise
                if waiting is not None:
                    waiting()
                    waiting = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, OPEN_RETRY_MAX_SECONDS)

    async def _open(self) -> None:
        connection = await asyncpg.connect(
            self._url, timeout=COMMAND_TIMEOUT, server_settings=self._settings()
        )
        try:
            if self._read_only:
                await check_readable(connection, self._schema)
            else:
                await setup(connection, self._schema)
        finally:
            await connection.close()
        pool = await asyncpg.create_pool(
            self._url,
            connection_class=_PooledConnection,
            min_size=1,
            max_size=self._pool_size,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=self._settings(),
        )
        self._pool = _Pool(pool, self._reach)
        if not self._read_only:
            self._listening = asyncio.create_task(self._listen(), name="inbox-listen")

    def _settings(self) -> dict[str, str]:
        settings = {"search_path": self._schema, "application_name": "ci-receiver"}
        if self._read_only:
            settings["default_transaction_read_only"] = "on"
        return settings

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
            self._listening = None
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), COMMAND_TIMEOUT)
            self._pool = None

    @property
    def pool(self) -> _Pool:
        if self._pool is None:  # not open yet (waiting for the server), or closed
            raise self._reach.unavailable() or InboxUnavailable("the inbox is not open")
        return self._pool

    async def _write(self, query: str, *args: Any) -> Any:
        """One statement that writes."""
        with self._writing():
            return await self.pool.fetchrow(query, *args)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Remember when writing last worked, or failed, for ping()."""
        try:
            yield
        except Exception:
            self._last_failure = time.monotonic()
            raise
        self._last_write = time.monotonic()

    # --- ingest --------------------------------------------------------------------

    async def store(
        self, receipt: Receipt, routed: list[tuple[Event, list[str]]], *, verify: bool = False
    ) -> Stored:
        ids = [event.id for event, _ in routed]
        columns: list[list[Any]] = [[] for _ in range(8)]
        run_events: list[str] = []
        run_handlers: list[str] = []
        run_statuses: list[str] = []
        for event, handlers in routed:
            for column, value in zip(columns, event_row(event), strict=True):
                column.append(text(value))
            for handler, status in new_runs(handlers, verify):
                run_events.append(text(event.id))
                run_handlers.append(handler)
                run_statuses.append(status)
        row = await self._stores.run(
            (
                receipt.received_at,
                receipt.source,
                text(receipt.request_id),
                orjson.dumps(receipt.headers),
                orjson.dumps(receipt.source_meta),
                pack(receipt.body),
                len(receipt.body),
                orjson.dumps(ids),
                *columns,
                run_events,
                run_handlers,
                run_statuses,
            )
        )
        receipt_id, inserted, _, forged = row
        if forged:
            runs = list(zip(run_events, run_handlers, run_statuses, strict=True))
            rows = [tuple(column[i] for column in columns) for i in range(len(ids))]
            inserted += await self._replace_forged(
                receipt, receipt_id, [r for r in rows if r[0] in forged], runs
            )
        new_ids = set(inserted)
        new = [event_id for event_id in ids if text(event_id) in new_ids]
        duplicates = [event_id for event_id in ids if text(event_id) not in new_ids]
        # One callback naming an event twice stores it once: the second is a duplicate.
        for event_id in set(new):
            while new.count(event_id) > 1:
                new.remove(event_id)
                duplicates.append(event_id)
        return Stored(receipt_id, ids, new, duplicates)

    async def _store_rows(self, batch: list[tuple[Any, ...]]) -> list[Any]:
        """STORE for each callback of `batch`, in one transaction and one round trip."""
        with self._writing():
            async with self.pool.acquire() as connection:
                return await connection.fetchmany(STORE, batch)

    async def store_many(self, items: list[ToStore]) -> list[Stored | BaseException]:
        # Each a store of its own, committed together (`self._stores`).
        stores = (self.store(receipt, routed, verify=verify) for receipt, routed, verify in items)
        return await asyncio.gather(*stores, return_exceptions=True)

    async def _replace_forged(
        self,
        receipt: Receipt,
        receipt_id: int,
        rows: list[tuple[Any, ...]],
        runs: list[tuple[str, str, str]],
    ) -> list[str]:
        """Replace the forged events of these rows (rare: a forgery came first); the
        ids replaced."""
        replaced: list[str] = []
        async with self.pool.acquire() as connection, connection.transaction():
            for event_id, *fields in dict((row[0], row) for row in rows).values():
                status = await connection.execute(
                    REPLACE_FORGED, event_id, *fields, receipt_id, receipt.received_at
                )
                if _count(status):
                    replaced.append(event_id)
            if replaced:
                await connection.execute(
                    "DELETE FROM runs WHERE event_id = ANY($1::text[])", replaced
                )
                await connection.executemany(
                    "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                    " VALUES ($1, $2, $3, now(), now()) ON CONFLICT DO NOTHING",
                    [run for run in runs if run[0] in replaced],
                )
                await connection.execute(
                    "UPDATE receipts SET outcome = 'accepted' WHERE id = $1", receipt_id
                )
                await connection.execute(f"SELECT pg_notify({CHANNEL}, '')")
        return replaced

    async def reject(
        self, receipt: Receipt, reason: str, detail: str, *, size: int | None = None
    ) -> int:
        kept = receipt.body[: self._rejected_body_bytes]
        row = await self._write(
            "INSERT INTO receipts (received_at, source, request_id, headers, source_meta, body,"
            " size, outcome, event_ids, error_reason, error_detail)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, 'rejected', $8, $9, $10) RETURNING id",
            receipt.received_at,
            receipt.source,
            text(receipt.request_id),
            orjson.dumps(receipt.headers),
            orjson.dumps(receipt.source_meta),
            kept,
            len(receipt.body) if size is None else size,
            orjson.dumps([]),
            text(reason),
            text(detail),
        )
        return int(row[0])

    async def settle(self, event_id: str, genuine: bool) -> int:
        # Released runs wake the other replicas, as new ones do.
        row = await self._write(
            "WITH settled AS (UPDATE runs SET status = $2, due_at = now(), updated_at = now()"
            " WHERE event_id = $1 AND status = 'held' RETURNING 1),"
            f" notified AS (SELECT pg_notify({CHANNEL}, '') WHERE $2 = 'pending'"
            " AND EXISTS (SELECT 1 FROM settled))"
            " SELECT (SELECT count(*) FROM settled), (SELECT count(*) FROM notified)",
            text(event_id),
            "pending" if genuine else "forged",
        )
        return int(row[0])

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
        try:
            rows = await self.pool.fetch(CLAIM, handler, limit, lease_seconds, token)
            # Events the caller holds are not read back: neither their row nor the body.
            unknown = [row[0] for row in rows if row[0] not in known]
            stored = await self.pool.fetch(CLAIMED_EVENTS, unknown) if unknown else []
        except Exception:
            self._last_failure = time.monotonic()
            raise
        documents = Documents()
        read = {row[0]: documents.event(row) for row in stored}
        claims = []
        for event_id, attempts, request_id in rows:
            event = known.get(event_id) or read.get(event_id)
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
        counted = outcome != "released"  # a run interrupted by shutdown is not an attempt
        outcomes = self._outcomes
        if outcomes is None:
            # The first outcome since the last batch left opens the next; the outcomes
            # reported until its statement starts go with it, in one round trip.
            outcomes = self._outcomes = []
            self._recorded = asyncio.ensure_future(self._record_outcomes(outcomes))
        recorded = self._recorded
        assert recorded is not None
        index = len(outcomes)
        outcomes.append(
            (
                text(claim.event.id),
                claim.handler,
                claim.lease_token,
                RUN_STATUS[outcome],
                int(counted),
                retry_at,
                text(error),
                claim.attempts + int(counted),
                started_at,
                outcome,
            )
        )
        # Shared by the batch's callers: one of them cancelled must not cancel the rest.
        return index + 1 in await asyncio.shield(recorded)

    async def _record_outcomes(self, outcomes: list[tuple[Any, ...]]) -> set[int]:
        """The positions (1-based) of the outcomes recorded, their leases still held."""
        await asyncio.sleep(0)  # the attempts finishing in this turn of the loop join
        if self._outcomes is outcomes:
            self._outcomes = self._recorded = None
        columns = [list(column) for column in zip(*outcomes, strict=True)]
        row = await self._write(FINISH, *columns)
        return set(row[0] or ())

    async def next_due(self, handlers: list[str]) -> datetime | None:
        if not handlers:
            return None
        # Leases are on the database's clock, which this host's may differ from: ask how
        # far away the next run is, not when.
        seconds: float | None = await self.pool.fetchval(
            "SELECT extract(epoch FROM min(greatest(due_at, coalesce(lease_until, due_at)))"
            " - now()) FROM runs WHERE status = 'pending' AND handler = ANY($1::text[])",
            handlers,
        )
        if seconds is None:
            return None
        return datetime.now(timezone.utc) + timedelta(seconds=float(seconds))

    def watch(self, wake: Callable[[], None]) -> None:
        self._watchers.append(wake)

    def _wake(self) -> None:
        for wake in self._watchers:
            wake()

    async def _listen(self) -> None:
        """Keep one connection LISTENing, reconnecting after any failure."""
        delay = 1.0
        while True:
            try:
                with self._reach:
                    connection = await asyncpg.connect(
                        self._url, timeout=COMMAND_TIMEOUT, server_settings=self._settings()
                    )
                delay = 1.0
                with self._reach:
                    await self._listen_on(connection)
            except InboxUnavailable:
                pass  # the server away (or the connection cut): logged once, by `Reach`
            except Exception as exc:
                logger.warning(
                    "inbox notifications lost; reconnecting (dispatch polls meanwhile)",
                    error=describe(exc),
                    retry_in=delay,
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _listen_on(self, connection: asyncpg.Connection) -> None:
        """LISTEN until the connection is lost; each connect wakes the watchers, since
        notifications may have been missed meanwhile."""
        try:
            lost = asyncio.Event()
            connection.add_termination_listener(lambda _: lost.set())
            await connection.add_listener(channel(self._schema), lambda *_: self._wake())
            self._wake()
            while not lost.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lost.wait(), LISTEN_CHECK_SECONDS)
                if not lost.is_set():
                    await connection.fetchval("SELECT 1", timeout=COMMAND_TIMEOUT)
            raise ConnectionError("the listening connection closed")
        finally:
            connection.terminate()

    async def ping(self) -> None:
        # A write that went through a moment ago, and no failure since, says as much as
        # one of our own would.
        now = time.monotonic()
        if now - self._last_write < PING_FRESH_SECONDS and self._last_write > self._last_failure:
            return
        try:
            await self._write(
                "INSERT INTO meta VALUES ('heartbeat', $1)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                str(time.time()),
            )
        except InboxUnavailable:  # away: where, why and since when
            raise
        except Exception as exc:
            raise InboxUnavailable(
                f"PostgreSQL at {self._reach.location}: {describe(exc)}"
            ) from exc

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
        ids = None if event_ids is None else [text(i) for i in event_ids]
        vouched = event_ids is not None if release is None else release
        async with self.pool.acquire() as connection:
            transaction = connection.transaction()
            await transaction.start()
            try:
                total = await _requeue(connection, ids, handlers, dead_only, vouched)
            except BaseException:
                await transaction.rollback()
                raise
            if dry_run:
                await transaction.rollback()
                return total
            if total:
                await connection.execute(f"SELECT pg_notify({CHANNEL}, '')")
            await transaction.commit()
        return total

    # --- reading -------------------------------------------------------------------

    async def events(
        self, filter: EventFilter | None = None, *, limit: int = 50, before: int | None = None
    ) -> list[EventSummary]:
        found = event_conditions(filter, DIALECT)
        if before is not None:
            found.add(f"e.seq < {found.param(before)}")
        limit_param = found.param(limit)
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {SUMMARY_COLUMNS} FROM events e {found.where()}"
                f" ORDER BY e.seq DESC LIMIT {limit_param}",
                *found.values,
            )
            runs = await _runs(connection, [row[1] for row in rows])
        return [EventSummary(*row, runs.get(row[1], [])) for row in rows]

    async def event_ids(
        self, filter: EventFilter | None = None, *, limit: int = 1000, after: int = 0
    ) -> list[tuple[int, str]]:
        found = event_conditions(filter, DIALECT)
        found.add(f"e.seq > {found.param(after)}")
        limit_param = found.param(limit)
        rows = await self.pool.fetch(
            f"SELECT e.seq, e.id FROM events e {found.where()} ORDER BY e.seq LIMIT {limit_param}",
            *found.values,
        )
        return [(row[0], row[1]) for row in rows]

    async def event(self, event_id: str) -> EventDetail | None:
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(
                f"SELECT {EVENT_COLUMNS}, r.request_id FROM events e"
                " JOIN receipts r ON r.id = e.receipt_id WHERE e.id = $1",
                text(event_id),
            )
            if row is None:
                return None
            attempts = [
                Attempt(*attempt)
                for attempt in await connection.fetch(
                    "SELECT handler, number, started_at, finished_at, outcome, error"
                    " FROM attempts WHERE event_id = $1 ORDER BY id",
                    text(event_id),
                )
            ]
            runs = await _runs(connection, [text(event_id)])
        event = Documents().event(row)
        receipt_id, request_id = row[2], row[EVENT_WIDTH]
        return EventDetail(event, receipt_id, request_id, runs.get(text(event_id), []), attempts)

    async def known(self, event_ids: list[str], *, forged: bool = True) -> set[str]:
        if not event_ids:
            return set()
        by_text = {text(event_id): event_id for event_id in event_ids}
        unforged = "" if forged else f" AND NOT {FORGED_EVENT}"
        rows = await self.pool.fetch(
            f"SELECT id FROM events e WHERE id = ANY($1::text[]){unforged}", list(by_text)
        )
        return {by_text[row[0]] for row in rows}

    async def receipts(
        self, *, limit: int = 50, outcome: ReceiptOutcome | None = None, before: int | None = None
    ) -> list[ReceiptSummary]:
        rows = await self.pool.fetch(
            "SELECT id, received_at, source, outcome, size, error_reason, error_detail,"
            " event_ids FROM receipts WHERE ($1::text IS NULL OR outcome = $1)"
            " AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
            outcome,
            before,
            limit,
        )
        return [ReceiptSummary(*row[:7], orjson.loads(row[7])) for row in rows]

    async def receipt(self, receipt_id: int) -> Receipt | None:
        row = await self.pool.fetchrow(
            "SELECT body, source, received_at, request_id, headers, source_meta, size, outcome"
            " FROM receipts WHERE id = $1",
            receipt_id,
        )
        if row is None:
            return None
        kept, source, received_at, request_id, headers, meta, size, outcome = row
        body = stored_body(kept, outcome)
        return Receipt(
            body,
            source,
            received_at,
            request_id or "",
            orjson.loads(headers),
            orjson.loads(meta),
            cut_from=size if size > len(body) else None,
        )

    async def rejected(
        self, *, limit: int = 50, before: int | None = None, preview: int = 512
    ) -> list[RejectedReceipt]:
        rows = await self.pool.fetch(
            "SELECT id, received_at, source, request_id, size, coalesce(octet_length(body), 0),"
            " error_reason, error_detail, headers, source_meta, substring(body from 1 for $1)"
            " FROM receipts WHERE outcome <> 'accepted' AND outcome = 'rejected'"
            " AND ($2::bigint IS NULL OR id < $2)"
            " ORDER BY id DESC LIMIT $3",
            preview,
            before,
            limit,
        )
        return [
            RejectedReceipt(
                *row[:8], orjson.loads(row[8]), orjson.loads(row[9]), bytes(row[10] or b"")
            )
            for row in rows
        ]

    async def backlog(self) -> dict[str, Backlog]:
        return backlogs(await self.pool.fetch(BACKLOG))

    async def counts(self, since: datetime) -> Counts:
        async with self.pool.acquire() as connection:

            async def grouped(sql: str) -> dict[str, int]:
                return {str(key): count for key, count in await connection.fetch(sql, since)}

            receipts = await grouped(
                "SELECT outcome, count(*) FROM receipts WHERE received_at >= $1 GROUP BY 1"
            )
            tags = await grouped(
                "SELECT coalesce(tag, event_name, kind), count(*) FROM events"
                " WHERE received_at >= $1 GROUP BY 1"
            )
            states = await grouped(
                "SELECT coalesce(state, '-'), count(*) FROM events"
                " WHERE received_at >= $1 GROUP BY 1"
            )
            runs: dict[str, dict[str, int]] = {}
            for handler, status, count in await connection.fetch(
                "SELECT r.handler, r.status, count(*) FROM events e JOIN runs r"
                " ON r.event_id = e.id WHERE e.received_at >= $1 GROUP BY 1, 2",
                since,
            ):
                runs.setdefault(handler, {})[status] = count
        return Counts(receipts=receipts, tags=tags, states=states, runs=runs)

    async def traffic(self, since: datetime, *, step: int = 60) -> Traffic:
        # Two passes over two tables: side by side, on two connections of the pool.
        steps, tallied = await asyncio.gather(
            self.pool.fetch(
                "SELECT floor(extract(epoch FROM received_at) / $2)::bigint, outcome, count(*)"
                " FROM receipts WHERE received_at >= $1 GROUP BY 1, 2 ORDER BY 1, 2",
                since,
                step,
            ),
            self.pool.fetch(
                "SELECT coalesce(tag, event_name, kind), coalesce(state, '-'), count(*)"
                " FROM events WHERE received_at >= $1 GROUP BY 1, 2",
                since,
            ),
        )
        tags, states = tallies(tallied)
        found = [
            (datetime.fromtimestamp(bucket * step, timezone.utc), outcome, count)
            for bucket, outcome, count in steps
        ]
        return Traffic(step, found, tags, states)

    async def load(self, event_ids: list[str]) -> list[Event]:
        if not event_ids:
            return []
        rows = await self.pool.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
            " WHERE e.id = ANY($1::text[])",
            [text(i) for i in event_ids],
        )
        # Decoding bodies is work for the CPU: not on the event loop.
        # One `Documents` for the read: each receipt's body is decoded once for its events.
        documents = Documents()
        return await asyncio.to_thread(lambda: [documents.event(row) for row in rows])

    async def size(self) -> int:
        size: int | None = await self.pool.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind = 'r'",
            self._schema,
        )
        return int(size or 0)

    # --- retention -----------------------------------------------------------------

    async def prune(self, cutoffs: Cutoffs, *, limit: int = 500, dry_run: bool = False) -> Pruned:
        async with self.pool.acquire() as connection, connection.transaction():
            # One replica prunes at a time: two deleting the same rows in another order
            # could deadlock. The others find nothing to do this time.
            if not dry_run and not await connection.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext($1))",
                f"ci-receiver prune {self._schema}",
            ):
                return Pruned()
            return await _prune(connection, cutoffs, None if dry_run else limit, dry_run)

    async def compact(self) -> None:
        """PostgreSQL's autovacuum makes the space of deleted rows reusable by itself."""

    # --- state ---------------------------------------------------------------------

    async def get_state(self, key: str) -> str | None:
        value: str | None = await self.pool.fetchval(
            "SELECT value FROM state WHERE key = $1", text(key)
        )
        return value

    async def set_state(self, key: str, value: str) -> None:
        await self._write(
            "INSERT INTO state VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            text(key),
            text(value),
        )

    async def states(self, prefix: str) -> dict[str, str]:
        rows = await self.pool.fetch(
            "SELECT key, value FROM state WHERE left(key, $1) = $2", len(prefix), text(prefix)
        )
        return {row[0]: row[1] for row in rows}

    async def delete_state(self, key: str) -> None:
        await self._write("DELETE FROM state WHERE key = $1", text(key))


async def _requeue(
    connection: asyncpg.Connection,
    ids: list[str] | None,
    handlers: list[str] | None,
    dead_only: bool,
    release: bool,
) -> int:
    if handlers and not dead_only:
        # Named handlers: create the runs that do not exist yet, reset the others.
        # Events released (named by the user) run whatever verification said;
        # otherwise a held event's new runs wait with its others, and a forged event
        # is left alone.
        total = 0
        for handler in handlers:
            status = await connection.execute(
                "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                " SELECT e.id, $1, CASE WHEN NOT $3 AND EXISTS (SELECT 1"
                " FROM runs h WHERE h.event_id = e.id AND h.status = 'held')"
                " THEN 'held' ELSE 'pending' END, now(), now() FROM events e"
                " WHERE ($2::text[] IS NULL OR e.id = ANY($2::text[]))"
                " AND ($3 OR NOT EXISTS (SELECT 1 FROM runs f"
                " WHERE f.event_id = e.id AND f.status = 'forged'))"
                " ON CONFLICT (event_id, handler) DO UPDATE SET status = excluded.status,"
                " attempts = 0, due_at = now(), last_error = NULL, lease_until = NULL,"
                " lease_token = NULL, updated_at = now()"
                " WHERE runs.lease_until IS NULL OR runs.lease_until <= now()",
                handler,
                ids,
                release,
            )
            total += _count(status)
        return total
    status = await connection.execute(
        "UPDATE runs SET status = 'pending', attempts = 0, due_at = now(),"
        " last_error = NULL, lease_until = NULL, lease_token = NULL, updated_at = now()"
        " WHERE (lease_until IS NULL OR lease_until <= now())"
        " AND (NOT $1 OR status = 'dead')"
        " AND ($2::text[] IS NULL OR event_id = ANY($2::text[]))"
        " AND ($5 OR status NOT IN ('held', 'forged'))"
        " AND CASE WHEN $3::text[] IS NULL THEN handler <> $4"
        " ELSE handler = ANY($3::text[]) END",
        dead_only,
        ids,
        handlers,
        VERIFY_RUN,
        release,
    )
    return _count(status)


async def _prune(
    connection: asyncpg.Connection, cutoffs: Cutoffs, limit: int | None, dry_run: bool
) -> Pruned:
    """One batch of retention (`limit` None: everything, for a dry run's count)."""
    found = Pruned()
    if cutoffs.events is not None:
        events = await connection.fetch(
            "SELECT e.id, coalesce(octet_length(e.data), 0) FROM events e WHERE e.received_at < $1"
            f" AND NOT {UNFINISHED_RUN} ORDER BY e.received_at LIMIT $2",
            cutoffs.events,
            limit,
        )
        found.events = len(events)
        found.bytes += sum(row[1] for row in events)
        ids = [row[0] for row in events]
        if not dry_run and ids:
            for table in ("runs", "attempts"):
                await connection.execute(
                    f"DELETE FROM {table} WHERE event_id = ANY($1::text[])", ids
                )
            await connection.execute("DELETE FROM events WHERE id = ANY($1::text[])", ids)
        # A receipt goes with the last of its events; a duplicate's has none of its own.
        still = f" AND {UNFINISHED_RUN}" if dry_run else ""
        receipts = await connection.fetch(
            "SELECT id, coalesce(octet_length(body), 0) FROM receipts WHERE received_at < $1"
            " AND outcome != 'rejected' AND NOT EXISTS (SELECT 1 FROM events e"
            f" WHERE e.receipt_id = receipts.id{still}) ORDER BY received_at LIMIT $2",
            cutoffs.events,
            limit,
        )
        found += await _remove_receipts(connection, receipts, dry_run)
    if cutoffs.refused is not None:
        refused = await connection.fetch(
            "SELECT id, coalesce(octet_length(body), 0) FROM receipts WHERE received_at < $1"
            " AND outcome = 'rejected' ORDER BY received_at LIMIT $2",
            cutoffs.refused,
            limit,
        )
        found += await _remove_receipts(connection, refused, dry_run)
    if cutoffs.bodies is not None:
        lean = ""
        if not dry_run:
            await _keep_data(connection, cutoffs.bodies, limit)
            # Not a body an event is still rebuilt from (_keep_data gave them their JSON).
            lean = " OR e.data IS NULL"
        bodies = await connection.fetch(
            f"SELECT id, octet_length(body) FROM receipts WHERE {BODIES_TO_DROP}"
            " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.receipt_id = receipts.id"
            f" AND ({UNFINISHED_RUN}{lean})) ORDER BY received_at LIMIT $2",
            cutoffs.bodies,
            limit,
        )
        found.bodies = len(bodies)
        found.bytes += sum(row[1] for row in bodies)
        if not dry_run and bodies:
            await connection.execute(
                "UPDATE receipts SET body = NULL WHERE id = ANY($1::bigint[])",
                [row[0] for row in bodies],
            )
    return found


async def _keep_data(connection: asyncpg.Connection, before: datetime, limit: int | None) -> None:
    """Give the events without JSON of the next receipts whose bodies retention drops
    the JSON their rows keep once the body is gone (decoded off the event loop)."""
    rows = await connection.fetch(
        f"SELECT {EVENT_COLUMNS} FROM events e JOIN receipts r ON r.id = e.receipt_id"
        " WHERE e.data IS NULL AND e.receipt_id IN (SELECT id FROM receipts"
        f" WHERE {BODIES_TO_DROP} AND NOT EXISTS (SELECT 1 FROM events e"
        f" WHERE e.receipt_id = receipts.id AND {UNFINISHED_RUN})"
        " ORDER BY received_at LIMIT $2)",
        before,
        limit,
    )
    if rows:
        data = await asyncio.to_thread(materialize, rows)
        await connection.executemany(
            "UPDATE events SET data = $1 WHERE id = $2 AND receipt_id = $3 AND data IS NULL",
            data,
        )


async def _remove_receipts(
    connection: asyncpg.Connection, rows: list[Any], dry_run: bool
) -> Pruned:
    if not dry_run and rows:
        await connection.execute(
            "DELETE FROM receipts WHERE id = ANY($1::bigint[])", [row[0] for row in rows]
        )
    return Pruned(receipts=len(rows), bytes=sum(row[1] for row in rows))


async def probe(url: str, schema: str) -> str:
    """Connect and say what the schema holds; nothing is changed."""
    try:
        connection = await asyncpg.connect(url, timeout=COMMAND_TIMEOUT)
    except Exception as exc:
        raise cannot_connect(url, exc) from None
    try:
        where = f"PostgreSQL {connection.get_server_version().major}"
        try:
            await check_readable(connection, schema)
        except SchemaError as exc:
            if "no inbox" not in str(exc):
                raise
            return f"{where}: schema {schema!r} is created at the first start"
        return f"{where}: inbox in schema {schema!r}, schema version {SCHEMA_VERSION}"
    finally:
        await connection.close()


def text(value: str | None) -> str | None:
    """A value for a text column: PostgreSQL refuses NUL in text, whatever a callback
    carries."""
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


async def _runs(connection: asyncpg.Connection, event_ids: list[str]) -> dict[str, list[RunState]]:
    found: dict[str, list[RunState]] = {}
    if not event_ids:
        return found
    for event_id, handler, status, attempts, due, error in await connection.fetch(
        "SELECT event_id, handler, status, attempts, due_at, last_error FROM runs"
        " WHERE event_id = ANY($1::text[]) ORDER BY handler",
        event_ids,
    ):
        due_at = due if status == "pending" else None
        found.setdefault(event_id, []).append(RunState(handler, status, attempts, due_at, error))
    return found


def _count(status: str) -> int:
    """The row count of a command status such as `UPDATE 3` or `INSERT 0 3`."""
    return int(status.rsplit(" ", 1)[-1])
