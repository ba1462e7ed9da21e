"""The `sql` handler's tables in the database: created, adopted or given missing columns
at start, and only ever its own (receiver/ownership.py).

Its mark is a row in its registry, the table `ci_receiver_tables` in the same schema as
its tables: a plain table works alike on SQLite, PostgreSQL and MySQL, where a table
comment would not (SQLite has none). Kept beside the table, a row outlives it: a user may
drop the table and make one of their own under its name, so a registered table is ours
only while it still has our primary key (`_marked`). A table an earlier version made,
before there was a registry, is recognised by its shape (`_shaped`) and registered. A
user's table of the same name is never altered: the start fails, naming it and the option
to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

from sqlalchemy import (
    Column,
    Connection,
    Inspector,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlalchemy.schema import CreateTable

from handlers.sql_tables import UtcDateTime, events_table, jobs_table
from receiver.ownership import claim

REGISTRY = "ci_receiver_tables"

Holds = Literal["jobs", "events"]
TABLES: dict[Holds, Callable[[MetaData, str, str | None], Table]] = {
    "jobs": jobs_table,
    "events": events_table,
}


@dataclass(frozen=True)
class Wanted:
    holds: Holds
    name: str
    # The option naming the table, for the error when the name is taken.
    option: str
    # The name was left at its default: an older default that is ours may stand in.
    default: bool


@dataclass
class Prepared:
    tables: dict[Holds, Table] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    # `table.column`s added to a table of an earlier version.
    added: list[str] = field(default_factory=list)
    # Older default names used in place of the new ones.
    legacy: list[str] = field(default_factory=list)
    # Every table there before this start was ci-receiver's (or there was none): a
    # SQLite file is then its own, to put in WAL mode.
    sole: bool = False


def registry_table(metadata: MetaData, schema: str | None) -> Table:
    return Table(
        REGISTRY,
        metadata,
        Column("table_name", String(255), primary_key=True),
        Column("holds", String(16), nullable=False),
        Column("registered_at", UtcDateTime, nullable=False),
        schema=schema,
        mysql_charset="utf8mb4",
    )


def prepare(
    connection: Connection, wanted: list[Wanted], schema: str | None, place: str, where: str
) -> Prepared:
    """Create the wanted tables that are missing (and on PostgreSQL their schema), adopt an
    earlier version's, and add the columns an older one lacks (nullable: existing rows have
    no value). Raises `NotOurs` for a table of a wanted name that ci-receiver did not make,
    before anything is written (SQLite and MySQL commit a CREATE TABLE at once, whatever
    follows). `place` is the option that puts the registry elsewhere."""
    if connection.dialect.name == "postgresql":
        # Replicas starting at once take turns (until commit) rather than fail.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock(hashtext('{REGISTRY}'))")
        if schema is not None:
            _create_schema(connection, schema)
    inspector = inspect(connection)
    metadata = MetaData()
    registry = registry_table(metadata, schema)
    has_registry = inspector.has_table(REGISTRY, schema=schema)
    # The registry's own name and shape are its mark.
    claim(
        f"table {_qualified(REGISTRY, schema)!r} in {where}",
        place,
        exists=has_registry,
        marked=False,
        shaped=has_registry and _shaped(inspector, registry),
    )
    registered = (
        dict(connection.execute(select(registry.c.table_name, registry.c.holds)).all())
        if has_registry
        else {}
    )
    present = {*inspector.get_table_names(schema=schema), *inspector.get_view_names(schema=schema)}

    prepared = Prepared()
    for want in wanted:
        name = _name(inspector, want, schema, registered)
        if name != want.name:
            prepared.legacy.append(name)
        table = TABLES[want.holds](metadata, name, schema)
        prepared.tables[want.holds] = table
        exists = inspector.has_table(name, schema=schema)
        marked = exists and _marked(inspector, table, want.holds, registered)
        verdict = claim(
            f"table {_qualified(name, schema)!r} in {where}",
            want.option,
            exists=exists,
            marked=marked,
            shaped=exists and not marked and _shaped(inspector, table),
        )
        if verdict == "new":
            prepared.created.append(name)
        elif verdict == "adopted":
            prepared.adopted.append(name)
    # Another `sql` handler's tables beside these are ci-receiver's too.
    others = present - {REGISTRY, *(table.name for table in prepared.tables.values())}
    prepared.sole = all(_registered(inspector, name, registered, schema) for name in others)

    if not has_registry:
        # Another handler may be making it at this moment.
        connection.execute(CreateTable(registry, if_not_exists=True))
    for table in prepared.tables.values():
        if table.name not in prepared.created:
            prepared.added += _add_missing_columns(connection, inspector, table)
    by_name = {table.name: table for table in prepared.tables.values()}
    metadata.create_all(connection, tables=[by_name[name] for name in prepared.created])
    marking = [*prepared.created, *prepared.adopted]
    if marking:
        # A row left by a table dropped since gives way to the table made now.
        connection.execute(registry.delete().where(registry.c.table_name.in_(marking)))
        now = datetime.now(timezone.utc)
        connection.execute(
            registry.insert(),
            [
                {"table_name": name, "holds": holds, "registered_at": now}
                for holds, table in prepared.tables.items()
                if (name := table.name) in marking
            ],
        )
    return prepared


def _create_schema(connection: Connection, schema: str) -> None:
    """Create the PostgreSQL schema when it is missing. Looked up first: CREATE SCHEMA IF
    NOT EXISTS needs the right to create schemas even when it is there, which a role
    owning its schema may well lack."""
    found = connection.scalar(
        text("SELECT 1 FROM pg_namespace WHERE nspname = :schema"), {"schema": schema}
    )
    if found is None:
        quoted = connection.dialect.identifier_preparer.quote_schema(schema)
        connection.exec_driver_sql(f"CREATE SCHEMA {quoted}")


def _qualified(name: str, schema: str | None) -> str:
    return f"{schema}.{name}" if schema else name


def _name(
    inspector: Inspector, want: Wanted, schema: str | None, registered: dict[str, str]
) -> str:
    """The wanted name, or the older default in its place: when the name is the default,
    is not there yet, and the older one is ci-receiver's."""
    if not want.default or inspector.has_table(want.name, schema=schema):
        return want.name
    # Earlier, each table was named for what it holds (`jobs`, `events`): common enough
    # names to be a user's own, still used when ci-receiver's, so that a config that kept
    # the default keeps its data.
    legacy = want.holds
    if not inspector.has_table(legacy, schema=schema):
        return want.name
    old = TABLES[want.holds](MetaData(), legacy, schema)
    ours = _marked(inspector, old, want.holds, registered) or _shaped(inspector, old)
    return legacy if ours else want.name


def _marked(inspector: Inspector, table: Table, holds: Holds, registered: dict[str, str]) -> bool:
    """Registered as holding `holds`, and still the table that was: our shape (a table a
    user made in its place may well be keyed by job_id too)."""
    return registered.get(table.name) == holds and _shaped(inspector, table)


def _registered(
    inspector: Inspector, name: str, registered: dict[str, str], schema: str | None
) -> bool:
    """Registered by any of ci-receiver's handlers, and still the table that was."""
    holds = registered.get(name)
    return holds in TABLES and _keyed(inspector, TABLES[holds](MetaData(), name, schema))


def _keyed(inspector: Inspector, table: Table) -> bool:
    key = inspector.get_pk_constraint(table.name, schema=table.schema)["constrained_columns"]
    return key == [column.name for column in table.primary_key]


def _shaped(inspector: Inspector, table: Table) -> bool:
    """Made by ci-receiver, as far as its shape tells: our primary key, and every column
    that must have a value (all versions had them). Columns a user added are allowed."""
    if not _keyed(inspector, table):
        return False
    found = {column["name"] for column in inspector.get_columns(table.name, schema=table.schema)}
    return {column.name for column in table.columns if not column.nullable} <= found


def _add_missing_columns(connection: Connection, inspector: Inspector, table: Table) -> list[str]:
    existing = {column["name"] for column in inspector.get_columns(table.name, schema=table.schema)}
    preparer = connection.dialect.identifier_preparer
    added = []
    for column in table.columns:
        if column.name in existing:
            continue
        ddl = (
            f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN "
            f"{preparer.format_column(column)} {column.type.compile(connection.dialect)}"
        )
        connection.exec_driver_sql(ddl)
        added.append(f"{table.name}.{column.name}")
    return added
