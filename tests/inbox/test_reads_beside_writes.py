"""Reads never block writes: the inspection commands on an inbox of 100,000 events, while
a receiver on the same file keeps taking callbacks.

The inbox commands open it read-only, on connections of their own; a query that walks
every event (a run status no event has) holds no lock a commit waits for. How long the
commands take is printed here and measured in `python -m bench.inspector`; this test
asserts what must hold: every callback posted meanwhile is answered 200 and stored.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import httpx
import orjson

from receiver import parse_callback
from receiver.inbox import Receipt
from receiver.inbox.sqlite import SqliteInbox
from tests.support.processes import REPO, Receiver

EVENTS = 100_000
TAGS = ("Transcode", "Snapshot", "SmartCover")


def body(number: int) -> bytes:
    return orjson.dumps(
        {
            "EventName": "TaskFinish",
            "JobsDetail": {
                "JobId": f"j{number:032x}",
                "State": "Failed" if number % 50 == 0 else "Success",
                "Tag": TAGS[number % 3],
                "Input": {
                    "BucketId": "media-1250000000",
                    "Region": "ap-guangzhou",
                    "Object": f"videos/{number}.mp4",
                },
            },
        }
    )


async def fill(inbox: SqliteInbox) -> None:
    async def store(number: int) -> None:
        raw = body(number)
        receipt = Receipt(raw, "http", datetime.now(timezone.utc), f"fill-{number}")
        await inbox.store(receipt, [(event, ["archive"]) for event in parse_callback(raw)])

    for start in range(0, EVENTS, 1000):
        await asyncio.gather(*(store(n) for n in range(start, start + 1000)))


def test_inspection_commands_on_a_big_inbox_never_hold_up_callbacks(tmp_path):
    data = tmp_path / "data"
    inbox = SqliteInbox(data / "inbox.db", synchronous="normal", rejected_body_bytes=1024)

    async def prepare() -> None:
        await inbox.open()
        try:
            await fill(inbox)
        finally:
            await inbox.close()

    asyncio.run(prepare())
    # The receiver runs another handler: the 100,000 `archive` runs stay pending, as a
    # big backlog would.
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{data}"\n[handlers.log]\ntype = "log"\n')
    receiver = Receiver(config).start()
    commands = [
        ("events", "list", "--status", "done", "--json"),  # no event matches: walks all
        ("events", "list", "--tag", "Snapshot", "--state", "Failed", "--limit", "200"),
        ("events", "list", "--key", "videos/9999*.mp4", "--json"),
        ("stats", "--since", "24h", "--json"),
    ]
    answers: list[int] = []
    slowest = 0.0
    reading = threading.Event()

    def post_while_reading() -> None:
        nonlocal slowest
        number = EVENTS
        while not reading.is_set():
            began = time.monotonic()
            try:
                answers.append(receiver.post(body(number)).status_code)
            except httpx.HTTPError:  # held up past the client's timeout: what this is about
                answers.append(0)
            slowest = max(slowest, time.monotonic() - began)
            number += 1

    try:
        poster = threading.Thread(target=post_while_reading)
        poster.start()
        durations = {}
        for command in commands:
            began = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "receiver.cli", *command, "--config", str(config)],
                capture_output=True,
                env={"PYTHONPATH": str(REPO)},
                timeout=120,
            )
            durations[" ".join(command)] = time.monotonic() - began
            assert result.returncode == 0, result.stderr
        reading.set()
        poster.join(60)
        assert not poster.is_alive()
        print({name: f"{seconds:.2f} s" for name, seconds in durations.items()})
        print(f"{len(answers)} callbacks posted meanwhile, the slowest answered in {slowest:.3f} s")
        assert answers
        assert set(answers) == {200}
        listed = subprocess.run(
            [sys.executable, "-m", "receiver.cli", "events", "list", "--limit", "1", "--json",
             "--config", str(config)],
            capture_output=True, env={"PYTHONPATH": str(REPO)}, timeout=60,
        )  # fmt: skip
        newest = orjson.loads(listed.stdout.splitlines()[0])
        assert int(newest["job_id"][1:], 16) >= EVENTS  # what was posted meanwhile is there
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
