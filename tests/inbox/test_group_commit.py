"""Group commit's rules, with a writer and sessions standing in for the database and
its connections: a batch the server refuses is written again item by item, and once the
server is found away, the items left fail at once instead of each waiting for its own
failure; batches in a row share one session, and a session lost or not had is the
failure of one batch, the next taking a new one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from receiver.inbox import group_commit
from receiver.inbox.group_commit import GroupCommit
from receiver.inbox.types import InboxUnavailable


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[None]:
    yield None


class Sessions:
    """Numbered sessions; `refuse` of them cannot be had; which are open."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.numbers = itertools.count(1)
        self.taken: list[int] = []
        self.open: set[int] = set()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[int]:
        if self.refuse:
            self.refuse -= 1
            raise InboxUnavailable("no connection")
        number = next(self.numbers)
        self.taken.append(number)
        self.open.add(number)
        try:
            yield number
        finally:
            self.open.discard(number)


async def started(commits: GroupCommit[Any, int, int], item: int) -> asyncio.Future[int]:
    """`commits.run(item)`, under way far enough that its batch leaves out any item
    run after it."""
    call = asyncio.ensure_future(commits.run(item))
    await asyncio.sleep(0)
    return call


async def test_a_refused_batch_is_written_item_by_item_until_the_server_is_away():
    writes: list[list[int]] = []

    async def write(_: None, items: list[int]) -> list[int]:
        writes.append(items)
        if len(items) > 1:
            raise ValueError("one row refused")
        if items == [2]:
            raise InboxUnavailable("the server went away")
        return [item * 10 for item in items]

    commits = GroupCommit(write, session, "test")
    first = await started(commits, 0)  # alone: committed at once
    results = await asyncio.gather(*(commits.run(i) for i in range(1, 6)), return_exceptions=True)
    assert await first == 0
    assert results[0] == 10
    assert all(isinstance(r, InboxUnavailable) for r in results[1:])
    # Items 3, 4 and 5 were not tried once the server was found away.
    assert writes == [[0], [1, 2, 3, 4, 5], [1], [2]]


async def test_a_writer_returning_too_few_results_fails_its_items_rather_than_hang():
    async def write(_: None, items: list[int]) -> list[int]:
        return items[:1]

    commits = GroupCommit(write, session, "test")
    first = await started(commits, 0)
    batch = [commits.run(1), commits.run(2)]
    assert await first == 0
    assert await asyncio.wait_for(asyncio.gather(*batch), 1) == [1, 2]  # each alone


async def test_a_cancelled_caller_leaves_the_batch_to_the_others():
    gate = asyncio.Event()
    written: list[int] = []

    async def write(_: None, items: list[int]) -> list[int]:
        await gate.wait()
        written.extend(items)
        return items

    commits = GroupCommit(write, session, "test")
    calls = [asyncio.ensure_future(commits.run(i)) for i in range(3)]
    await asyncio.sleep(0)
    calls[1].cancel()
    gate.set()
    assert await calls[0] == 0
    assert await calls[2] == 2
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    assert written == [0, 1, 2]


async def zero_then_one_and_two(
    sessions: Sessions,
) -> tuple[GroupCommit[int, int, int], list[tuple[int, list[int]]]]:
    """Item 0 committed alone, items 1 and 2 arriving while it is: the group commit, and
    what was written through which session."""
    written: list[tuple[int, list[int]]] = []
    gate = asyncio.Event()

    async def write(number: int, items: list[int]) -> list[int]:
        written.append((number, items))
        await gate.wait()
        return items

    commits = GroupCommit(write, sessions.hold, "test")
    first = await started(commits, 0)
    later = [asyncio.ensure_future(commits.run(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(first, *later) == [0, 1, 2]
    return commits, written


async def test_batches_in_a_row_share_one_session_given_back_after_the_last():
    sessions = Sessions()
    commits, written = await zero_then_one_and_two(sessions)
    assert written == [(1, [0]), (1, [1, 2])]
    assert sessions.open == set()
    assert await commits.run(3) == 3  # after a pause: a session of its own
    assert written[-1] == (2, [3])


async def test_a_session_not_had_fails_its_batch_and_the_next_batch_tries_again():
    sessions = Sessions(refuse=1)

    async def write(number: int, items: list[int]) -> list[int]:
        return items

    commits = GroupCommit(write, sessions.hold, "test")
    first = await started(commits, 0)
    second = asyncio.ensure_future(commits.run(1))  # waits for the next batch
    with pytest.raises(InboxUnavailable, match="no connection"):
        await first
    assert await second == 1
    assert sessions.taken == [1]


async def test_a_session_lost_during_a_batch_is_replaced_for_the_next():
    sessions = Sessions()
    gate = asyncio.Event()
    written: list[tuple[int, list[int]]] = []

    async def write(number: int, items: list[int]) -> list[int]:
        written.append((number, items))
        await gate.wait()
        if number == 1:
            raise InboxUnavailable("the server went away")
        return items

    commits = GroupCommit(write, sessions.hold, "test")
    first = await started(commits, 0)
    second = await started(commits, 1)
    gate.set()
    with pytest.raises(InboxUnavailable):
        await first
    assert await second == 1
    assert written == [(1, [0]), (2, [1])]
    assert sessions.open == set()


async def test_a_refused_batch_is_written_again_each_item_in_a_new_session():
    # The session the batch failed on may be what failed (a connection closed under it):
    # the items are tried again on others.
    sessions = Sessions()
    written: list[tuple[int, list[int]]] = []

    async def write(number: int, items: list[int]) -> list[int]:
        written.append((number, items))
        if number == 2:
            raise RuntimeError("the connection was closed")
        return items

    commits = GroupCommit(write, sessions.hold, "test")
    first = await started(commits, 0)
    assert await first == 0
    assert await asyncio.gather(commits.run(1), commits.run(2)) == [1, 2]
    assert written == [(1, [0]), (2, [1, 2]), (3, [1]), (4, [2])]
    assert sessions.open == set()


async def test_an_item_alone_that_met_a_dying_session_is_tried_once_more_on_another():
    sessions = Sessions()

    async def write(number: int, items: list[int]) -> list[int]:
        if number == 1:
            raise RuntimeError("another operation is in progress")  # asyncpg, dying
        if items == [1]:
            raise ValueError("the server refuses this row")
        return items

    commits = GroupCommit(write, sessions.hold, "test")
    assert await commits.run(0) == 0  # on session 2
    with pytest.raises(ValueError, match="refuses"):  # on sessions 3 and 4: it stands
        await commits.run(1)
    assert sessions.taken == [1, 2, 3, 4]


async def test_a_session_is_given_back_after_a_while_however_many_batches_wait(monkeypatch):
    # So that a burst never keeps a connection from the pool's other users.
    monkeypatch.setattr(group_commit, "MOST_SECONDS_HELD", 0.0)
    _, written = await zero_then_one_and_two(Sessions())
    assert written == [(1, [0]), (2, [1, 2])]


async def test_items_committed_are_not_written_again_when_their_session_fails_to_close():
    # A pool closing under the group commit may refuse the connection it is given back.
    written: list[list[int]] = []

    @contextlib.asynccontextmanager
    async def hold() -> AsyncIterator[None]:
        yield None
        raise RuntimeError("the pool is closed")

    async def write(_: None, items: list[int]) -> list[int]:
        written.append(items)
        return items

    commits = GroupCommit(write, hold, "test")
    assert await commits.run(0) == 0
    assert written == [[0]]


async def test_an_item_whose_caller_left_is_still_written_again_after_its_batch_failed():
    # An outcome's attempt cancelled at shutdown still wants its record kept.
    written: list[list[int]] = []
    gate = asyncio.Event()

    async def write(_: None, items: list[int]) -> list[int]:
        written.append(items)
        await gate.wait()
        if len(items) > 1:
            raise ValueError("one row refused")
        return items

    commits = GroupCommit(write, session, "test")
    first = await started(commits, 0)
    gone, staying = asyncio.ensure_future(commits.run(1)), asyncio.ensure_future(commits.run(2))
    await asyncio.sleep(0)
    gone.cancel()
    gate.set()
    assert await first == 0
    assert await staying == 2
    assert written == [[0], [1, 2], [1], [2]]
