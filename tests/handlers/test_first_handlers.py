"""The built-in log, jsonl and sqlite handlers, driven directly."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import timedelta, timezone

import orjson
import pytest

import handlers
from handlers import BatchContext
from receiver import parse_callback
from receiver.dispatch.outcomes import handler_logger
from receiver.ownership import NotOurs
from tests.support.callbacks import load


async def started(type_name: str, **options):
    handler = handlers.build(type_name, options)
    await handlers.start(handler)
    return handler


async def test_jsonl_writes_a_batch_as_one_fsynced_write(tmp_path, monkeypatch):
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    path = tmp_path / "deep" / "events.jsonl"
    handler = await started("jsonl", path=str(path))
    events = [
        event
        for name in ("transcode.xml", "two_jobs.xml", "smartcover.json", "workflow_finish.xml")
        for event in parse_callback(load(name))
    ]
    ctx = BatchContext(handler="jsonl", deadline=0.0, log=handler_logger, runs={})
    assert await handler.handle_batch(events[:-1], ctx) is None
    await handler(events[-1])  # called alone, as the first contract
    await handlers.close(handler)
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["id"] for line in lines] == [event.id for event in events]
    assert lines[0] == orjson.loads(events[0].to_json())
    assert len(fsyncs) == 2


async def test_jsonl_can_leave_out_the_raw_document(tmp_path):
    handler = await started("jsonl", path=str(tmp_path / "e.jsonl"), include_raw=False)
    await handler(parse_callback(load("transcode.xml"))[0])
    await handlers.close(handler)
    (line,) = (tmp_path / "e.jsonl").read_bytes().splitlines()
    assert "raw" not in orjson.loads(line)
    assert orjson.loads(line)["operation"]["TemplateName"] == "trans_993874"


async def test_jsonl_appends_to_its_own_file_and_never_to_anybody_elses(tmp_path):
    event = parse_callback(load("transcode.xml"))[0]
    ours = tmp_path / "events.jsonl"
    for _ in range(2):  # a restart appends to the file it wrote
        handler = await started("jsonl", path=str(ours), include_raw=False)
        await handler(event)
        await handlers.close(handler)
    assert len(ours.read_bytes().splitlines()) == 2

    theirs = tmp_path / "app.log"
    theirs.write_bytes(b'{"level": "info", "msg": "a line of theirs"}\n')
    before = theirs.read_bytes()
    with pytest.raises(NotOurs, match=f"the file {theirs} was not created by ci-receiver"):
        await started("jsonl", path=str(theirs))
    # While rotating, the day's file is claimed when the day's first event is written.
    day = event.received_at.astimezone(timezone.utc).date().isoformat()
    theirs.with_name(f"app-{day}.log").write_bytes(before)
    handler = await started("jsonl", path=str(theirs), rotate="daily")
    with pytest.raises(NotOurs):
        await handler(event)
    await handlers.close(handler)
    assert theirs.read_bytes() == theirs.with_name(f"app-{day}.log").read_bytes() == before


async def test_jsonl_follows_its_file_when_it_is_rotated_away_or_deleted(tmp_path):
    first, second, third = parse_callback(load("two_jobs.xml")) + parse_callback(
        load("transcode.xml")
    )
    path = tmp_path / "events.jsonl"
    handler = await started("jsonl", path=str(path), include_raw=False)
    try:
        await handler(first)
        path.rename(tmp_path / "events.jsonl.1")  # logrotate's rename
        await handler(second)
        (tmp_path / "events.jsonl.1").unlink()  # ... and its compression, later
        path.unlink()  # or a user cleaning up
        await handler(third)
    finally:
        await handlers.close(handler)
    assert [orjson.loads(line)["id"] for line in path.read_bytes().splitlines()] == [third.id]


async def test_jsonl_fails_only_the_events_of_a_file_it_could_not_write(tmp_path):
    # A batch across two days (midnight, a replay): the first day's lines are written
    # once, and only the second day's events are left to retry.
    today, yesterday = parse_callback(load("two_jobs.xml"))
    yesterday.received_at -= timedelta(days=1)
    path = tmp_path / "events.jsonl"
    theirs = path.with_name(f"events-{today.received_at.astimezone(timezone.utc).date()}.jsonl")
    theirs.write_bytes(b"somebody else's\n")
    handler = await started("jsonl", path=str(path), rotate="daily", include_raw=False)
    ctx = BatchContext(handler="jsonl", deadline=0.0, log=handler_logger, runs={})
    try:
        failed = await handler.handle_batch([yesterday, today], ctx)
    finally:
        await handlers.close(handler)
    assert list(failed) == [today.id]
    assert isinstance(failed[today.id], NotOurs)
    written = path.with_name(
        f"events-{yesterday.received_at.astimezone(timezone.utc).date()}.jsonl"
    )
    assert [orjson.loads(line)["id"] for line in written.read_bytes().splitlines()] == [
        yesterday.id
    ]
    assert theirs.read_bytes() == b"somebody else's\n"


def job_rows(path):
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT job_id, state, event_id, outputs FROM ci_jobs").fetchall()


async def test_sqlite_jobs_table_is_upserted_and_never_moves_backwards(tmp_path):
    path = tmp_path / "jobs.db"
    handler = await started("sqlite", path=str(path))
    body = load("transcode.xml")
    running = parse_callback(body.replace(b"<State>Success", b"<State>Running"))[0]
    success = parse_callback(body)[0]
    await handler(running)
    assert [row[1] for row in job_rows(path)] == ["Running"]
    await handler(success)
    await handler(running)  # late, after Success
    await handler(success)  # replayed
    await handlers.close(handler)
    ((job_id, state, event_id, outputs),) = job_rows(path)
    assert (job_id, state, event_id) == (success.job_id, "Success", success.id)
    assert orjson.loads(outputs) == [o.to_dict() for o in success.outputs]


async def test_sqlite_takes_the_history_options_of_sql(tmp_path):
    path = tmp_path / "jobs.db"
    handler = await started(
        "sqlite", path=str(path), table="ci_jobs", history=True, events_table="ci_events"
    )
    events = parse_callback(load("two_jobs.xml"))
    for event in events:
        await handler(event)
    await handlers.close(handler)
    with sqlite3.connect(path) as connection:
        jobs = connection.execute("SELECT job_id FROM ci_jobs").fetchall()
        history = connection.execute("SELECT event_id FROM ci_events").fetchall()
    assert sorted(jobs) == sorted((event.job_id,) for event in events)
    assert sorted(history) == sorted((event.id,) for event in events)


async def test_log_handler_logs_a_failed_job_with_its_code(capsys, restore_logging):
    from receiver.logs import configure_logging

    configure_logging("info", "json")  # here: capsys captures only while the test runs
    handler = await started("log")
    await handler(parse_callback(load("smartcover_failed.xml"))[0])
    await asyncio.sleep(0)  # the turn's lines are written as it ends
    out = capsys.readouterr().out.splitlines()
    (line,) = [orjson.loads(text) for text in out if '"event":"event"' in text]
    assert (line["tag"], line["state"], line["code"]) == (
        "SmartCover",
        "Failed",
        "ResourceDownloadFailed",
    )


def test_a_plain_async_function_is_a_handler_without_options():
    async def handle(event):
        return None

    import types

    module = types.ModuleType("plain_handlers")
    module.handle = handle
    import sys

    sys.modules["plain_handlers"] = module
    assert handlers.build("plain_handlers:handle", {}) is handle
    with pytest.raises(handlers.HandlerConfigError, match="takes no options"):
        handlers.build("plain_handlers:handle", {"x": 1})
