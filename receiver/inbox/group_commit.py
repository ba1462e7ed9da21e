"""Group commit for the PostgreSQL inbox: the writes of the same moment (callbacks to
store, outcomes to record) are committed together, as SQLite's writer does
(receiver/inbox/writer.py).

While a batch is being committed, the items that arrive queue; the next batch takes them
all (up to `MOST_PER_BATCH`) and writes them with one statement (one round trip, one
commit, one WAL flush). A burst of callbacks is then a few large commits instead of one
per callback; an item alone commits at once. Each caller still returns only once its own
item is committed.

The batches that follow one another without a pause are written through one session
(`hold`: a connection of the pool), taken for the first and given back after the last,
or after `MOST_SECONDS_HELD`: taking a connection from asyncpg's pool and giving it back
(a task, futures, the holder's bookkeeping) cost about as much CPU as the batch's
statement itself (`python -m bench.peer`, docs/benchmarks.md).

A batch that fails as a whole because the server cannot be reached fails every item of
it (each sender is asked to send again). One that fails for any other reason (a
deadlock with another replica's batch, one row the server refuses, a connection that
died under it) is written again one item at a time, each in a new session, so that one
item's failure is never the others'.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from receiver.inbox.types import InboxUnavailable

# The most items committed in one transaction: a larger batch holds its row locks and
# its connection longer without saving anything that matters.
MOST_PER_BATCH = 256
# The longest a session is held for batches in a row: then it is given back, and the
# next batch takes one anew, so that a burst never keeps a connection from the pool's
# other users (claims, readiness, the inspector) for longer, however small the pool.
MOST_SECONDS_HELD = 0.05

Item = TypeVar("Item")
Result = TypeVar("Result")
Session = TypeVar("Session")


class GroupCommit(Generic[Session, Item, Result]):
    """Items written in batches by `write`, which commits a list of them in one
    transaction through a session of `hold` and returns a result for each, in order.
    `hold` raises InboxUnavailable when no session can be had."""

    def __init__(
        self,
        write: Callable[[Session, list[Item]], Awaitable[list[Result]]],
        hold: Callable[[], AbstractAsyncContextManager[Session]],
        name: str,
    ) -> None:
        self._write = write
        self._hold = hold
        self._name = name
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def run(self, item: Item) -> Result:
        """`item`'s result, once committed."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._committing is None:
            # In a context of its own, not the first caller's: the task commits every
            # caller's items, for as long as they keep coming (its log lines, and any
            # span of its queries, are no one request's).
            self._committing = contextvars.Context().run(
                asyncio.create_task, self._commit_all(), name=self._name
            )
        # A caller cancelled cancels only its own future: the batch goes on for the others.
        return await future

    async def _commit_all(self) -> None:
        try:
            while self._waiting:
                await self._commit_run()
        finally:
            self._committing = None

    async def _commit_run(self) -> None:
        """Batches one after another through one session, until none is waiting, one
        fails or `MOST_SECONDS_HELD` have passed: a failed session is given back (broken,
        cancelling a statement that timed out: the pool mends it), and the next batch
        takes a new one."""
        batch = self._next_batch()
        loop = asyncio.get_running_loop()
        try:
            async with self._hold() as session:
                until = loop.time() + MOST_SECONDS_HELD
                while True:
                    results = await self._write(session, [item for item, _ in batch])
                    _settle_all(batch, results)
                    if not self._waiting or loop.time() >= until:
                        return
                    batch = self._next_batch()
        except InboxUnavailable as exc:  # no session, or the server away: none is kept
            for _, future in batch:
                _settle(future, exception=exc)
        except Exception:
            await self._commit_each(batch)

    async def _commit_each(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """A batch that failed, written again one item at a time, each in a session of
        its own: one item's failure is never the others', and an item alone that met a
        connection as it died (asyncpg's client errors) is tried once more on another.
        Once the server is found away, the rest fail at once rather than wait each in
        turn."""
        for position, (item, future) in enumerate(batch):
            if future.done() and not future.cancelled():
                continue  # committed: its session failed only to be given back
            try:
                async with self._hold() as session:
                    _settle_all([(item, future)], await self._write(session, [item]))
            except InboxUnavailable as away:
                for _, waiting in batch[position:]:
                    _settle(waiting, exception=away)
                return
            except Exception as exc:
                _settle(future, exception=exc)

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch = self._waiting[:MOST_PER_BATCH]
        del self._waiting[:MOST_PER_BATCH]
        return batch


def _settle_all(batch: list[tuple[Any, asyncio.Future[Any]]], results: list[Any]) -> None:
    """Each item's future its result; raises, settling none, when the count is wrong."""
    if len(results) != len(batch):
        raise RuntimeError(f"{len(results)} results written for {len(batch)} items")
    for (_, future), result in zip(batch, results, strict=True):
        _settle(future, result=result)


def _settle(
    future: asyncio.Future[Any], *, result: Any = None, exception: BaseException | None = None
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
