"""For tests of several ci-receiver processes on one PostgreSQL inbox: a schema of the
test's own on the machine's server (dropped afterwards), the `[inbox]` lines that point
a config at it, and reading what the processes stored straight from the database."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from sqlalchemy import make_url

from tests.support.inbox_places import drop_schema


class SharedInbox:
    def __init__(self, url: str) -> None:
        self.url = url
        self.schema = f"test_{uuid.uuid4().hex[:12]}"

    def toml(self, port: int | None = None) -> str:
        """The `[inbox]` table of a config on this inbox; through another port (a
        proxy in front of the server) when given."""
        url = self.url if port is None else self.url_through(port)
        return f'[inbox]\nurl = "{url}"\npostgres_schema = "{self.schema}"\npool_size = 4\n'

    def url_through(self, port: int) -> str:
        return make_url(self.url).set(port=port).render_as_string(hide_password=False)

    @property
    def port(self) -> int:
        return make_url(self.url).port or 5432

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of `sql` in the inbox's schema; none while the schema is not created."""

        async def run() -> list[tuple[Any, ...]]:
            connection = await asyncpg.connect(
                self.url, server_settings={"search_path": self.schema}
            )
            try:
                return [tuple(row) for row in await connection.fetch(sql, *args)]
            except asyncpg.UndefinedTableError:
                return []
            finally:
                await connection.close()

        return asyncio.run(run())

    def count(self, sql: str, *args: Any) -> int:
        rows = self.query(sql, *args)
        return int(rows[0][0]) if rows else 0

    def drop(self) -> None:
        asyncio.run(drop_schema(self.url, self.schema))
