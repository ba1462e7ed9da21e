"""Group commit on the event loop: operations queue up while a commit is under way and
run together as the next batch, so concurrent callbacks share one fsync.

The operations run on the event loop's own thread: they are Python, and running them on
another thread would only make the two fight over the GIL (measured: about a quarter
more CPU per callback). What can wait long without needing Python goes to a helper
thread: COMMIT and its fsync, and a BEGIN that has to wait for another process's lock.
A batch runs its operations back to back; only if one fails is the batch run again with
a savepoint per operation, so that the failing one is rolled back alone and its caller
alone gets the exception.

A batch made only of dispatch bookkeeping (claims, attempts and outcomes) commits with
`synchronous=normal` even when the inbox is `full`: no fsync of its own, still safe
from a crash of the process (the kill -9 tests), and made durable by the next full
commit, which syncs the whole WAL before it. What a power cut can take is bookkeeping
after the last callback committed: a claim (the run is claimed again) or an outcome
(the handler runs again), which is the at-least-once dispatch promises anyway. A
batch holding anything else (a callback, a replay, a verdict) commits as configured.

A batch that fails as a whole (a full disk, another process keeping the lock past the
lock timeout, an I/O error) fails each of its callers with `InboxUnavailable`: each
sender is answered 503 and each consumer leaves its message to come back, as with a
PostgreSQL inbox away. The log says so once as it begins and once as a commit goes
through again, however many batches fail between. So does a batch for an inbox file
deleted or replaced while the process runs (its commits would go on into the deleted
file, and be lost with it when the process ends): answered 503 until a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from receiver.failing import Failing
from receiver.inbox.types import InboxUnavailable

logger = structlog.get_logger("ci_receiver.inbox")
# Every batch that fails as a whole is news once, whatever its error's words.
UNWRITABLE = "the inbox file cannot be written"

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
# (operation, its caller's future, whether it is dispatch bookkeeping)
_Item = tuple[Operation, asyncio.Future[Any], bool]

MAX_BATCH = 512
# Seconds to wait for another process (serve and consume on one data folder, the workers
# of `serve --workers`) to let go of the write lock.
LOCK_TIMEOUT = 10.0
# How a BEGIN that meets the lock tries again: after these pauses, doubling up to the
# last. SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25... ms between tries (a
# whole second each where it was built without usleep), so it wakes up to several ms
# after the lock was let go: with writers committing back to back, that is time the
# waiting one's callbacks wait for nothing (bench/sqlite_locks.py).
FIRST_PAUSE = 0.0001
LAST_PAUSE = 0.001


class InboxClosedError(RuntimeError):
    pass


class InboxFileGone(RuntimeError):
    pass


class Writer:
    def __init__(self, path: Path, *, synchronous: str, setup: Operation) -> None:
        self._path = path
        self._synchronous = synchronous
        self._syncing = synchronous  # the connection's setting now
        self._setup = setup
        self._connection: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._pending: list[_Item] = []
        self._batch: list[_Item] = []  # being committed
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="inbox-commit")
        self._accepting = False
        self.commits = 0  # batches committed, for tests and metrics
        self.last_commit = 0.0  # time.monotonic() of the last commit that went through
        # The last batch that failed as a whole (disk full, lock timeout), and when.
        self.last_failure: Exception | None = None
        self.last_failure_at = 0.0
        # Batches failing as a whole: said once as it begins, once as a commit goes through.
        self._failing = Failing()

    async def start(self) -> None:
        self._connection = await self._in_thread(self._connect)
        self._task = asyncio.create_task(self._run(), name="inbox-writer")
        self._task.add_done_callback(self._ended)
        self._accepting = True

    async def stop(self) -> None:
        """Commit what is queued, then close."""
        self._accepting = False
        if self._task is not None:
            self._work.set()
            # A writer that died has said so to its callers already; still close.
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._connection is not None:
            await self._in_thread(self._connection.close)
            self._connection = None
        self._thread.shutdown()

    def submit(
        self, operation: Callable[[sqlite3.Connection], T], *, bookkeeping: bool = False
    ) -> asyncio.Future[T]:
        """Queue `operation` for the next commit. `bookkeeping`: it only records dispatch
        progress, which may be lost to a power cut (see above)."""
        (future,) = self.submit_many([operation], bookkeeping=bookkeeping)
        return future

    def submit_many(
        self, operations: list[Operation], *, bookkeeping: bool = False
    ) -> list[asyncio.Future[Any]]:
        """Queue several operations at once (a batch of messages): each its own future,
        each rolled back alone should it fail, as if submitted one by one."""
        if not self._accepting:
            raise InboxClosedError("the inbox is closed")
        create_future = asyncio.get_running_loop().create_future
        futures = [create_future() for _ in operations]
        self._pending += [(op, f, bookkeeping) for op, f in zip(operations, futures, strict=True)]
        self._work.set()
        return futures

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            connection.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT * 1000)}")
            connection.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            self._setup(connection)
        except BaseException:
            connection.close()
            raise
        # No waiting on the event loop: a BEGIN that finds the lock taken is retried on
        # the helper thread, with the lock timeout.
        connection.execute("PRAGMA busy_timeout=0")
        opened = os.stat(self._path)
        self._file = (opened.st_dev, opened.st_ino)
        return connection

    def _check_file(self) -> None:
        """Raises InboxFileGone when the path no longer names the file opened."""
        try:
            now = os.stat(self._path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != self._file:
            raise InboxFileGone(
                f"{self._path} was deleted or replaced while this process ran: what is"
                " committed now would be lost with the deleted file; restart to open it anew"
            )

    async def _run(self) -> None:
        while self._accepting or self._pending:
            await self._work.wait()
            self._work.clear()
            while self._pending:
                self._batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                await self._commit(self._batch)
                self._batch = []
                # The callers of the batch just committed go on before the next batch
                # runs, those that await their own future (`store`; those of a gather, as
                # `store_many`'s, are woken a step later, after it): an ingest tells the
                # dispatcher of its events, so that a claim in the next batch finds them
                # in memory rather than reading them back and decoding them again
                # (bench.stages `with log`).
                await asyncio.sleep(0)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Should the writer ever stop other than by stop(), nothing may wait on it."""
        self._accepting = False
        error = task.exception() if not task.cancelled() else None
        failure = InboxClosedError(f"the inbox writer stopped: {error!r}")
        for _, future, _ in [*self._batch, *self._pending]:
            if not future.done():
                future.set_exception(failure)
        self._batch, self._pending = [], []

    async def _commit(self, batch: list[_Item]) -> None:
        connection = self._connection
        assert connection is not None
        try:
            self._check_file()
            self._sync(connection, batch)
            await self._begin(connection)
            try:
                results = self._execute(connection, batch, isolated=False)
            except Exception:
                connection.execute("ROLLBACK")
                await self._begin(connection)
                results = self._execute(connection, batch, isolated=True)
            await self._in_thread(connection.execute, "COMMIT")
            self.commits += 1
            self.last_commit = time.monotonic()
            failed = self._failing.over()
            if failed is not None:
                logger.info("inbox writable again", path=str(self._path), failed_batches=failed)
        except Exception as exc:  # the batch as a whole failed: disk full, lock timeout
            self.last_failure, self.last_failure_at = exc, time.monotonic()
            with contextlib.suppress(sqlite3.Error):
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
            if self._failing.news(UNWRITABLE):
                logger.warning(
                    "inbox not writable; callbacks are answered 503 until it is",
                    path=str(self._path),
                    error=str(exc),
                )
            unavailable = InboxUnavailable(f"not writable: {exc}")
            unavailable.__cause__ = exc
            results = [(None, unavailable)] * len(batch)
        for (_, future, _), (result, error) in zip(batch, results, strict=True):
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def _sync(self, connection: sqlite3.Connection, batch: list[_Item]) -> None:
        """`normal` for a batch of bookkeeping alone, else as configured."""
        wanted = self._synchronous
        if wanted == "full" and all(bookkeeping for _, _, bookkeeping in batch):
            wanted = "normal"
        if wanted != self._syncing:
            connection.execute(f"PRAGMA synchronous={wanted.upper()}")
            self._syncing = wanted

    async def _begin(self, connection: sqlite3.Connection) -> None:
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            await self._in_thread(_begin_waiting, connection)

    @staticmethod
    def _execute(
        connection: sqlite3.Connection, batch: list[_Item], *, isolated: bool
    ) -> list[tuple[Any, BaseException | None]]:
        results: list[tuple[Any, BaseException | None]] = []
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
        return results

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)


def _begin_waiting(connection: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, tried again promptly while another process holds the lock, for
    up to LOCK_TIMEOUT (on the helper thread: the pauses release the GIL)."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    pause = FIRST_PAUSE
    while True:
        try:
            connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, LAST_PAUSE)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)
