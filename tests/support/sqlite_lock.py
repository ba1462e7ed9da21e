"""SQLite's write lock held as another process's writer holds it (`serve` and `consume`
on one data folder): the inbox's writes wait for it, and past the lock timeout its
batches fail as the inbox unavailable."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class HeldLock:
    """`with HeldLock(path) as lock:` the write lock of the database at `path`, taken at
    once (BEGIN IMMEDIATE) and kept until `lock.release()` or the end of the block."""

    def __init__(self, path: Path) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None)
        self._connection.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        self._connection.close()
