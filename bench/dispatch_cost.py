"""CPU per callback to store it and to dispatch it through the `log` handler, next to
the same figures of another copy of the code (the baseline), measured in the same run.

    python -m bench.dispatch_cost [--against REV] [--callbacks N] [--rounds R] [--postgres]

REV is a git revision to compare with, exported with this tree's measuring code
(bench/trees.py). Each round runs one process per tree, alternately, each with its tree
first on PYTHONPATH; the best round of each is kept. A process builds the default
service (config defaults: SQLite with synchronous=full, the `log` handler at info, its
lines written to /dev/null) and measures CPU time (`time.process_time`: every thread,
user and system) for:

- store: N distinct small JSON callbacks through the ingest path, 32 at a time (as 32
  connections would send them), the dispatcher not yet running (their runs stored
  pending, none leased to the process as `serve` leases those it can start);
- dispatch: the dispatcher then claiming, running and recording all N runs;
- both at once: N more callbacks stored while the dispatcher runs, until all are done
  (how `serve` runs them), with the inbox commits per callback;
- the handler alone: the `log` handler called N times, the work dispatch carries out;
- the collector: CPU in garbage collection per callback over store and dispatch (with
  `--freeze`, what start-up made is frozen first, as `serve` does).

No HTTP: what is measured is the ingest path, the inbox and the dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.trees import HERE, best_of, export

CONNECTIONS = 32


class _Collections:
    """CPU the garbage collector takes, from its own callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._began = 0.0
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._began


class _Pending:
    """A handoff that leases nothing: runs are stored pending, for the loop to claim."""

    def __init__(self, dispatcher: Any) -> None:
        self._dispatcher = dispatcher

    def reserve(self, runs: list) -> dict:
        return {}

    def stored(self, request_id: str, runs: list, leases: dict) -> None:
        self._dispatcher.notify(runs)

    def abandoned(self, leases: dict) -> None:
        pass


async def _measure(count: int, postgres: str | None, freeze: bool) -> dict[str, float]:
    import handlers as handler_api
    from receiver import parse_callback
    from receiver.config import Config
    from receiver.inbox import Receipt
    from receiver.runtime.service import Service
    from tests.support.callbacks import job

    def bodies() -> list[bytes]:
        return [job(f"j{uuid.uuid4().hex}") for _ in range(count)]

    def receipt(body: bytes) -> Receipt:
        headers = {"content-type": "application/json"}
        return Receipt(body, "http", datetime.now(timezone.utc), "bench", headers, {})

    async def store_all(service: Service, batch: list[bytes]) -> None:
        gate = asyncio.Semaphore(CONNECTIONS)

        async def one(body: bytes) -> None:
            async with gate:
                await service.ingestor.ingest(receipt(body))

        await asyncio.gather(*(one(body) for body in batch))

    async def handled(service: Service, total: int) -> None:
        # The counter's own value: collecting the registry would cost more than dispatch.
        done = service.metrics.attempts.labels("log", "done")._value
        while done.get() < total:
            await asyncio.sleep(0.005)

    with tempfile.TemporaryDirectory() as folder:
        settings: dict = {"data_dir": Path(folder)}
        if postgres:
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            settings["inbox"] = {"url": postgres, "postgres_schema": schema}
        service = Service(Config(**settings))
        await service.inbox.open()
        dispatcher = service.dispatcher
        # The handler started, the dispatch loop not yet: stores leave the runs pending,
        # not leased to this process as they are stored (which would start them at once).
        for slot in dispatcher._handlers:
            await handler_api.start(slot.handler)
            slot.started = True
        handoff = getattr(service.ingestor, "_handoff", None)
        if handoff is not None:
            service.ingestor._handoff = _Pending(dispatcher)
        await store_all(service, bodies()[:50])  # warm up the code paths and the file
        if freeze:
            gc.collect()
            gc.freeze()
        collections = _Collections()
        commits = getattr(service.inbox, "commits", 0)
        began = time.process_time()
        await store_all(service, bodies())
        stored = time.process_time() - began
        if handoff is not None:
            service.ingestor._handoff = handoff
        began = time.process_time()
        await dispatcher.start()
        await handled(service, count + 50)
        dispatched = time.process_time() - began
        commits = getattr(service.inbox, "commits", 0)
        began = time.process_time()
        await store_all(service, bodies())
        await handled(service, 2 * count + 50)
        both = time.process_time() - began
        both_commits = getattr(service.inbox, "commits", 0) - commits
        collected = collections.seconds
        slot = next(iter(dispatcher._handlers))
        sample = [parse_callback(body)[0] for body in bodies()]
        began = time.process_time()
        for event in sample:
            await slot.handler(event)
        alone = time.process_time() - began
        await service.stop()
        if postgres:
            import asyncpg

            connection = await asyncpg.connect(postgres)
            await connection.execute(f"DROP SCHEMA {schema} CASCADE")
            await connection.close()
    micro = 1e6 / count
    return {
        "store": stored * micro,
        "dispatch": dispatched * micro,
        "both": both * micro,
        "commits": both_commits / count,
        "handler": alone * micro,
        "gc": collected * micro / 2,  # over 2N callbacks
    }


def child(count: int, postgres: str | None, freeze: bool) -> None:
    """One measurement in this process, printed as a JSON line."""
    import uvloop

    from receiver.logs import configure_logging

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the log lines go nowhere
    try:
        configure_logging("info", "json")
        figures = uvloop.run(_measure(count, postgres, freeze))
    finally:
        sys.stdout = sys.__stdout__
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", metavar="REV", help="the git revision to compare with")
    parser.add_argument(
        "--its-bench",
        action="store_true",
        help="with --against: the revision measured with its own bench/ (before the layout"
        " by stage, this tree's cannot import its modules)",
    )
    parser.add_argument("--callbacks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="the PostgreSQL inbox")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() after start-up")
    parser.add_argument("--postgres-url", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.callbacks, args.postgres_url, args.freeze)
        return
    postgres = None
    if args.postgres:
        from tests.support.databases import server_url

        postgres = server_url("postgresql")
    arguments = ["--child", "--callbacks", str(args.callbacks)]
    arguments += ["--freeze"] if args.freeze else []
    arguments += ["--postgres-url", postgres] if postgres else []
    work = Path(tempfile.mkdtemp(prefix="bench-dispatch-rev-"))
    try:
        trees = {}
        if args.against:
            baseline = export(args.against, work / "baseline", own_bench=args.its_bench)
            trees["baseline"] = baseline
        best = best_of(args.rounds, {**trees, "this": HERE}, "bench.dispatch_cost", arguments)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    backend = "PostgreSQL" if postgres else "SQLite (synchronous=full)"
    print(
        f"{backend}, {args.callbacks} JSON callbacks, {CONNECTIONS} at a time, best of"
        f" {args.rounds}; CPU µs per callback (every thread)\n"
    )
    labels = {
        "store": "store (dispatcher idle)",
        "dispatch": "dispatch through `log`",
        "both": "store + dispatch at once",
        "commits": "inbox commits per callback",
        "handler": "the `log` handler alone",
        "gc": "garbage collection",
    }
    print(f"{'':<30}{'this':>10}" + (f"{'baseline':>10}{'ratio':>8}" if args.against else ""))
    for key, label in labels.items():
        line = f"{label:<30}{best['this'][key]:>10.2f}"
        if args.against:
            base = best["baseline"][key]
            line += f"{base:>10.2f}{best['this'][key] / base if base else 0:>8.2f}"
        print(line)


if __name__ == "__main__":
    main()
