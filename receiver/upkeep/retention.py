"""Retention: prune what is finished and old from the inbox, in the background.

Each pass removes, batch by batch, what `[retention]` allows (see `Upkeep.prune`: pending,
held and dead-lettered work is never touched), pausing between batches so that storing
callbacks never waits long behind it, then gives the freed space back (`compact`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import structlog
from prometheus_client import CollectorRegistry, Counter

from receiver.config import RetentionConfig
from receiver.inbox import Cutoffs, InboxUnavailable, Pruned, Upkeep

logger = structlog.get_logger("ci_receiver.retention")

BATCH = 500
# Between batches: what a callback waits at most behind pruning is one batch.
PAUSE_SECONDS = 0.05


def retention_cutoffs(retention: RetentionConfig, now: datetime) -> Cutoffs:
    """What `[retention]` lets go at `now`: each kind received before its moment (a
    duration of 0 keeps that kind for ever)."""

    def before(seconds: float) -> datetime | None:
        return now - timedelta(seconds=seconds) if seconds else None

    return Cutoffs(before(retention.events), before(retention.bodies), before(retention.refused))


class Pruner:
    name = "retention"

    def __init__(
        self, inbox: Upkeep, config: RetentionConfig, registry: CollectorRegistry | None = None
    ) -> None:
        self._inbox = inbox
        self._config = config
        pruned = Counter(
            "ci_receiver_pruned",
            "What retention removed from the inbox: events, receipts, bodies, bytes.",
            ["what"],
            registry=registry,
        )
        self._counted = {what: pruned.labels(what) for what in ("events", "receipts", "bodies")}
        self._bytes = pruned.labels("bytes")
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """A pass now, then one every `interval`, until stopped."""
        while not self._stopping.is_set():
            try:
                pruned = await self.prune()
            except InboxUnavailable as exc:  # the inbox says so itself, once
                logger.debug("retention pass failed: the inbox is unavailable", error=str(exc))
            except Exception:  # the inbox failed: the next pass tries again
                logger.exception("retention pass failed")
            else:
                if pruned:
                    logger.info(
                        "pruned the inbox",
                        events=pruned.events,
                        receipts=pruned.receipts,
                        bodies=pruned.bodies,
                        bytes=pruned.bytes,
                    )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._config.interval)

    def stop(self) -> None:
        self._stopping.set()

    async def prune(
        self,
        *,
        now: datetime | None = None,
        progress: Callable[[Pruned], None] | None = None,
    ) -> Pruned:
        """One whole pass (what it would remove: `Reading.prunable`). Stops between
        batches when stopped."""
        cutoffs = retention_cutoffs(self._config, now or datetime.now(timezone.utc))
        total = Pruned()
        while not self._stopping.is_set():
            batch = await self._inbox.prune(cutoffs, limit=BATCH)
            if not batch:
                break
            total += batch
            self._count(batch)
            if progress is not None:
                progress(batch)
            await asyncio.sleep(PAUSE_SECONDS)
        if total:
            await self._inbox.compact()
        return total

    def _count(self, batch: Pruned) -> None:
        for what, counter in self._counted.items():
            counter.inc(getattr(batch, what))
        self._bytes.inc(batch.bytes)
