"""Inbox bytes per stored callback, next to the callback's own size.

    python -m bench.inbox_size [--copies 500] [--postgres URL | --no-postgres] [--tables]

For every sample callback, stores `--copies` copies (each a distinct job, the body's
size unchanged) with one handler run each, handles them (one attempt each), and prints
how many bytes the inbox grew by per callback: the SQLite file, and with `--postgres`
(default: the machine's server, when it answers) the tables of a PostgreSQL inbox in a
schema of its own, dropped afterwards. The ratio to the body's size is the figure the
lean inbox is judged by (each callback's bytes are kept once, compressed; an event row
keeps only its normalized fields). `--tables` adds where the bytes go: each table and
index per callback (SQLite's `dbstat`, PostgreSQL's relation sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sqlite3
import statistics
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

from receiver import parse_callback
from receiver.config import Config
from receiver.inbox import Inbox, Receipt
from receiver.inbox.factory import open_inbox
from tests.support.callbacks import ALL, load

HEADERS = {"content-type": "application/xml", "user-agent": "CI callback"}


def copies_of(name: str, count: int) -> list[bytes]:
    """`count` variants of a fixture, each a distinct job: the last hex digits of every
    id it holds (JobId, RunId, trace_id) replaced by a counter of the same width."""
    body = load(name)
    ids = {e.job_id for e in parse_callback(body, _headers(name)) if e.job_id}
    variants = []
    for number in range(count):
        variant = body
        for subject in ids:
            if len(subject) < 8:
                continue
            variant = variant.replace(subject.encode(), f"{subject[:-6]}{number:06x}".encode())
        variants.append(variant)
    return variants


def _headers(name: str) -> dict[str, str]:
    version = re.search(r"_(simple|detail)", name)
    return {"x-ci-content-version": version.group(1).title()} if version else {}


async def fill(inbox: Inbox, bodies: list[bytes], name: str) -> int:
    """Store and handle the bodies; how many events they made."""
    headers = {**HEADERS, **_headers(name)}
    events = 0
    for body in bodies:
        routed = [(event, ["log"]) for event in parse_callback(body, headers)]
        receipt = Receipt(body, "http", datetime.now(timezone.utc), "bench", headers, {})
        events += len((await inbox.store(receipt, routed)).new)
    while claims := await inbox.claim("log", 500, 60):
        for claim in claims:
            await inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))
    return events


Tables = dict[str, float]


def _growth(before: dict[str, int], after: dict[str, int], count: int) -> Tables:
    return {name: (size - before.get(name, 0)) / count for name, size in after.items()}


async def sqlite_bytes(name: str, rounds: tuple[list[bytes], list[bytes]]) -> tuple[float, Tables]:
    """Bytes per callback of the second round on SQLite, in all and per table."""
    with tempfile.TemporaryDirectory() as folder:
        config = Config(data_dir=Path(folder), inbox={"synchronous": "normal"})
        sizes = []
        for bodies in rounds:
            inbox = open_inbox(config)
            await inbox.open()
            await fill(inbox, bodies, name)
            await inbox.close()  # folded from its WAL
            connection = sqlite3.connect(config.inbox_path)
            tables = connection.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
            sizes.append((config.inbox_path.stat().st_size, dict(tables.fetchall())))
            connection.close()
        count = len(rounds[1])
        return (sizes[1][0] - sizes[0][0]) / count, _growth(sizes[0][1], sizes[1][1], count)


async def postgres_bytes(
    url: str, name: str, rounds: tuple[list[bytes], list[bytes]]
) -> tuple[float, Tables]:
    """Bytes per callback of the second round on PostgreSQL, in all and per relation."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    config = Config(inbox={"url": url, "postgres_schema": schema})
    inbox = open_inbox(config)
    await inbox.open()
    connection = await asyncpg.connect(url)
    try:
        sizes = []
        for bodies in rounds:
            await fill(inbox, bodies, name)
            sizes.append(await _relation_sizes(connection, schema))
        count = len(rounds[1])
        total = (sum(sizes[1].values()) - sum(sizes[0].values())) / count
        return total, _growth(sizes[0], sizes[1], count)
    finally:
        await inbox.close()
        await connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await connection.close()


async def _relation_sizes(connection: asyncpg.Connection, schema: str) -> dict[str, int]:
    """Each table (with its TOAST) and index of the schema, VACUUMed first: bytes of live
    rows, not of dead ones awaiting autovacuum."""
    tables = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    for table in tables:
        await connection.execute(f'VACUUM "{schema}"."{table[0]}"')
    rows = await connection.fetch(
        "SELECT c.relname, CASE c.relkind WHEN 'r' THEN pg_table_size(c.oid)"
        " ELSE pg_relation_size(c.oid) END FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind IN ('r', 'i')",
        schema,
    )
    return {row[0]: row[1] for row in rows}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--tables", action="store_true", help="bytes per table and index")
    arguments = parser.parse_args()
    postgres = None if arguments.no_postgres else arguments.postgres
    print(
        f"{arguments.copies} copies of each sample on top of as many, one handler run and"
        " attempt each"
    )
    header = f"{'callback':<36} {'body':>6} {'SQLite':>8} {'ratio':>6}"
    if postgres:
        header += f" {'PostgreSQL':>11} {'ratio':>6}"
    print(header)
    ratios: dict[str, list[float]] = {"sqlite": [], "postgres": []}
    for name in ALL:
        bodies = copies_of(name, 2 * arguments.copies)
        rounds = (bodies[: arguments.copies], bodies[arguments.copies :])
        size = statistics.mean(len(body) for body in rounds[1])
        on_sqlite, sqlite_tables = await sqlite_bytes(name, rounds)
        ratios["sqlite"].append(on_sqlite / size)
        line = f"{name:<36} {size:>6.0f} {on_sqlite:>8.0f} {on_sqlite / size:>5.2f}x"
        tables = {"SQLite": sqlite_tables}
        if postgres:
            on_postgres, tables["PostgreSQL"] = await postgres_bytes(postgres, name, rounds)
            ratios["postgres"].append(on_postgres / size)
            line += f" {on_postgres:>11.0f} {on_postgres / size:>5.2f}x"
        print(line, flush=True)
        if arguments.tables:
            for backend, sizes in tables.items():
                ordered = sorted(sizes.items(), key=lambda item: -item[1])
                listed = ", ".join(f"{table} {size:.0f}" for table, size in ordered if size >= 1)
                print(f"    {backend}: {listed}")
    for backend, values in ratios.items():
        if values:
            print(
                f"{backend}: inbox bytes per callback / body size: median"
                f" {statistics.median(values):.2f}x, largest {max(values):.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
