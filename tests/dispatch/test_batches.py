"""Batch handlers (`handle_batch`) as the dispatcher runs them, on SQLite and PostgreSQL
(the `inbox` fixture): batches up to `batch_size`, gathered for `batch_wait`, each run's
outcome recorded on its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime, timezone

from handlers import BatchContext, BatchHandler, BatchResult, Fail, Retry
from receiver import parse_callback
from receiver.callback.event import Event
from receiver.inbox import InboxUnavailable, Receipt
from tests.dispatch.test_handoff import receipt, service
from tests.dispatch.test_loop import dispatcher, settled, statuses, until
from tests.support.callbacks import job


class Batches(BatchHandler):
    """Records each batch (event ids, and each event's attempt number); answers with
    what `answer` makes of the batch."""

    def __init__(self, answer=None, delay: float = 0) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.answer = answer or (lambda events: None)
        self.delay = delay
        self.running = 0
        self.most_running = 0

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext) -> BatchResult:
        self.batches.append([(event.id, ctx.of(event).attempt) for event in events])
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return self.answer(events)
        finally:
            self.running -= 1


async def store_jobs(inbox, count: int, handler: str = "batch", prefix: str = "jb") -> list[str]:
    """`count` job callbacks stored in one go, routed to `handler`."""
    runs, bodies = [], []
    for i in range(count):
        body = job(f"{prefix}{i:04d}")
        bodies.append(body)
        runs += [(event, [handler]) for event in parse_callback(body)]
    stored = await inbox.store(
        Receipt(b"".join(bodies), "http", datetime.now(timezone.utc), "req-b"), runs
    )
    return stored.new


async def run_until_settled(d, inbox, ids: list[str], timeout: float = 10.0) -> None:
    """Start the dispatcher, wait until every one of the events has no run pending, stop."""
    await d.start()
    await until(lambda: all_settled(inbox, ids), timeout=timeout)
    await d.stop()


async def all_settled(inbox, ids: list[str]) -> bool:
    for event_id in ids:
        if not await settled(inbox, event_id):
            return False
    return True


async def test_due_runs_come_in_batches_of_batch_size(inbox):
    batches = Batches()
    ids = await store_jobs(inbox, 250)
    d = dispatcher(inbox, batch=(batches, {"batch_size": 100, "concurrency": 1}))
    await run_until_settled(d, inbox, ids)
    assert sorted(len(b) for b in batches.batches) == [50, 100, 100]
    handled = [event_id for batch in batches.batches for event_id, _ in batch]
    assert sorted(handled) == sorted(ids)
    assert {(await statuses(inbox, i))["batch"] for i in ids} == {("done", 1)}


async def test_a_batch_waits_batch_wait_for_more(inbox):
    batches = Batches()
    _, d, ingestor = await service(inbox, batch=(batches, {"batch_wait": 0.5}))
    began = time.monotonic()
    ids = []
    for i in range(5):  # stored one by one, each committed and handed to the dispatcher
        ids += (await ingestor.ingest(receipt(job(f"jwait{i}")))).new
    await until(lambda: all_settled(inbox, ids))
    took = time.monotonic() - began
    await d.stop()
    assert [sorted(i for i, _ in b) for b in batches.batches] == [sorted(ids)]
    assert took >= 0.45


async def test_each_event_of_a_batch_ends_as_the_handler_says(inbox):
    ids = await store_jobs(inbox, 5)
    retried, dead, broken = ids[0], ids[1], ids[2]
    answered: set[str] = set()

    def answer(events):
        # The first time each is seen: one retried, one dead-lettered, one raising.
        verdicts = {
            retried: Retry("later", after=0),
            dead: Fail("refused"),
            broken: RuntimeError("boom"),
        }
        out = {e.id: verdicts[e.id] for e in events if e.id in verdicts and e.id not in answered}
        answered.update(out)
        return out

    batches = Batches(answer)
    d = dispatcher(inbox, batch=(batches, {"batch_wait": 0, "max_attempts": 3}))
    await run_until_settled(d, inbox, ids)
    assert await statuses(inbox, retried) == {"batch": ("done", 2)}
    assert await statuses(inbox, dead) == {"batch": ("dead", 1)}
    assert await statuses(inbox, broken) == {"batch": ("done", 2)}
    for event_id in ids[3:]:
        assert await statuses(inbox, event_id) == {"batch": ("done", 1)}
    assert sorted(batches.batches[0]) == sorted((event_id, 1) for event_id in ids)
    # The retries came back with their own attempt numbers.
    later = [entry for batch in batches.batches[1:] for entry in batch]
    assert sorted(later) == sorted([(retried, 2), (broken, 2)])
    errors = {a.error for a in (await inbox.event(broken)).attempts if a.error}
    assert errors == {"RuntimeError: boom"}
    assert (await inbox.event(dead)).runs[0].last_error == "Fail: refused"


async def test_a_batch_that_raises_fails_every_event_in_it(inbox):
    def refuse(events):
        raise Fail("the warehouse refused the batch")

    ids = await store_jobs(inbox, 3)
    d = dispatcher(inbox, batch=(Batches(refuse), {"batch_wait": 0}))
    await run_until_settled(d, inbox, ids)
    for event_id in ids:
        assert await statuses(inbox, event_id) == {"batch": ("dead", 1)}


async def test_a_batch_that_times_out_is_retried_whole(inbox):
    slow = Batches(delay=5)
    ids = await store_jobs(inbox, 3)
    d = dispatcher(inbox, batch=(slow, {"batch_wait": 0, "timeout": 0.2, "max_attempts": 2}))
    await run_until_settled(d, inbox, ids)
    for event_id in ids:
        assert await statuses(inbox, event_id) == {"batch": ("dead", 2)}
        errors = {a.error for a in (await inbox.event(event_id)).attempts}
        assert errors == {"timed out after 0.2s"}
    assert [len(b) for b in slow.batches] == [3, 3]


async def test_concurrency_counts_batches(inbox):
    batches = Batches(delay=0.2)
    ids = await store_jobs(inbox, 60)
    d = dispatcher(inbox, batch=(batches, {"batch_size": 10, "batch_wait": 0, "concurrency": 2}))
    await run_until_settled(d, inbox, ids)
    assert batches.most_running == 2
    assert [len(b) for b in batches.batches] == [10] * 6


async def test_stop_starts_a_batch_being_gathered(inbox):
    batches = Batches()
    _, d, ingestor = await service(inbox, batch=(batches, {"batch_wait": 60}))
    (event_id,) = (await ingestor.ingest(receipt(job("jgathered")))).new
    await until(lambda: _gathering(d))
    began = time.monotonic()
    await d.stop()
    assert time.monotonic() - began < 5
    assert batches.batches == [[(event_id, 1)]]
    assert await statuses(inbox, event_id) == {"batch": ("done", 1)}


async def _gathering(d) -> bool:
    return any(slot.filling for slot in d._handlers)


class AwayAfterFirstClaim:
    """The inbox, away (every claim and question failing) from the second claim on, for
    `seconds`."""

    def __init__(self, inbox, seconds: float) -> None:
        self.inbox = inbox
        self.seconds = seconds
        self.away_since: float | None = None

    def __getattr__(self, name: str):
        return getattr(self.inbox, name)

    def _away(self) -> bool:
        return self.away_since is not None and time.monotonic() - self.away_since < self.seconds

    async def claim(self, *args, **kwargs):
        if self._away():
            raise InboxUnavailable("the database is away")
        claims = await self.inbox.claim(*args, **kwargs)
        if claims and self.away_since is None:
            self.away_since = time.monotonic()
        return claims

    async def next_due(self, *args, **kwargs):
        if self._away():
            raise InboxUnavailable("the database is away")
        return await self.inbox.next_due(*args, **kwargs)


async def test_a_gathered_batch_starts_on_time_while_the_inbox_is_away(inbox):
    batches = Batches()
    starts: list[float] = []
    answer = batches.answer
    batches.answer = lambda events: (starts.append(time.monotonic()), answer(events))[1]
    (event_id,) = await store_jobs(inbox, 1)
    away = AwayAfterFirstClaim(inbox, seconds=3)
    d = dispatcher(away, poll=1.0, batch=(batches, {"batch_wait": 0.3}))
    await d.start()
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert batches.batches == [[(event_id, 1)]]
    assert starts[0] - away.away_since < 1.0  # its batch_wait, not the outage's end
