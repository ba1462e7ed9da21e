"""Replay: choose stored events and queue their handler runs again.

Events are chosen by id, or by a filter (every event, for `--all`), and gone through in
pages, each read as its turn comes. Runs are queued for the handlers named (created where
missing; with `dead_only`, their dead-lettered runs only), or, with none named, the runs
the events already have (only dead-lettered ones, with `dead_only`) of the handlers some
process runs: queued for a handler removed from every config, a run would wait forever.
A handler named runs only events the current routes send to it, unless routes are
ignored: the same choice ingest would make today.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from receiver.inbox import EventFilter, Reading, RunQueue
from receiver.ingest.routing import Router

PAGE = 500


class Replaying(Reading, RunQueue, Protocol):
    """Replay reads the events it chooses and queues their runs again."""


@dataclass(slots=True)
class Replayed:
    events: int = 0  # events chosen
    runs: int = 0  # runs queued (with dry_run: that would be)
    # Per handler named: events chosen that the routes do not send to it.
    unrouted: dict[str, int] = field(default_factory=dict)
    # With no handler named: runs of handlers no process runs, by handler, left as they are.
    unrun: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Chosen:
    """The events a replay goes through: how many, and their ids a page at a time (a
    replay of millions never holds them all)."""

    count: int
    pages: AsyncIterator[list[str]]


async def chosen(inbox: Reading, event_ids: list[str] | None, filter: EventFilter | None) -> Chosen:
    """The events named (those that exist), or those matching `filter` as it starts: one
    stored while it goes is not chosen (its runs are new already)."""
    if event_ids:
        known = await inbox.known(event_ids)
        named = [event_id for event_id in event_ids if event_id in known]
        return Chosen(len(named), _pages_of(named))
    count, newest = await inbox.matching(filter)
    return Chosen(count, _pages_matching(inbox, filter, newest))


async def _pages_of(event_ids: list[str]) -> AsyncIterator[list[str]]:
    for start in range(0, len(event_ids), PAGE):
        yield event_ids[start : start + PAGE]


async def _pages_matching(
    inbox: Reading, filter: EventFilter | None, newest: int
) -> AsyncIterator[list[str]]:
    after = 0
    while page := await inbox.event_ids(filter, limit=PAGE, after=after, through=newest):
        yield [event_id for _, event_id in page]
        after = page[-1][0]


async def replay(
    inbox: Replaying,
    router: Router,
    events: Chosen,
    *,
    handlers: list[str],
    runnable: Collection[str],
    dead_only: bool,
    ignore_routes: bool = False,
    dry_run: bool = False,
    release: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Replayed:
    """Queue again the runs of these events; `release` (events the user named) runs
    them even if held or forged by verification. With no handler named, only the runs
    of `runnable` handlers (`presence.runnable`) are. `progress` is told how many events
    each page held."""
    done = Replayed()
    async for page in events.pages:
        done.events += len(page)
        if handlers and not ignore_routes:
            loaded = await inbox.load(page)
            for handler in handlers:
                routed = [e.id for e in loaded if handler in router.handlers_for(e)]
                if not dead_only:  # (dead ones: these events may have no run of it)
                    unrouted = len(page) - len(routed)
                    done.unrouted[handler] = done.unrouted.get(handler, 0) + unrouted
                if routed:
                    done.runs += await inbox.requeue(
                        routed, [handler], dead_only=dead_only, dry_run=dry_run, release=release
                    )
        elif handlers:
            done.runs += await inbox.requeue(
                page, handlers, dead_only=dead_only, dry_run=dry_run, release=release
            )
        else:
            done.runs += await inbox.requeue(
                page, None, among=list(runnable), dead_only=dead_only, dry_run=dry_run,
                release=release,
            )  # fmt: skip
            for handler, count in (await inbox.runs_by_handler(page, dead_only)).items():
                if handler not in runnable:
                    done.unrun[handler] = done.unrun.get(handler, 0) + count
        if progress is not None:
            progress(len(page))
    return done
