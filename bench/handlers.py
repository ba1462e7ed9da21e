"""Events per second through the `sql` and `webhook` handlers, next to a bare baseline.

    python -m bench.handlers [--events N] [--concurrency C] [--rounds R]

Each handler is called directly, C calls in flight at a time (what the dispatcher
does with `concurrency = C`), on N distinct jobs per round; the inbox and the
dispatcher are not part of it. Baselines, measured in the same run and interleaved
with the handler's rounds:

- sql: a plain INSERT of the same row into a copy of the jobs table (and of the event
  row into a copy of the events table, with history), one transaction per event, same
  driver and concurrency: what the conditional upsert costs over writing the rows.
- webhook: a bare httpx POST of the same JSON body to the same server, same pool and
  concurrency: what serializing and signing add.

SQLite runs in a temp folder; PostgreSQL and MySQL run when the machine's servers answer
(see tests/support/databases.py); the webhook goes to a uvicorn server in its own process on
loopback.
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
from pathlib import Path

import httpx
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine

from handlers.sql import SqlHandler, async_url
from handlers.sql_tables import event_row, events_table, job_row, jobs_table
from handlers.webhook import WebhookHandler
from receiver import parse_callback
from receiver.callback.event import Event
from tests.support.callbacks import load
from tests.support.databases import answers, drop_tables, server_url
from tests.support.processes import free_port, wait_for_port

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


async def best_of(
    rounds: int, count: int, limit: int, *calls: Callable[[Event], Awaitable[None]]
) -> list[float]:
    """Best events/s of each call, rounds interleaved; fresh jobs every round."""
    best = [0.0] * len(calls)
    await asyncio.gather(*(call(event) for call in calls for event in make_events(20)))  # warm
    for _ in range(rounds):
        for i, call in enumerate(calls):
            best[i] = max(best[i], await rate(call, make_events(count), limit))
    return best


async def bench_sql(url: str, history: bool, args: argparse.Namespace) -> tuple[float, float]:
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
        handled, bare = await best_of(
            args.rounds, args.events, args.concurrency, handler, bare_insert
        )
    finally:
        await handler.close()
        await engine.dispose()
        await drop_tables(
            url,
            [options["table"], options["events_table"], bare_jobs.name, bare_events.name],
        )
    return handled, bare


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
            args.rounds, args.events, args.concurrency, handler, bare_post
        )
    finally:
        await handler.close()
        await client.aclose()
    return handled, bare


def start_sink() -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.sink:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}/hook"


async def main(args: argparse.Namespace) -> None:
    print(
        f"python {sys.version.split()[0]}, {args.events} events per round, best of "
        f"{args.rounds}, handler concurrency {args.concurrency}\n"
    )
    print(f"{'handler':<32}{'events/s':>10}{'baseline':>10}  baseline is")

    with tempfile.TemporaryDirectory() as folder:
        databases = [("SQLite", f"sqlite:///{folder}/bench.db")]
        for name, backend in (("PostgreSQL", "postgresql"), ("MySQL", "mysql")):
            url = server_url(backend)
            if answers(url):
                databases.append((name, url))
            else:
                print(f"({name} does not answer: left out)")
        for name, url in databases:
            for history in (False, True):
                label = f"sql on {name}" + (" + history" if history else "")
                handled, bare = await bench_sql(url, history, args)
                print(f"{label:<32}{handled:>10.0f}{bare:>10.0f}  plain INSERT of the same rows")

    sink, url = start_sink()
    try:
        handled, bare = await bench_webhook(url, args)
    finally:
        sink.terminate()
        sink.wait(10)
    label = "webhook to loopback"
    print(f"{label:<32}{handled:>10.0f}{bare:>10.0f}  bare httpx POST of the same body")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1000, help="events per round")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
