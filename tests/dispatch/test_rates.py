"""Rate limits as the dispatcher keeps them (on SQLite and PostgreSQL, the `inbox_place`
fixture): never more starts in a window than the rate, by every process on the inbox
together; waiting for a turn is no attempt."""

from __future__ import annotations

import asyncio
import time

import orjson

from receiver.inbox import InboxUnavailable
from tests.dispatch.test_batches import Batches, all_settled, run_until_settled, store_jobs
from tests.dispatch.test_loop import Recording, dispatcher, statuses, until


class Timed(Recording):
    """Records when each attempt started."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.started: list[float] = []

    async def __call__(self, event) -> None:
        self.started.append(time.monotonic())
        await super().__call__(event)


def most_in_a_window(starts: list[float], seconds: float) -> int:
    starts = sorted(starts)
    return max(sum(1 for other in starts if start <= other < start + seconds) for start in starts)


async def test_attempts_start_no_faster_than_the_rate(inbox_place):
    inbox = await inbox_place.open()
    timed = Timed()
    ids = await store_jobs(inbox, 7, handler="robot")
    d = dispatcher(inbox, robot=(timed, {"rate": "3/1s", "max_attempts": 1}))
    began = time.monotonic()
    await d.start()
    await until(lambda: _started(timed, 3))
    # Held for the rate: pending in the inbox, as the backlog gauge reads it.
    assert (await inbox.backlog())["robot"].pending >= 4
    await until(lambda: all_settled(inbox, ids))
    await d.stop()
    assert len(timed.started) == 7
    # The window is the database's clock, this the test's: a little slack at its edges.
    assert most_in_a_window(timed.started, 0.9) <= 3
    assert timed.started[-1] - began >= 1.9  # 3 now, 3 a second later, 1 after two
    # Waiting for a turn was no attempt: one each, none dead-lettered.
    for event_id in ids:
        assert await statuses(inbox, event_id) == {"robot": ("done", 1)}


async def test_every_process_on_the_inbox_shares_the_rate(inbox_place):
    inbox, other_replica = await inbox_place.open(), await inbox_place.open()
    first, second = Timed(delay=0.05), Timed(delay=0.05)
    ids = await store_jobs(inbox, 8, handler="robot")
    config = {"rate": "4/1s", "concurrency": 2}
    one = dispatcher(inbox, robot=(first, config))
    two = dispatcher(other_replica, robot=(second, config))
    await one.start()
    await two.start()
    await until(lambda: all_settled(inbox, ids))
    await one.stop()
    await two.stop()
    assert len(first.started) + len(second.started) == 8
    assert first.started  # both took part
    assert second.started
    assert most_in_a_window(first.started + second.started, 0.9) <= 4


async def test_a_batch_takes_one_turn(inbox_place):
    inbox = await inbox_place.open()
    batches = Batches()
    ids = await store_jobs(inbox, 30, handler="digest")
    config = {"rate": "2/1s", "batch_size": 10, "batch_wait": 0, "concurrency": 3}
    d = dispatcher(inbox, digest=(batches, config))
    began = time.monotonic()
    await d.start()
    await until(lambda: all_settled(inbox, ids))
    took = time.monotonic() - began
    await d.stop()
    assert [len(b) for b in batches.batches] == [10, 10, 10]
    assert took >= 0.9  # two batches at once, the third a second later


async def test_the_robots_ship_their_vendors_limits():
    from handlers import build
    from receiver.config import HandlerConfig
    from receiver.dispatch.slots import Slot

    def slot(type_name: str, **config) -> Slot:
        handler = build(type_name, {"url": "https://example.invalid/hook"})
        return Slot(type_name, handler, HandlerConfig(type=type_name, **config))

    assert [str(r) for r in slot("wecom").limits] == ["20/min"]
    assert [str(r) for r in slot("feishu").limits] == ["100/min", "5/s"]
    assert slot("wecom", rate="off").limits == []
    assert [str(r) for r in slot("wecom", rate="30/10s").limits] == ["30/10s"]


async def test_turns_left_are_used_at_once(inbox_place):
    """Four places, five turns in ten seconds: four runs, then a fifth alone starts
    without waiting for the window."""
    inbox = await inbox_place.open()
    timed = Timed()
    d = dispatcher(inbox, robot=(timed, {"rate": "5/10s", "concurrency": 4}))
    await d.start()
    first = await store_jobs(inbox, 4, handler="robot", prefix="jfirst")
    await until(lambda: all_settled(inbox, first))
    stored = time.monotonic()
    fifth = await store_jobs(inbox, 1, handler="robot", prefix="jfifth")
    await until(lambda: all_settled(inbox, fifth))
    await d.stop()
    assert timed.started[-1] - stored < 2


async def test_an_idle_process_holds_no_turns_from_the_others(inbox_place):
    inbox, other_replica = await inbox_place.open(), await inbox_place.open()
    first, second = Timed(), Timed()
    config = {"rate": "4/10s"}
    one = dispatcher(inbox, poll=0.02, robot=(first, config))
    two = dispatcher(other_replica, poll=0.02, robot=(second, config))
    await one.start()
    await two.start()
    await asyncio.sleep(0.5)  # both polling an idle handler
    stored = time.monotonic()
    ids = await store_jobs(inbox, 4, handler="robot")
    await until(lambda: all_settled(inbox, ids))
    await one.stop()
    await two.stop()
    assert len(first.started) + len(second.started) == 4
    assert max(first.started + second.started) - stored < 2
    assert await inbox.get_state("rate:robot") is not None


class FailsOnce:
    """The inbox, its first call of `method` failing as a database going away would."""

    def __init__(self, inbox, method: str) -> None:
        self.inbox = inbox
        self.method = method
        self.failed = False

    def __getattr__(self, name: str):
        found = getattr(self.inbox, name)
        if name != self.method or self.failed:
            return found

        async def failing(*args, **kwargs):
            self.failed = True
            raise InboxUnavailable("the database is away")

        return failing


async def test_a_claim_that_fails_takes_no_turn(inbox_place):
    inbox = await inbox_place.open()
    timed = Timed()
    ids = await store_jobs(inbox, 1, handler="robot")
    d = dispatcher(FailsOnce(inbox, "claim"), robot=(timed, {"rate": "1/10s"}))
    began = time.monotonic()
    await run_until_settled(d, inbox, ids)
    assert timed.started[0] - began < 3  # the poll after the failure, not the window


async def test_a_batch_takes_its_turn_as_it_starts(inbox_place):
    """1 a second, batches gathered for up to a second, two places: the second batch,
    full at once too, is handed back for want of a turn and starts a second after the
    first."""
    inbox = await inbox_place.open()
    batches = Batches()
    starts: list[float] = []
    answer = batches.answer
    batches.answer = lambda events: (starts.append(time.monotonic()), answer(events))[1]
    config = {"rate": "1/1s", "batch_size": 5, "batch_wait": 1.0, "concurrency": 2}
    d = dispatcher(inbox, digest=(batches, config))
    ids = await store_jobs(inbox, 10, handler="digest")
    await run_until_settled(d, inbox, ids, timeout=15)
    assert [len(b) for b in batches.batches] == [5, 5]
    assert starts[1] - starts[0] >= 0.95


async def _started(timed: Timed, count: int) -> bool:
    return len(timed.started) >= count


async def test_a_batch_without_a_turn_is_handed_back_and_runs_once_with_one(inbox_place):
    inbox = await inbox_place.open()
    batches = Batches()
    ids = await store_jobs(inbox, 3, handler="digest")
    config = {"rate": "1/10s", "batch_wait": 0.1}
    d = dispatcher(FailsOnce(inbox, "update_state"), poll=0.2, digest=(batches, config))
    await run_until_settled(d, inbox, ids)
    assert [sorted(i for i, _ in batch) for batch in batches.batches] == [sorted(ids)]
    for event_id in ids:
        assert await statuses(inbox, event_id) == {"digest": ("done", 1)}
    assert len(orjson.loads(await inbox.get_state("rate:digest"))) == 1  # its one turn
