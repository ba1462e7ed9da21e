"""The durable inbox: every callback, its events, and each handler's progress on them.

The `Inbox` protocol below is all that sources, ingest, dispatch, the CLI and the admin
API use. Two backends implement it with the same semantics (one contract test suite
runs over both): SQLite, the embedded default on one host, and PostgreSQL, shared by
any number of receivers and consumers.

Each callback's bytes are stored once, compressed, with its receipt. An event row keeps
the normalized fields it is filtered by and a reference to its receipt; the whole event,
`raw` and `operation` included, is rebuilt by decoding the receipt's body again when it
is read (see `records.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from receiver.callback.event import Event, Source

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from receiver.config import Config

# held: waiting for the event to be verified (it runs once it is); forged: the
# verification contradicted the event, so it never runs.
RunStatus = Literal["pending", "done", "dead", "held", "forged"]
RUN_STATUSES: tuple[RunStatus, ...] = ("pending", "done", "dead", "held", "forged")
# "forged": the verification step's own attempt, which found the event contradicted.
Outcome = Literal["done", "retry", "dead", "released", "forged"]
ReceiptOutcome = Literal["accepted", "duplicate", "rejected"]

# The run of the built-in verification step (see receiver/ci/verify.py), stored beside the
# held runs of an event from a source with `verify = "ci-api"`. Not a name a configured
# handler can take.
VERIFY_RUN = "(verify)"


def new_runs(handlers: list[str], verify: bool) -> list[tuple[str, RunStatus]]:
    """(handler, status) of a new event's runs: pending, or held behind its verification."""
    if not verify:
        return [(name, "pending") for name in handlers]
    return [(VERIFY_RUN, "pending"), *((name, "held") for name in handlers)]


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


# What `Inbox.store_many` takes for each callback: `store`'s arguments.
ToStore = tuple[Receipt, list[tuple[Event, list[str]]], bool]


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
    attempts: int
    due_at: datetime | None  # when a pending run may be attempted next
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

    `key` is a glob over the input object's key (`*` any run of characters, `?` one).
    `status` selects events with a run in that status (of `handler`, when given);
    `since` / `until` bound `received_at` (from inclusive, to exclusive).
    """

    kind: str | None = None
    tag: str | None = None
    state: str | None = None
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
    runs: dict[str, dict[str, int]]  # of those events' runs: handler -> status -> count


@dataclass(slots=True)
class Traffic:
    """What arrived since a moment, for the inspector's overview: callbacks per `step`
    seconds by outcome, and the new events by tag and by state (as `Counts` has them)."""

    step: int
    # (the start of a step, outcome, count), oldest first; steps with none left out.
    callbacks: list[tuple[datetime, ReceiptOutcome, int]]
    tags: dict[str, int]
    states: dict[str, int]


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


class Inbox(Protocol):
    async def open(self, waiting: Callable[[], None] | None = None) -> None:
        """Connect, create or migrate the schema; raise with a clear message when the
        inbox cannot be used (a newer schema, wrong credentials). An inbox opened to wait
        for its database (`open_inbox(wait=True)`) calls `waiting` once if it has to."""
        ...

    async def close(self) -> None: ...

    # --- ingest ---------------------------------------------------------------------

    async def store(
        self, receipt: Receipt, routed: list[tuple[Event, list[str]]], *, verify: bool = False
    ) -> Stored:
        """Commit the receipt, each new event and a pending run per routed handler; an
        event whose id is already stored is a duplicate and gets no runs, unless the
        stored one was found forged: then the new one replaces it, its runs afresh. Two processes
        storing the same id at the same moment: one new, one duplicate, never an error.
        With `verify`, each new event's runs are stored `held`, beside a pending run of
        the verification step (`VERIFY_RUN`), which settles them."""
        ...

    async def store_many(self, items: list[ToStore]) -> list[Stored | BaseException]:
        """`store` for several callbacks at once (a batch of queued messages), committed
        together where the inbox can: for each, its `Stored` or the exception `store`
        would have raised, each failing alone."""
        ...

    async def settle(self, event_id: str, genuine: bool) -> int:
        """The verification's verdict on an event: its held runs become pending (genuine)
        or forged. Returns how many runs changed (none when they were settled already, or
        released by a replay)."""
        ...

    async def reject(
        self, receipt: Receipt, reason: str, detail: str, *, size: int | None = None
    ) -> int:
        """Record a body that could not be decoded, its first `rejected_body_bytes`
        kept; `size` is its full size when only a part was read."""
        ...

    # --- dispatch -------------------------------------------------------------------

    async def claim(
        self,
        handler: str,
        limit: int,
        lease_seconds: float,
        known: Mapping[str, Event] | None = None,
    ) -> list[Claim]:
        """Lease up to `limit` due pending runs of `handler`, runs leased to no one (or
        whose lease ended); events found in `known` (the ones the caller just stored)
        are not read back."""
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
        """Record an attempt; False when the lease was lost (ended and taken by another
        process, or the run was replayed since)."""
        ...

    async def next_due(self, handlers: list[str]) -> datetime | None:
        """When the earliest pending run of these handlers can be claimed."""
        ...

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever another process may have made runs due (a new event, a
        replay). Backends that cannot tell never call it: dispatch polls anyway."""
        ...

    async def ping(self) -> None:
        """Raise unless the inbox takes writes."""
        ...

    # --- replay ---------------------------------------------------------------------

    async def requeue(
        self,
        event_ids: list[str] | None,
        handlers: list[str] | None,
        *,
        dead_only: bool,
        dry_run: bool = False,
        release: bool | None = None,
    ) -> int:
        """Make runs pending again with their attempts reset (named handlers: creating
        the runs that do not exist yet); None selects every event or every handler.
        Runs leased right now are left alone. Returns how many runs were (with
        `dry_run`: would be) queued.

        Verification: with `release` (by default: when `event_ids` are named), the events
        run whatever verification said (held or forged: the caller vouches for them);
        without, held and forged runs are left alone, and a new run of a held event is
        created held. The verification run
        itself is requeued only when `handlers` names it."""
        ...

    # --- reading (never blocks writers) ---------------------------------------------

    async def events(
        self, filter: EventFilter | None = None, *, limit: int = 50, before: int | None = None
    ) -> list[EventSummary]:
        """Newest first; `before` is the `seq` of the last event of the previous page."""
        ...

    async def event_ids(
        self, filter: EventFilter | None = None, *, limit: int = 1000, after: int = 0
    ) -> list[tuple[int, str]]:
        """(seq, id) of matching events, oldest first from `after`: for going through
        many events in pages (replay by filter)."""
        ...

    async def event(self, event_id: str) -> EventDetail | None: ...

    async def known(self, event_ids: list[str], *, forged: bool = True) -> set[str]:
        """Which of these event ids are stored (`forged=False`: leaving out the events
        verification found forged, which a new delivery of their id replaces)."""
        ...

    async def receipts(
        self, *, limit: int = 50, outcome: ReceiptOutcome | None = None, before: int | None = None
    ) -> list[ReceiptSummary]:
        """Newest first; `before` is the id of the last receipt of the previous page."""
        ...

    async def receipt(self, receipt_id: int) -> Receipt | None:
        """A stored callback as received (a rejected one cut to the kept size)."""
        ...

    async def rejected(
        self, *, limit: int = 50, before: int | None = None, preview: int = 512
    ) -> list[RejectedReceipt]:
        """Refused callbacks, newest first, each with its first `preview` bytes; `before`
        is the id of the last one of the previous page."""
        ...

    async def backlog(self) -> dict[str, Backlog]:
        """Per handler with any pending or dead run."""
        ...

    async def counts(self, since: datetime) -> Counts:
        """Receipts, new events and their runs since `since`."""
        ...

    async def traffic(self, since: datetime, *, step: int = 60) -> Traffic:
        """Callbacks per `step` seconds (steps aligned on the epoch) and new events by tag
        and state, since `since`: one pass over an index of the receipts' times and one
        over the events of the period, whatever the inbox holds before it."""
        ...

    async def load(self, event_ids: list[str]) -> list[Event]:
        """These events, whole: for deciding about many events at once (replay by
        routes)."""
        ...

    async def size(self) -> int:
        """Bytes the inbox takes on disk."""
        ...

    # --- retention ------------------------------------------------------------------

    async def prune(self, cutoffs: Cutoffs, *, limit: int = 500, dry_run: bool = False) -> Pruned:
        """Remove one batch (at most `limit` of each kind) of what the cutoffs allow;
        call again until it returns nothing. Never touches an event with a run pending,
        held or dead-lettered, nor the body those need. `dry_run` counts everything
        that would go, changing nothing."""
        ...

    async def compact(self) -> None:
        """Give the space pruning freed back to the file system, in small steps (SQLite);
        nothing where the database does it itself (PostgreSQL's autovacuum)."""
        ...

    # --- small durable state (the reconciler's cursor) ------------------------------

    async def get_state(self, key: str) -> str | None: ...
    async def set_state(self, key: str, value: str) -> None: ...
    async def states(self, prefix: str) -> dict[str, str]:
        """Every key starting with `prefix`, with its value."""
        ...

    async def delete_state(self, key: str) -> None: ...


def open_inbox(
    config: Config,
    *,
    read_only: bool = False,
    wait: bool = False,
    registry: CollectorRegistry | None = None,
) -> Inbox:
    """The inbox the config names: PostgreSQL for a `postgresql://` URL, else the SQLite
    file. `read_only` opens it for the inspection commands: no schema changes, no
    writer, nothing that could hold up a running receiver. With `wait` (a service),
    opening waits for a database server that cannot be reached yet, instead of failing
    at once (a command), and the server's outages are logged, once as it goes and once
    as it comes back; `registry` takes the inbox's metrics."""
    inbox = config.inbox
    if inbox.url is not None:
        from receiver.inbox.postgres import PostgresInbox

        return PostgresInbox(
            inbox.url,
            schema=inbox.postgres_schema,
            pool_size=inbox.pool_size,
            rejected_body_bytes=inbox.rejected_body_bytes,
            read_only=read_only,
            wait=wait,
            registry=registry,
        )
    from receiver.inbox.sqlite import SqliteInbox

    return SqliteInbox(
        config.inbox_path,
        synchronous=inbox.synchronous,
        rejected_body_bytes=inbox.rejected_body_bytes,
        read_only=read_only,
    )


async def probe(config: Config) -> str:
    """Check that the configured inbox can be used, without changing it; a line saying
    what was found. Raises `InboxUnavailable` or `SchemaError` with what is wrong."""
    if config.inbox.url is not None:
        from receiver.inbox.postgres import probe as probe_postgres

        return await probe_postgres(config.inbox.url, config.inbox.postgres_schema)
    from receiver.inbox.sqlite import probe as probe_sqlite

    return await probe_sqlite(config.inbox_path)
