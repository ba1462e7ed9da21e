"""Events per second through the `sql` and `webhook` handlers, next to a bare baseline.

    python -m bench.handlers [--events N] [--concurrency C] [--rounds R]
                             [--batch-size B] [--db-rtt MS [MS ...]]

Each handler is called directly, C calls in flight at a time (what the dispatcher
does with `concurrency = C`), on N distinct jobs per round; the inbox and the
dispatcher are not part of it. `sql` is called both ways in the same run: event by
event (`__call__`, how every event reached it before batches) and in batches of B
(`handle_batch`, how the dispatcher calls it now, C batches in flight). Baselines,
measured in the same run and interleaved with the handler's rounds:

- sql: a plain INSERT of the same row into a copy of the jobs table (and of the event
  row into a copy of the events table, with history), one transaction per event, same
  driver and concurrency: what a team writes first, and what the conditional upsert
  costs over writing the rows.
- webhook: a bare httpx POST of the same JSON body to the same server, same pool and
  concurrency: what serializing and signing add.

SQLite runs in a temp folder; PostgreSQL and MySQL run when the machine's servers answer
(see tests/support/databases.py), PostgreSQL also behind bench/delay_proxy.py at each
`--db-rtt`; the webhook goes to a uvicorn server in its own process on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from bench import sink
from bench.delay_proxy import database_behind
from handlers import BatchContext
from handlers.sql import SqlHandler, async_url
from handlers.sql_tables import event_row, events_table, job_row, jobs_table
from handlers.webhook import WebhookHandler
from receiver import parse_callback
from receiver.callback.event import Event
from receiver.dispatch.outcomes import handler_logger
from tests.support.callbacks import load
from tests.support.databases import answers, drop_tables, server_url

SECRET = "whsec_" + base64.b64encode(b"benchmark secret, thirty-two by!").decode()


def make_events(count: int) -> list[Event]:
    base = parse_callback(load("smartcover.xml"))[0]
    jobs = [f"jbench{uuid.uuid4().hex[:24]}" for _ in range(count)]
    return [dataclasses.replace(base, job_id=job, id=f"job:{job}:Success") for job in jobs]


async def rate(call: Callable[[Event], Awaitable[None]], events: list[Event], limit: int) -> float:
    """Events per second with at most `limit` calls in flight."""
    gate = asyncio.Semaphore(limit)

    async def one(event: Event) -> None:
        async with gate:
            await call(event)

    began = time.perf_counter()
    await asyncio.gather(*(one(event) for event in events))
    return len(events) / (time.perf_counter() - began)


def batched(
    handle_batch: Callable[[list[Event], BatchContext], Awaitable[object]], size: int
) -> Callable[[list[Event], int], Awaitable[float]]:
    """A runner giving the events to `handle_batch` in batches of `size`."""
    ctx = BatchContext(handler="bench", deadline=0.0, log=handler_logger, runs={})

    async def run(events: list[Event], limit: int) -> float:
        batches = [events[i : i + size] for i in range(0, len(events), size)]

        gate = asyncio.Semaphore(limit)

        async def one(batch: list[Event]) -> None:
            async with gate:
                if await handle_batch(batch, ctx):
                    raise RuntimeError("the batch handler refused events")

        began = time.perf_counter()
        await asyncio.gather(*(one(batch) for batch in batches))
        return len(events) / (time.perf_counter() - began)

    return run


def one_by_one(
    call: Callable[[Event], Awaitable[None]],
) -> Callable[[list[Event], int], Awaitable[float]]:
    async def run(events: list[Event], limit: int) -> float:
        return await rate(call, events, limit)

    return run


async def best_of(
    rounds: int, count: int, limit: int, *runners: Callable[[list[Event], int], Awaitable[float]]
) -> list[float]:
    """Best events/s of each runner, rounds interleaved; fresh jobs every round."""
    best = [0.0] * len(runners)
    for runner in runners:  # warm
        await runner(make_events(20), limit)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            best[i] = max(best[i], await runner(make_events(count), limit))
    return best


async def bench_sql(
    url: str, history: bool, args: argparse.Namespace
) -> tuple[float, float, float]:
    """Events/s: the handler event by event, in batches, and the plain INSERT."""
    suffix = uuid.uuid4().hex[:8]
    options = {
        "url": url,
        "table": f"bench_jobs_{suffix}",
        "history": history,
        "events_table": f"bench_events_{suffix}",
    }
    handler = SqlHandler(options)
    await handler.start()
    # The baseline's tables: the same columns, plain INSERTs built once, like the upsert.
    metadata = MetaData()
    bare_jobs = jobs_table(metadata, f"bench_bare_jobs_{suffix}")
    bare_events = events_table(metadata, f"bench_bare_events_{suffix}")
    engine = create_async_engine(async_url(url), pool_size=5)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    insert_job, insert_event = bare_jobs.insert(), bare_events.insert()

    async def bare_insert(event: Event) -> None:
        async with engine.begin() as connection:
            await connection.execute(insert_job, job_row(event))
            if history:
                await connection.execute(insert_event, event_row(event, include_raw=False))

    try:
        single, batches, bare = await best_of(
            args.rounds,
            args.events,
            args.concurrency,
            one_by_one(handler),
            batched(handler.handle_batch, args.batch_size),
            one_by_one(bare_insert),
        )
    finally:
        await handler.close()
        await engine.dispose()
        await drop_tables(
            url,
            [options["table"], options["events_table"], bare_jobs.name, bare_events.name],
        )
    return single, batches, bare


async def bench_webhook(url: str, args: argparse.Namespace) -> tuple[float, float]:
    handler = WebhookHandler({"url": url, "secret": SECRET, "max_connections": args.concurrency})
    await handler.start()
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    client = httpx.AsyncClient(limits=limits, timeout=10)

    async def bare_post(event: Event) -> None:
        response = await client.post(
            url, content=event.to_json(), headers={"Content-Type": "application/json"}
        )
        response.raise_for_status()

    try:
        handled, bare = await best_of(
            args.rounds, args.events, args.concurrency, one_by_one(handler), one_by_one(bare_post)
        )
    finally:
        await handler.close()
        await client.aclose()
    return handled, bare


def start_sink() -> tuple[subprocess.Popen, str]:
    process, url = sink.start()
    return process, f"{url}/hook"


async def main(args: argparse.Namespace) -> None:
    print(
        f"python {sys.version.split()[0]}, {args.events} events per round, best of "
        f"{args.rounds}, handler concurrency {args.concurrency}, batches of "
        f"{args.batch_size}\n"
    )
    print(
        f"{'handler':<34}{'events/s':>10}{'batches':>10}{'ratio':>7}{'baseline':>10}  baseline is"
    )

    with tempfile.TemporaryDirectory() as folder:
        databases: list[tuple[str, str, float | None]] = [
            ("SQLite", f"sqlite:///{folder}/bench.db", None)
        ]
        for name, backend in (("PostgreSQL", "postgresql"), ("MySQL", "mysql")):
            url = server_url(backend)
            if not answers(url):
                print(f"({name} does not answer: left out)")
                continue
            databases.append((name, url, None))
            if backend == "postgresql":
                databases += [(f"{name} {rtt:g} ms", url, rtt) for rtt in args.db_rtt]
        for name, url, rtt in databases:
            with database_behind(url, rtt) as (reached, _):
                for history in (False, True):
                    label = f"sql on {name}" + (" + history" if history else "")
                    single, batches, bare = await bench_sql(reached, history, args)
                    print(
                        f"{label:<34}{single:>10.0f}{batches:>10.0f}{batches / single:>6.1f}x"
                        f"{bare:>10.0f}  plain INSERT, one transaction per event"
                    )

    sink, url = start_sink()
    try:
        handled, bare = await bench_webhook(url, args)
    finally:
        sink.terminate()
        sink.wait(10)
    label = "webhook to loopback"
    print(
        f"{label:<34}{handled:>10.0f}{'':>10}{'':>7}{bare:>10.0f}  bare httpx POST of the same body"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="events per round")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100, help="events per sql batch")
    parser.add_argument(
        "--db-rtt", type=float, nargs="+", default=[], metavar="MS",
        help="also run PostgreSQL behind the delay proxy at these RTTs",
    )  # fmt: skip
    asyncio.run(main(parser.parse_args()))
