"""The durable inbox: every callback, its events, and each handler's progress on them.

The interface below is all the HTTP app, the consumer and the dispatcher use; an inbox
on another database implements the same methods. SQLite is the built-in one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from receiver.model import Event, Source

RunStatus = Literal["pending", "done", "dead"]
Outcome = Literal["done", "retry", "dead", "released"]


@dataclass(slots=True)
class Receipt:
    """One delivery as it arrived: the raw body and where it came from."""

    body: bytes
    source: Source
    received_at: datetime
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    source_meta: dict[str, Any] = field(default_factory=dict)
    # Set on a stored receipt whose body was kept only in part: the size that arrived.
    cut_from: int | None = None


@dataclass(slots=True)
class Stored:
    receipt_id: int
    ids: list[str]  # every event of the callback, in document order
    new: list[str]
    duplicates: list[str]


@dataclass(slots=True)
class Claim:
    """One (event, handler) run leased to this process until `lease_until`."""

    event: Event
    handler: str
    attempts: int  # attempts made before this one
    lease_token: str
    request_id: str | None


@dataclass(slots=True)
class RunState:
    handler: str
    status: RunStatus
    attempts: int
    due_at: datetime | None
    last_error: str | None


@dataclass(slots=True)
class Attempt:
    handler: str
    number: int
    started_at: datetime
    finished_at: datetime
    outcome: Outcome
    error: str | None


@dataclass(slots=True)
class EventSummary:
    id: str
    received_at: datetime
    kind: str
    event_name: str | None
    tag: str | None
    state: str | None
    job_id: str | None
    runs: list[RunState]


@dataclass(slots=True)
class EventDetail:
    event: Event
    receipt_id: int
    request_id: str | None
    runs: list[RunState]
    attempts: list[Attempt]


@dataclass(slots=True)
class ReceiptSummary:
    id: int
    received_at: datetime
    source: str
    outcome: Literal["accepted", "duplicate", "rejected"]
    size: int
    error_reason: str | None
    error_detail: str | None
    event_ids: list[str]


class Inbox(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def store(self, receipt: Receipt, routed: list[tuple[Event, list[str]]]) -> Stored:
        """Commit the receipt, each new event and a pending run per routed handler; an
        event whose id is already stored is a duplicate and gets no runs."""
        ...

    async def reject(
        self, receipt: Receipt, reason: str, detail: str, *, size: int | None = None
    ) -> int:
        """Record a body that could not be decoded, kept up to a bounded size; `size` is
        its full size when only a part was read."""
        ...

    async def claim(
        self,
        handler: str,
        limit: int,
        lease_seconds: float,
        known: Mapping[str, Event] | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` due pending runs of `handler`; events found in `known`
        (the ones the caller just stored) are not read back."""
        ...

    async def finish(
        self,
        claim: Claim,
        outcome: Outcome,
        *,
        started_at: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> bool:
        """Record an attempt; False when the lease was lost to another process."""
        ...

    async def next_due(self, handlers: list[str]) -> datetime | None: ...
    async def ping(self) -> None:
        """Raise unless the inbox takes writes."""
        ...

    async def requeue(
        self, event_ids: list[str] | None, handlers: list[str] | None, *, dead_only: bool
    ) -> int:
        """Make runs pending again (creating them for named handlers); returns how many."""
        ...

    async def events(
        self,
        *,
        limit: int = 50,
        kind: str | None = None,
        tag: str | None = None,
        state: str | None = None,
        job_id: str | None = None,
        status: RunStatus | None = None,
    ) -> list[EventSummary]: ...
    async def event(self, event_id: str) -> EventDetail | None: ...
    async def receipts(
        self, *, limit: int = 50, outcome: str | None = None
    ) -> list[ReceiptSummary]: ...
    async def receipt(self, receipt_id: int) -> Receipt | None:
        """A stored callback as received (a rejected one cut to the kept size)."""
        ...

    async def pending_counts(self) -> dict[str, int]: ...

    async def known(self, event_ids: list[str]) -> set[str]:
        """Which of these event ids are stored."""
        ...

    async def get_state(self, key: str) -> str | None:
        """A small durable value (e.g. the reconcile cursor); None when never set."""
        ...

    async def set_state(self, key: str, value: str) -> None: ...


def open_inbox(path: Path, *, synchronous: str = "full", rejected_body_bytes: int) -> Inbox:
    from receiver.inbox.sqlite import SqliteInbox

    return SqliteInbox(path, synchronous=synchronous, rejected_body_bytes=rejected_body_bytes)
