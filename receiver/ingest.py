"""The one way a callback gets in, whatever its channel: decode, route, commit."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from receiver.events import parse_callback
from receiver.inbox import VERIFY_RUN, Inbox, Receipt, Stored
from receiver.metrics import Metrics
from receiver.model import Event
from receiver.payload import Limits, PayloadError
from receiver.routing import Router

logger = structlog.get_logger("ci_receiver.ingest")

# Bodies this large are parsed off the event loop so that other requests keep moving.
THREAD_PARSE_BYTES = 64 * 1024


async def parse_or_refuse(receipt: Receipt, limits: Limits, intake: Intake) -> list[Event]:
    """Decode and normalize a receipt's body. A body that cannot be is first kept through
    `intake.reject`, then its `PayloadError` is raised."""
    try:
        return await _parse(receipt, limits)
    except PayloadError as error:
        await intake.reject(receipt, error)
        raise


async def _parse(receipt: Receipt, limits: Limits) -> list[Event]:
    work = functools.partial(
        parse_callback,
        receipt.body,
        receipt.headers,
        source=receipt.source,
        source_meta=receipt.source_meta,
        received_at=receipt.received_at,
        limits=limits,
    )
    if len(receipt.body) > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(work)
    return work()


# The states CI documents; any other value a callback carries counts as "other", so that
# what a sender writes cannot grow the metric series without bound.
KNOWN_STATES = frozenset({"Submitted", "Running", "Success", "Failed", "Pause", "Cancel"})


def _state_label(state: str | None) -> str:
    return state if state in KNOWN_STATES else "other"


class RejectionNotKept(Exception):
    """A body was refused and could not be kept either: the sender should send it again."""


class Intake(Protocol):
    """Where a source hands its callbacks: the `Ingestor` below, or the TDMQ relay."""

    async def ingest(self, receipt: Receipt) -> Stored:
        """Keep the callback; raise `PayloadError` for a body refused (and kept), or
        `RejectionNotKept` for one refused that could not be kept."""
        ...

    async def reject(
        self, receipt: Receipt, error: PayloadError, *, size: int | None = None
    ) -> None:
        """Keep a refused body for inspection; raise `RejectionNotKept` if it cannot be."""
        ...


class Ingestor:
    def __init__(
        self,
        inbox: Inbox,
        router: Router,
        metrics: Metrics,
        limits: Limits,
        on_stored: Callable[[list[tuple[Event, list[str]]]], None],
        verified_sources: frozenset[str] = frozenset(),
    ) -> None:
        self._inbox = inbox
        self._router = router
        self._metrics = metrics
        self._limits = limits
        self._on_stored = on_stored
        # Events from these sources wait for verification (receiver/verify.py).
        self._verified_sources = verified_sources

    async def ingest(self, receipt: Receipt) -> Stored:
        """Commit the callback and its events; raise `PayloadError` after recording a
        body that cannot be decoded. Returns only once the commit is durable."""
        began = time.perf_counter()
        events = await parse_or_refuse(receipt, self._limits, self)
        routed = [(event, self._router.handlers_for(event)) for event in events]
        verify = self._verifies(receipt)
        stored = await self._inbox.store(receipt, routed, verify=verify)
        self._count(receipt, routed, stored)
        elapsed = time.perf_counter() - began
        self._metrics.series(self._metrics.ingest_seconds, receipt.source).observe(elapsed)
        if stored.new:
            new = set(stored.new)
            self._on_stored(
                [(event, [VERIFY_RUN] if verify else names) for event, names in routed
                 if event.id in new]
            )  # fmt: skip
        return stored

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
        self._metrics.series(self._metrics.callbacks, receipt.source, "rejected").inc()
        logger.warning(
            "callback rejected",
            reason=error.reason,
            detail=error.message,
            size=size or len(receipt.body),
        )
        try:
            await self._inbox.reject(receipt, error.reason, error.message, size=size)
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
                continue
            metrics.series(metrics.events, event.kind, _state_label(event.state)).inc()
            if not handler_names:
                metrics.unrouted.inc()
                logger.info(
                    "no route for event", event_id=event.id, tag=event.tag, state=event.state
                )
