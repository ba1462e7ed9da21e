"""What the admin API and the inspector pages do with the running service: read its
inbox, tell its handlers' state, replay. Both front ends call this; neither talks to
the inbox for anything but plain reads.

Replay follows `ci-receiver replay` to the letter (`receiver.dispatch.replay`): the same choice
of events, the same routes, the same counts, and it wakes this process's dispatcher so
that queued runs start at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol, runtime_checkable

from receiver.admin.params import BadRequest, ReplayRequest
from receiver.dispatch.loop import Dispatcher
from receiver.dispatch.replay import Replayed, chosen, replay
from receiver.inbox import Backlog, EventFilter, Inbox, Stored, Traffic
from receiver.ingest.again import NotDecodedAgain, decode_again
from receiver.ingest.routing import Router
from receiver.sources.backend import Backend
from receiver.upkeep.presence import runnable, running

# The overview's period.
OVERVIEW_HOURS = 24


@runtime_checkable
class KeepsInbox(Backend, Protocol):
    """A backend with an inbox and a dispatcher to inspect: the `Service` (a relay,
    which hands callbacks to TDMQ, keeps none)."""

    inbox: Inbox
    dispatcher: Dispatcher


class NotAvailable(Exception):
    """This process keeps no inbox (relay mode): there is nothing to inspect here."""


@dataclass(slots=True)
class HandlerState:
    name: str
    status: str  # started, starting, not started: <its error>; "not configured" for old runs
    started: bool
    pending: int
    dead: int
    oldest_due: datetime | None


@dataclass(slots=True)
class Overview:
    since: datetime
    traffic: Traffic
    handlers: list[HandlerState]


class Inspection:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def _service(self) -> KeepsInbox:
        """The service behind the admin listener: a relay keeps no inbox to inspect."""
        if not isinstance(self._backend, KeepsInbox):
            raise NotAvailable(
                "this process relays callbacks to TDMQ and keeps no inbox: inspect the"
                " consumers' inbox instead"
            )
        return self._backend

    @property
    def inbox(self) -> Inbox:
        return self._service.inbox

    @property
    def handler_names(self) -> list[str]:
        return list(self._backend.config.handlers)

    async def handlers(self) -> list[HandlerState]:
        """Every configured handler (and any other with work left in the inbox, such as
        the verification step, or a handler since removed from the config)."""
        backlog = await self.inbox.backlog()
        status = self._service.dispatcher.handler_status()
        started = self._service.dispatcher.handler_started()
        names = list(status) + sorted(name for name in backlog if name not in status)
        empty = Backlog(0, 0, None)
        return [
            HandlerState(
                name,
                status.get(name, "not configured"),
                started.get(name, False),
                backlog.get(name, empty).pending,
                backlog.get(name, empty).dead,
                backlog.get(name, empty).oldest_due,
            )
            for name in names
        ]

    async def overview(self, step: int = 60) -> Overview:
        now = datetime.now(timezone.utc)
        # Whole steps: the first bar of the chart is not a part of one.
        start = (now - timedelta(hours=OVERVIEW_HOURS)).timestamp() // step * step + step
        since = datetime.fromtimestamp(start, timezone.utc)
        traffic = await self.inbox.traffic(since, step=step)
        return Overview(since, traffic, await self.handlers())

    async def last_error(self, handler: str) -> str | None:
        """The error of the run dead-lettered last for `handler` (the newest event's)."""
        found = await self.inbox.events(EventFilter(status="dead", handler=handler), limit=1)
        runs = [run for summary in found for run in summary.runs if run.handler == handler]
        return runs[0].last_error if runs else None

    async def replay(self, request: ReplayRequest) -> Replayed:
        """`ci-receiver replay` with these options; BadRequest for what it would refuse."""
        matching = request.filter.event_filter() if request.filter else EventFilter()
        if not (request.events or request.all or request.dead or matching != EventFilter()):
            raise BadRequest("say what to replay: events, a filter, dead or all")
        if request.all and not (request.handlers or request.dead):
            raise BadRequest("all runs handlers over every stored event: name them in handlers")
        if request.events and (request.all or request.filter):
            raise BadRequest("events are named: leave out all and filter")
        unknown = [name for name in request.handlers if name not in self.handler_names]
        if unknown:
            known = ", ".join(self.handler_names)
            raise BadRequest(f"handlers: not configured: {', '.join(unknown)} (known: {known})")
        if request.dead:
            if matching.status not in (None, "dead"):
                raise BadRequest("filter.status: dead replays dead-lettered runs only")
            matching.status = "dead"
            if len(request.handlers) == 1:  # only events with a dead run of that handler
                matching.handler = request.handlers[0]
        events = await chosen(self.inbox, list(request.events), matching)
        if not events.count:
            return Replayed()
        done = await replay(
            self.inbox,
            Router(self._service.config.routes, self.handler_names),
            events,
            handlers=list(request.handlers),
            runnable=runnable(await running(self.inbox), self.handler_names),
            dead_only=request.dead,
            ignore_routes=request.ignore_routes,
            dry_run=request.dry_run,
            release=bool(request.events),  # named ones run whatever verification said
        )
        if done.runs and not request.dry_run:
            self._service.dispatcher.wake()
        return done

    async def replay_receipt(self, receipt_id: int) -> Stored:
        """Decode a stored callback again (`replay --receipt`), as the CLI does."""
        try:
            return await decode_again(self.inbox, self._service.ingestor, receipt_id)
        except NotDecodedAgain as exc:
            raise BadRequest(str(exc), status=exc.status) from None
