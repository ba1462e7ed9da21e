"""The time limit of handlers' attempts: asyncio's `timeout` in meaning, one timer per
loop in cost. Each test runs on asyncio's loop and on uvloop's, as `serve` does."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from receiver.dispatch.deadline import Timeout, timeout

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coroutine)

    return run


async def limited(seconds: float, work: float) -> float:
    """How long a block that would take `work` seconds ran under a limit of `seconds`
    (TimeoutError if it was ended)."""
    began = time.monotonic()
    async with timeout(seconds):
        await asyncio.sleep(work)
    return time.monotonic() - began


def test_a_block_past_its_limit_ends_with_timeout_error_at_its_deadline(run):
    async def main() -> float:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await limited(0.2, 10)
        return time.monotonic() - began

    assert 0.19 <= run(main()) < 1.0


def test_a_block_in_time_is_left_alone_after_it(run):
    async def main() -> None:
        await limited(0.1, 0)
        await asyncio.sleep(0.3)  # past the deadline: nothing cancels this task

    run(main())


def test_blocks_of_many_lengths_each_end_at_their_own_deadline(run):
    # Interleaved lengths, starts and finishes: only those past their limit end, each
    # at its own deadline (the timer moves to an earlier deadline as one arrives).
    cases = [(0.6, 0.1), (0.3, 5), (0.6, 5), (0.1, 5), (0.3, 0.05), (0.6, 0.2), (0.1, 0.01)]

    async def one(seconds: float, work: float, start: float) -> tuple[str, float]:
        await asyncio.sleep(start)
        began = time.monotonic()
        try:
            await limited(seconds, work)
        except TimeoutError:
            return "ended", time.monotonic() - began
        return "done", time.monotonic() - began

    async def main() -> list[tuple[str, float]]:
        return await asyncio.gather(
            *(one(seconds, work, 0.02 * i) for i, (seconds, work) in enumerate(cases))
        )

    for (seconds, work), (how, took) in zip(cases, run(main()), strict=True):
        if work > seconds:
            assert how == "ended"
            assert seconds - 0.01 <= took < seconds + 0.5
        else:
            assert how == "done"


def test_a_cancellation_from_outside_stays_a_cancellation(run):
    async def main() -> None:
        task = asyncio.create_task(limited(5, 10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_a_cancellation_at_the_deadline_from_outside_is_not_taken_for_the_limit(run):
    # The task is cancelled by someone else (a shutdown) in the same turn as its limit
    # ends: as with asyncio's, the cancellation goes on rather than a TimeoutError.
    async def main() -> None:
        limits: list[Timeout] = []

        async def block() -> None:
            async with timeout(0.1) as limit:
                limits.append(limit)
                await asyncio.sleep(10)

        task = asyncio.create_task(block())
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        # At the limit's own deadline, not one read off the clock again: under load a
        # millisecond may pass in between, and the two would fire in separate turns.
        loop.call_at(limits[0].when, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_a_handler_that_swallows_its_cancellation_leaves_no_pending_cancel(run):
    async def main() -> None:
        async with timeout(0.05):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0
        await asyncio.sleep(0.01)  # not cancelled again

    run(main())


def test_nested_limits_the_inner_one_first(run):
    async def main() -> str:
        async with timeout(5):
            try:
                async with timeout(0.05):
                    await asyncio.sleep(10)
            except TimeoutError:
                return "inner"
        return "none"

    assert run(main()) == "inner"


def test_many_blocks_of_one_length_share_one_timer():
    # What the module is for: asyncio's timeout starts a timer per block.
    async def main() -> int:
        loop = asyncio.get_running_loop()
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        release = asyncio.Event()

        async def block() -> None:
            async with timeout(30):
                await release.wait()

        tasks = [asyncio.create_task(block()) for _ in range(100)]
        await asyncio.sleep(0.01)
        timers = len(loop._scheduled) - before  # type: ignore[attr-defined]
        release.set()
        await asyncio.gather(*tasks)
        return timers

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        assert runner.run(main()) == 1


@pytest.mark.parametrize("new_loop", [LOOPS[name] for name in sorted(LOOPS)], ids=sorted(LOOPS))
def test_a_loop_that_used_it_goes_when_it_is_closed(new_loop):
    # Its open blocks are kept on the loop: nothing else holds the loop afterwards.
    loop = new_loop()
    loop.run_until_complete(limited(5, 0))
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None


def test_a_timeout_is_entered_once(run):
    async def main() -> None:
        limit = timeout(5)
        async with limit:
            pass
        with pytest.raises(RuntimeError, match="already been entered"):
            async with limit:
                pass

    run(main())
