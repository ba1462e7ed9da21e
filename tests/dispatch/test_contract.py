"""The handler contract as the dispatcher applies it (on SQLite and PostgreSQL, the
`inbox` fixture): the `Context` a handler asks for, the first one-argument contract
kept, and each handler's event its own."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog

from handlers import Context, Handler, Retry, calling, takes_context
from receiver import parse_callback
from receiver.callback.event import Event
from tests.dispatch.test_handoff import receipt, service
from tests.dispatch.test_loop import dispatcher, settled, statuses, store, until
from tests.support.callbacks import load


class Seeing(Handler):
    """Keeps the context of every attempt; fails the first `failures`."""

    def __init__(self, failures: int = 0) -> None:
        self.seen: list[tuple[Context, float]] = []
        self.failures = failures

    async def __call__(self, event: Event, ctx: Context) -> None:
        self.seen.append((ctx, ctx.seconds_left()))
        ctx.log.info("handling", tag=event.tag)
        if len(self.seen) <= self.failures:
            raise Retry("not yet")


async def test_a_handler_that_takes_a_context_knows_its_attempt(inbox):
    seeing = Seeing(failures=2)
    (event_id,) = await store(inbox, "transcode.xml", ["hook"])
    d = dispatcher(inbox, hook=(seeing, {"max_attempts": 3, "timeout": 7}))
    with structlog.testing.capture_logs() as logs:
        await d.start()
        await until(lambda: settled(inbox, event_id))
        await d.stop()
    assert await statuses(inbox, event_id) == {"hook": ("done", 3)}
    contexts = [ctx for ctx, _ in seeing.seen]
    assert [(c.handler, c.attempt, c.max_attempts, c.last) for c in contexts] == [
        ("hook", 1, 3, False),
        ("hook", 2, 3, False),
        ("hook", 3, 3, True),
    ]
    for ctx, left in seeing.seen:
        assert 6 < left <= 7
        assert ctx.deadline <= time.monotonic() + 7
    lines = [line for line in logs if line["event"] == "handling"]
    assert [(line["event_id"], line["handler"], line["attempt"]) for line in lines] == [
        (event_id, "hook", 1),
        (event_id, "hook", 2),
        (event_id, "hook", 3),
    ]


async def test_the_first_contract_is_called_with_the_event_alone(inbox):
    seen: list[str] = []

    async def plain(event):
        seen.append(event.id)

    (event_id,) = await store(inbox, "transcode.xml", ["plain"])
    d = dispatcher(inbox, plain=(plain, {}))
    await d.start()
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert seen == [event_id]


class Meddling:
    """Changes the event it is given, then lets the other handler look."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate

    async def __call__(self, event: Event) -> None:
        event.tag = "Meddled"
        event.outputs.clear()
        event.raw.clear()
        self.gate.set()


class Looking:
    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.seen: list[tuple[str | None, int, bool]] = []

    async def __call__(self, event: Event) -> None:
        await asyncio.wait_for(self.gate.wait(), 5)
        self.seen.append((event.tag, len(event.outputs), bool(event.raw)))


@pytest.mark.parametrize("free_places", [True, False], ids=["started-at-store", "claimed"])
async def test_no_handler_sees_what_another_changed_in_its_event(inbox, free_places):
    gate = asyncio.Event()
    looking = Looking(gate)
    # Without a free place at store time, the runs are claimed, the event read from
    # what this process holds (`FreshEvents`) rather than from the inbox.
    places = {} if free_places else {"concurrency": 1}
    busy = [Looking(asyncio.Event())] if not free_places else []
    handlers = {"meddling": (Meddling(gate), places), "looking": (looking, places)}
    watched, d, ingestor = await service(inbox, **handlers)
    if busy:  # hold both handlers' only place until the callback is stored
        for slot in d._handlers:
            slot.running += 1
    stored = await ingestor.ingest(receipt(load("transcode.xml")))
    if busy:
        for slot in d._handlers:
            slot.running -= 1
        d.wake()
    (event_id,) = stored.new
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    (pristine,) = parse_callback(load("transcode.xml"))
    assert looking.seen == [(pristine.tag, len(pristine.outputs), True)]
    assert pristine.outputs
    assert watched.claimed == (0 if free_places else 2)


def test_which_handlers_take_a_context():
    async def alone(event): ...
    async def both(event, ctx): ...
    async def anything(*args): ...
    async def own_extra(event, extra=None): ...

    class Method:
        async def __call__(self, event, ctx=None): ...

    class Named:
        async def __call__(self, event, context: Context | None = None): ...

    handlers = (alone, both, anything, own_extra, Method(), Named())
    assert [takes_context(h) for h in handlers] == [False, True, False, False, True, True]
    with pytest.raises(TypeError, match="takes a Context"):
        calling(both)(None, None)  # type: ignore[arg-type]


def test_a_copy_of_an_event_is_equal_and_shares_nothing():
    from receiver.testing import samples

    for name, original in samples().items():
        copy = original.copy()
        assert copy == original, name
        assert copy.raw is not original.raw
        assert copy.outputs is not original.outputs


async def test_the_context_links_to_the_inspector_the_service_was_given(inbox):
    from receiver.config import HandlerConfig
    from receiver.dispatch.loop import Dispatcher
    from receiver.dispatch.slots import Slot
    from receiver.metrics import Metrics

    seeing = Seeing()
    (event_id,) = await store(inbox, "transcode.xml", ["hook"])
    slot = Slot("hook", seeing, HandlerConfig(type="test"))
    d = Dispatcher(
        inbox, [slot], Metrics(), poll_interval=0.05, inspector_url="https://ci.example.com/i"
    )
    await d.start()
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    [(ctx, _)] = seeing.seen
    assert ctx.inspector_url == "https://ci.example.com/i"
