"""The `timeout` that a handler's start and attempts run under.

It means what asyncio's `timeout` means: at the deadline the block's task is cancelled,
and that cancellation comes out of the block as `TimeoutError`; any other cancellation
goes on as it is. But asyncio's makes, starts and cancels a timer on the loop for every
block, which cost each attempt of the `log` handler more CPU than the handler itself
(docs/benchmarks.md). Here the blocks of a loop share one timer: blocks of one length end
in the order they began, so the oldest open block of each length is the next of them to
end, and the timer is set for the earliest of those. When it fires, it ends the blocks
past their deadline and is set again for what is still open (not at all if nothing is).
A block that ends in time only leaves its length's list.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

# A timer may fire this early (libuv counts in milliseconds): a block whose deadline is
# this close is ended with the others rather than by a timer of its own.
EARLY_SECONDS = 0.001


class _OpenBlocks:
    """The open blocks of one loop, by length, each length's in the order they began,
    and the timer set for the earliest deadline among them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._by_length: dict[float, dict[Timeout, None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, block: Timeout) -> None:
        self._by_length.setdefault(block.seconds, {})[block] = None
        if block.when < self._timer_at:
            self._set_timer(block.when)

    def remove(self, block: Timeout) -> None:
        blocks = self._by_length.get(block.seconds)
        if blocks is not None:
            blocks.pop(block, None)
            if not blocks:
                del self._by_length[block.seconds]

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time() + EARLY_SECONDS
        earliest = math.inf
        for seconds, blocks in list(self._by_length.items()):
            due = []
            for block in blocks:
                if block.when > now:
                    earliest = min(earliest, block.when)
                    break
                due.append(block)
            for block in due:
                del blocks[block]
                block.expire()
            if not blocks:
                del self._by_length[seconds]
        if earliest < math.inf:
            self._set_timer(earliest)


# Where a loop keeps its open blocks: on the loop itself, so that they go with it (kept
# in a table by loop, they would hold their loop, and it them, for ever).
_ON_THE_LOOP = "_ci_receiver_open_blocks"


class Timeout:
    """`async with timeout(seconds):` one block, limited to `seconds`."""

    __slots__ = ("_cancelling", "_expired", "_open", "_task", "seconds", "when")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.when = math.inf
        self._expired = False

    async def __aenter__(self) -> Timeout:
        if self.when != math.inf:  # as asyncio's: one block each
            raise RuntimeError("this timeout has already been entered")
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("timeout() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.when = loop.time() + self.seconds
        open_blocks: _OpenBlocks | None = getattr(loop, _ON_THE_LOOP, None)
        if open_blocks is None:
            open_blocks = _OpenBlocks(loop)
            setattr(loop, _ON_THE_LOOP, open_blocks)
        self._open = open_blocks
        open_blocks.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._expired:
            self._open.remove(self)
        # As asyncio's: ours, unless the task was cancelled again meanwhile.
        elif self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()


def timeout(seconds: float) -> Timeout:
    return Timeout(seconds)


__all__ = ["timeout"]
