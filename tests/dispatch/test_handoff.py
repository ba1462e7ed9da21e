"""Runs stored by this process start at once: their places held while the callback is
stored, the runs stored leased to this process, no claim made (on SQLite and PostgreSQL,
the `inbox` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone

import orjson
import structlog

from receiver import parse_callback
from receiver.callback.decode import Limits
from receiver.callback.event import Event
from receiver.config import HandlerConfig
from receiver.dispatch.slots import Slot, unmasked
from receiver.inbox import InboxUnavailable, Receipt
from receiver.ingest import ingest as ingest_module
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
        self.asked_for: set[str] = set()  # the handlers whose runs claims asked for
        self.claiming = 0
        self.failing_stores = 0

    def __getattr__(self, name: str):
        return getattr(self.inbox, name)

    async def claim(self, handler: str, *args, **kwargs):
        self.claiming += 1
        try:
            claims = await self.inbox.claim(handler, *args, **kwargs)
        finally:
            self.claiming -= 1
            self.asked_for.add(handler)
        self.claimed += len(claims)
        return claims

    async def store(self, *args, **kwargs):
        if self.failing_stores:
            self.failing_stores -= 1
            raise InboxUnavailable("the database is away")
        return await self.inbox.store(*args, **kwargs)


def receipt(body: bytes, request_id: str = "req") -> Receipt:
    return Receipt(body, "http", datetime.now(timezone.utc), request_id)


class SlowClaims(Watched):
    """Claims that take 0.1 s (their round trip, stretched)."""

    async def claim(self, handler: str, *args, **kwargs):
        await asyncio.sleep(0.1)
        return await super().claim(handler, *args, **kwargs)


class CommitsWhenGivenUp(Watched):
    """Stores that go on and commit when their caller is cancelled, as the SQLite
    writer's and the PostgreSQL group commit's do, and take 0.05 s to."""

    async def store(self, *args, **kwargs):
        self.under_way = asyncio.ensure_future(self.inbox.store(*args, **kwargs))
        await asyncio.sleep(0.05)
        return await self.under_way


# Longer than any test here: the loop claims only when something wakes it.
QUIET_POLL_SECONDS = 60.0


async def service(inbox, watched_as=Watched, **handlers):
    """A started dispatcher of these handlers, and an ingestor handing off to it.

    The loop is idle once this returns: its first claims made, and no other until
    something wakes it. A claim under way holds the places it asks for, so a callback
    stored meanwhile would be claimed rather than started at once, and the tests counting
    claims would count it."""
    watched = watched_as(inbox)
    d = dispatcher(watched, poll=QUIET_POLL_SECONDS, **handlers)
    await d.start()
    await until(lambda: _started(d))
    await until(lambda: _idle(watched, handlers))
    ingestor = Ingestor(watched, Router(None, list(handlers)), Metrics(), Limits(), handoff=d)
    return watched, d, ingestor


async def _started(d) -> bool:
    return all(d.handler_started().values())


async def _idle(watched: Watched, handlers: dict) -> bool:
    return watched.asked_for >= set(handlers) and not watched.claiming


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
    leases = d.reserve([(event, ["h"])])
    assert list(leases) == [(event.id, "h")]
    stopping = asyncio.create_task(d.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waiting for the store
    assert d.reserve([(event, ["h"])]) == {}  # no new places once stopping
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


async def test_a_callback_stored_during_a_claim_waits_for_a_place(inbox):
    one = Recording(delay=0.3)
    _watched, d, ingestor = await service(inbox, SlowClaims, h=(one, {"concurrency": 1}))
    (waiting,) = (await inbox.store(receipt(job("jelsewhere")), [(e, ["h"]) for e in
                  parse_callback(job("jelsewhere"))])).new  # fmt: skip
    d.wake()
    await asyncio.sleep(0.05)  # the loop's claim is under way, its place taken
    (mine,) = (await ingestor.ingest(receipt(job("jmine")))).new
    await until(lambda: settled(inbox, waiting))
    await until(lambda: settled(inbox, mine))
    await d.stop()
    assert one.most_running == 1
    assert sorted(one.calls) == sorted([waiting, mine])


async def test_a_store_given_up_on_hands_its_leased_runs_back(inbox):
    handler = Recording()
    watched, d, ingestor = await service(inbox, CommitsWhenGivenUp, h=(handler, {}))
    ingesting = asyncio.create_task(ingestor.ingest(receipt(job("jgivenup"))))
    await asyncio.sleep(0.01)
    ingesting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ingesting
    (event_id,) = (await watched.under_way).new  # it committed, leased to this process
    # Handed back once the store must have ended, and claimed: not left to its lease.
    await until(lambda: settled(inbox, event_id), timeout=5.0)
    await d.stop()
    assert handler.calls == [event_id]
    assert watched.claimed == 1


async def test_a_run_whose_handler_a_reload_replaced_meanwhile_is_handed_back(inbox):
    old, new = Recording(), Recording()
    _, d, _ = await service(inbox, h=(old, {}))
    body = job("jreloaded")
    (event,) = parse_callback(body)
    leases = d.reserve([(event, ["h"])])
    d.replace_handlers([Slot("h", new, HandlerConfig(type="test", timeout=7))], unmasked)
    await asyncio.sleep(0.2)  # the loop swaps the handlers
    await inbox.store(receipt(body), [(event, ["h"])], leases=leases)
    d.stored("req", [(event, ["h"])], leases)
    await until(lambda: settled(inbox, event.id), timeout=5.0)
    await d.stop()
    assert (old.calls, new.calls) == ([], [event.id])


async def test_handing_back_a_replaced_handlers_run_leaves_the_others_leased(inbox):
    # The event's runs of both handlers are leased under the callback's one token; a
    # reload replaces `b` while it is stored. Only b's run is handed back: a's, started,
    # stays leased to its attempt (else claimed again and run twice at once, and its
    # outcome refused for the lease it lost).
    a, old_b, new_b = Recording(delay=0.5), Recording(), Recording()
    _, d, _ = await service(inbox, a=(a, {}), b=(old_b, {}))
    body = job("jtwohandlers")
    (event,) = parse_callback(body)
    routed = [(event, ["a", "b"])]
    leases = d.reserve(routed)
    d.replace_handlers(
        [
            d._handlers.get("a"),
            Slot("b", new_b, HandlerConfig(type="test", timeout=7)),
        ],
        unmasked,
    )
    await asyncio.sleep(0.2)  # the loop swaps the handlers
    await inbox.store(receipt(body), routed, leases=leases)
    d.stored("req", routed, leases)
    await until(lambda: settled(inbox, event.id), timeout=5.0)
    await d.stop()
    assert (a.calls, old_b.calls, new_b.calls) == ([event.id], [], [event.id])
    assert a.most_running == 1
    assert await statuses(inbox, event.id) == {"a": ("done", 1), "b": ("done", 1)}


async def test_an_event_named_twice_in_a_callback_runs_once_and_is_not_kept(inbox):
    handler = Recording()
    watched, d, ingestor = await service(inbox, h=(handler, {}))
    detail = orjson.loads(job("jnamedtwice"))["JobsDetail"]
    body = orjson.dumps({"EventName": "TaskFinish", "JobsDetail": [detail, detail]})
    (event_id,) = (await ingestor.ingest(receipt(body))).new
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert handler.calls == [event_id]
    assert watched.claimed == 0
    # Nothing waits in memory for a claim that never comes.
    assert event_id not in d._fresh.events


async def test_a_batch_cancelled_while_parsing_holds_no_place(inbox, monkeypatch):
    handler = Recording()
    _, d, ingestor = await service(inbox, h=(handler, {"concurrency": 2}))
    parse = ingest_module.parse_or_refuse
    parsed = 0

    async def second_never_ends(*args):
        nonlocal parsed
        parsed += 1
        if parsed == 2:
            await asyncio.sleep(60)
        return await parse(*args)

    monkeypatch.setattr(ingest_module, "parse_or_refuse", second_never_ends)
    batch = [receipt(job("jbatch1"), "r1"), receipt(job("jbatch2"), "r2")]
    ingesting = asyncio.create_task(ingestor.ingest_many(batch))
    await asyncio.sleep(0.1)
    ingesting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ingesting
    began = asyncio.get_running_loop().time()
    await d.stop()  # waits for no place: none is held
    assert asyncio.get_running_loop().time() - began < 2.0
