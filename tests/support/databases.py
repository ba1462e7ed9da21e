"""The database servers the `sql` tests run against: the machine's PostgreSQL and MariaDB,
or the servers named by CI_RECEIVER_TEST_POSTGRES_URL / CI_RECEIVER_TEST_MYSQL_URL."""

from __future__ import annotations

import os
import socket

import pytest
from sqlalchemy import MetaData, inspect, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from handlers.sql import async_url
from handlers.sql_schema import REGISTRY, registry_table

SERVERS = {
    "postgresql": ("CI_RECEIVER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mysql": ("CI_RECEIVER_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def server_url(backend: str) -> str:
    variable, default = SERVERS[backend]
    return os.environ.get(variable, default)


def answers(url: str) -> bool:
    parsed = make_url(url)
    try:
        socket.create_connection((parsed.host or "127.0.0.1", parsed.port), timeout=2).close()
    except OSError:
        return False
    return True


def require_server(backend: str) -> str:
    """The server's URL; when it does not answer, skip, or under CI=true fail."""
    url = server_url(backend)
    if not answers(url):
        where = make_url(url).render_as_string(hide_password=True)
        message = f"{backend} does not answer at {where}"
        if in_ci():
            pytest.fail(f"{message}: under CI=true the database tests must run")
        pytest.skip(message)
    return url


async def drop_tables(url: str, names: list[str]) -> None:
    """Drop the tables, and their rows in the `sql` handler's registry."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            quote = connection.dialect.identifier_preparer.quote
            for name in names:
                await connection.execute(text(f"DROP TABLE IF EXISTS {quote(name)}"))
            if await connection.run_sync(lambda sync: inspect(sync).has_table(REGISTRY)):
                registry = registry_table(MetaData(), None)
                await connection.execute(registry.delete().where(registry.c.table_name.in_(names)))
    finally:
        await engine.dispose()


async def execute(url: str, *statements: str) -> None:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.exec_driver_sql(statement)
    finally:
        await engine.dispose()


def schema_keyword(url: str) -> str:
    """What a schema is called on the server: MySQL's are databases."""
    return "SCHEMA" if url.startswith("postgresql") else "DATABASE"
