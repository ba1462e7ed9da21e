"""Group commit for the PostgreSQL inbox: the writes of the same moment (callbacks to
store, outcomes to record) are committed together, as SQLite's writer does
(receiver/inbox/writer.py).

While a batch is being committed, the items that arrive queue; the next batch takes them
all (up to `MOST_PER_BATCH`) and writes them with one statement (one round trip, one
commit, one WAL flush). A burst of callbacks is then a few large commits instead of one
per callback; an item alone commits at once. Each caller still returns only once its own
item is committed.

The batches that follow one another without a pause are written through one session
(`hold`: a connection of the pool), taken for the first and given back after the last:
taking a connection from asyncpg's pool and giving it back cost more CPU than the
statement itself (`python -m bench.dispatch_cost --postgres`).

A batch that fails as a whole because the server cannot be reached fails every item of
it (each sender is asked to send again). One that fails for any other reason (a
deadlock with another replica's batch, one row the server refuses) is written again one
item at a time, so that one item's failure is never the others'.
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
                batch = self._next_batch()
                try:
                    async with self._hold() as session:
                        await self._commit(session, batch)
                        while self._waiting:
                            batch = self._next_batch()
                            await self._commit(session, batch)
                except InboxUnavailable as exc:
                    # No session (each of the batch told here), or the server went away
                    # during a batch (each told already): a new session for the next.
                    for _, future in batch:
                        _settle(future, exception=exc)
        finally:
            self._committing = None

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        batch = self._waiting[:MOST_PER_BATCH]
        del self._waiting[:MOST_PER_BATCH]
        return batch

    async def _commit(
        self, session: Session, batch: list[tuple[Item, asyncio.Future[Result]]]
    ) -> None:
        """Raises InboxUnavailable, once it has failed the whole batch with it."""
        try:
            results = await self._write(session, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results written for {len(batch)} items")
        except InboxUnavailable as exc:  # the server away: none of them is kept
            for _, future in batch:
                _settle(future, exception=exc)
            raise
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exception=exc)
                return
            # One item's failure must not be the others': each alone, until the server
            # is found away (the rest then fail at once rather than wait each in turn).
            for position, (item, future) in enumerate(batch):
                try:
                    await self._commit(session, [(item, future)])
                except InboxUnavailable as away:
                    for _, waiting in batch[position + 1 :]:
                        _settle(waiting, exception=away)
                    return
            return
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
