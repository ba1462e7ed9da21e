"""Admission of callbacks by the memory they hold, not by their count.

When a batch of CI jobs ends together, their callbacks arrive at the same moment, and CI
documents no retry: a callback refused is a callback lost. So a callback that finds no
room waits for some (up to `http.admission_wait`) rather than being refused at once,
and what bounds the callbacks in progress is what they cost: the bytes of their bodies
(declared by Content-Length, or read so far of a chunked one) plus `REQUEST_COST` each,
for what decoding and storing one holds besides its body (its document, its events, its
task). A waiting callback holds only its connection and what it has sent so far, and
those waiting are bounded too: their bodies and constants within another `budget`;
past that, a callback is refused at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

# What a callback in progress holds besides its body (decoded document, events, the
# request's task and buffers), rounded up from what a burst of small callbacks costs
# (`python -m bench.burst`: peak RSS against the number in progress).
REQUEST_COST = 16 * 1024


class Ticket:
    """The room one admitted callback holds."""

    __slots__ = ("bytes",)

    def __init__(self, size: int) -> None:
        self.bytes = size


class Admission:
    """`budget` bytes for the callbacks in progress. One that does not fit waits, first
    come first served, for at most `wait` seconds, while those waiting hold less than
    another `budget`."""

    def __init__(self, budget: int, wait: float) -> None:
        self.budget = budget
        self.wait = wait
        self.used = 0
        self.waiting = 0
        self.waiting_bytes = 0  # of those waiting to enter
        # (bytes wanted, bytes already held, future) in arrival order; one leaves when
        # admitted, or once expired.
        self._waiters: deque[tuple[int, int, asyncio.Future[bool]]] = deque()

    async def enter(self, size: int) -> Ticket | None:
        """Room for a callback whose body is `size` bytes (so far); None when none came
        within `wait` seconds, or at once when those waiting already hold `budget`."""
        charge = size + REQUEST_COST
        if not self.waiting and self._fits(charge, 0):
            self.used += charge
            return Ticket(charge)
        if self.waiting_bytes and self.waiting_bytes + charge > self.budget:  # nor to wait
            return None
        self.waiting_bytes += charge
        try:
            admitted = await self._wait_for_room(charge, 0, self.wait)
        finally:
            self.waiting_bytes -= charge
        if admitted:
            return Ticket(charge)
        return None

    async def grow(self, ticket: Ticket, more: int, *, deadline: float) -> bool:
        """Room for `more` bytes of a chunked body being read, waiting until `deadline`
        (time.monotonic()) at most. An admitted callback goes before those still waiting
        to enter: the room it holds frees the sooner."""
        held = ticket.bytes
        if self._fits(more, held):
            self.used += more
        elif not await self._wait_for_room(more, held, deadline - time.monotonic(), first=True):
            return False
        ticket.bytes += more
        return True

    def leave(self, ticket: Ticket) -> None:
        self._give_back(ticket.bytes)
        ticket.bytes = 0

    # ---------------------------------------------------------------------------------

    def _fits(self, charge: int, held: int) -> bool:
        # One callback larger than the whole budget still goes in (or grows) alone.
        return self.used + charge <= self.budget or self.used == held

    def _give_back(self, charge: int) -> None:
        self.used -= charge
        waiters = self._waiters
        while waiters:  # in order, those that fit now, up to the first that does not
            charge, held, future = waiters[0]
            if future.done():  # expired, or its request cancelled
                waiters.popleft()
                continue
            if not self._fits(charge, held):
                return
            waiters.popleft()
            self.waiting -= 1
            self.used += charge
            future.set_result(True)

    async def _wait_for_room(
        self, charge: int, held: int, timeout: float, *, first: bool = False
    ) -> bool:
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        if first:
            self._waiters.appendleft((charge, held, future))
        else:
            self._waiters.append((charge, held, future))
        self.waiting += 1
        expiry = loop.call_later(timeout, self._expire, future)
        try:
            return await future
        except asyncio.CancelledError:
            # The request cancelled (the server stopping): give back any room it was
            # given meanwhile.
            if future.cancelled():
                self.waiting -= 1
            elif future.result():
                self._give_back(charge)
            raise
        finally:
            expiry.cancel()

    def _expire(self, future: asyncio.Future[bool]) -> None:
        if not future.done():
            self.waiting -= 1
            future.set_result(False)
