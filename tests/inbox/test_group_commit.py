"""Group commit's failure rules, with a writer standing in for the database: a batch
the server refuses is written again item by item, and once the server is found away,
the items left fail at once instead of each waiting for its own failure."""

from __future__ import annotations

import asyncio

import pytest

from receiver.inbox.group_commit import GroupCommit
from receiver.inbox.types import InboxUnavailable


async def test_a_refused_batch_is_written_item_by_item_until_the_server_is_away():
    writes: list[list[int]] = []

    async def write(items: list[int]) -> list[int]:
        writes.append(items)
        if len(items) > 1:
            raise ValueError("one row refused")
        if items == [2]:
            raise InboxUnavailable("the server went away")
        return [item * 10 for item in items]

    commits = GroupCommit(write, "test")
    first = asyncio.ensure_future(commits.run(0))  # alone: committed at once
    await asyncio.sleep(0)
    results = await asyncio.gather(*(commits.run(i) for i in range(1, 6)), return_exceptions=True)
    assert await first == 0
    assert results[0] == 10
    assert all(isinstance(r, InboxUnavailable) for r in results[1:])
    # Items 3, 4 and 5 were not tried once the server was found away.
    assert writes == [[0], [1, 2, 3, 4, 5], [1], [2]]


async def test_a_writer_returning_too_few_results_fails_its_items_rather_than_hang():
    async def write(items: list[int]) -> list[int]:
        return items[:1]

    commits = GroupCommit(write, "test")
    first = asyncio.ensure_future(commits.run(0))
    await asyncio.sleep(0)
    batch = [commits.run(1), commits.run(2)]
    assert await first == 0
    assert await asyncio.wait_for(asyncio.gather(*batch), 1) == [1, 2]  # each alone


async def test_a_cancelled_caller_leaves_the_batch_to_the_others():
    gate = asyncio.Event()
    written: list[int] = []

    async def write(items: list[int]) -> list[int]:
        await gate.wait()
        written.extend(items)
        return items

    commits = GroupCommit(write, "test")
    calls = [asyncio.ensure_future(commits.run(i)) for i in range(3)]
    await asyncio.sleep(0)
    calls[1].cancel()
    gate.set()
    assert await calls[0] == 0
    assert await calls[2] == 2
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    assert written == [0, 1, 2]
