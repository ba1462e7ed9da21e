"""The handler test kit (receiver.testing) as a handler author uses it: its samples,
and handlers run by the dispatcher's rules without a server."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence

import pytest

from handlers import BatchContext, BatchHandler, BatchResult, Context, Fail, Handler, Retry
from receiver.callback.event import Event
from receiver.testing import (
    SAMPLES,
    event_from,
    events_from,
    many,
    run_handler,
    run_handler_sync,
    sample,
    samples,
)
from tests.support.callbacks import load


def test_a_sample_for_every_kind_of_callback_and_its_failures():
    made = samples()
    assert set(made) == set(SAMPLES)
    assert {event.kind for event in made.values()} == {"job", "workflow", "moderation"}
    tags = {event.tag for event in made.values()}
    assert {"SmartCover", "Animation", "Transcode", "Snapshot"} <= tags
    assert {event.state for event in made.values()} >= {"Success", "Failed", "Cancel"}
    # A job that did not succeed lists no output, as CI's do: a handler that forgets to
    # look at the state is caught by its test.
    unfinished = [e for e in made.values() if e.kind == "job" and e.state != "Success"]
    assert {e.state for e in unfinished} == {"Failed", "Cancel"}
    assert [e.outputs for e in unfinished] == [[]] * len(unfinished)
    verdicts = [
        made[f"moderation-{v}"].moderation.result for v in ("simple", "detail", "suspected")
    ]
    assert verdicts == [0, 1, 2]  # normal, violation, suspected
    assert sample("transcode") is not sample("transcode")  # each a new one


def test_an_unknown_sample_names_those_there_are():
    with pytest.raises(KeyError, match="no sample callback 'transcod'; there are: smartcover"):
        sample("transcod")


def test_many_are_about_different_jobs():
    made = many("transcode-failed", 3)
    assert len({event.job_id for event in made}) == 3
    assert len({event.id for event in made}) == 3
    assert all(event.job_id in event.id for event in made)


def test_a_callback_of_ones_own_is_read_from_bytes_or_a_file(tmp_path):
    path = tmp_path / "two.xml"
    path.write_bytes(load("two_jobs.xml"))
    assert [e.job_id for e in events_from(path)] == [
        e.job_id for e in events_from(path.read_bytes())
    ]
    assert event_from(str(path)).job_id == events_from(path)[0].job_id


class Flaky(Handler):
    """Fails with what it is told, attempt by attempt; records what it saw."""

    def __init__(self, *failures: BaseException | None, delay: float = 0) -> None:
        self.failures = list(failures)
        self.seen: list[tuple[int, bool]] = []
        self.delay = delay
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def __call__(self, event: Event, ctx: Context) -> None:
        self.seen.append((ctx.attempt, ctx.last))
        event.tag = "changed by the handler"
        if self.delay:
            await asyncio.sleep(self.delay)
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure


async def test_failures_are_retried_until_success_without_waiting():
    handler = Flaky(RuntimeError("db down"), Retry("busy", after=90))
    given = sample("transcode")
    [run] = await run_handler(handler, given, attempts=5)
    assert run.outcome == "done"
    assert [(a.number, a.outcome) for a in run.attempts] == [
        (1, "retry"),
        (2, "retry"),
        (3, "done"),
    ]
    lines, first = inspect.getsourcelines(Flaky.__call__)
    line = first + next(i for i, text in enumerate(lines) if "raise failure" in text)
    raised_at = f"(raised at testing/test_kit.py:{line} in __call__)"
    assert run.errors == [f"RuntimeError: db down {raised_at}", "Retry: busy"]
    assert 0 < run.attempts[0].retry_after <= 1.0  # the back-off's first step: 0.5-1 s
    assert 89 < run.attempts[1].retry_after <= 90
    assert handler.seen == [(1, False), (2, False), (3, False)]
    assert (handler.started, handler.closed) == (True, True)
    assert given.tag == "Transcode"  # the handler had a copy


async def test_fail_and_the_last_failure_dead_letter():
    [refused] = await run_handler(Flaky(Fail("404 from the peer")), sample())
    assert (refused.outcome, len(refused.attempts)) == ("dead", 1)
    assert refused.errors == ["Fail: 404 from the peer"]
    down = Flaky(*[OSError("unreachable")] * 5)
    [gave_up] = await run_handler(down, sample(), attempts=2)
    assert [a.outcome for a in gave_up.attempts] == ["retry", "dead"]
    assert down.seen == [(1, False), (2, True)]


async def test_an_attempt_past_its_timeout_is_retried():
    [run] = await run_handler(Flaky(delay=5), sample(), attempts=1, timeout=0.1)
    assert run.errors == ["timed out after 0.1s"]
    assert run.outcome == "dead"


def test_a_test_that_is_not_async_runs_it_too():
    [run] = run_handler_sync(Flaky(), sample("workflow"))
    assert run.outcome == "done"


class Warehouse(BatchHandler):
    """Takes batches; refuses the failed ones once, dead-letters cancelled ones."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.refused: set[str] = set()

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext) -> BatchResult:
        self.batches.append(len(events))
        answer: dict[str, BaseException] = {}
        for event in events:
            if event.state == "Cancel":
                answer[event.id] = Fail("cancelled")
            elif event.state == "Failed" and event.id not in self.refused:
                self.refused.add(event.id)
                answer[event.id] = Retry("locked", after=1)
        return answer


async def test_a_batch_handler_gets_its_events_in_batches_each_ending_on_its_own():
    warehouse = Warehouse()
    events = [*many("transcode", 5), *many("transcode-failed", 2), sample("transcode-cancelled")]
    runs = await run_handler(warehouse, *events, batch_size=4)
    assert warehouse.batches == [4, 4, 2]  # then the two retried
    assert [run.outcome for run in runs] == ["done"] * 7 + ["dead"]
    assert [len(run.attempts) for run in runs] == [1] * 5 + [2, 2] + [1]


async def test_the_fixtures_are_there_for_pytest(ci_sample, ci_samples, ci_run_handler):
    assert ci_sample("snapshot").tag == "Snapshot"
    assert set(ci_samples) == set(SAMPLES)
    [run] = await ci_run_handler(Flaky(), ci_sample("animation"))
    assert run.outcome == "done"
