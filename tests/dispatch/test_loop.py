"""Dispatch semantics against real inboxes (SQLite and PostgreSQL: the `inbox` fixture),
with handlers written for the tests."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
from structlog.testing import capture_logs

from handlers import Fail, Retry
from receiver.callback.event import Event
from receiver.config import DispatchConfig, HandlerConfig, RouteConfig
from receiver.dispatch import replay as replay_module
from receiver.dispatch.loop import Dispatcher
from receiver.dispatch.outcomes import backoff
from receiver.dispatch.replay import chosen, replay
from receiver.dispatch.slots import Slot
from receiver.inbox import EventFilter, Receipt
from receiver.ingest.routing import Router
from receiver.metrics import Metrics
from receiver.runtime.service import Service
from tests.support.callbacks import load
from tests.support.installations import variant

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "timeout": 5}


class Recording:
    """Records every call; raises what the test tells it to for the first attempts."""

    def __init__(self, failures: list[BaseException] | None = None, delay: float = 0) -> None:
        self.calls: list[str] = []
        self.failures = list(failures or [])
        self.delay = delay
        self.running = 0
        self.most_running = 0

    async def __call__(self, event: Event) -> None:
        self.calls.append(event.id)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.failures:
                raise self.failures.pop(0)
        finally:
            self.running -= 1


async def store(inbox, name: str, handlers: list[str]) -> list[str]:
    return await store_body(inbox, load(name), handlers)


async def store_body(inbox, body: bytes, handlers: list[str]) -> list[str]:
    from receiver import parse_callback

    events = parse_callback(body)
    receipt = Receipt(body, "http", datetime.now(timezone.utc), "req-1")
    stored = await inbox.store(receipt, [(event, handlers) for event in events])
    return stored.new


def dispatcher(inbox, poll=0.05, drain=5.0, **handlers) -> Dispatcher:
    slots = []
    for name, (handler, config) in handlers.items():
        slots.append(Slot(name, handler, HandlerConfig(type="test", **{**FAST, **config})))
    return Dispatcher(inbox, slots, Metrics(), poll_interval=poll, drain_timeout=drain)


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def dispatched_until(inbox, condition, **handlers) -> Dispatcher:
    """A dispatcher of these handlers (as `dispatcher` takes them), started, run until
    `condition` holds, and stopped."""
    d = dispatcher(inbox, **handlers)
    await d.start()
    await until(condition)
    await d.stop()
    return d


async def statuses(inbox, event_id: str) -> dict[str, tuple[str, int]]:
    detail = await inbox.event(event_id)
    return {run.handler: (run.status, run.attempts) for run in detail.runs}


async def settled(inbox, event_id: str) -> bool:
    return all(status != "pending" for status, _ in (await statuses(inbox, event_id)).values())


async def test_a_cancellation_the_handler_raises_itself_is_a_failure_like_any(inbox):
    # A CancelledError that does not come from stopping the attempt (a shared future
    # another task's cancellation cancelled, or raised by the handler's own code) is
    # the handler's failure: counted, retried after a back-off, dead-lettered in the
    # end; never handed back uncounted and due at once, again and again.
    stray = Recording([asyncio.CancelledError("shared future cancelled")] * 3)
    (event_id,) = await store(inbox, "transcode.xml", ["stray"])
    await dispatched_until(
        inbox, lambda: settled(inbox, event_id), stray=(stray, {"max_attempts": 3})
    )
    assert await statuses(inbox, event_id) == {"stray": ("dead", 3)}
    attempts = (await inbox.event(event_id)).attempts
    assert [(a.number, a.outcome) for a in attempts] == [(1, "retry"), (2, "retry"), (3, "dead")]
    assert "CancelledError: shared future cancelled" in attempts[0].error


async def test_a_failing_handler_is_retried_alone(inbox):
    flaky = Recording([RuntimeError("db down"), Retry("busy")])
    steady = Recording()
    (event_id,) = await store(inbox, "transcode.xml", ["flaky", "steady"])
    await dispatched_until(
        inbox, lambda: settled(inbox, event_id), flaky=(flaky, {}), steady=(steady, {})
    )
    assert await statuses(inbox, event_id) == {"flaky": ("done", 3), "steady": ("done", 1)}
    assert flaky.calls == [event_id] * 3
    assert steady.calls == [event_id]
    # Of both handlers, in the order recorded: steady's may come before flaky's first.
    attempts = [a for a in (await inbox.event(event_id)).attempts if a.handler == "flaky"]
    assert [(a.handler, a.number, a.outcome) for a in attempts] == [
        ("flaky", 1, "retry"),
        ("flaky", 2, "retry"),
        ("flaky", 3, "done"),
    ]
    assert "RuntimeError: db down" in attempts[0].error


async def test_a_handler_failing_every_event_the_same_way_says_so_once(inbox):
    # A peer down: every event's attempt fails alike. One warning, then one line when an
    # attempt succeeds again; a different failure is news and said too.
    peer_down = Retry("cannot reach http://peer: ConnectError")
    hook = Recording([peer_down] * 6 + [Retry("http://peer answered 503")])
    ids = [
        *await store(inbox, "transcode.xml", ["hook"]),
        *await store(inbox, "two_jobs.xml", ["hook"]),
    ]
    d = dispatcher(inbox, hook=(hook, {"concurrency": 1, "max_attempts": 20}))
    with capture_logs() as logs:
        await d.start()
        for event_id in ids:
            await until(lambda event_id=event_id: settled(inbox, event_id))
        await d.stop()
    said = [(line["event"], line["log_level"], line.get("error")) for line in logs
            if line["event"] in ("handler failed; will retry", "handler succeeds again")
            and line["log_level"] != "debug"]  # fmt: skip
    assert said == [
        ("handler failed; will retry", "warning", "Retry: cannot reach http://peer: ConnectError"),
        ("handler failed; will retry", "warning", "Retry: http://peer answered 503"),
        ("handler succeeds again", "info", None),
    ]
    (back,) = [line for line in logs if line["event"] == "handler succeeds again"]
    assert back["failed_since"] == 7
    attempts = [a for event_id in ids for a in (await inbox.event(event_id)).attempts]
    assert Counter(a.outcome for a in attempts) == {"retry": 7, "done": 3}


async def test_dead_letter_after_the_last_attempt(inbox):
    always = Recording([RuntimeError("no")] * 10)
    (event_id,) = await store(inbox, "transcode.xml", ["always"])
    await dispatched_until(
        inbox, lambda: settled(inbox, event_id), always=(always, {"max_attempts": 3})
    )
    assert await statuses(inbox, event_id) == {"always": ("dead", 3)}
    assert len(always.calls) == 3
    assert [s.id for s in await inbox.events(EventFilter(status="dead"))] == [event_id]


async def test_fail_dead_letters_at_once(inbox):
    refusing = Recording([Fail("HTTP 404 from the peer")])
    (event_id,) = await store(inbox, "transcode.xml", ["refusing"])
    await dispatched_until(
        inbox, lambda: settled(inbox, event_id), refusing=(refusing, {"max_attempts": 5})
    )
    detail = await inbox.event(event_id)
    assert detail.runs[0].status == "dead"
    assert detail.runs[0].attempts == 1
    assert detail.runs[0].last_error == "Fail: HTTP 404 from the peer"


async def test_retry_after_sets_when_the_next_attempt_is_due(inbox):
    later = Recording([Retry("rate limited", after=3600)])
    (event_id,) = await store(inbox, "transcode.xml", ["later"])
    await dispatched_until(inbox, lambda: _attempted(inbox, event_id), later=(later, {}))
    run = (await inbox.event(event_id)).runs[0]
    assert (run.status, run.attempts) == ("pending", 1)
    wait = (run.due_at - datetime.now(timezone.utc)).total_seconds()
    assert 3500 < wait <= 3600


async def _attempted(inbox, event_id: str) -> bool:
    return bool((await inbox.event(event_id)).attempts)


async def test_a_handler_past_its_timeout_is_retried(inbox):
    slow = Recording(delay=5)
    (event_id,) = await store(inbox, "transcode.xml", ["slow"])
    await dispatched_until(
        inbox, lambda: settled(inbox, event_id), slow=(slow, {"timeout": 0.1, "max_attempts": 2})
    )
    detail = await inbox.event(event_id)
    assert detail.runs[0].status == "dead"
    assert [a.error for a in detail.attempts] == ["timed out after 0.1s"] * 2


async def test_concurrency_is_bounded_per_handler(inbox):
    counted = Recording(delay=0.05)
    ids = []
    for name in (
        "transcode.xml",
        "smartcover.xml",
        "snapshot.xml",
        "pic_process.xml",
        "two_jobs.xml",
    ):
        ids += await store(inbox, name, ["counted"])
    await dispatched_until(
        inbox, lambda: _all_settled(inbox, ids), counted=(counted, {"concurrency": 2})
    )
    assert sorted(counted.calls) == sorted(ids)
    assert counted.most_running == 2


async def _all_settled(inbox, ids: list[str]) -> bool:
    return all([await settled(inbox, event_id) for event_id in ids])


async def test_a_handler_that_cannot_start_holds_its_runs_until_it_can(inbox):
    class StartsOnSecondTry(Recording):
        starts = 0

        async def start(self) -> None:
            self.starts += 1
            if self.starts == 1:
                raise ConnectionRefusedError("database not up yet")

    handler = StartsOnSecondTry()
    (event_id,) = await store(inbox, "transcode.xml", ["db"])
    d = dispatcher(inbox, db=(handler, {}))
    await d.start()
    await until(
        lambda: _status(d, "db", "not started: ConnectionRefusedError: database not up yet")
    )
    assert handler.calls == []
    await until(lambda: settled(inbox, event_id))  # start is retried after ~1 s
    await d.stop()
    assert handler.starts == 2
    assert await statuses(inbox, event_id) == {"db": ("done", 1)}


async def _status(d: Dispatcher, name: str, wanted: str) -> bool:
    return d.handler_status()[name] == wanted


async def test_a_handler_slow_to_start_holds_back_nothing_else(inbox):
    class SlowStart(Recording):
        async def start(self) -> None:
            await asyncio.sleep(3600)

    slow, quick = SlowStart(), Recording()
    (event_id,) = await store(inbox, "transcode.xml", ["slow", "quick"])
    d = dispatcher(inbox, slow=(slow, {"timeout": 60}), quick=(quick, {}))
    await d.start()  # returns at once: starts run in the background
    await until(lambda: _calls(quick, 1))
    assert d.handler_status() == {"slow": "starting", "quick": "started"}
    await d.stop()  # and stop does not wait for the start either
    assert await statuses(inbox, event_id) == {"slow": ("pending", 0), "quick": ("done", 1)}


async def test_a_start_that_hangs_is_given_up_after_the_handler_timeout(inbox):
    class Hangs(Recording):
        async def start(self) -> None:
            await asyncio.sleep(3600)

    d = dispatcher(inbox, h=(Hangs(), {"timeout": 0.1}))
    await d.start()
    await until(lambda: _status(d, "h", "not started: no start within 0.1s"))
    await d.stop()


@pytest.mark.parametrize("after", [float("inf"), float("nan"), 1e300, -5])
async def test_a_retry_delay_that_is_no_usable_number_is_bounded(inbox, after):
    odd = Recording([Retry("odd", after=after)])
    (event_id,) = await store(inbox, "transcode.xml", ["odd"])
    # A delay that is no number falls back to the back-off's: one long enough that the
    # retry cannot come due before the stop (FAST's, 25-50 ms, sometimes did under load).
    await dispatched_until(
        inbox,
        lambda: _attempted(inbox, event_id),
        odd=(odd, {"backoff_initial": 60, "backoff_max": 60}),
    )
    detail = await inbox.event(event_id)
    assert detail.attempts[0].outcome == "retry"
    run = detail.runs[0]
    if after == -5 and run.status == "done":
        # Due again at once, and run again (successfully) before the stop: no wait at all.
        assert run.attempts == 2
        return
    assert (run.status, run.attempts) == ("pending", 1)
    wait = (run.due_at - datetime.now(timezone.utc)).total_seconds()
    assert wait <= 7 * 24 * 3600
    if after == -5:  # a delay in the past is no delay: due now, not 5 s ago
        assert -1 < wait <= 1


async def test_stop_lets_running_attempts_finish(inbox):
    slowish = Recording(delay=0.3)
    (event_id,) = await store(inbox, "transcode.xml", ["slowish"])
    await dispatched_until(inbox, lambda: _running(slowish), slowish=(slowish, {}), drain=5)
    assert await statuses(inbox, event_id) == {"slowish": ("done", 1)}


async def _running(handler: Recording) -> bool:
    return handler.running > 0


async def test_stop_releases_what_does_not_finish_in_time_without_counting_it(inbox):
    stuck = Recording(delay=60)
    (event_id,) = await store(inbox, "transcode.xml", ["stuck"])
    await dispatched_until(
        inbox, lambda: _running(stuck), stuck=(stuck, {"timeout": 120}), drain=0.2
    )
    detail = await inbox.event(event_id)
    assert (detail.runs[0].status, detail.runs[0].attempts) == ("pending", 0)
    assert [(a.outcome, a.error) for a in detail.attempts] == [
        ("released", "interrupted by shutdown")
    ]
    # A new dispatcher (the restarted process) runs it at once: the lease was handed back.
    again = Recording()
    await dispatched_until(inbox, lambda: settled(inbox, event_id), stuck=(again, {}))
    assert again.calls == [event_id]


async def test_a_run_leased_by_a_process_that_died_is_taken_over_after_its_lease(inbox):
    (event_id,) = await store(inbox, "transcode.xml", ["h"])
    (claim,) = await inbox.claim("h", 10, lease_seconds=0.3)  # the process dies here
    assert await inbox.claim("h", 10, lease_seconds=30) == []
    handler = Recording()
    await dispatched_until(inbox, lambda: settled(inbox, event_id), h=(handler, {}))
    assert handler.calls == [event_id]
    # The dead process's late report is refused: its lease token no longer holds.
    assert not await inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))


async def test_pending_work_resumes_after_a_restart(inbox):
    ids = await store(inbox, "two_jobs.xml", ["h"])
    first = Recording([RuntimeError("boom")])
    await dispatched_until(
        inbox, lambda: _calls(first, 2), h=(first, {"backoff_initial": 0.3, "backoff_max": 0.3})
    )
    second = Recording()
    await dispatched_until(inbox, lambda: _all_settled(inbox, ids), h=(second, {}))
    assert Counter(first.calls + second.calls) == {ids[0]: 2, ids[1]: 1} or Counter(
        first.calls + second.calls
    ) == {ids[0]: 1, ids[1]: 2}


async def test_a_retry_runs_when_due_not_at_the_next_poll(inbox):
    # Polling every 30 s, the run asked to wait 0.3 s is tried again when due: the loop,
    # asleep until the poll, learns of the retry from the outcome it records.
    (event_id,) = await store(inbox, "transcode.xml", ["h"])
    handler = Recording([Retry("later", after=0.3)])
    d = dispatcher(inbox, poll=30.0, h=(handler, {}))
    await d.start()
    began = time.monotonic()
    await until(lambda: settled(inbox, event_id), timeout=10.0)
    await d.stop()
    assert handler.calls == [event_id, event_id]
    assert time.monotonic() - began < 5.0


async def _calls(handler: Recording, n: int) -> bool:
    return len(handler.calls) >= n


async def test_requeue_dead_runs_replays_them(inbox):
    (event_id,) = await store(inbox, "transcode.xml", ["h", "other"])
    broken = Recording([Fail("bad config")])
    other = Recording()
    d = dispatcher(inbox, h=(broken, {}), other=(other, {}))
    await d.start()
    await until(lambda: settled(inbox, event_id))
    assert await inbox.requeue(None, None, dead_only=True) == 1
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    assert await statuses(inbox, event_id) == {"h": ("done", 1), "other": ("done", 1)}
    assert broken.calls == [event_id, event_id]
    assert other.calls == [event_id]


async def test_dead_letters_of_a_handler_the_routes_no_longer_send_to_are_left_alone(inbox):
    # As the inspector's confirmation says, and as replaying for a named handler does.
    (event_id,) = await store(inbox, "transcode.xml", ["h"])
    await dispatched_until(
        inbox, lambda: settled(inbox, event_id), h=(Recording([Fail("bad config")]), {})
    )
    rerouted = Router([RouteConfig(handlers=["elsewhere"])], ["h", "elsewhere"])
    named = await chosen(inbox, [event_id], None)
    left = await replay(inbox, rerouted, named, handlers=["h"], runnable={"h"}, dead_only=True)
    assert (left.runs, await statuses(inbox, event_id)) == (0, {"h": ("dead", 1)})
    still = Router(None, ["h"])
    named = await chosen(inbox, [event_id], None)
    again = await replay(inbox, still, named, handlers=["h"], runnable={"h"}, dead_only=True)
    assert again.runs == 1
    assert await statuses(inbox, event_id) == {"h": ("pending", 0)}


async def test_a_replay_goes_through_the_events_chosen_as_it_started(inbox, monkeypatch):
    # A page at a time (two here), not every id read first; an event stored meanwhile is
    # not chosen: its runs are new already.
    monkeypatch.setattr(replay_module, "PAGE", 2)
    for n in range(5):
        await store_body(inbox, variant(load("smartcover.json"), n), ["h"])
    events = await chosen(inbox, None, EventFilter())
    assert events.count == 5
    await store_body(inbox, variant(load("smartcover.json"), 5), ["h"])
    pages = []
    events.pages = _noting(events.pages, pages)
    done = await replay(
        inbox, Router(None, ["h"]), events, handlers=["h"], runnable={"h"}, dead_only=False,
        dry_run=True,
    )  # fmt: skip
    assert (done.events, done.runs) == (5, 5)
    assert [len(page) for page in pages] == [2, 2, 1]


async def _noting(pages, seen: list) -> AsyncIterator[list[str]]:
    async for page in pages:
        seen.append(page)
        yield page


def test_backoff_doubles_up_to_its_ceiling_with_equal_jitter():
    config = HandlerConfig(type="t", backoff_initial=1, backoff_max=10)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (9, 10)]:
        delays = [backoff(config, attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered


def test_backoff_stays_at_its_ceiling_however_many_attempts():
    # The verification step retries without end: its 1025th attempt and later must not
    # overflow the float the doubling is made in.
    config = HandlerConfig(type="t", backoff_initial=1, backoff_max=60)
    for attempt in (1025, 10_000, sys.maxsize):
        assert 30 <= backoff(config, attempt) <= 60


async def test_a_run_is_leased_for_its_timeout_plus_the_configured_grace(inbox_place, tmp_path):
    # [dispatch] lease_grace, meaning the same on either inbox: on PostgreSQL too, not
    # derived from how long SQLite waits for another process's write lock.
    slow = HandlerConfig(
        type="tests.support.handler_doubles:Recorder",
        path=str(tmp_path / "seen"),
        delay=2,
        timeout=5,
    )
    config = inbox_place.config.model_copy(
        update={
            "dispatch": DispatchConfig(poll_interval=0.05, lease_grace=42),
            "handlers": {"slow": slow},
        }
    )
    service = Service(config)
    await service.start()
    try:
        await store(service.inbox, "transcode.xml", ["slow"])
        service.dispatcher.wake()

        async def leased() -> bool:
            due = await service.inbox.next_due(["slow"])
            return due is not None and due > datetime.now(timezone.utc) + timedelta(seconds=10)

        await until(leased)
        due = await service.inbox.next_due(["slow"])
        assert due is not None
        assert 5 + 42 - 3 < (due - datetime.now(timezone.utc)).total_seconds() <= 5 + 42 + 1
    finally:
        await service.stop()


# --- a config reload (receiver/dispatch/slots.py: replace_handlers) ---------------------------


class Closable(Recording):
    def __init__(self, delay: float = 0) -> None:
        super().__init__(delay=delay)
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def slot(name: str, handler: Recording, **config) -> Slot:
    return Slot(name, handler, HandlerConfig(type="test", **{**FAST, **config}))


async def test_a_reload_lets_a_removed_handler_finish_and_leaves_its_other_runs_waiting(inbox):
    removed = Closable(delay=0.5)
    first, second = [(await store(inbox, name, ["removed"]))[0]
                     for name in ("transcode.xml", "smartcover.json")]  # fmt: skip
    d = dispatcher(inbox, removed=(removed, {"concurrency": 1}))
    await d.start()
    await until(lambda: _running(removed))
    added = Recording()
    assert d.replace_handlers([slot("added", added)], str) == ["+added", "-removed"]
    # The attempt under way ends and is recorded; the handler is closed after it.
    await until(lambda: _closed(removed))
    assert await statuses(inbox, first) == {"removed": ("done", 1)}
    assert removed.calls == [first]
    # Its other run is not claimed by anyone here: it waits for a receiver that has it.
    (third,) = await store(inbox, "workflow_finish.xml", ["added"])
    d.wake()
    await until(lambda: settled(inbox, third))
    assert added.calls == [third]
    await asyncio.sleep(0.3)
    assert await statuses(inbox, second) == {"removed": ("pending", 0)}
    assert d.handler_status() == {"added": "started"}
    await d.stop()


async def _closed(handler: Closable) -> bool:
    return handler.closed


async def test_a_reload_keeps_an_unchanged_handler_and_restarts_a_changed_one(inbox):
    same, changed = Closable(), Closable()
    d = dispatcher(inbox, same=(same, {}), changed=(changed, {}))
    await d.start()
    same_again, changed_again = Closable(), Closable()
    changes = d.replace_handlers(
        [slot("same", same_again), slot("changed", changed_again, max_attempts=3)], str
    )
    assert changes == ["~changed"]
    await until(lambda: _closed(changed))
    (event_id,) = await store(inbox, "transcode.xml", ["same", "changed"])
    d.wake()
    await until(lambda: settled(inbox, event_id))
    await d.stop()
    # The unchanged handler kept running as it was (its new instance never started);
    # the changed one runs as configured now.
    assert (same.calls, same_again.calls) == ([event_id], [])
    assert (changed.calls, changed_again.calls) == ([], [event_id])


async def test_stop_while_a_removed_handler_drains_releases_its_attempt(inbox):
    stuck = Closable(delay=60)
    (event_id,) = await store(inbox, "transcode.xml", ["stuck"])
    d = dispatcher(inbox, stuck=(stuck, {"timeout": 120}), drain=0.2)
    await d.start()
    await until(lambda: _running(stuck))
    d.replace_handlers([], str)
    d.wake()
    await asyncio.sleep(0.1)  # the loop takes it out; its attempt runs on
    await d.stop()  # one drain for all: the attempt is handed back, the handler closed
    detail = await inbox.event(event_id)
    assert (detail.runs[0].status, detail.runs[0].attempts) == ("pending", 0)
    assert [a.outcome for a in detail.attempts] == ["released"]
    assert stuck.closed


class Counted(Closable):
    """Counts, with the other handlers sharing `together`, attempts running at once."""

    def __init__(self, together: Counter[str], delay: float) -> None:
        super().__init__(delay=delay)
        self.together = together

    async def __call__(self, event: Event) -> None:
        self.together["now"] += 1
        self.together["most"] = max(self.together["most"], self.together["now"])
        try:
            await super().__call__(event)
        finally:
            self.together["now"] -= 1


async def test_a_changed_handler_keeps_its_concurrency_while_the_old_one_finishes(inbox):
    together: Counter[str] = Counter()
    old, new = Counted(together, delay=0.4), Counted(together, delay=0.05)
    (first,) = await store(inbox, "transcode.xml", ["one"])
    d = dispatcher(inbox, one=(old, {"concurrency": 1}))
    await d.start()
    await until(lambda: _running(old))
    assert d.replace_handlers([slot("one", new, concurrency=1, max_attempts=3)], str) == ["~one"]
    ids = [(await store(inbox, name, ["one"]))[0] for name in ("smartcover.json", "snapshot.xml")]
    d.wake()
    for event_id in [first, *ids]:
        await until(lambda e=event_id: settled(inbox, e))
    await d.stop()
    assert old.calls == [first]
    assert sorted(new.calls) == sorted(ids)
    assert together["most"] == 1  # never the old and the new one at once


async def test_reloads_in_a_row_keep_the_concurrency_of_every_generation_draining(inbox):
    # `one` changed twice while its first generation's attempt still runs, then taken
    # out and added again: each new generation counts every older one still draining.
    together: Counter[str] = Counter()
    first = Counted(together, delay=0.6)
    second, third, fourth = (Counted(together, delay=0.3) for _ in range(3))
    (running_first,) = await store(inbox, "transcode.xml", ["one"])
    d = dispatcher(inbox, one=(first, {"concurrency": 1}))
    await d.start()
    await until(lambda: _running(first))
    d.replace_handlers([slot("one", second, concurrency=1, max_attempts=3)], str)
    (for_second,) = await store(inbox, "smartcover.json", ["one"])
    d.wake()
    await asyncio.sleep(0.1)  # applied: `second` waits for `first`'s place
    d.replace_handlers([slot("one", third, concurrency=1, max_attempts=4)], str)
    d.wake()
    await asyncio.sleep(0.1)
    d.replace_handlers([], str)
    d.wake()
    await asyncio.sleep(0.1)
    d.replace_handlers([slot("one", fourth, concurrency=1, max_attempts=5)], str)
    ids = [(await store(inbox, name, ["one"]))[0] for name in ("snapshot.xml", "two_jobs.xml")]
    d.wake()
    for event_id in [running_first, for_second, *ids]:
        await until(lambda e=event_id: settled(inbox, e))
    await d.stop()
    assert first.calls == [running_first]
    assert together["most"] == 1  # never two generations' attempts at once


async def test_a_handler_changed_then_removed_records_what_each_generation_ran(inbox):
    # Changed, then removed while both generations' attempts still run: neither
    # generation's end may take the other's metric series from under its attempts.
    first, second = Closable(delay=0.3), Closable(delay=0.6)
    (for_first,) = await store(inbox, "transcode.xml", ["x"])
    d = dispatcher(inbox, x=(first, {"concurrency": 1}))
    await d.start()
    await until(lambda: _running(first))
    d.replace_handlers([slot("x", second, max_attempts=3)], str)
    (for_second,) = await store(inbox, "smartcover.json", ["x"])
    d.wake()
    await until(lambda: _running(second))
    d.replace_handlers([], str)
    d.wake()
    await until(lambda: _closed(first))
    await until(lambda: _closed(second))
    await d.stop()
    assert await statuses(inbox, for_first) == {"x": ("done", 1)}
    assert await statuses(inbox, for_second) == {"x": ("done", 1)}
