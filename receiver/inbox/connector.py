"""What the inbox's rules (`manager.py`) need of a database: a connector runs units of
work (`query.Work`) and gives back their rows. SQLite's runs writes on its single
writer, batched into group commits, and reads on helper threads; PostgreSQL's runs them
on its pool, group-committing stores, batching outcomes, and saying when the server
cannot be reached. Neither decides anything about events or runs, but for the hot path
each takes its own way: a callback stored and an outcome recorded (see `store`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol, TypeVar

from receiver.inbox.query import Dialect, Statement, Tx, Work
from receiver.inbox.types import InboxUnavailable, Lease, Receipt, RunStatus

T = TypeVar("T")


@dataclass(slots=True)
class Delivery:
    """A callback to store, as rows: its receipt, and each of its events
    (`records.event_row`) with its new runs (handler, status, and the lease it is stored
    with, if any). The connector packs the receipt's body (`records.pack`) as it writes
    it: a batch's bodies one after another."""

    receipt: Receipt
    events: list[tuple[tuple[Any, ...], list[tuple[str, RunStatus, Lease | None]]]]


@dataclass(slots=True)
class Delivered:
    receipt_id: int
    stored: list[str]  # the ids of the events stored as new (or in place of forged ones)


class Finished(NamedTuple):
    """An attempt's outcome to record on its run, while its lease is still held (in the
    order of PostgreSQL's `FINISH` columns)."""

    event_id: str
    handler: str
    lease_token: str
    status: str  # the run's status from now
    counted: int  # 1 for an attempt, 0 for a run released at shutdown
    retry_at: datetime | None
    error: str | None
    number: int  # the attempt's number
    started_at: datetime
    outcome: str


class Connector(Protocol):
    dialect: Dialect

    async def open(self, waiting: Callable[[], None] | None) -> None: ...

    async def close(self) -> None: ...

    async def read(self, work: Callable[[Tx], Work[T]]) -> T:
        """Run `work` on one snapshot (a read-only transaction), holding up no writer."""
        ...

    async def read_one(self, statement: Callable[[Tx], Statement]) -> Any:
        """One statement that reads (one snapshot by itself: no transaction around it)."""
        ...

    async def write(self, work: Callable[[Tx], Work[T]]) -> T:
        """Run `work` in one transaction."""
        ...

    async def execute(self, statement: Callable[[Tx], Statement]) -> Any:
        """One statement that writes, committed alone."""
        ...

    async def store(self, delivery: Delivery) -> Delivered:
        """Store a callback: its receipt, each new event (or in place of a stored one
        that verification found forged, its runs afresh) and its runs; a receipt none of
        whose events is new is a duplicate's. Each backend its own way, the hot path:
        SQLite statement by statement on its writer, PostgreSQL in one statement."""
        ...

    async def store_many(self, deliveries: list[Delivery]) -> list[Delivered | BaseException]:
        """`store` for each, each failing alone, committed together."""
        ...

    async def finish(self, finished: Finished) -> bool:
        """Record an outcome if the run's lease is still held (the run updated, and the
        attempt): True if it was. SQLite statement by statement on its writer,
        PostgreSQL batched with the outcomes of the same moment in one statement."""
        ...

    async def lease(
        self, handler: str, limit: int, lease_seconds: float, token: str
    ) -> list[tuple[str, int, str | None]]:
        """Lease due pending runs of `handler` to `token`: (event id, attempts made,
        the request id of its receipt) of each."""
        ...

    def watch(self, wake: Callable[[], None]) -> None: ...

    @property
    def last_write(self) -> float:
        """When (time.monotonic()) a write last went through; 0: never."""
        ...

    @property
    def last_failure(self) -> float:
        """When (time.monotonic()) a write last failed; 0: never."""
        ...

    def unwritable(self, error: Exception) -> InboxUnavailable:
        """What to raise when the heartbeat could not be written."""
        ...

    async def size(self) -> int: ...

    async def compact(self) -> None: ...
