"""The one way a callback gets in, whatever its channel: decode, route, commit, hand off."""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import structlog
from structlog.contextvars import bind_contextvars

from receiver import tracing
from receiver.callback import vocabulary
from receiver.callback.decode import Limits, PayloadError
from receiver.callback.event import Event
from receiver.callback.normalize import Normalized, read_callback
from receiver.inbox import (
    VERIFY_RUN,
    InboxUnavailable,
    Leases,
    Receipt,
    Stored,
    Storing,
    ToStore,
)
from receiver.ingest.routing import Router
from receiver.metrics import Metrics

logger = structlog.get_logger("ci_receiver.ingest")

# Bodies this large are parsed off the event loop so that other requests keep moving,
# one at a time: a parse holds the GIL but for the loop's turns, and every more thread
# parsing would take a further share of it from the loop. So however many large (or
# hostile) bodies arrive at once, the loop's share stays the same, and they wait in line.
THREAD_PARSE_BYTES = 64 * 1024
_PARSER = ThreadPoolExecutor(1, thread_name_prefix="parse")
# A refused callback kept costs its body and about this much more (headers, metadata,
# indexes), counted against the hour's budget.
REJECTED_ROW_BYTES = 512


async def parse_or_refuse(
    receipt: Receipt, limits: Limits, intake: Intake, *, keep_refused: bool = True
) -> Normalized:
    """Decode and normalize a receipt's body. A body that cannot be is first kept through
    `intake.reject` (unless not `keep_refused`: a body decoded again, kept already), then
    its `PayloadError` is raised (`RefusedOverBudget`, by `reject`, when it is to wait)."""
    try:
        return await _parse(receipt, limits)
    except PayloadError as error:
        if keep_refused:
            await intake.reject(receipt, error)
        raise


async def _parse(receipt: Receipt, limits: Limits) -> Normalized:
    work = functools.partial(
        read_callback,
        receipt.body,
        receipt.headers,
        source=receipt.source,
        source_meta=receipt.source_meta,
        received_at=receipt.received_at,
        limits=limits,
    )
    if len(receipt.body) > THREAD_PARSE_BYTES:
        return await asyncio.get_running_loop().run_in_executor(_PARSER, work)
    return work()


def _pending(routed: list[tuple[Event, list[str]]], verify: bool) -> list[tuple[Event, list[str]]]:
    """Each event with the handlers whose runs it is stored pending: the verification
    step's alone while the event waits to be verified (the others are held). An event
    the callback names twice is stored with its first entry's runs."""
    pending: dict[str, tuple[Event, list[str]]] = {}
    for event, names in routed:
        pending.setdefault(event.id, (event, [VERIFY_RUN] if verify else names))
    return list(pending.values())


def _by_its_events_source(receipt: Receipt, events: list[Event]) -> Receipt:
    """The receipt as kept: by the source its events came by, which decoding may find
    more exactly (an HTTP post that a CMQ topic pushed is `cmq-push`), so that a list of
    events reads each one's source off its receipt without decoding it again."""
    source = events[0].source
    return receipt if source == receipt.source else replace(receipt, source=source)


# The states CI documents; any other value a callback carries counts as "other", so that
# what a sender writes cannot grow the metric series without bound.
KNOWN_STATES = frozenset(vocabulary.STATES)


def _state_label(state: str | None) -> str:
    return state if state in KNOWN_STATES else "other"


class IntakeUnavailable(Exception):
    """The callback cannot be taken now: the sender should send it again. `reason` is the
    machine-readable reason of the 503 answer."""

    def __init__(self, message: str, *, reason: str = "inbox_unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class RejectionNotKept(IntakeUnavailable):
    """A body was refused and could not be kept either: the sender should send it again."""


class RefusedOverBudget(PayloadError):
    """A queue's message refused when the hour's budget for keeping refused bodies had no
    room for it: neither kept nor counted yet. Its consumer leaves it to come back, kept
    once the budget has refilled (`Config.refusals_wait_in`)."""


class Intake(Protocol):
    """Where a source hands its callbacks: the `Ingestor` below, or the TDMQ relay."""

    async def ingest(self, receipt: Receipt, *, keep_refused: bool = True) -> Stored:
        """Keep the callback; raise `PayloadError` for a body refused (and kept, unless
        not `keep_refused`: a body decoded again; `RefusedOverBudget`, as `reject`),
        `RejectionNotKept` for one refused that could not be kept, `IntakeUnavailable`
        when it cannot be kept now."""
        ...

    async def reject(
        self, receipt: Receipt, error: PayloadError, *, size: int | None = None
    ) -> None:
        """Keep a refused body for inspection (or count it, past the budget for them).
        Raise `RefusedOverBudget` for a queue's message the budget has no room for now but
        will have (left in its queue, it is kept when it comes back), `RejectionNotKept`
        if it cannot be kept now."""
        ...


class Handoff(Protocol):
    """Who runs the handlers of what is stored: the dispatcher of this process."""

    def reserve(self, runs: list[tuple[Event, list[str]]]) -> Leases:
        """Before a callback is stored, with its events' pending runs: leases for those
        it will start as soon as they are stored, stored with them."""
        ...

    def stored(self, request_id: str, runs: list[tuple[Event, list[str]]], leases: Leases) -> None:
        """The callback was stored, with these new events' pending runs (none: it was not,
        or it was a duplicate); `leases` are what `reserve` gave for it."""
        ...

    def abandoned(self, leases: Leases) -> None:
        """The callback's store was given up on (cancelled) and may yet commit."""
        ...


class NoHandoff:
    """Nobody runs handlers here (tests of the sources): what is stored waits in the inbox."""

    def reserve(self, runs: list[tuple[Event, list[str]]]) -> Leases:
        return {}

    def stored(self, request_id: str, runs: list[tuple[Event, list[str]]], leases: Leases) -> None:
        pass

    def abandoned(self, leases: Leases) -> None:
        pass


class RejectedBudget:
    """How much of refused callbacks may be kept: the first `body_bytes` of each, and
    `bytes_per_hour` in all (a bucket that refills evenly over the hour), so that a flood
    of garbage cannot fill the disk."""

    def __init__(self, body_bytes: int, bytes_per_hour: int) -> None:
        self.body_bytes = body_bytes
        self._rate = bytes_per_hour / 3600
        self._capacity = float(bytes_per_hour)
        self._left = float(bytes_per_hour)
        self._at = time.monotonic()

    def fits(self, body: bytes) -> bool:
        """Whether the budget has room for `body` when full: else it is never kept."""
        return self._cost(body) <= self._capacity

    def take(self, body: bytes) -> bytes | None:
        """The part of `body` to keep, or None when the budget is spent."""
        now = time.monotonic()
        self._left = min(self._capacity, self._left + (now - self._at) * self._rate)
        self._at = now
        cost = self._cost(body)
        if cost > self._left:
            return None
        self._left -= cost
        return body[: self.body_bytes]

    def _cost(self, body: bytes) -> int:
        return min(len(body), self.body_bytes) + REJECTED_ROW_BYTES


class Ingestor:
    def __init__(
        self,
        inbox: Storing,
        router: Router,
        metrics: Metrics,
        limits: Limits,
        handoff: Handoff | None = None,
        rejected: RejectedBudget | None = None,
        verified_sources: frozenset[str] = frozenset(),
        refusals_wait_in: frozenset[str] = frozenset(),
    ) -> None:
        self._inbox = inbox
        # Replaced whole by a config reload (receiver/runtime/reload.py): each callback is routed
        # by the routes in force when it arrives.
        self.router = router
        self._metrics = metrics
        self._limits = limits
        self._handoff = handoff or NoHandoff()
        self._rejected = rejected or RejectedBudget(64 * 1024, 64 * 1024 * 1024)
        # Events from these sources wait for verification (receiver/ci/verify.py).
        self._verified_sources = verified_sources
        # Refusals from these sources wait in their queue for room in `rejected`.
        self._refusals_wait_in = refusals_wait_in

    async def ingest(self, receipt: Receipt, *, keep_refused: bool = True) -> Stored:
        """Commit the callback and its events; raise `PayloadError` after recording a
        body that cannot be decoded (`Intake.ingest`). Returns only once the commit is
        durable."""
        began = time.perf_counter()
        parsed = await parse_or_refuse(receipt, self._limits, self, keep_refused=keep_refused)
        receipt = _by_its_events_source(receipt, parsed.events)
        routed = [(event, self.router.handlers_for(event)) for event in parsed.events]
        verify = self._verifies(receipt)
        pending = _pending(routed, verify)
        leases = self._handoff.reserve(pending)
        try:
            with tracing.storing([receipt.source_meta]) as span:
                stored = await self._inbox.store(receipt, routed, verify=verify, leases=leases)
                span.set("ci_receiver.events.new", len(stored.new))
        except asyncio.CancelledError:  # the store goes on, and may yet commit
            self._handoff.abandoned(leases)
            raise
        except Exception as exc:
            error = self._not_kept(receipt, leases, exc)
            if error is exc:
                raise
            raise error from exc
        self._hand_off(receipt, routed, pending, leases, stored, began, parsed.warnings)
        return stored

    async def ingest_many(self, receipts: list[Receipt]) -> list[Stored | BaseException]:
        """`ingest` for several callbacks at once (a batch of queued messages), in one
        group commit where the inbox has it: for each, its `Stored` or the exception
        `ingest` would have raised. Returns once every commit is durable.

        Each callback's log lines carry its request id (bound in the caller's context,
        which is left with the last one's)."""
        began = time.perf_counter()
        # Each receipt's outcome by its place: its refusal, or its store's outcome.
        results: dict[int, Stored | BaseException] = {}
        # Each parsed callback: its place, what to store, its pending runs, its events'
        # warnings.
        parsed: list[tuple[int, ToStore, list[tuple[Event, list[str]]], list[list[str]]]] = []
        try:
            for index, receipt in enumerate(receipts):
                bind_contextvars(request_id=receipt.request_id)
                try:
                    normalized = await parse_or_refuse(receipt, self._limits, self)
                except Exception as exc:  # PayloadError, the body kept as rejected, or not
                    results[index] = exc
                    continue
                receipt = _by_its_events_source(receipt, normalized.events)
                routed = [(event, self.router.handlers_for(event)) for event in normalized.events]
                verify = self._verifies(receipt)
                pending = _pending(routed, verify)
                leases = self._handoff.reserve(pending)
                to_store = (receipt, routed, verify, leases)
                parsed.append((index, to_store, pending, normalized.warnings))
        except BaseException:  # cancelled while parsing: nothing stored yet
            for _, (receipt, _, _, leases), _, _ in parsed:
                self._handoff.stored(receipt.request_id, [], leases)
            raise
        try:
            with tracing.storing([item[0].source_meta for _, item, _, _ in parsed]):
                outcomes = await self._inbox.store_many([item for _, item, _, _ in parsed])
        except asyncio.CancelledError:  # the stores go on, and may yet commit
            for _, (_, _, _, leases), _, _ in parsed:
                self._handoff.abandoned(leases)
            raise
        except Exception as exc:  # the inbox is closed: none of them is kept
            outcomes = [exc] * len(parsed)
        for (index, to_store, pending, warnings), stored in zip(parsed, outcomes, strict=True):
            receipt, routed, _, leases = to_store
            if isinstance(stored, BaseException):
                results[index] = self._not_kept(receipt, leases, stored)
                continue
            results[index] = stored
            bind_contextvars(request_id=receipt.request_id)
            self._hand_off(receipt, routed, pending, leases, stored, began, warnings)
        return [results[index] for index in range(len(receipts))]

    def _not_kept(self, receipt: Receipt, leases: Leases, error: BaseException) -> BaseException:
        """A store that failed: the places held for its runs given back, and counted.
        Returns what the caller raises: `IntakeUnavailable` for the database away (the
        inbox logs that once), the error itself otherwise. The sender is asked to send it
        again (503, nack, left undeleted)."""
        self._handoff.stored(receipt.request_id, [], leases)
        self._metrics.series(self._metrics.callbacks, receipt.source, "unavailable").inc()
        if isinstance(error, InboxUnavailable):
            return IntakeUnavailable(str(error))
        return error

    def _hand_off(
        self,
        receipt: Receipt,
        routed: list[tuple[Event, list[str]]],
        pending: list[tuple[Event, list[str]]],
        leases: Leases,
        stored: Stored,
        began: float,
        warnings: list[list[str]],
    ) -> None:
        """Count a committed callback and hand its new events' pending runs to the
        dispatcher, which starts those leased to it now and gives back every other place
        held."""
        new: list[tuple[Event, list[str]]] = []
        try:
            self._kept(receipt, routed, stored, began, warnings)
            if stored.new:
                ids = set(stored.new)
                new = [item for item in pending if item[0].id in ids]
        finally:
            self._handoff.stored(receipt.request_id, new, leases)

    def _kept(
        self,
        receipt: Receipt,
        routed: list[tuple[Event, list[str]]],
        stored: Stored,
        began: float,
        warnings: list[list[str]],
    ) -> None:
        """Count a committed callback. `warnings` are its events' (`Normalized.warnings`)."""
        self._count(receipt, routed, stored)
        self._warn(routed, stored, warnings)
        elapsed = time.perf_counter() - began
        self._metrics.series(self._metrics.ingest_seconds, receipt.source).observe(elapsed)

    def _warn(
        self, routed: list[tuple[Event, list[str]]], stored: Stored, warnings: list[list[str]]
    ) -> None:
        """Count the fields that could not be read, and say which.

        A warning belongs to the entry that sent the field, and is counted when that
        entry's event is first stored: CI sending a callback again counts nothing, and a
        callback that repeats stored entries beside new ones counts only the new ones'
        (an entry repeated within the callback, as a duplicate, counts once)."""
        first = set(stored.new)
        fields: list[str] = []
        for (event, _), names in zip(routed, warnings, strict=True):
            if event.id in first:
                first.discard(event.id)
                fields += names
        if not fields:
            return
        metrics = self._metrics
        for name in fields:
            metrics.series(metrics.field_warnings, name).inc()
        logger.warning(
            "callback fields not understood, kept as sent in the raw document",
            fields=sorted(set(fields)),
        )

    def _verifies(self, receipt: Receipt) -> bool:
        # A stored callback decoded again (`replay --receipt`) is verified as it was
        # the first time: by the source it came from.
        source = receipt.source
        if source == "replay":
            source = receipt.source_meta.get("replayed_source", source)
        return source in self._verified_sources

    async def reject(
        self, receipt: Receipt, error: PayloadError, *, size: int | None = None
    ) -> None:
        metrics = self._metrics
        full_size = len(receipt.body) if size is None else size
        kept = self._rejected.take(receipt.body)
        if (
            kept is None
            and receipt.source in self._refusals_wait_in
            and self._rejected.fits(receipt.body)
        ):
            # Counted when it comes back and is kept; not logged each time: a flood.
            raise RefusedOverBudget(error.reason, error.message)
        metrics.series(metrics.callbacks, receipt.source, "rejected").inc()
        if kept is None:
            # Counted, not kept, and not logged one by one: a flood is what spends the
            # budget. The sender still gets its 4xx: the body was refused either way.
            metrics.series(metrics.rejected_not_kept, receipt.source, error.reason).inc()
            return
        logger.warning(
            "callback rejected", reason=error.reason, detail=error.message, size=full_size
        )
        try:
            await self._inbox.reject(
                replace(receipt, body=kept), error.reason, error.message, size=full_size
            )
        except InboxUnavailable as exc:  # the database away: the inbox logs it once
            raise RejectionNotKept(str(exc)) from exc
        except Exception as exc:
            logger.exception("cannot record the rejected callback", head=receipt.body[:200])
            raise RejectionNotKept(str(exc)) from exc

    def _count(
        self, receipt: Receipt, routed: list[tuple[Event, list[str]]], stored: Stored
    ) -> None:
        metrics = self._metrics
        outcome = "accepted" if stored.new else "duplicate"
        metrics.series(metrics.callbacks, receipt.source, outcome).inc()
        new = set(stored.new)
        for event, handler_names in routed:
            if event.id not in new:
                # CI sending again, or the same callback over a second channel: answered
                # as accepted, kept and handled once.
                logger.info("duplicate event; already stored", event_id=event.id)
                continue
            metrics.series(metrics.events, event.kind, _state_label(event.state)).inc()
            if not handler_names:
                metrics.unrouted.inc()
                logger.info(
                    "no route for event", event_id=event.id, tag=event.tag, state=event.state
                )
