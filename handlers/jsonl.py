"""`jsonl`: append one JSON line per event to a file, fsync'd before the attempt counts.

Concurrent events share one write and one fsync. Delivery to the file is at-least-once:
after a crash between the fsync and the inbox recording it, a line can appear twice;
each line carries the event `id` to tell.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydantic import BaseModel, ConfigDict

from receiver.model import Event


class JsonLinesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path
    # The decoded document can be large; leave it out for a slimmer file.
    include_raw: bool = True
    fsync: bool = True


class JsonLinesHandler:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = JsonLinesOptions.model_validate(options)
        self._file: BinaryIO | None = None
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = self.options.path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 (held open for the handler's life)

    async def __call__(self, event: Event) -> None:
        record = event.to_dict()
        if not self.options.include_raw:
            del record["raw"]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((orjson.dumps(record) + b"\n", done))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        await done

    async def close(self) -> None:
        if self._flushing is not None:
            await self._flushing
        if self._file is not None:
            self._file.close()
            self._file = None

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
                except Exception as exc:
                    for _, done in batch:
                        if not done.done():  # a waiter that timed out cancelled its future
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._flushing = None

    def _write(self, data: bytes) -> None:
        if self._file is None:
            raise RuntimeError("the jsonl handler is not started")
        self._file.write(data)
        self._file.flush()
        if self.options.fsync:
            os.fsync(self._file.fileno())
