"""Reads of the SQLite inbox, on connections of their own on helper threads.

In WAL mode a reader and the writer never wait for each other, so a long query (a list
over a large inbox, an admin page) neither holds up a callback's commit nor, running
off the event loop, the requests being served meanwhile. Each query runs in a read
transaction of its own: its statements see one snapshot.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

THREADS = 2


class Reader:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="inbox-read")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._query, query)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for connection in self._connections:
            connection.close()
        self._connections.clear()

    def _query(self, query: Callable[[sqlite3.Connection], T]) -> T:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        connection.execute("BEGIN")
        try:
            return query(connection)
        finally:
            connection.execute("ROLLBACK")

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        # Reads only: a query that tried to write would fail rather than take the lock.
        connection.execute("PRAGMA query_only = ON")
        connection.execute("PRAGMA busy_timeout = 5000")
        with self._lock:
            self._connections.append(connection)
        return connection
