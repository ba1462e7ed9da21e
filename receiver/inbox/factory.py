"""The inbox a config names: PostgreSQL for a `postgresql://` URL, else the SQLite file."""

from __future__ import annotations

from typing import Literal, overload

from prometheus_client import CollectorRegistry

from receiver.config import Config
from receiver.inbox.roles import Inbox, ReadOnlyInbox


@overload
def open_inbox(
    config: Config,
    *,
    read_only: Literal[False] = False,
    wait: bool = False,
    registry: CollectorRegistry | None = None,
) -> Inbox: ...


@overload
def open_inbox(
    config: Config,
    *,
    read_only: Literal[True],
    wait: bool = False,
    registry: CollectorRegistry | None = None,
) -> ReadOnlyInbox: ...


@overload
def open_inbox(
    config: Config,
    *,
    read_only: bool,
    wait: bool = False,
    registry: CollectorRegistry | None = None,
) -> Inbox | ReadOnlyInbox: ...


def open_inbox(
    config: Config,
    *,
    read_only: bool = False,
    wait: bool = False,
    registry: CollectorRegistry | None = None,
) -> Inbox | ReadOnlyInbox:
    """The inbox the config names. `read_only` opens it for the inspection commands: a
    `ReadOnlyInbox`, with no schema changes, no writer, nothing that could hold up a
    running receiver. With `wait` (a service), opening waits for a database server that
    cannot be reached yet, instead of failing at once (a command), and the server's
    outages are logged, once as it goes and once as it comes back; `registry` takes the
    inbox's metrics."""
    inbox = config.inbox
    if inbox.url is not None:
        from receiver.inbox.postgres import PostgresInbox, PostgresReader

        if read_only:
            return PostgresReader(
                inbox.url, schema=inbox.postgres_schema, pool_size=inbox.pool_size
            )
        return PostgresInbox(
            inbox.url,
            schema=inbox.postgres_schema,
            pool_size=inbox.pool_size,
            rejected_body_bytes=inbox.rejected_body_bytes,
            wait=wait,
            registry=registry,
        )
    from receiver.inbox.sqlite import SqliteInbox, SqliteReader

    if read_only:
        return SqliteReader(config.inbox_path)
    return SqliteInbox(
        config.inbox_path,
        synchronous=inbox.synchronous,
        rejected_body_bytes=inbox.rejected_body_bytes,
    )


async def probe(config: Config) -> str:
    """Check that the configured inbox can be used, without changing it; a line saying
    what was found. Raises `InboxUnavailable` or `SchemaError` with what is wrong."""
    if config.inbox.url is not None:
        from receiver.inbox.postgres import probe as probe_postgres

        return await probe_postgres(config.inbox.url, config.inbox.postgres_schema)
    from receiver.inbox.sqlite import probe as probe_sqlite

    return await probe_sqlite(config.inbox_path)
