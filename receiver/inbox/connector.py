"""What the inbox's rules (`manager.py`) need of a database: a connector runs units of
work (`query.Work`) and gives back their rows. SQLite's runs writes on its single
writer, batched into group commits, and reads on helper threads; PostgreSQL's runs them
on its pool, group-committing stores, batching outcomes, and saying when the server
cannot be reached. Neither decides anything about events or runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from receiver.inbox.query import Delivered, Delivery, Dialect, Finished, Statement, Tx, Work
from receiver.inbox.types import InboxUnavailable

T = TypeVar("T")


class Connector(Protocol):
    dialect: Dialect

    async def open(self, waiting: Callable[[], None] | None) -> None: ...

    async def close(self) -> None: ...

    async def read(self, work: Callable[[Tx], Work[T]]) -> T:
        """Run `work` on one snapshot, holding up no writer."""
        ...

    async def write(self, work: Callable[[Tx], Work[T]], *, bookkeeping: bool = False) -> T:
        """Run `work` in one transaction. `bookkeeping`: it only records dispatch progress
        (see writer.py)."""
        ...

    async def execute(
        self, statement: Callable[[Tx], Statement], *, bookkeeping: bool = False
    ) -> Any:
        """One statement that writes, committed alone."""
        ...

    async def store(
        self, deliveries: list[Delivery], work: Callable[[Tx, Delivery], Work[Delivered]]
    ) -> list[Delivered | BaseException]:
        """Store each delivery as `work` does, each failing alone, committed together
        where the backend can (PostgreSQL: in one statement of its own doing the same)."""
        ...

    async def finish(self, finished: Finished, work: Callable[[Tx, Finished], Work[bool]]) -> bool:
        """Record an outcome as `work` does (PostgreSQL: batched with others, in one
        statement of its own doing the same)."""
        ...

    async def lease(
        self, handler: str, limit: int, lease_seconds: float, token: str
    ) -> list[tuple[str, int, str | None]]:
        """Lease due pending runs of `handler` to `token`: (event id, attempts made,
        the request id of its receipt) of each."""
        ...

    def watch(self, wake: Callable[[], None]) -> None: ...

    def wrote_lately(self) -> bool:
        """A write went through a moment ago, and none failed since."""
        ...

    def unwritable(self, error: Exception) -> InboxUnavailable:
        """What to raise when the heartbeat could not be written."""
        ...

    async def size(self) -> int: ...

    async def compact(self) -> None: ...
