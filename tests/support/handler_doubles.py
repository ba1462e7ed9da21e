"""A handler for tests, configured by dotted path (`tests.support.handler_doubles:Recorder`)
in a ci-receiver process: it appends what it sees to a JSON-lines file."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from receiver.callback.event import Event


class Recorder:
    """Options: `path` (required), `fail_first` (fail the first N attempts of each event),
    `delay` (seconds per attempt)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.path = Path(options["path"])
        self.fail_first = int(options.get("fail_first", 0))
        self.delay = float(options.get("delay", 0))
        self.seen: Counter[str] = Counter()

    async def __call__(self, event: Event) -> None:
        self.seen[event.id] += 1
        self._write("started", event)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.seen[event.id] <= self.fail_first:
            self._write("failed", event)
            raise RuntimeError(f"planned failure {self.seen[event.id]} of {self.fail_first}")
        self._write("done", event)

    def _write(self, what: str, event: Event) -> None:
        line = {"what": what, "id": event.id, "pid": os.getpid(), "source": event.source}
        with open(self.path, "ab") as file:
            file.write(orjson.dumps(line) + b"\n")


class CannotStart:
    """A handler whose start always fails with a message naming its secrets, as a
    driver's error can: options `token` and `url`."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.token = options["token"]
        self.url = options["url"]

    async def start(self) -> None:
        raise PermissionError(f"{self.url} refused the login with token {self.token}")

    async def __call__(self, event: Event) -> None:
        raise AssertionError("never started, never called")


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file that a process may still be appending to:
    a last line without its newline is still being written."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [orjson.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def recorded(path: Path, what: str = "done") -> list[str]:
    return [line["id"] for line in json_lines(path) if line["what"] == what]


def _planned_line() -> int:
    lines, first = inspect.getsourcelines(Recorder.__call__)
    return first + next(i for i, line in enumerate(lines) if "planned failure" in line)


# The error of a planned failure, as the inbox keeps it: with where it was raised.
PLANNED = (
    "RuntimeError: planned failure {} of {}"
    f" (raised at support/handler_doubles.py:{_planned_line()} in __call__)"
)
