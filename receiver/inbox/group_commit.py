"""Group commit for the PostgreSQL inbox: the callbacks being stored at the same moment
are committed together, as SQLite's writer does (receiver/inbox/writer.py).

Each callback's store is one statement returning one row. While a batch is being
committed, the stores that arrive queue; the next batch takes them all (up to
`MOST_PER_BATCH`) and runs their statements in one transaction, pipelined on one
connection (asyncpg's `fetchmany`: one round trip, one commit, one WAL flush). A burst of
callbacks is then a few large commits instead of one per callback; a callback alone
commits at once. Each caller still returns only once its own row is committed.

A batch that fails as a whole because the server cannot be reached fails every store of
it (each sender is asked to send again). One that fails for any other reason (a
deadlock with another replica's batch, one row the server refuses) is run again one
store at a time, so that one callback's failure is never the others'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from receiver.inbox.types import InboxUnavailable

# The most stores committed in one transaction: a larger batch holds its row locks and
# its connection longer without saving anything that matters.
MOST_PER_BATCH = 256

Arguments = tuple[Any, ...]


class GroupCommit:
    """One statement's executions, committed in batches. `run_many` executes the
    statement once per arguments in one transaction, returning a row for each in order;
    `run_one` executes it alone."""

    def __init__(
        self,
        run_many: Callable[[list[Arguments]], Awaitable[list[Any]]],
        run_one: Callable[[Arguments], Awaitable[Any]],
    ) -> None:
        self._run_many = run_many
        self._run_one = run_one
        self._waiting: list[tuple[Arguments, asyncio.Future[Any]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def run(self, arguments: Arguments) -> Any:
        """The statement's row for `arguments`, once committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((arguments, future))
        if self._committing is None:
            self._committing = asyncio.create_task(self._commit_all(), name="inbox-store")
        # A caller cancelled cancels only its own future: the batch goes on for the others.
        return await future

    async def _commit_all(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:MOST_PER_BATCH]
                del self._waiting[:MOST_PER_BATCH]
                await self._commit(batch)
        finally:
            self._committing = None

    async def _commit(self, batch: list[tuple[Arguments, asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            await self._commit_alone(*batch[0])
            return
        try:
            rows = await self._run_many([arguments for arguments, _ in batch])
        except InboxUnavailable as exc:  # the server away: none of them is kept
            for _, future in batch:
                _settle(future, exception=exc)
            return
        except Exception:  # one store's failure must not be the others': each alone
            for arguments, future in batch:
                await self._commit_alone(arguments, future)
            return
        for (_, future), row in zip(batch, rows, strict=True):
            _settle(future, result=row)

    async def _commit_alone(self, arguments: Arguments, future: asyncio.Future[Any]) -> None:
        try:
            row = await self._run_one(arguments)
        except Exception as exc:
            _settle(future, exception=exc)
            return
        _settle(future, result=row)


def _settle(
    future: asyncio.Future[Any], *, result: Any = None, exception: BaseException | None = None
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
