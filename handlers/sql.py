"""`sql` / `sqlite`: keep a jobs table of the latest state of every job, upserted, and
optionally an events table with every event once.

One implementation for SQLite, PostgreSQL and MySQL/MariaDB, on SQLAlchemy Core with
async drivers (aiosqlite, asyncpg, aiomysql). An upsert never moves a job backwards: a
late `Running` after `Success` leaves the row alone, and replaying an event is
harmless. Tables are created, or given the columns they lack, on start: only its own
(sql_schema.py).

Events come in batches (`handle_batch`): one transaction and one prepared statement run
over all the batch's rows. A batch the database refuses for its data (a value a column
cannot hold) is written again event by event, so that only the events at fault fail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field, field_serializer
from sqlalchemy import URL, Insert, Table, case, make_url
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from handlers import BatchContext, BatchResult, Fail, HandlerConfigError, HandlerOptions
from handlers.sql_schema import Prepared, Wanted, prepare
from handlers.sql_tables import event_row, job_row
from receiver.callback.event import Event
from receiver.ownership import NotOurs

logger = structlog.get_logger("ci_receiver.handlers.sql")

# backend -> (async driver, the ci-receiver extra that installs it)
DRIVERS = {
    "sqlite": ("aiosqlite", None),
    "postgresql": ("asyncpg", "postgres"),
    "mysql": ("aiomysql", "mysql"),
    "mariadb": ("aiomysql", "mysql"),
}
SQLITE_BUSY_TIMEOUT_MS = 30_000
# No pre-ping on checkout (it costs a round trip per event); a connection the server
# dropped fails one attempt, which is retried, and none is kept past this age.
POOL_RECYCLE_SECONDS = 1800


class TableOptions(HandlerOptions):
    """What `sql` and `sqlite` share: the tables."""

    # Not `jobs`, a name a database may well hold already (an earlier default, still
    # used where it is ci-receiver's: sql_schema._name).
    table: str = "ci_jobs"
    # Also keep every event, once, in `events_table`.
    history: bool = False
    events_table: str = "ci_events"
    # Keep the decoded callback document in the history rows.
    include_raw: bool = False


class SqlOptions(TableOptions):
    # A SQLAlchemy URL: sqlite:///jobs.db, postgresql://user:pass@host/db,
    # mysql://user:pass@host/db. The async driver is filled in when left out.
    url: str
    # The tables' schema (PostgreSQL: created when missing; MySQL: a database); unset:
    # the connection's own (`public`, the URL's database).
    schema_name: str | None = Field(None, alias="schema")  # `schema` is BaseModel's
    # Connections kept open to a database server (a SQLite file has no pool to size).
    pool_size: int = 5

    @field_serializer("url")
    def _hide_password(self, url: str) -> str:
        return make_url(url).render_as_string(hide_password=True)


class SqliteOptions(TableOptions):
    # The database file, created with its folder when missing.
    path: Path


def async_url(url: str) -> URL:
    """The URL with its async driver, which must be importable: a clear error otherwise."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise HandlerConfigError(f"url: not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    backend = "postgresql" if backend == "postgres" else backend
    if backend not in DRIVERS:
        raise HandlerConfigError(
            f"url: {backend!r} is not supported; use sqlite, postgresql or mysql"
        )
    driver, extra = DRIVERS[backend]
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=f"{backend}+{driver}")
    if backend in ("mysql", "mariadb") and "charset" not in parsed.query:
        # Job messages and keys can be Chinese; MySQL's older "utf8" cannot hold all of it.
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError as exc:
        raise HandlerConfigError(f"url: {exc}") from None
    except ImportError as exc:
        install = f"pip install 'ci-receiver[{extra}]'" if extra else f"pip install {driver}"
        raise HandlerConfigError(
            f"url: the driver for {parsed.drivername} is not installed ({exc}): {install}"
        ) from None
    return parsed


class SqlHandler:
    options: TableOptions
    # The option naming a SQLite file: another file is SQLite's only elsewhere.
    file_option = "`url`"

    def __init__(self, options: Mapping[str, Any]) -> None:
        sql_options = SqlOptions.model_validate(options)
        url = async_url(sql_options.url)
        schema = sql_options.schema_name
        if schema is not None and url.get_backend_name() == "sqlite":
            raise HandlerConfigError("schema: SQLite has none; leave it out")
        self._prepare(sql_options, url, sql_options.pool_size, schema)

    def _prepare(
        self, options: TableOptions, url: URL, pool_size: int | None, schema: str | None
    ) -> None:
        self.options = options
        self._url = url
        self._pool_size = pool_size
        self._schema = schema
        # Which option puts the tables elsewhere, for the error when a name is taken: a
        # schema on a server, another file on SQLite (which has no schema).
        self._place = self.file_option if self.dialect == "sqlite" else "`schema`"
        elsewhere = "" if self.dialect == "sqlite" else f" (or {self._place})"
        given = options.model_fields_set
        self._wanted = [Wanted("jobs", options.table, f"`table`{elsewhere}", "table" not in given)]
        if options.history:
            self._wanted.append(
                Wanted(
                    "events",
                    options.events_table,
                    f"`events_table`{elsewhere}",
                    "events_table" not in given,
                )
            )
        # The tables and statements, once start() knows which tables they are.
        self.jobs: Table | None = None
        self.events: Table | None = None
        self._upsert: Insert | None = None
        self._insert_event: Insert | None = None
        self._engine: AsyncEngine | None = None

    @property
    def dialect(self) -> str:
        return self._url.get_backend_name()

    async def start(self) -> None:
        engine = self._create_engine()
        where = self._url.render_as_string(hide_password=True)
        try:
            database = self._url.database
            if self.dialect == "sqlite" and database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            async with engine.begin() as connection:
                prepared = await connection.run_sync(
                    prepare, self._wanted, self._schema, self._place, where
                )
            if self.dialect == "sqlite":
                await self._journal(engine, prepared.sole)
        except NotOurs:
            await engine.dispose()
            raise
        except Exception as exc:
            await engine.dispose()
            raise RuntimeError(f"cannot open {where}: {type(exc).__name__}: {exc}") from None
        self._use(prepared)
        self._engine = engine

    async def _journal(self, engine: AsyncEngine, sole: bool) -> None:
        """WAL mode, where readers do not block the writer, for a file of ci-receiver's
        tables only: the mode stays with the file, so a file with tables of a user's keeps
        theirs (its writers still wait for each other: busy_timeout)."""
        if not sole:
            logger.info(
                "the SQLite file holds tables ci-receiver did not create; its journal mode"
                " is left as it is",
                file=self._url.database,
            )
            return
        async with engine.connect() as connection:
            # Outside a transaction: SQLite cannot change the mode within one.
            await connection.exec_driver_sql("PRAGMA journal_mode=WAL")

    def _use(self, prepared: Prepared) -> None:
        for name in prepared.legacy:
            logger.info("using the table of an earlier default name, with its data", table=name)
        if prepared.adopted:
            logger.info("registered tables an earlier ci-receiver made", tables=prepared.adopted)
        if prepared.added:
            logger.info("added missing columns", columns=prepared.added)
        self.jobs = prepared.tables["jobs"]
        self.events = prepared.tables.get("events")
        self._upsert = upsert_job(self.jobs, self.dialect)
        if self.events is not None:
            self._insert_event = insert_event(self.events, self.dialect)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def __call__(self, event: Event) -> None:
        await self._write_alone(event)

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext) -> BatchResult:
        if len(events) == 1:
            await self._write_alone(events[0])
            return None
        try:
            await self._write(events)
        except DBAPIError as exc:
            if not refused_for_its_data(exc):
                raise
            ctx.log.warning(
                "the database refused the batch; writing its events one by one",
                error=f"{type(exc).__name__}: {exc.orig}",
            )
        else:
            return None
        refused: dict[str, BaseException] = {}
        for event in events:
            try:
                await self._write_alone(event)
            except Fail as exc:
                refused[event.id] = exc
        return refused

    async def _write_alone(self, event: Event) -> None:
        """One event's rows; `Fail` (`refusal`) when the database refuses them for their
        data."""
        try:
            await self._write([event])
        except DBAPIError as exc:
            if refused_for_its_data(exc):
                raise refusal(exc) from None
            raise

    async def _write(self, events: Sequence[Event]) -> None:
        """The events' rows in one transaction, each statement run over all its rows."""
        if self._engine is None or self._upsert is None:
            raise RuntimeError("the sql handler is not started")
        async with self._engine.begin() as connection:
            await connection.execute(self._upsert, latest_rows(events))
            if self._insert_event is not None:
                include_raw = self.options.include_raw
                rows = [event_row(event, include_raw) for event in events]
                rows.sort(key=lambda row: str(row["event_id"]))
                await connection.execute(self._insert_event, rows)

    def _create_engine(self) -> AsyncEngine:
        if self.dialect != "sqlite":
            return create_async_engine(
                self._url, pool_size=self._pool_size, pool_recycle=POOL_RECYCLE_SECONDS
            )
        engine = create_async_engine(self._url)

        # Concurrent writers wait for each other rather than fail with "database is
        # locked". (WAL mode is set once the file is known to be ours: start.)
        @sqlalchemy_event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

        return engine


def refused_for_its_data(exc: DBAPIError) -> bool:
    """Whether the database refused the rows themselves (a value a column cannot hold, a
    constraint), not the connection or the statement: SQL's classes 22 and 23, which the
    asyncpg dialect does not turn into DataError and IntegrityError."""
    if isinstance(exc, (DataError, IntegrityError)):
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("22", "23")


def refusal(exc: DBAPIError) -> Fail:
    """A row the database refused: trying again cannot help (a dead letter, to look at and
    replay once the table can take it). Said in a line: the driver's own words, without
    the statement and its parameters that SQLAlchemy's message adds (kilobytes)."""
    cause = exc.orig if exc.orig is not None else exc
    words = str(cause).strip().splitlines()
    said = words[0][:300] if words else ""
    return Fail(f"the database refused the event's row: {type(cause).__name__}: {said}")


def latest_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    """One job row per job of the batch: the one that upserting them one after another
    would leave (the furthest along; of those as far, the last). In job order: batches
    running at once lock the rows they share in the same order, so they cannot deadlock
    (PostgreSQL and MySQL would fail one of them)."""
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        row = job_row(event)
        kept = rows.get(row["job_id"])
        if kept is None or kept["state_rank"] <= row["state_rank"]:
            rows[row["job_id"]] = row
    return [rows[job_id] for job_id in sorted(rows)]


def upsert_job(jobs: Table, dialect: str) -> Insert:
    """INSERT a job row, or UPDATE it when the event is at least as far along. Built once
    and executed with each row as parameters, so SQLAlchemy compiles it once."""
    updated = [column.name for column in jobs.columns if column.name != "job_id"]
    if dialect in ("mysql", "mariadb"):
        upsert = mysql.insert(jobs)
        newer = jobs.c.state_rank <= upsert.inserted.state_rank
        # MySQL has no WHERE on ON DUPLICATE KEY UPDATE, so each column keeps its value
        # unless the event is at least as far along. MySQL runs assignments left to
        # right, later ones seeing the new values of earlier ones: the condition reads
        # state_rank, so it is assigned last and every column is judged against the row
        # as it was.
        updated.remove("state_rank")
        return upsert.on_duplicate_key_update(
            [
                (name, case((newer, upsert.inserted[name]), else_=jobs.c[name]))
                for name in [*updated, "state_rank"]
            ]
        )
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(jobs)
    return statement.on_conflict_do_update(
        index_elements=[jobs.c.job_id],
        set_={name: statement.excluded[name] for name in updated},
        where=jobs.c.state_rank <= statement.excluded.state_rank,
    )


def insert_event(events: Table, dialect: str) -> Insert:
    """INSERT an event row unless its event id is already there."""
    if dialect in ("mysql", "mariadb"):
        # A no-op update: unlike INSERT IGNORE, it does not hide other errors.
        statement = mysql.insert(events)
        return statement.on_duplicate_key_update(event_id=events.c.event_id)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return insert(events).on_conflict_do_nothing()


class SqliteHandler(SqlHandler):
    """`sql` on a SQLite file, named by `path` rather than by a URL."""

    file_option = "`path`"

    def __init__(self, options: Mapping[str, Any]) -> None:
        sqlite_options = SqliteOptions.model_validate(options)
        url = async_url(f"sqlite:///{sqlite_options.path}")
        self._prepare(sqlite_options, url, None, None)
