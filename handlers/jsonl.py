"""`jsonl`: append one JSON line per event to a file, fsync'd before the attempt counts.

Events come in batches (`handle_batch`): a batch is one write and one fsync (per file,
when rotating: the days it holds). Delivery
to the file is at-least-once: after a crash between the fsync and the inbox recording
it, a line can appear twice; each line carries the event `id` to tell.

With `rotate = "daily"` there is one file per UTC day, the date put before the suffix
(`events.jsonl` -> `events-2026-11-22.jsonl`). An event goes to the file of the day it
was received, so a retried or replayed event lands among the events of its own day.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

from handlers import BatchContext, BatchResult, HandlerOptions
from receiver.callback.event import Event
from receiver.ownership import claim


class JsonLinesOptions(HandlerOptions):
    path: Path
    # The decoded document can be large; leave it out for a slimmer file.
    include_raw: bool = True
    fsync: bool = True
    rotate: Literal["none", "daily"] = "none"


class JsonLinesHandler:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = JsonLinesOptions.model_validate(options)
        self._file: BinaryIO | None = None
        self._file_path: Path | None = None
        self._started = False
        # Writes run in one thread, one after the other, in the order asked: a batch
        # that timed out cannot interleave its lines with the next one's.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jsonl")

    async def start(self) -> None:
        self.options.path.parent.mkdir(parents=True, exist_ok=True)
        if self.options.rotate == "none":
            self._open(self.options.path)
        self._started = True

    def path_for(self, event: Event) -> Path:
        path = self.options.path
        if self.options.rotate == "none":
            return path
        day = event.received_at.astimezone(timezone.utc).date().isoformat()
        return path.with_name(f"{path.stem}-{day}{path.suffix}")

    async def __call__(self, event: Event) -> None:
        failed = await self._append([event])
        if failed:
            raise next(iter(failed.values()))

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext) -> BatchResult:
        return await self._append(events) or None

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._file_path, self._started = None, None, False
        self._writer.shutdown(wait=False)  # this is its last task

    async def _append(self, events: Sequence[Event]) -> dict[str, BaseException]:
        """The events' lines, each file's in one write and one fsync; the events of the
        files that could not be written, with why (those of the others are written, and
        must not be written again when these are retried)."""
        include_raw = self.options.include_raw
        by_path: dict[Path, list[Event]] = {}
        for event in events:
            by_path.setdefault(self.path_for(event), []).append(event)
        loop = asyncio.get_running_loop()
        failed: dict[str, BaseException] = {}
        for path, in_file in by_path.items():
            data = b"".join(event.to_json(include_raw=include_raw) + b"\n" for event in in_file)
            try:
                await loop.run_in_executor(self._writer, self._write, path, data)
            except Exception as exc:
                failed.update((event.id, exc) for event in in_file)
        return failed

    def _write(self, path: Path, data: bytes) -> None:
        if not self._started:
            raise RuntimeError("the jsonl handler is not started")
        if path != self._file_path or self._moved():
            self._open(path)
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        if self.options.fsync:
            os.fsync(self._file.fileno())

    def _moved(self) -> bool:
        """Whether the open file is no longer at its path (rotated away or deleted): lines
        written to it now would be lost with it."""
        assert self._file is not None
        assert self._file_path is not None
        try:
            there = os.stat(self._file_path)
        except FileNotFoundError:
            return True
        return not os.path.samestat(there, os.fstat(self._file.fileno()))

    def _open(self, path: Path) -> None:
        # One file open at a time: the current day's, while rotating.
        if self._file is not None:
            self._file.close()
            self._file, self._file_path = None, None
        _claim(path)
        self._file = open(path, "ab")  # noqa: SIM115 (held open until the next file)
        self._file_path = path


# How every line this handler writes begins (Event.to_json): a file that begins so is its own.
_OUR_LINE = re.compile(rb'\{"id":"[^"\n]*","kind":"')


def _claim(path: Path) -> None:
    """Refuse (`NotOurs`) to append to a file of somebody else's: the path may name a log,
    a config, a database, mistyped or copied."""
    try:
        with open(path, "rb") as existing:
            head = existing.read(4096)
    except FileNotFoundError:
        head = b""
    claim(
        f"the file {path}",
        "`path`",
        exists=bool(head),
        marked=bool(_OUR_LINE.match(head)),
        shaped=False,
    )
