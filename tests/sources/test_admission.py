"""The admission of callbacks by the bytes they hold (receiver/sources/admission.py), on a
real event loop: waiting for room, in order, within the wait, and giving room back."""

from __future__ import annotations

import asyncio
import time

import pytest

from receiver.sources.admission import REQUEST_COST, Admission

KiB = 1024


def admission(budget_callbacks: int, wait: float = 5.0, size: int = 0) -> Admission:
    """Room for exactly `budget_callbacks` bodies of `size` bytes."""
    return Admission(budget_callbacks * (size + REQUEST_COST), wait)


async def test_within_the_budget_callbacks_go_in_at_once():
    gate = admission(3)
    tickets = [await gate.enter(0) for _ in range(3)]
    assert all(tickets)
    assert gate.used == 3 * REQUEST_COST
    for ticket in tickets:
        gate.leave(ticket)
    assert gate.used == 0


async def test_past_the_budget_a_callback_waits_for_room_then_goes_in():
    gate = admission(2)
    first, second = await gate.enter(0), await gate.enter(0)
    third = asyncio.create_task(gate.enter(0))
    await asyncio.sleep(0.05)
    assert not third.done()
    assert gate.waiting == 1
    gate.leave(first)
    assert await asyncio.wait_for(third, 1) is not None
    assert gate.waiting == 0
    assert gate.used == 2 * REQUEST_COST
    gate.leave(second)


async def test_waiters_go_in_in_the_order_they_came():
    gate = admission(5)
    holders = [await gate.enter(0) for _ in range(5)]
    order: list[int] = []

    async def wait(index: int) -> None:
        ticket = await gate.enter(0)
        order.append(index)
        await asyncio.sleep(0.01)
        gate.leave(ticket)

    waiters = []
    for index in range(5):
        waiters.append(asyncio.create_task(wait(index)))
        await asyncio.sleep(0)
    for ticket in holders:
        gate.leave(ticket)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]


async def test_no_room_within_the_wait_is_a_refusal_and_leaves_nothing_behind():
    gate = admission(1, wait=0.2)
    holder = await gate.enter(0)
    began = time.monotonic()
    assert await gate.enter(0) is None
    assert 0.15 < time.monotonic() - began < 1
    assert gate.waiting == 0
    gate.leave(holder)
    assert gate.used == 0
    assert await gate.enter(0) is not None  # the expired waiter took nothing


async def test_room_is_counted_by_bytes_not_by_callbacks():
    gate = Admission(100 * KiB + 2 * REQUEST_COST, wait=0.2)
    large = await gate.enter(100 * KiB)
    assert await gate.enter(0) is not None  # a small one still fits beside it
    assert await gate.enter(0) is None  # a second one does not
    gate.leave(large)
    assert await gate.enter(50 * KiB) is not None


async def test_a_callback_larger_than_the_whole_budget_goes_in_alone():
    gate = admission(1, wait=0.2)
    alone = await gate.enter(10 * gate.budget)
    assert alone is not None
    assert await gate.enter(0) is None
    gate.leave(alone)


async def test_a_chunked_body_grows_before_the_waiting_ones():
    gate = admission(2, wait=1)
    reading, other = await gate.enter(0), await gate.enter(0)
    newcomer = asyncio.create_task(gate.enter(0))
    await asyncio.sleep(0.01)
    growing = asyncio.create_task(gate.grow(reading, KiB, deadline=time.monotonic() + 1))
    await asyncio.sleep(0.01)
    gate.leave(other)  # room for one: the body being read gets it
    assert await asyncio.wait_for(growing, 1) is True
    assert not newcomer.done()
    gate.leave(reading)
    assert await asyncio.wait_for(newcomer, 1) is not None


async def test_a_chunked_body_alone_grows_past_the_budget():
    gate = admission(1, wait=1)
    reading = await gate.enter(0)
    assert await gate.grow(reading, 10 * gate.budget, deadline=time.monotonic() + 5) is True
    gate.leave(reading)
    assert gate.used == 0


async def test_a_body_that_cannot_grow_before_its_deadline_is_refused():
    gate = admission(2, wait=1)
    reading, other = await gate.enter(0), await gate.enter(0)
    began = time.monotonic()
    assert await gate.grow(reading, KiB, deadline=began + 0.2) is False
    assert 0.15 < time.monotonic() - began < 1
    assert gate.waiting == 0
    assert gate.used == 2 * REQUEST_COST
    gate.leave(reading)
    gate.leave(other)
    assert gate.used == 0


async def test_a_growing_body_left_alone_while_it_waits_goes_on():
    gate = admission(2, wait=1)
    reading, other = await gate.enter(0), await gate.enter(0)
    growing = asyncio.create_task(gate.grow(reading, gate.budget, deadline=time.monotonic() + 5))
    await asyncio.sleep(0.01)
    assert not growing.done()
    gate.leave(other)  # now it is alone: it may pass the budget
    assert await asyncio.wait_for(growing, 1) is True
    gate.leave(reading)
    assert gate.used == 0


async def test_a_waiter_cancelled_gives_back_what_it_was_given():
    gate = admission(1)
    holder = await gate.enter(0)
    waiting = asyncio.create_task(gate.enter(0))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.waiting == 0
    gate.leave(holder)
    assert gate.used == 0


async def test_those_waiting_are_bounded_too_past_that_a_refusal_at_once():
    gate = admission(2, wait=5)
    holders = [await gate.enter(0), await gate.enter(0)]
    waiting = [asyncio.create_task(gate.enter(0)) for _ in range(2)]  # a budget's worth
    await asyncio.sleep(0.01)
    assert gate.waiting == 2
    began = time.monotonic()
    assert await gate.enter(0) is None  # no room to wait either
    assert time.monotonic() - began < 0.1
    for ticket in holders:
        gate.leave(ticket)
    for ticket in await asyncio.gather(*waiting):
        assert ticket is not None
        gate.leave(ticket)
    assert gate.used == 0
    assert gate.waiting_bytes == 0


async def test_a_waiter_cancelled_once_given_room_gives_it_back():
    gate = admission(1)
    holder = await gate.enter(0)
    waiting = asyncio.create_task(gate.enter(0))
    await asyncio.sleep(0.01)
    gate.leave(holder)  # the room goes to the waiter, which has not run since
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.used == 0
    assert gate.waiting == 0
    assert await gate.enter(0) is not None
