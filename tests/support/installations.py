"""ci-receiver installations in a folder, for the TDMQ and CMQ tests: configs, publishing
with the official Pulsar client, reading the results.

Results are read straight from the files a ci-receiver process writes (its SQLite inbox
and a `jsonl` handler's file), so the tests see what a user would find there.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pulsar

from receiver.inbox.records import stored_body
from receiver.inbox.sqlite import SqliteReader
from tests.support.handler_doubles import json_lines
from tests.support.processes import free_port

T = TypeVar("T")

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjaS1yZWNlaXZlciJ9.test-role-token"


def write_config(
    path: Path,
    broker_url: str,
    topic: str,
    *,
    data_dir: Path,
    jsonl: Path,
    tdmq: str = "",
    extra: str = "",
) -> Path:
    """A config as a user writes it: the TDMQ section, a jsonl handler to count with."""
    path.write_text(
        f"""
data_dir = "{data_dir}"
[log]
format = "json"
[dispatch]
poll_interval = 0.2
[tdmq]
service_url = "{broker_url}"
token = "{TOKEN}"
topics = ["{topic}"]
nack_delay = 0.5
{tdmq}
[handlers.jobs]
type = "jsonl"
path = "{jsonl}"
include_raw = false
{extra}
"""
    )
    return path


def publish(
    broker_url: str,
    topic: str,
    messages: Iterable[bytes | tuple[bytes, dict[str, str]]],
    **send: Any,
) -> int:
    """Publish with the official client, unbatched, each confirmed; returns how many.
    `send` goes to every `producer.send` (e.g. `event_timestamp`)."""
    client = pulsar.Client(broker_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        producer = client.create_producer(topic, batching_enabled=False)
        count = 0
        for message in messages:
            body, properties = message if isinstance(message, tuple) else (message, {})
            producer.send(body, properties=properties, **send)
            count += 1
        return count
    finally:
        client.close()


def wait_until(check: Callable[[], T], what: str, timeout: float = 60) -> T:
    """Poll `check` until it returns something truthy; a bound against hangs, not a speed
    assertion."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still not the case after {timeout}s")
        time.sleep(0.1)


def handled(jsonl: Path) -> Counter[str]:
    """How many times the jsonl handler was given each event id."""
    return Counter(line["id"] for line in json_lines(jsonl))


def query(inbox: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    if not inbox.exists():
        return []
    connection = sqlite3.connect(inbox, timeout=10)
    try:
        return connection.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the schema is not created yet
        return []
    finally:
        connection.close()


def receipts(inbox: Path) -> list[dict[str, Any]]:
    rows = query(
        inbox,
        "SELECT id, source, outcome, error_reason, body, headers, source_meta, event_ids,"
        " size, request_id FROM receipts ORDER BY id",
    )
    return [
        {
            "id": row[0],
            "source": row[1],
            "outcome": row[2],
            "error_reason": row[3],
            "body": stored_body(row[4], row[2]) if row[4] is not None else None,
            "headers": orjson.loads(row[5]),
            "source_meta": orjson.loads(row[6]),
            "event_ids": orjson.loads(row[7]),
            "size": row[8],
            "request_id": row[9],
        }
        for row in rows
    ]


def events(inbox: Path) -> dict[str, dict[str, Any]]:
    """Every stored event, whole (read through the inbox, which rebuilds the document)."""

    async def read() -> dict[str, dict[str, Any]]:
        reader = SqliteReader(inbox)
        await reader.open()
        try:
            found = {}
            for _, event_id in await reader.event_ids(limit=100_000):
                detail = await reader.event(event_id)
                assert detail is not None
                found[event_id] = detail.event.to_dict()
            return found
        finally:
            await reader.close()

    return asyncio.run(read()) if inbox.exists() else {}


def variant(body: bytes, number: int) -> bytes:
    """The SmartCover fixture as another job: a distinct event per number."""
    return body.replace(b"j6842765cf84611ecb8546d80f2baf56f", f"j{number:032x}".encode())


class Installation:
    """One ci-receiver installation in a folder: its inbox, and the file of a `jsonl`
    handler that counts what was handled; a subclass writes its config."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.inbox = folder / "data" / "inbox.db"
        self.jsonl = folder / "jobs.jsonl"
        self.config = folder / "ci-receiver.toml"

    def handled(self) -> Counter[str]:
        return handled(self.jsonl)

    def receipts(self) -> list[dict[str, Any]]:
        return receipts(self.inbox)

    def events(self) -> dict[str, dict[str, Any]]:
        return events(self.inbox)


class Site(Installation):
    """An installation consuming a Pulsar topic."""

    def __init__(self, folder: Path, broker_url: str, topic: str, **config: str) -> None:
        super().__init__(folder)
        write_config(
            self.config, broker_url, topic, data_dir=folder / "data", jsonl=self.jsonl, **config
        )


def content_version(name: str) -> dict[str, str]:
    """The header CI sends with a moderation callback, told by the fixture's name."""
    for version in ("Simple", "Detail"):
        if f"_{version.lower()}" in name:
            return {"X-Ci-Content-Version": version}
    return {}


def ci_receiver(*args: str) -> subprocess.CompletedProcess[str]:
    """Run one `ci-receiver` command to its end, as a user at a shell; a command that
    serves gets an admin port of its own (the default one may be taken on this machine)."""
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CI_RECEIVER_ADMIN__PORT": str(free_port())},
    )
