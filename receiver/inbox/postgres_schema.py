"""The PostgreSQL inbox's tables, in a schema of their own (`inbox.postgres_schema`).

Created and migrated at start under an advisory lock, so that replicas starting at the
same moment do it once. JSON documents and bodies are `bytea`, not `jsonb`: jsonb
refuses `\\u0000`, which a hostile callback may well carry, and a refused insert would
turn one bad callback into a 503 for ever. Text columns get NUL replaced for the same
reason (`text()` in postgres.py); the event's own JSON keeps the value as sent.

Version 2 keeps accepted bodies compressed and no JSON in an event's row while its
receipt keeps the body (`data` NULL: the event is rebuilt from it, see records.py), and
drops two indexes that the wider ones starting with the same column serve. Version 3
indexes runs by status, receipts by outcome and by origin only where they are not the
common case (done, accepted, not copied), and leaves room in the pages of `runs` so that
a claim (which changes no indexed column) updates its row in place, without new index
entries: together a fifth of a small callback's bytes. Version 4 compresses bodies with
zstd where 3 used zlib (records.py `pack`): its tables are 3's, and bodies written before
stay zlib, which `unpack` still reads; the version says that an older ci-receiver, which
reads zlib alone, must not use the schema. Version 5 keeps a moderation event's verdict
in a column, for filters and counts.

The inbox is marked as ci-receiver's by a row in `meta` (mark.py), which needs no more
rights than writing the schema version; tables of its names that it did not create,
in a schema a user pointed it at, are not touched (receiver/ownership.py).
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import orjson
import structlog

from receiver.inbox.mark import KEYS, MARK, claim_inbox
from receiver.inbox.records import EVENT_COLUMNS, VERDICTS_BATCH, VERDICTS_TO_FILL, verdicts
from receiver.inbox.types import SchemaError
from receiver.ownership import Claim

logger = structlog.get_logger("ci_receiver.inbox")

SCHEMA_VERSION = 5

OUR_TABLES = ["meta", "state", "receipts", "events", "runs", "attempts"]
# The tables of every version (mark.py).
EVERY_VERSION = set(OUR_TABLES)

TABLES = [
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
        origin text
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS receipts_origin ON receipts (origin)"
    " WHERE origin IS NOT NULL",
    # Refused and duplicate receipts by outcome.
    "CREATE INDEX IF NOT EXISTS receipts_unaccepted ON receipts (outcome, id)"
    " WHERE outcome <> 'accepted'",
    # The overview's callbacks per minute by outcome, read from the index alone, and any
    # range of receipts by time.
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
        -- NULL while the receipt keeps the body (the event is rebuilt from it)
        data bytea,
        -- A moderation event's verdict (normal, violation, suspected), for filters and
        -- counts
        verdict text
    )""",
    "CREATE INDEX IF NOT EXISTS events_job ON events (job_id)",
    # The overview's events by tag and state, read from the index alone, and any range
    # of events by time.
    "CREATE INDEX IF NOT EXISTS events_time_tally"
    " ON events (received_at, tag, event_name, kind, state)",
    "CREATE INDEX IF NOT EXISTS events_receipt ON events (receipt_id)",
    # The overview's verdicts, read from the index alone: moderation events only.
    "CREATE INDEX IF NOT EXISTS events_verdict ON events (received_at, verdict)"
    " WHERE verdict IS NOT NULL",
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
    ) WITH (fillfactor = 70)""",
    "CREATE INDEX IF NOT EXISTS runs_due ON runs (handler, due_at) WHERE status = 'pending'",
    # Pending, held, forged and dead runs.
    "CREATE INDEX IF NOT EXISTS runs_open ON runs (status, handler) WHERE status <> 'done'",
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


def _lock_key(schema: str) -> str:
    return f"ci-receiver inbox schema {schema}"


async def setup(connection: asyncpg.Connection, schema: str) -> None:
    """Create or migrate the tables in `schema`; one process at a time."""
    key = _lock_key(schema)
    await connection.execute("SELECT pg_advisory_lock(hashtext($1))", key)
    try:
        async with connection.transaction():
            exists = await connection.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema
            )
            if not exists:
                await connection.execute(f'CREATE SCHEMA "{schema}"')
            ownership = await owned(connection, schema)
            found = await _version(connection, schema)
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaError(
                    f"the inbox in schema {schema!r} was written by a newer ci-receiver (schema"
                    f" version {found}, this one knows {SCHEMA_VERSION}); upgrade ci-receiver"
                )
            if found == 1:
                await _migrate_from_1(connection, schema)
            if found in (1, 2):
                await _migrate_from_2(connection, schema)
            # From 3 to 4 nothing changes but the version written below.
            if found is not None and found < 5:
                await _add_verdict_column(connection, schema)
            for statement in TABLES:
                await connection.execute(statement)
            if found is not None and found < 5:
                await _plan_verdicts(connection)
            await connection.execute(
                "INSERT INTO meta VALUES ('schema_version', $1)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                str(SCHEMA_VERSION),
            )
            await connection.execute(
                "INSERT INTO meta VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                *MARK,
            )
    finally:
        await connection.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
    if ownership == "adopted":
        logger.info("marked the inbox an earlier ci-receiver made as its own", schema=schema)
    await fill_verdicts(connection)


async def owned(connection: asyncpg.Connection, schema: str) -> Claim:
    """Whether the tables of the inbox's names in `schema` are ci-receiver's (or there
    are none); `NotOurs` when they are not."""
    names = {
        row[0]
        for row in await connection.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relname = ANY($2::text[])",
            schema,
            OUR_TABLES,
        )
    }
    meta = await _meta(connection, schema) if "meta" in names else {}
    return claim_inbox(
        f"the PostgreSQL schema {schema!r} (holding {', '.join(sorted(names))})",
        "inbox.postgres_schema",
        found=names,
        meta=meta,
        every_version=EVERY_VERSION,
    )


async def _meta(connection: asyncpg.Connection, schema: str) -> dict[str, str]:
    """The rows of `KEYS`, if `meta` is a table of keys and values."""
    columns = await connection.fetchval(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1"
        " AND table_name = 'meta' AND column_name IN ('key', 'value')",
        schema,
    )
    if columns != 2:
        return {}
    rows = await connection.fetch(
        f'SELECT key::text, value::text FROM "{schema}".meta WHERE key::text = ANY($1::text[])',
        list(KEYS),
    )
    return {key: value for key, value in rows}


async def _migrate_from_1(connection: asyncpg.Connection, schema: str) -> None:
    """Version 1 required an event's JSON. Both changes are to the catalog alone: no row
    is rewritten (older rows keep their JSON, and their bodies uncompressed, which
    `records.unpack` tells apart), so the lock is held for a moment."""
    await connection.execute(f'ALTER TABLE "{schema}".events ALTER COLUMN data DROP NOT NULL')
    await _drop_index_of(connection, schema, "events", "events_time")
    await _drop_index_of(connection, schema, "receipts", "receipts_time")


async def _migrate_from_2(connection: asyncpg.Connection, schema: str) -> None:
    """Version 2 indexed every run by status, every receipt by outcome and origin. The
    new partial indexes are built when the tables are made (`TABLES`); the fill factor
    applies to pages written from now on."""
    await _drop_index_of(connection, schema, "runs", "runs_status")
    await _drop_index_of(connection, schema, "receipts", "receipts_outcome")
    for statement in (
        f'ALTER TABLE "{schema}".receipts DROP CONSTRAINT IF EXISTS receipts_origin_key',
        f'ALTER TABLE "{schema}".runs SET (fillfactor = 70)',
    ):
        await connection.execute(statement)


async def _drop_index_of(
    connection: asyncpg.Connection, schema: str, table: str, index: str
) -> None:
    """Drop the index an older inbox kept on its `table`, and nothing else of that name: in
    a shared schema (`public`) the name may be a user's index on a table of theirs, made
    before the inbox's own, which `CREATE INDEX IF NOT EXISTS` then never made."""
    ours = await connection.fetchval(
        "SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND tablename = $2 AND indexname = $3",
        schema, table, index,
    )  # fmt: skip
    if ours:
        await connection.execute(f'DROP INDEX "{schema}".{index}')


async def _add_verdict_column(connection: asyncpg.Connection, schema: str) -> None:
    """Version 4 kept no verdict: the column is added (to the catalog alone)."""
    await connection.execute(f'ALTER TABLE "{schema}".events ADD COLUMN IF NOT EXISTS verdict text')


async def _plan_verdicts(connection: asyncpg.Connection) -> None:
    """The moderation events stored so far get their verdicts after the migration
    (`fill_verdicts`): those stored from now on have theirs."""
    through = await connection.fetchval(
        "SELECT coalesce(max(seq), 0) FROM events WHERE kind = 'moderation'"
    )
    if through:
        await connection.execute(
            "INSERT INTO state VALUES ($1, $2) ON CONFLICT (key) DO UPDATE"
            " SET value = excluded.value",
            VERDICTS_TO_FILL,
            orjson.dumps({"after": 0, "through": through}).decode(),
        )


async def fill_verdicts(connection: asyncpg.Connection) -> None:
    """Fill in the verdicts a migration left to fill, a batch per transaction (the plan's
    row locked meanwhile: replicas starting together take turns), so that no lock is held
    long and a process stopped half-way leaves the rest to the next start."""
    logged = False
    while True:
        async with connection.transaction():
            value = await connection.fetchval(
                "SELECT value FROM state WHERE key = $1 FOR UPDATE", VERDICTS_TO_FILL
            )
            if value is None:
                return
            plan = orjson.loads(value)
            if not logged:
                logger.info("filling in the verdicts of the inbox's moderation events", **plan)
                logged = True
            batch = await connection.fetch(
                f"SELECT e.seq, {EVENT_COLUMNS} FROM events e JOIN receipts r"
                " ON r.id = e.receipt_id WHERE e.kind = 'moderation' AND e.seq > $1"
                f" AND e.seq <= $2 ORDER BY e.seq LIMIT {VERDICTS_BATCH}",
                plan["after"],
                plan["through"],
            )
            if not batch:
                await connection.execute("DELETE FROM state WHERE key = $1", VERDICTS_TO_FILL)
                logger.info("the inbox's moderation events have their verdicts")
                return
            found = verdicts([tuple(row)[1:] for row in batch])
            await connection.executemany("UPDATE events SET verdict = $1 WHERE id = $2", found)
            plan["after"] = batch[-1][0]
            await connection.execute(
                "UPDATE state SET value = $1 WHERE key = $2",
                orjson.dumps(plan).decode(),
                VERDICTS_TO_FILL,
            )


async def check_readable(connection: asyncpg.Connection, schema: str) -> None:
    await owned(connection, schema)
    found = await _version(connection, schema)
    if found == SCHEMA_VERSION:
        return
    if found is None:
        raise SchemaError(f"no inbox in schema {schema!r} (nothing received yet?)")
    raise SchemaError(
        f"the inbox in schema {schema!r} has version {found}, this ci-receiver knows"
        f" {SCHEMA_VERSION}: run the same version as the receivers"
    )


async def _version(connection: asyncpg.Connection, schema: str) -> int | None:
    has_meta = await connection.fetchval(
        "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'meta'", schema
    )
    if not has_meta:
        return None
    value = await connection.fetchval(
        f"SELECT value FROM \"{schema}\".meta WHERE key = 'schema_version'"
    )
    return int(value) if value is not None else None
