"""Backlog gauges: what waits in the inbox, looked at every few seconds.

Alerts need them ("dead letters exist", "the backlog grows", "the oldest run waits too
long"), and counting at every scrape would put a query on the scraper's schedule. On a
PostgreSQL inbox every replica reports the same shared backlog: aggregate with max().
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Gauge

from receiver.inbox import Inbox

logger = structlog.get_logger("ci_receiver.monitor")

INTERVAL_SECONDS = 15.0
# Under `serve --workers`, every worker measures the same shared inbox: its latest
# figure is the one shown.
SHARED: Final = "livemostrecent"


class BacklogMonitor:
    name = "backlog"

    def __init__(
        self,
        inbox: Inbox,
        handlers: list[str],
        registry: CollectorRegistry | None = None,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self._inbox = inbox
        self.handlers = handlers  # a config reload replaces them
        self._interval = interval
        self._pending = Gauge(
            "ci_receiver_pending_runs",
            "Handler runs waiting in the inbox (due now or later), by handler.",
            ["handler"],
            registry=registry,
            multiprocess_mode=SHARED,
        )
        self._dead = Gauge(
            "ci_receiver_dead_letters",
            "Dead-lettered handler runs in the inbox, by handler.",
            ["handler"],
            registry=registry,
            multiprocess_mode=SHARED,
        )
        self._oldest = Gauge(
            "ci_receiver_oldest_due_seconds",
            "How long the oldest due run of a handler has been waiting (0: none waits).",
            ["handler"],
            registry=registry,
            multiprocess_mode=SHARED,
        )
        self._size = Gauge(
            "ci_receiver_inbox_bytes",
            "Bytes the inbox takes on disk.",
            registry=registry,
            multiprocess_mode=SHARED,
        )
        self._seen: set[str] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.update()
            except Exception as exc:  # the inbox failing shows in /readyz and the logs
                logger.debug("backlog not measured", error=str(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    def stop(self) -> None:
        self._stopping.set()

    async def update(self) -> None:
        backlog = await self._inbox.backlog()
        now = datetime.now(timezone.utc)
        # Handlers seen before keep a series: back to 0 once their backlog is gone.
        self._seen.update(self.handlers, backlog)
        for handler in self._seen:
            entry = backlog.get(handler)
            self._pending.labels(handler).set(entry.pending if entry else 0)
            self._dead.labels(handler).set(entry.dead if entry else 0)
            waited = (now - entry.oldest_due).total_seconds() if entry and entry.oldest_due else 0
            self._oldest.labels(handler).set(max(waited, 0.0))
        self._size.set(await self._inbox.size())
