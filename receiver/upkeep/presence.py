"""Which processes run on an inbox, with which handlers.

Each running service says so in the inbox's small state every half minute, so that a
replay can tell when no running process would ever run what it queues (a handler added
to the config file but not to the receivers that run it yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import structlog

from receiver.ids import new_id, process_of
from receiver.inbox import KeptState, Reading, RunState

logger = structlog.get_logger("ci_receiver.presence")

PREFIX = "process:"
INTERVAL_SECONDS = 30.0
# A process not heard of for this long is gone (killed, or its host is).
GONE_SECONDS = 3 * INTERVAL_SECONDS
# Entries of processes gone this long are removed.
FORGET_SECONDS = 86400.0


@dataclass(slots=True)
class Process:
    host: str
    pid: int
    handlers: list[str]
    seen: float  # time.time() when it last said so


class Presence:
    name = "presence"

    def __init__(self, inbox: KeptState, handlers: list[str]) -> None:
        self._inbox = inbox
        self.handlers = list(handlers)
        self._key = f"{PREFIX}{socket.gethostname()}:{os.getpid()}:{new_id()}"
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    await self.announce()
                    await _forget_gone(self._inbox)
                except Exception as exc:  # the inbox failing shows in /readyz already
                    logger.debug("presence not recorded", error=str(exc))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), INTERVAL_SECONDS)
        finally:
            with contextlib.suppress(Exception):
                await self._inbox.delete_state(self._key)

    def stop(self) -> None:
        self._stopping.set()

    async def announce(self) -> None:
        process = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "handlers": self.handlers,
            "seen": time.time(),
        }
        await self._inbox.set_state(self._key, orjson.dumps(process).decode())


async def names(inbox: Reading, runs: list[RunState]) -> dict[str, str]:
    """`host (pid N)` of each process heard of, by the prefix of the ids it makes (what
    a lease it holds names: `ids.process_of`); read only when one of `runs` is being run."""
    found: dict[str, str] = {}
    if not any(run.leased_by is not None for run in runs):
        return found
    for key, value in (await inbox.states(PREFIX)).items():
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError):
            process = orjson.loads(value)
            # The key ends with an id the process made (`Presence`).
            found[process_of(key.rpartition(":")[2])] = f"{process['host']} (pid {process['pid']})"
    return found


def holder(run: RunState, names: dict[str, str]) -> str:
    """Which process runs `run` (it holds its lease), as `names` calls it."""
    return names.get(run.leased_by or "", f"process {run.leased_by}")


async def running(inbox: KeptState) -> list[Process]:
    """The processes heard of lately."""
    return [p for p in await _processes(inbox) if time.time() - p.seen < GONE_SECONDS]


def runnable(processes: list[Process], configured: Iterable[str]) -> set[str]:
    """The handlers some process runs: those `configured` here, and those of the
    `processes` heard of lately (`running`: another replica's config may have more)."""
    return set(configured).union(*(process.handlers for process in processes))


async def _processes(inbox: KeptState) -> list[Process]:
    found = []
    for value in (await inbox.states(PREFIX)).values():
        try:
            found.append(Process(**orjson.loads(value)))
        except (orjson.JSONDecodeError, TypeError):
            continue
    return found


async def _forget_gone(inbox: KeptState) -> None:
    for key, value in (await inbox.states(PREFIX)).items():
        with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError):
            if time.time() - orjson.loads(value)["seen"] > FORGET_SECONDS:
                await inbox.delete_state(key)
