"""Runs stored by this process start at once: their places held while the callback is
stored, the runs stored leased to this process, no claim made (on SQLite and PostgreSQL,
the `inbox` fixture)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import structlog

from receiver import parse_callback
from receiver.callback.decode import Limits
from receiver.callback.event import Event
from receiver.inbox import InboxUnavailable, Receipt
from receiver.ingest.ingest import Ingestor, IntakeUnavailable
from receiver.ingest.routing import Router
from receiver.metrics import Metrics
from tests.dispatch.test_loop import Recording, dispatcher, settled, statuses, until
from tests.support.callbacks import job


class Watched:
    """The inbox, counting the runs that claims took, and failing the stores it is told
    to."""

    def __init__(self, inbox) -> None:
        self.inbox = inbox
        self.claimed = 0
        self.failing_stores = 0

    def __getattr__(self, name: str):
        return getattr(self.inbox, name)

    async def claim(self, *args, **kwargs):
        claims = await self.inbox.claim(*args, **kwargs)
        self.claimed += len(claims)
        return claims

    async def store(self, *args, **kwargs):
        if self.failing_stores:
            self.failing_stores -= 1
            raise InboxUnavailable("the database is away")
        return await self.inbox.store(*args, **kwargs)


def receipt(body: bytes, request_id: str = "req") -> Receipt:
    return Receipt(body, "http", datetime.now(timezone.utc), request_id)


async def service(inbox, **handlers):
    """A started dispatcher of these handlers, and an ingestor handing off to it."""
    watched = Watched(inbox)
    d = dispatcher(watched, **handlers)
    await d.start()
    await until(lambda: _started(d))
    ingestor = Ingestor(watched, Router(None, list(handlers)), Metrics(), Limits(), handoff=d)
    return watched, d, ingestor


async def _started(d) -> bool:
    return all(d.handler_started().values())


async def test_a_run_stored_here_starts_without_a_claim(inbox):
    handler = Recording()
    watched, d, ingestor = await service(inbox, h=(handler, {}))
    stored = await ingestor.ingest(receipt(job("jhere")))
    (event_id,) = stored.new
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert handler.calls == [event_id]
    assert watched.claimed == 0
    assert await statuses(inbox, event_id) == {"h": ("done", 1)}


async def test_runs_beyond_the_free_places_are_claimed(inbox):
    slow = Recording(delay=0.2)
    watched, d, ingestor = await service(inbox, h=(slow, {"concurrency": 1}))
    stored = await asyncio.gather(*(ingestor.ingest(receipt(job(f"jfull{i}"))) for i in range(3)))
    ids = [s.new[0] for s in stored]
    for event_id in ids:
        await until(lambda event_id=event_id: settled(inbox, event_id))
    await d.stop()
    assert sorted(slow.calls) == sorted(ids)
    assert slow.most_running == 1
    assert watched.claimed == 2  # the first took the one place as it was stored


async def test_a_duplicate_gives_its_place_back(inbox):
    handler = Recording()
    watched, d, ingestor = await service(inbox, h=(handler, {"concurrency": 1}))
    (first,) = (await ingestor.ingest(receipt(job("jonce")))).new
    await until(lambda: settled(inbox, first))
    assert (await ingestor.ingest(receipt(job("jonce")))).duplicates == [first]
    # Had the duplicate kept the only place, this one could never run.
    (second,) = (await ingestor.ingest(receipt(job("jtwice")))).new
    await until(lambda: settled(inbox, second))
    await d.stop()
    assert handler.calls == [first, second]
    assert watched.claimed == 0


async def test_a_store_that_fails_gives_its_places_back(inbox):
    handler = Recording()
    watched, d, ingestor = await service(inbox, h=(handler, {"concurrency": 1}))
    watched.failing_stores = 1
    try:
        await ingestor.ingest(receipt(job("jaway")))
    except IntakeUnavailable:
        pass
    else:
        raise AssertionError("the store did not fail")
    (event_id,) = (await ingestor.ingest(receipt(job("jaway")))).new
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert handler.calls == [event_id]
    assert watched.claimed == 0


async def test_stop_waits_for_a_callback_being_stored_and_runs_it(inbox):
    handler = Recording()
    _, d, _ = await service(inbox, h=(handler, {}))
    body = job("jstopping")
    (event,) = parse_callback(body)
    leases = d.reserve("req", [(event, ["h"])])
    assert list(leases) == [(event.id, "h")]
    stopping = asyncio.create_task(d.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waiting for the store
    assert d.reserve("req2", [(event, ["h"])]) == {}  # no new places once stopping
    stored = await inbox.store(receipt(body), [(event, ["h"])], leases=leases)
    d.stored("req", [(event, ["h"])], leases)
    await stopping
    assert stored.new == [event.id]
    assert handler.calls == [event.id]
    assert await statuses(inbox, event.id) == {"h": ("done", 1)}


async def test_an_attempt_carries_its_own_context_not_the_requests(inbox):
    seen: list[dict] = []

    async def look(event: Event) -> None:
        seen.append(structlog.contextvars.get_contextvars())

    _, d, ingestor = await service(inbox, h=(look, {}))
    structlog.contextvars.bind_contextvars(bound_by_the_request="yes")
    try:
        (event_id,) = (await ingestor.ingest(receipt(job("jcontext"), "req-9"))).new
    finally:
        structlog.contextvars.unbind_contextvars("bound_by_the_request")
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert seen == [{"request_id": "req-9", "event_id": event_id, "handler": "h"}]
