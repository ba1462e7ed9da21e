"""Group commit: one thread owns the SQLite connection and commits queued work in batches.

Every operation submitted while a commit (and its fsync) is under way joins the next
batch, so concurrent callbacks share one fsync. A batch runs its operations back to
back; only if one fails is the batch run again with a savepoint per operation, so that
the failing one is rolled back alone and its caller alone gets the exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
_Item = tuple[Operation, asyncio.Future[Any], asyncio.AbstractEventLoop]

MAX_BATCH = 512


class InboxClosedError(RuntimeError):
    pass


class Writer:
    def __init__(self, path: Path, *, synchronous: str, setup: Operation) -> None:
        self._path = path
        self._synchronous = synchronous
        self._setup = setup
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._accepting = False
        self.commits = 0  # batches committed, for tests and metrics

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inbox-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        self._accepting = True

    def stop(self) -> None:
        self._accepting = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, operation: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if not self._accepting:
            raise InboxClosedError("the inbox is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((operation, future, loop))
        return future

    def _run(self) -> None:
        try:
            connection = self._connect()
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                batch, stopping = self._next_batch()
                if batch:
                    self._commit(connection, batch)
                if stopping:
                    return
        finally:
            connection.close()

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
        # Other processes (serve and consume on one data folder) may hold the lock a moment.
        connection.execute("PRAGMA busy_timeout=10000")
        with connection:
            self._setup(connection)
        return connection

    def _next_batch(self) -> tuple[list[_Item], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _commit(self, connection: sqlite3.Connection, batch: list[_Item]) -> None:
        try:
            try:
                results = self._execute(connection, batch, isolated=False)
            except Exception:
                connection.execute("ROLLBACK")
                results = self._execute(connection, batch, isolated=True)
        except Exception as exc:  # the batch as a whole failed: disk full, lock timeout
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            results = [(None, exc)] * len(batch)
        # One wake-up per event loop for the whole batch, not one per operation.
        settled: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
        for (_, future, loop), (result, error) in zip(batch, results, strict=True):
            settled.setdefault(loop, []).append((future, result, error))
        for loop, outcomes in settled.items():
            with contextlib.suppress(RuntimeError):  # that caller's loop is already closed
                loop.call_soon_threadsafe(_settle_all, outcomes)

    def _execute(
        self, connection: sqlite3.Connection, batch: list[_Item], *, isolated: bool
    ) -> list[tuple[Any, BaseException | None]]:
        results: list[tuple[Any, BaseException | None]] = []
        connection.execute("BEGIN IMMEDIATE")
        for operation, _, _ in batch:
            if not isolated:
                results.append((operation(connection), None))
                continue
            connection.execute("SAVEPOINT operation")
            try:
                results.append((operation(connection), None))
            except Exception as exc:
                connection.execute("ROLLBACK TO operation")
                results.append((None, exc))
            connection.execute("RELEASE operation")
        connection.execute("COMMIT")
        self.commits += 1
        return results


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
