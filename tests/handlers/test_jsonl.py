"""The `jsonl` handler: lines on disk, and a file per UTC day when rotating."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import datetime, timedelta, timezone

import handlers
from tests.support.sample_events import at_state, event


def received(base, when: datetime):
    return dataclasses.replace(base, received_at=when)


async def test_daily_rotation_files_each_event_under_its_utc_day(tmp_path):
    base = event("transcode.xml")
    # 23:30 UTC and 00:30 UTC the next day; the first is already the 23rd in Beijing.
    late = received(base, datetime(2026, 11, 22, 23, 30, tzinfo=timezone.utc))
    early = received(
        at_state(base, "Failed"), datetime(2026, 11, 23, 8, 30, tzinfo=timezone(timedelta(hours=8)))
    )
    handler = handlers.build("jsonl", {"path": str(tmp_path / "events.jsonl"), "rotate": "daily"})
    await handlers.start(handler)
    try:
        await asyncio.gather(handler(late), handler(early))
        await handler(late)  # a repeat goes back to its own day's file
    finally:
        await handlers.close(handler)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events-2026-11-22.jsonl",
        "events-2026-11-23.jsonl",
    ]
    day_one = (tmp_path / "events-2026-11-22.jsonl").read_text().splitlines()
    day_two = (tmp_path / "events-2026-11-23.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in day_one] == [late.id, late.id]
    assert [json.loads(line)["id"] for line in day_two] == [early.id]


async def test_without_rotation_one_file_is_appended_across_restarts(tmp_path):
    path = tmp_path / "out" / "events.jsonl"
    for name in ("smartcover.xml", "snapshot.xml"):
        handler = handlers.build("jsonl", {"path": str(path), "include_raw": False})
        await handlers.start(handler)
        try:
            await handler(event(name))
        finally:
            await handlers.close(handler)

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["tag"] for line in lines] == ["SmartCover", "Snapshot"]
    assert all("raw" not in line for line in lines)
    assert [p.name for p in path.parent.iterdir()] == ["events.jsonl"]
