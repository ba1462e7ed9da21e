"""What the inbox stores and answers: its records, the statuses of a run, the filters and
cutoffs callers pass, and the errors it raises. Nothing here touches a database, so
that anything (the config among them) can use these without the inbox's machinery."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from receiver import config
from receiver.callback.event import Event, Source

# held: waiting for the event to be verified (it runs once it is); forged: the
# verification contradicted the event, so it never runs.
RunStatus = Literal["pending", "done", "dead", "held", "forged"]
RUN_STATUSES: tuple[RunStatus, ...] = ("pending", "done", "dead", "held", "forged")
# "forged": the verification step's own attempt, which found the event contradicted.
Outcome = Literal["done", "retry", "dead", "released", "forged"]
ReceiptOutcome = Literal["accepted", "duplicate", "rejected"]

# The verification step's run (a name the config reserves).
VERIFY_RUN = config.VERIFY_RUN


class SchemaError(RuntimeError):
    """The inbox cannot be used by this version of ci-receiver (a newer schema, or an
    older one that only a receiver's start migrates)."""


class InboxUnavailable(RuntimeError):
    """The inbox cannot be reached or cannot write now (a database restarting, a full
    disk); the caller should answer 503 and expect it to come back by itself. `since`:
    when the outage began, when it is known."""

    def __init__(self, message: str, *, since: datetime | None = None) -> None:
        super().__init__(message)
        self.since = since


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


@dataclass(frozen=True, slots=True)
class Lease:
    """A new run leased as it is stored, to the process storing it, which starts it at
    once instead of claiming it (`token` and the lease's length, as a claim has them)."""

    token: str
    seconds: float


# The leases of a callback's new runs, by (event id, handler); a run without one waits
# to be claimed.
Leases = Mapping[tuple[str, str], Lease]

# What `Inbox.store_many` takes for each callback: `store`'s arguments.
ToStore = tuple[Receipt, list[tuple[Event, list[str]]], bool, Leases]


@dataclass(slots=True)
class Claim:
    """One (event, handler) run leased to this process until its lease ends."""

    event: Event
    handler: str
    attempts: int  # attempts made before this one
    lease_token: str
    request_id: str | None


@dataclass(slots=True)
class RunState:
    handler: str
    status: RunStatus
    attempts: int  # since it was stored or last replayed: what `max_attempts` counts
    due_at: datetime | None  # when a pending run may be attempted next
    last_error: str | None
    # While a process runs it (its lease held): which one (`ids.process_of`), since when.
    leased_by: str | None = None
    leased_since: datetime | None = None


@dataclass(slots=True)
class Attempt:
    handler: str
    number: int  # the handler's attempts at the event so far, replays or not
    started_at: datetime
    finished_at: datetime
    outcome: Outcome
    error: str | None
    replayed: bool = False  # the first attempt after a replay


@dataclass(slots=True)
class EventSummary:
    """An event as lists show it; `seq` orders events by arrival and pages lists."""

    seq: int
    id: str
    received_at: datetime
    kind: str
    event_name: str | None
    tag: str | None
    state: str | None
    job_id: str | None
    bucket: str | None
    key: str | None
    verdict: str | None  # a moderation event's: normal, violation or suspected
    source: str  # its receipt's: how it came (`http`, `cmq-push`, `tdmq`, ...)
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
    outcome: ReceiptOutcome
    size: int
    error_reason: str | None
    error_detail: str | None
    event_ids: list[str]


@dataclass(slots=True, kw_only=True)
class EventFilter:
    """Which events a list, a replay or a count is about; every field set must match.

    `kind` to `key` match as a route's keys of those names do (receiver/callback/
    matching.py): `state failed` finds what CI calls Failed, `tag` a workflow's event
    name too; `key` is a glob over the input object's key (`*` any run of characters,
    `?` one). `status` selects events with a run in that status (of `handler`, when
    given); `since` / `until` bound `received_at` (from inclusive, to exclusive).
    """

    kind: str | None = None
    event_name: str | None = None
    tag: str | None = None
    state: str | None = None
    verdict: str | None = None
    job_id: str | None = None
    bucket: str | None = None
    key: str | None = None
    status: RunStatus | None = None
    handler: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(slots=True)
class Backlog:
    """A handler's work in the inbox, for gauges and the overview."""

    pending: int
    dead: int
    oldest_due: datetime | None  # the earliest due_at of its pending runs


@dataclass(slots=True)
class Counts:
    """What arrived since a moment, for `stats` and the overview."""

    receipts: dict[str, int]  # by outcome: accepted, duplicate, rejected
    tags: dict[str, int]  # new events by tag (or event name, for workflows and verdicts)
    states: dict[str, int]  # new events by state
    verdicts: dict[str, int]  # new moderation events by verdict
    runs: dict[str, dict[str, int]]  # of those events' runs: handler -> status -> count


@dataclass(slots=True)
class Traffic:
    """What arrived since a moment, for the inspector's overview: callbacks per `step`
    seconds by outcome, and the new events by tag, by state and by verdict (as `Counts`
    has them)."""

    step: int
    # (the start of a step, outcome, count), oldest first; steps with none left out.
    callbacks: list[tuple[datetime, ReceiptOutcome, int]]
    tags: dict[str, int]
    states: dict[str, int]
    verdicts: dict[str, int]


@dataclass(slots=True)
class RejectedReceipt:
    """A refused callback as the inspector lists it: why, from where, and its first bytes."""

    id: int
    received_at: datetime
    source: str
    request_id: str | None
    size: int  # as it arrived
    kept: int  # bytes of it kept (0: counted only, or removed)
    reason: str | None
    detail: str | None
    headers: dict[str, str]
    source_meta: dict[str, Any]
    preview: bytes  # its first bytes, at most the `preview` asked for


@dataclass(slots=True, frozen=True)
class Cutoffs:
    """What retention may remove: what was received before each moment (None: keep)."""

    events: datetime | None  # handled events, their runs and attempts, and their receipts
    bodies: datetime | None  # the bodies of handled callbacks (their events stay)
    refused: datetime | None  # refused callbacks


@dataclass(slots=True)
class Pruned:
    events: int = 0
    receipts: int = 0  # receipts removed, refused ones included
    bodies: int = 0  # bodies dropped from receipts that stay
    bytes: int = 0  # of bodies and event rows removed

    def __iadd__(self, other: Pruned) -> Pruned:
        self.events += other.events
        self.receipts += other.receipts
        self.bodies += other.bodies
        self.bytes += other.bytes
        return self

    def __bool__(self) -> bool:
        return bool(self.events or self.receipts or self.bodies)
