"""The SQLite writer and another process's write lock (`serve --workers`, or `serve` and
`consume` on one data folder): a BEGIN that meets it waits, and gives up after the lock
timeout. The other process is a second connection on another thread, holding the lock
with BEGIN IMMEDIATE as a writer in another process does."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from receiver.inbox import InboxUnavailable
from receiver.inbox import writer as writer_module
from receiver.inbox.writer import Writer


def _setup(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE IF NOT EXISTS rows (n INTEGER)")


def _insert(n: int):
    def insert(connection: sqlite3.Connection) -> int:
        connection.execute("INSERT INTO rows VALUES (?)", (n,))
        return n

    return insert


def _hold_lock(path, released: threading.Event) -> tuple[threading.Thread, threading.Event]:
    """Another writer takes the lock and keeps it until `released` is set."""
    taken = threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO rows VALUES (-1)")
        taken.set()
        released.wait(30)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread, taken


async def test_a_begin_that_meets_the_lock_waits_for_it(tmp_path):
    path = tmp_path / "inbox.db"
    writer = Writer(path, synchronous="full", setup=_setup)
    await writer.start()
    released = threading.Event()
    thread, taken = _hold_lock(path, released)
    try:
        assert taken.wait(10)
        stored = writer.submit(_insert(1))
        await asyncio.sleep(0.2)
        assert not stored.done()  # waiting while the other holds the lock
        released.set()
        assert await stored == 1
    finally:
        released.set()
        thread.join()
        await writer.stop()
    rows = sqlite3.connect(path).execute("SELECT n FROM rows ORDER BY rowid").fetchall()
    assert rows == [(-1,), (1,)]  # after the other's commit


async def test_a_lock_held_past_the_timeout_fails_the_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "LOCK_TIMEOUT", 0.3)
    path = tmp_path / "inbox.db"
    writer = Writer(path, synchronous="full", setup=_setup)
    await writer.start()
    released = threading.Event()
    thread, taken = _hold_lock(path, released)
    try:
        assert taken.wait(10)
        # The batch failed as a whole: its caller is told the inbox cannot write now.
        with pytest.raises(InboxUnavailable, match=r"^not writable: .*locked") as failed:
            await writer.submit(_insert(1))
        assert isinstance(failed.value.__cause__, sqlite3.OperationalError)
        released.set()
        thread.join()
        assert await writer.submit(_insert(2)) == 2  # the lock let go: writing again
    finally:
        released.set()
        thread.join()
        await writer.stop()
