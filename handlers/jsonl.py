"""`jsonl`: append one JSON line per event to a file, fsync'd before the attempt counts.

Concurrent events share one write and one fsync. Delivery to the file is at-least-once:
after a crash between the fsync and the inbox recording it, a line can appear twice;
each line carries the event `id` to tell.

With `rotate = "daily"` there is one file per UTC day, the date put before the suffix
(`events.jsonl` -> `events-2026-11-22.jsonl`). An event goes to the file of the day it
was received, so a retried or replayed event lands among the events of its own day.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from datetime import timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict

from receiver.callback.event import Event


class JsonLinesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
        self._pending: list[tuple[Path, bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

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
        line = event.to_json(include_raw=self.options.include_raw)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((self.path_for(event), line + b"\n", done))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        await done

    async def close(self) -> None:
        if self._flushing is not None:
            await self._flushing
        if self._file is not None:
            self._file.close()
        self._file, self._file_path, self._started = None, None, False

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                by_path: dict[Path, list[tuple[bytes, asyncio.Future[None]]]] = {}
                for path, line, done in batch:
                    by_path.setdefault(path, []).append((line, done))
                for path, lines in by_path.items():
                    await self._write_lines(path, lines)
        finally:
            self._flushing = None

    async def _write_lines(
        self, path: Path, lines: list[tuple[bytes, asyncio.Future[None]]]
    ) -> None:
        try:
            await asyncio.to_thread(self._write, path, b"".join(line for line, _ in lines))
        except Exception as exc:
            for _, done in lines:
                if not done.done():  # a waiter that timed out cancelled its future
                    done.set_exception(exc)
        else:
            for _, done in lines:
                if not done.done():
                    done.set_result(None)

    def _write(self, path: Path, data: bytes) -> None:
        if not self._started:
            raise RuntimeError("the jsonl handler is not started")
        if path != self._file_path:
            self._open(path)
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        if self.options.fsync:
            os.fsync(self._file.fileno())

    def _open(self, path: Path) -> None:
        # One file open at a time: the current day's, while rotating.
        if self._file is not None:
            self._file.close()
        self._file = open(path, "ab")  # noqa: SIM115 (held open until the next file)
        self._file_path = path
