"""The inbox as each of its users sees it: one protocol per role.

Ingest stores (`Storing`), the dispatcher works through the runs (`RunQueue`), the
commands and the admin API read (`Reading`), retention keeps it small (`Upkeep`), and
the reconciler and presence keep a little state in it (`KeptState`). A caller asks for
the role it uses; `Inbox` is all of them, what a service opens, and `ReadOnlyInbox` what
the inspection commands open: no method of it writes, so writing through one is a type
error rather than a failure at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from receiver.callback.event import Event
from receiver.inbox.types import (
    Backlog,
    Claim,
    Counts,
    Cutoffs,
    EventDetail,
    EventFilter,
    EventSummary,
    Leases,
    Outcome,
    Pruned,
    Receipt,
    ReceiptOutcome,
    ReceiptSummary,
    RejectedReceipt,
    Stored,
    ToStore,
    Traffic,
)

T = TypeVar("T")
# A change of a kept value: (the value, or None; the database's now in seconds since the
# epoch) -> (the new value, what to give back).
StateChange = Callable[[str | None, float], tuple[str, T]]


class Lifecycle(Protocol):
    async def open(self, waiting: Callable[[], None] | None = None) -> None:
        """Connect, create or migrate the schema; raise with a clear message when the
        inbox cannot be used (a newer schema, wrong credentials). An inbox opened to wait
        for its database (`open_inbox(wait=True)`) calls `waiting` once if it has to."""
        ...

    async def close(self) -> None: ...


class Storing(Protocol):
    """What ingest and the verification step write."""

    async def store(
        self,
        receipt: Receipt,
        routed: list[tuple[Event, list[str]]],
        *,
        verify: bool = False,
        leases: Leases = ...,
    ) -> Stored:
        """Commit the receipt, each new event and a pending run per routed handler; an
        event whose id is already stored is a duplicate and gets no runs, unless the
        stored one was found forged: then the new one replaces it, its runs afresh, in
        the same transaction. Two processes storing the same id at the same moment: one
        new, one duplicate, never an error. With `verify`, each new event's runs are
        stored `held`, beside a pending run of the verification step (`VERIFY_RUN`),
        which settles them. A pending run named in `leases` is stored leased with it:
        no claim takes it until the lease ends or its outcome is recorded."""
        ...

    async def store_many(self, items: list[ToStore]) -> list[Stored | BaseException]:
        """`store` for several callbacks at once (a batch of queued messages), committed
        together where the inbox can: for each, its `Stored` or the exception `store`
        would have raised, each failing alone."""
        ...

    async def reject(
        self, receipt: Receipt, reason: str, detail: str, *, size: int | None = None
    ) -> int:
        """Record a body that could not be decoded, its first `rejected_body_bytes`
        kept; `size` is its full size when only a part was read."""
        ...

    async def settle(self, event_id: str, genuine: bool) -> int:
        """The verification's verdict on an event: its held runs become pending (genuine)
        or forged. Returns how many runs changed (none when they were settled already, or
        released by a replay)."""
        ...

    async def hasten(self, handler: str) -> int:
        """Make the pending runs of `handler` waiting for a retry due now (the ones being
        attempted aside); returns how many."""
        ...

    async def ping(self) -> None:
        """Raise unless the inbox takes writes."""
        ...


class RunQueue(Protocol):
    """The runs of (event, handler), as the dispatcher and replay work through them."""

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

    async def release(self, lease_token: str) -> int:
        """Hand back, unattempted, the runs leased under `lease_token` that have not
        ended (runs stored leased that will not be started): claimable at once, by any
        process. Returns how many."""
        ...

    async def release_claims(self, claims: Sequence[Claim]) -> int:
        """`release`, of these claims of one `claim` only (a rate limit's surplus)."""
        ...

    async def next_due(self, handlers: list[str]) -> datetime | None:
        """When the earliest pending run of these handlers can be claimed."""
        ...

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` whenever another process may have made runs due (a new event, a
        replay). Backends that cannot tell never call it: dispatch polls anyway."""
        ...

    async def requeue(
        self,
        event_ids: list[str] | None,
        handlers: list[str] | None,
        *,
        among: list[str] | None = None,
        dead_only: bool,
        dry_run: bool = False,
        release: bool | None = None,
    ) -> int:
        """Make runs pending again with their attempts reset (named handlers: creating
        the runs that do not exist yet); None selects every event or every handler
        (with `among`: the runs the events have of these handlers only). Runs leased
        right now are left alone. Returns how many runs were (with `dry_run`: would be)
        queued.

        Verification: with `release` (by default: when `event_ids` are named), the events
        run whatever verification said (held or forged: the caller vouches for them);
        without, held and forged runs are left alone, and a new run of a held event is
        created held. The verification run itself is requeued only when `handlers`
        names it."""
        ...

    async def runs_by_handler(self, event_ids: list[str], dead_only: bool) -> dict[str, int]:
        """How many runs these events have of each handler (`dead_only`: dead ones), the
        verification step's aside."""
        ...


class Reading(Protocol):
    """What the commands, the admin API and the gauges read; reading never blocks
    writers."""

    async def events(
        self, filter: EventFilter | None = None, *, limit: int = 50, before: int | None = None
    ) -> list[EventSummary]:
        """Newest first; `before` is the `seq` of the last event of the previous page."""
        ...

    async def event_ids(
        self,
        filter: EventFilter | None = None,
        *,
        limit: int = 1000,
        after: int = 0,
        through: int | None = None,
    ) -> list[tuple[int, str]]:
        """(seq, id) of matching events, oldest first from `after` (up to `through`):
        for going through many events in pages (replay by filter)."""
        ...

    async def matching(self, filter: EventFilter | None = None) -> tuple[int, int]:
        """How many events match, and the `seq` of the newest of them (0: none)."""
        ...

    async def states(self, prefix: str) -> dict[str, str]:
        """Every kept value whose key starts with `prefix` (the processes present...)."""
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

    async def prunable(self, cutoffs: Cutoffs) -> Pruned:
        """Everything `Upkeep.prune` would remove under these cutoffs, counted."""
        ...


class Upkeep(Protocol):
    """Retention: what is finished and old leaves the inbox."""

    async def prune(self, cutoffs: Cutoffs, *, limit: int = 500) -> Pruned:
        """Remove one batch (at most `limit` of each kind) of what the cutoffs allow;
        call again until it returns nothing. Never touches an event with a run pending,
        held or dead-lettered, nor the body those need. What would go, counted without
        changing anything: `Reading.prunable`."""
        ...

    async def compact(self) -> None:
        """Give the space pruning freed back to the file system, in small steps (SQLite);
        nothing where the database does it itself (PostgreSQL's autovacuum)."""
        ...


class KeptState(Protocol):
    """Small durable values by key: the reconciler's cursor, the processes present."""

    async def get_state(self, key: str) -> str | None: ...

    async def set_state(self, key: str, value: str) -> None: ...

    async def states(self, prefix: str) -> dict[str, str]:
        """Every key starting with `prefix`, with its value."""
        ...

    async def delete_state(self, key: str) -> None: ...

    async def update_state(self, key: str, change: StateChange[T]) -> T:
        """Change a value in one transaction, no other process changing it meanwhile:
        `change(value or None, now)` (now: the database's clock, in seconds since the
        epoch) gives the new value and what to return."""
        ...


class ReadOnlyInbox(Lifecycle, Reading, Protocol):
    """An inbox opened for inspection: it reads, and has no way to write."""


class Inbox(ReadOnlyInbox, Storing, RunQueue, Upkeep, KeptState, Protocol):
    """The whole inbox, as a service opens it."""
