"""The PostgreSQL inbox: one database shared by any number of receivers and consumers.

- **Dedup across replicas**: events are inserted `ON CONFLICT (id) DO NOTHING`; two
  replicas storing the same id at once: the second waits for the first to commit and
  finds a duplicate, never an error.
- **Few round trips**: the callbacks arriving at one moment go in one statement
  (`STORE`: their receipts, new events and runs, those the storing process will start
  leased to it), which also notifies the other replicas of runs left to claim; the
  outcomes of attempts ending together likewise (`FINISH`).
- **Claims** take due runs `FOR UPDATE SKIP LOCKED` under a lease measured on the
  database's clock, so replicas never wait for each other's claims, and a replica that
  dies mid-attempt leaves its runs to the others when the lease ends.
- **Wake-ups**: every replica LISTENs on its schema's channel (`ci_receiver_work.<schema>`);
  a store that leaves runs to claim, or a replay, notifies it, so an idle replica starts
  new work within moments (polling stays as the fallback).
- **Failures**: the database restarting or unreachable makes operations raise
  `InboxUnavailable` saying where and since when (callers answer 503 or leave the
  message unacked), logged once as it goes and once as it comes back (`reach.py`); the
  pool reconnects by itself.

The connector runs the inbox's statements (`query.py`) for its rules (`manager.py`),
but for the hot path, which PostgreSQL takes its own way, one round trip each: the
callbacks of a moment stored by one statement (`STORE`) and the outcomes of a moment
recorded by another (`FINISH`), each group-committed (`group_commit.py`), runs leased
many at a time (`LEASE`).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import orjson
import structlog
from prometheus_client import CollectorRegistry

from receiver.inbox.connector import Delivered, Delivery, Finished
from receiver.inbox.group_commit import GroupCommit
from receiver.inbox.manager import InboxManager, InboxReader
from receiver.inbox.postgres_schema import SCHEMA_VERSION, check_readable, setup
from receiver.inbox.query import FORGED_EVENT, Dialect, Offload, Statement, Tx, Work, glob_to_like
from receiver.inbox.reach import Location, Reach, cannot_connect, describe, quiet_pool_floor
from receiver.inbox.records import pack
from receiver.inbox.types import InboxUnavailable, SchemaError

T = TypeVar("T")
S = TypeVar("S", str, str | None)

logger = structlog.get_logger("ci_receiver.inbox")

# Notifications are database-wide: each schema's inbox has a channel of its own, so that
# deployments sharing a database do not wake each other (a name is cut at 63 characters).
CHANNEL_PREFIX = "ci_receiver_work."
CHANNEL = f"left('{CHANNEL_PREFIX}' || current_schema(), 63)"  # in SQL, on the inbox's path


class _PooledConnection(asyncpg.Connection):  # type: ignore[misc]
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
            rows: list[Any] = await self._pool.fetch(query, *args)
            return rows

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


# Seconds any one statement, or connecting, may take before it counts as a failure (a
# database that stopped answering must not hold a callback's answer for ever).
COMMAND_TIMEOUT = 10.0
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

# Plans that find rows through an index, on the connections that write. Every statement
# of the hot path (STORE, LEASE, FINISH, next_due, load) looks rows up by key or by an
# indexed range; but each is prepared once per connection, and PostgreSQL keeps the
# generic plan it makes after the first executions until the table is next analyzed
# (autovacuum: a minute or more). One made while the tables were still small (a new
# inbox, one just emptied by retention) reads a table whole to join it, cheapest then,
# and a burst meanwhile has every claim and outcome read all of `runs` (docs/benchmarks.md, "Next to
# a hand-written receiver"). Where no index serves, a table is still
# read whole; JIT is off, since such a scan now costs more than any threshold of it. Set
# once a connection is open, not sent as startup parameters, which PgBouncer refuses
# unless told of them. The read-only commands keep the planner's own choice.
KEYED_PLANS = "SET enable_seqscan = off; SET jit = off"

DIALECT = Dialect(
    placeholder=lambda n: f"${n}",
    glob=lambda column, param: f"{column} LIKE {param}",
    glob_pattern=glob_to_like,
    time=lambda moment: moment,
    clock=None,
    no_limit=None,
    length="octet_length",
    greatest="greatest",
    seconds=lambda difference: f"extract(epoch FROM {difference})",
    steps=lambda column, step: f"floor(extract(epoch FROM {column}) / {step})::bigint",
    chunk=None,
    try_lock="SELECT pg_try_advisory_xact_lock(hashtext('ci-receiver prune ' || current_schema()))",
    text=lambda value: text(value),
    # In the "C" collation lower() lowers ASCII letters only, as SQLite's does.
    fold=lambda expression: f'lower({expression} COLLATE "C")',
)

# The callbacks of a batch in one statement: their receipts, their new events and the
# events' runs, and the replacement of stored events of their ids that verification found
# forged (their rows take the delivery's, their runs made afresh), all in one
# transaction. Within the batch, as if stored one after the other: an event named by
# several callbacks is stored (or replaced) by the first, a duplicate for the others. The
# runs of a replaced event that it has again are reset in place, the others deleted: no
# row is touched twice. A run with a lease is stored leased (the storer starts it). It
# wakes the other replicas once, when runs were made that they may claim. One row per
# callback, in order: its receipt's id and the ids of the events it stored.
#
# The batch is one argument, a JSON text (`_store_batch_json`): [receipts, events, runs],
# each a list of rows, a row its columns by position, bytea columns in base64 (`decode`
# reads them whatever the database's encoding). Not an array per column: asyncpg encodes
# arrays element by element in Python (type checks of each), over 10 µs of the event
# loop per callback, where orjson writes the whole batch in a few. It is parsed once
# (`batch`), as jsonb, whose rows are then read column by column without parsing them
# again. The events' and runs' rows go through an array (`unnest(ARRAY(...))`): the
# planner expects 10 rows of an array it does not know, and 100 of
# `jsonb_array_elements`, enough for a plan made while the tables were small (and kept,
# `KEYED_PLANS`) to read a whole index to join them (FINISH's read `runs`'). Not the
# receipts', which would be copied, bodies and all, into the array, and which meet no
# table but in their INSERT. Each array keeps its rows' order (`ORDER BY i`), which
# positions (`n`) stand for.
STORE = f"""
WITH batch AS (SELECT $1::jsonb AS b),
receipt AS (
    SELECT nextval('receipts_id_seq') AS id, (r->>0)::timestamptz AS received_at,
        r->>1 AS source, r->>2 AS request_id, decode(r->>3, 'base64') AS headers,
        decode(r->>4, 'base64') AS source_meta, decode(r->>5, 'base64') AS body,
        (r->>6)::int AS size, decode(r->>7, 'base64') AS event_ids, n
    FROM batch, jsonb_array_elements(b->0) WITH ORDINALITY AS j(r, n)
),
delivered AS (
    SELECT e.*, r.id AS receipt_id, r.received_at
    FROM (
        SELECT (v->>0)::bigint AS receipt_n, v->>1 AS id, v->>2 AS kind,
            v->>3 AS event_name, v->>4 AS job_id, v->>5 AS tag, v->>6 AS state,
            v->>7 AS bucket, v->>8 AS key, v->>9 AS verdict, n
        FROM unnest(ARRAY(SELECT v FROM batch, jsonb_array_elements(b->1)
            WITH ORDINALITY AS a(v, i) ORDER BY i)) WITH ORDINALITY AS j(v, n)
    ) e
    JOIN receipt r ON r.n = e.receipt_n
),
runs_of AS (
    SELECT DISTINCT ON (r.id, u.event_id, u.handler) r.id AS receipt_id, u.event_id,
        u.handler, u.status, u.lease_token,
        now() + make_interval(secs => u.lease_seconds) AS lease_until
    FROM (
        SELECT (v->>0)::bigint AS receipt_n, v->>1 AS event_id, v->>2 AS handler,
            v->>3 AS status, v->>4 AS lease_token, (v->>5)::float8 AS lease_seconds
        FROM unnest(ARRAY(SELECT jsonb_array_elements(b->2) FROM batch)) AS j(v)
    ) u
    JOIN receipt r ON r.n = u.receipt_n
),
inserted AS (
    -- No JSON (`data`): the event is rebuilt from the receipt's body (records.py).
    INSERT INTO events (id, receipt_id, received_at, kind, event_name, job_id, tag, state,
        bucket, key, verdict)
    SELECT id, receipt_id, received_at, kind, event_name, job_id, tag, state, bucket, key,
        verdict
    FROM delivered ORDER BY n
    ON CONFLICT (id) DO NOTHING
    RETURNING id, receipt_id
),
replaced AS (
    UPDATE events SET kind = d.kind, event_name = d.event_name, job_id = d.job_id,
        tag = d.tag, state = d.state, bucket = d.bucket, key = d.key, verdict = d.verdict,
        data = NULL,
        receipt_id = d.receipt_id, received_at = d.received_at
    FROM (SELECT DISTINCT ON (id) * FROM delivered ORDER BY id, n) d
    WHERE events.id = d.id AND {FORGED_EVENT.replace("e.id", "events.id")}
    RETURNING events.id, events.receipt_id
),
stored AS (SELECT * FROM inserted UNION ALL SELECT * FROM replaced),
cleared AS (
    DELETE FROM runs WHERE event_id IN (SELECT id FROM replaced)
        AND (event_id, handler) NOT IN (SELECT o.event_id, o.handler FROM runs_of o
            JOIN replaced p ON p.id = o.event_id AND p.receipt_id = o.receipt_id)
),
new_runs AS (
    INSERT INTO runs (event_id, handler, status, due_at, updated_at, lease_until, lease_token)
    SELECT o.event_id, o.handler, o.status, now(), now(), o.lease_until, o.lease_token
    FROM runs_of o JOIN stored s ON s.id = o.event_id AND s.receipt_id = o.receipt_id
    ON CONFLICT (event_id, handler) DO UPDATE SET status = excluded.status, attempts = 0,
        due_at = excluded.due_at, lease_until = excluded.lease_until,
        lease_token = excluded.lease_token, last_error = NULL,
        updated_at = excluded.updated_at
    RETURNING status, lease_token
),
kept AS (
    INSERT INTO receipts (id, received_at, source, request_id, headers, source_meta, body,
        size, outcome, event_ids)
    SELECT id, received_at, source, request_id, headers, source_meta, body, size,
        CASE WHEN id IN (SELECT receipt_id FROM stored) THEN 'accepted' ELSE 'duplicate' END,
        event_ids
    FROM receipt
),
notified AS (
    SELECT pg_notify({CHANNEL}, '')
    WHERE EXISTS (SELECT 1 FROM new_runs WHERE status = 'pending' AND lease_token IS NULL)
)
SELECT r.id, array_remove(array_agg(s.id), NULL), (SELECT count(*) FROM notified)
FROM receipt r LEFT JOIN stored s ON s.receipt_id = r.id
GROUP BY r.id, r.n ORDER BY r.n
"""

# Due pending runs leased on the database's clock, skipping those another replica is
# leasing at this moment.
LEASE = """
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

# The outcomes of many claims in one statement: each run updated only while its lease is
# still held, an attempt recorded for each one updated; the positions of those updated
# come back. The outcomes are one argument, a JSON text: a row of `Finished`'s columns for
# each and its position, read through an array as STORE's events are, for the same
# reasons. The array is in the runs' key order (then the outcomes' own), which the join to
# `runs` keeps under `KEYED_PLANS` (a nested loop over the primary key): every batch locks
# its runs in that one order, so no two wait on each other in a cycle. No `SELECT ...
# ORDER BY ... FOR UPDATE` first to make sure of it: locking every row twice cost a third
# of the statement's server CPU, and should another statement make a cycle, PostgreSQL
# breaks it (the loser is aborted; a batch of outcomes is then written again item by
# item).
FINISH = """
WITH o AS (
    SELECT v->>0 AS event_id, v->>1 AS handler, v->>2 AS token, v->>3 AS status,
        (v->>4)::int AS counted, (v->>5)::timestamptz AS retry_at, v->>6 AS error,
        (v->>7)::int AS number, (v->>8)::timestamptz AS started_at, v->>9 AS outcome,
        (v->>10)::int AS n
    FROM unnest(ARRAY(SELECT v FROM jsonb_array_elements($1::jsonb) AS a(v)
        ORDER BY v->>0, v->>1, (v->>10)::int)) AS j(v)
),
updated AS (
    UPDATE runs SET status = o.status, attempts = runs.attempts + o.counted,
        due_at = COALESCE(o.retry_at, now()), lease_until = NULL, lease_token = NULL,
        last_error = o.error, updated_at = now()
    FROM o
    WHERE runs.event_id = o.event_id AND runs.handler = o.handler
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


class PostgresConnector:
    dialect = DIALECT

    def __init__(
        self,
        url: str,
        *,
        schema: str,
        pool_size: int,
        read_only: bool = False,
        wait: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._url = url
        self._schema = schema
        self._pool_size = pool_size
        self._read_only = read_only
        self._wait = wait
        # A service's inbox (`wait`) logs its outages; a command says why it failed.
        self._reach = Reach(Location.of(url), log=wait, registry=registry)
        quiet_pool_floor()
        self._pool: _Pool | None = None
        self._watchers: list[Callable[[], None]] = []
        self._listening: asyncio.Task[None] | None = None
        self.last_write = 0.0
        self._last_failure = 0.0
        # The callbacks being stored at one moment, and the outcomes being recorded,
        # each committed together.
        self._stores = GroupCommit(self._store_batch, self._held, "inbox-store")
        self._outcomes = GroupCommit(self._finish_batch, self._held, "inbox-finish")

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
            # Connecting too: asyncpg's own bound is a minute, which every caller
            # waiting for a batch's new connection would wait on a server that stopped
            # answering (a network cut).
            timeout=COMMAND_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=self._settings(),
            init=None if self._read_only else _plan_by_keys,
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

    async def read(self, work: Callable[[Tx], Work[T]]) -> T:
        # Its statements see one snapshot (BEGIN and COMMIT: two round trips more than
        # `read_one`).
        async with (
            self.pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await run(connection, work)

    async def read_one(self, statement: Callable[[Tx], Statement]) -> Any:
        async with self.pool.acquire() as connection:
            return await execute(connection, statement(Tx(DIALECT)))

    async def write(self, work: Callable[[Tx], Work[T]]) -> T:
        with self._writing():
            async with self.pool.acquire() as connection, connection.transaction():
                return await run(connection, work)

    async def execute(self, statement: Callable[[Tx], Statement]) -> Any:
        with self._writing():
            async with self.pool.acquire() as connection:
                return await execute(connection, statement(Tx(DIALECT)))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Remember when writing last worked, or failed, for ping()."""
        try:
            yield
        except Exception:
            self._last_failure = time.monotonic()
            raise
        self.last_write = time.monotonic()

    # --- storing -------------------------------------------------------------------

    async def store(self, delivery: Delivery) -> Delivered:
        """With the others of the moment (`self._stores`), in one statement (`STORE`)."""
        return await self._stores.run(delivery)

    async def store_many(self, deliveries: list[Delivery]) -> list[Delivered | BaseException]:
        stored: list[Delivered | BaseException] = await asyncio.gather(
            *(self.store(delivery) for delivery in deliveries), return_exceptions=True
        )
        return stored

    @contextlib.asynccontextmanager
    async def _held(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for a group commit's batches, held from the first to the last:
        what they write goes through it, and it records (`_writing`, for `ping`) and
        names (`Reach`, in `_Pool.acquire`) their failures, and the failure to get a
        connection. One that failed other than by the server's refusal (asyncpg's
        client errors, as when its backend dies under it) is closed rather than handed
        to the pool's next user."""
        with self._writing():
            async with self.pool.acquire() as connection:
                try:
                    yield connection
                except asyncpg.PostgresError:  # the server answered: the connection is sound
                    raise
                except BaseException:
                    connection.terminate()
                    raise

    async def _store_batch(
        self, connection: asyncpg.Connection, deliveries: list[Delivery]
    ) -> list[Delivered]:
        rows = await connection.fetch(STORE, _store_batch_json(deliveries))
        return [Delivered(row[0], row[1]) for row in rows]

    # --- the run queue -------------------------------------------------------------

    async def lease(
        self, handler: str, limit: int, lease_seconds: float, token: str
    ) -> list[tuple[str, int, str | None]]:
        try:
            rows = await self.pool.fetch(LEASE, handler, limit, lease_seconds, token)
        except Exception:
            self._last_failure = time.monotonic()
            raise
        return [(row[0], row[1], row[2]) for row in rows]

    async def finish(self, finished: Finished) -> bool:
        """With the others of the moment (`self._outcomes`), in one statement (`FINISH`)."""
        return await self._outcomes.run(finished)

    async def _finish_batch(
        self, connection: asyncpg.Connection, outcomes: list[Finished]
    ) -> list[bool]:
        """Whether each outcome was recorded (its lease still held)."""
        rows = [  # FINISH's argument: `Finished` as they are, but for their text, then
            # their position
            (text(event_id), handler, token, status, counted, _utc(retry_at), text(error),
             number, _utc(started_at), outcome, position)
            for position, (event_id, handler, token, status, counted, retry_at, error,
                           number, started_at, outcome) in enumerate(outcomes, 1)
        ]  # fmt: skip
        recorded = set(await connection.fetchval(FINISH, orjson.dumps(rows).decode()) or ())
        return [position in recorded for position in range(1, len(outcomes) + 1)]

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

    # --- upkeep --------------------------------------------------------------------

    @property
    def last_failure(self) -> float:
        return self._last_failure

    def unwritable(self, error: Exception) -> InboxUnavailable:
        return InboxUnavailable(f"PostgreSQL at {self._reach.location}: {describe(error)}")

    async def size(self) -> int:
        size: int | None = await self.pool.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind = 'r'",
            self._schema,
        )
        return int(size or 0)

    async def compact(self) -> None:
        """PostgreSQL's autovacuum makes the space of deleted rows reusable by itself."""


class PostgresInbox(InboxManager):
    """The whole inbox in `schema` of the PostgreSQL database at `url`."""

    connector: PostgresConnector

    def __init__(
        self,
        url: str,
        *,
        schema: str,
        pool_size: int,
        rejected_body_bytes: int,
        wait: bool = False,
        registry: CollectorRegistry | None = None,
    ) -> None:
        connector = PostgresConnector(
            url, schema=schema, pool_size=pool_size, wait=wait, registry=registry
        )
        super().__init__(connector, rejected_body_bytes=rejected_body_bytes)


class PostgresReader(InboxReader):
    """The PostgreSQL inbox, read by the inspection commands: read-only transactions,
    no schema change, no listening."""

    def __init__(self, url: str, *, schema: str, pool_size: int) -> None:
        super().__init__(PostgresConnector(url, schema=schema, pool_size=pool_size, read_only=True))


async def _plan_by_keys(connection: asyncpg.Connection) -> None:
    await connection.execute(KEYED_PLANS)


def _store_batch_json(deliveries: list[Delivery]) -> str:
    """STORE's argument for a batch: the receipts' rows, then their events', each with
    the position of its receipt (1-based), then their runs'."""
    # The bodies packed together, before the rest: one after another, zstd's code and
    # context stay in the CPU's caches (`records.pack`).
    bodies = [_base64(pack(delivery.receipt.body)) for delivery in deliveries]
    receipts: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    runs: list[tuple[Any, ...]] = []
    for position, (delivery, body) in enumerate(zip(deliveries, bodies, strict=True), 1):
        receipt = delivery.receipt
        receipts.append(
            (
                _utc(receipt.received_at),
                receipt.source,
                text(receipt.request_id),
                _base64(orjson.dumps(receipt.headers)),
                _base64(orjson.dumps(receipt.source_meta)),
                body,
                len(receipt.body),
                _base64(orjson.dumps([event[0] for event, _ in delivery.events])),
            )
        )
        for event, handlers in delivery.events:
            event_id = text(event[0])
            events.append((position, event_id, *[text(value) for value in event[1:]]))
            for handler, status, lease in handlers:
                token, seconds = (None, None) if lease is None else (lease.token, lease.seconds)
                runs.append((position, event_id, handler, status, token, seconds))
    return orjson.dumps((receipts, events, runs)).decode()


def _utc(moment: datetime | None) -> datetime | None:
    """A time as STORE and FINISH take it: in UTC, which orjson writes whole (an offset
    with seconds it cuts to minutes); a naive one is local time, as asyncpg read it."""
    if moment is None or moment.tzinfo is timezone.utc:
        return moment
    return moment.astimezone(timezone.utc)


def _base64(value: bytes) -> str:
    """A bytea column's value as STORE takes it (`decode(..., 'base64')`)."""
    return binascii.b2a_base64(value, newline=False).decode("ascii")


async def run(connection: asyncpg.Connection, work: Callable[[Tx], Work[T]]) -> T:
    """Run a unit of work's statements one after the other on `connection`."""
    steps = work(Tx(DIALECT))
    result: Any = None
    while True:
        try:
            step = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if isinstance(step, Offload):
            result = await asyncio.to_thread(step.function, step.argument)
        else:
            result = await execute(connection, step)


async def execute(connection: asyncpg.Connection, statement: Statement) -> Any:
    if statement.fetch == "many":
        rows = [[_argument(value) for value in row] for row in statement.args]
        await connection.executemany(statement.text, rows)
        return None
    args = [_argument(value) for value in statement.args]
    if statement.wakes:
        return (await connection.fetchrow(_waking(statement.text), *args))[0]
    if statement.fetch == "rows":
        return await connection.fetch(statement.text, *args)
    if statement.fetch == "row":
        return await connection.fetchrow(statement.text, *args)
    if statement.fetch == "value":
        return await connection.fetchval(statement.text, *args)
    status = await connection.execute(statement.text, *args)
    return _count(status) if statement.fetch == "count" else None


@functools.lru_cache(maxsize=64)
def _waking(statement: str) -> str:
    """`statement`, which may make runs due, waking the other replicas (`_listen`) once
    it commits when it changed any row; it returns how many it changed."""
    return (
        f"WITH changed AS ({statement} RETURNING 1),"
        f" woken AS (SELECT pg_notify({CHANNEL}, '') WHERE EXISTS (SELECT 1 FROM changed))"
        " SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM woken)"
    )


def _argument(value: Any) -> Any:
    """A statement's argument, text refusing no NUL (`text`)."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [text(item) for item in value]
    return value


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


def text(value: S) -> S:
    """A value for a text column: PostgreSQL refuses NUL in text, whatever a callback
    carries."""
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _count(status: str) -> int:
    """The row count of a command status such as `UPDATE 3` or `INSERT 0 3`."""
    return int(status.rsplit(" ", 1)[-1])
