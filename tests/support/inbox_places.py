"""Inboxes for tests: the same test on SQLite (a temp file) and PostgreSQL (a schema of
its own on the machine's server, dropped afterwards)."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from receiver.config import Config
from receiver.inbox import Inbox
from receiver.inbox.factory import open_inbox
from receiver.inbox.postgres import DIALECT
from receiver.inbox.query import dialect_text
from tests.support.databases import require_server

BACKENDS = ["sqlite", "postgresql"]


class InboxPlace:
    """Where one test's inbox lives; `open()` gives a new connection to it, as another
    replica would have."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.schema = f"test_{uuid.uuid4().hex[:12]}"
        if backend == "sqlite":
            self.url = None
            self.config = Config(data_dir=tmp_path / "data")
        else:
            self.url = require_server("postgresql")
            self.config = Config(
                data_dir=tmp_path / "data",
                inbox={"url": self.url, "postgres_schema": self.schema},
            )
        self._opened: list[Inbox] = []

    def settings(self) -> dict[str, str]:
        """The config keys of this inbox, as `CI_RECEIVER_...` variables for a process."""
        if self.url is None:
            return {}
        return {
            "CI_RECEIVER_INBOX__URL": self.url,
            "CI_RECEIVER_INBOX__POSTGRES_SCHEMA": self.schema,
        }

    async def open(self, *, read_only: bool = False) -> Inbox:
        inbox = open_inbox(self.config, read_only=read_only)
        await inbox.open()
        self._opened.append(inbox)
        return inbox

    async def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the inbox's tables, behind its back (`?` placeholders on
        both backends); its rows."""
        if self.url is None:
            connection = sqlite3.connect(self.config.inbox_path)
            try:
                with connection:
                    return connection.execute(statement, args).fetchall()
            finally:
                connection.close()
        statement, _ = dialect_text(DIALECT, statement)
        connection = await asyncpg.connect(self.url, server_settings={"search_path": self.schema})
        try:
            return [tuple(row) for row in await connection.fetch(statement, *args)]
        finally:
            await connection.close()

    async def close(self) -> None:
        for inbox in self._opened:
            await inbox.close()
        self._opened.clear()
        if self.url is not None:
            await drop_schema(self.url, self.schema)


async def drop_schema(url: str, schema: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()
