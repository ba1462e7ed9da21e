"""A burst: N senders, each with one honest callback, all at the same moment.

    python -m bench.burst [--senders 1000,2000,5000] [--bodies xml,json]
                          [--inboxes sqlite,postgres] [--against REV]

When a batch of CI jobs ends together (a folder of videos snapshotted, a moderation
sweep), CI's senders arrive at once, and CI documents no retry: a callback refused is
lost. For each inbox, body format and N, a fresh `ci-receiver serve` runs its embedded
default (no config; the PostgreSQL inbox is the one thing added for that row), then N
connections are opened at once, each posting one 2.3 KB Snapshot callback with a JobId
of its own (XML, or its JSON form) and reading the answer. Printed per row: answers by
status (`closed`: the connection ended with no answer), the time from the start of the
burst to the last 200, p50/p99 of the answers, the server's peak RSS (VmHWM), the
events stored and, on PostgreSQL, the transactions that stored them (the distinct xmin
of the receipts: SQLite keeps no such trace). `--env NAME=VALUE` sets a key of the
receiver's (CI_RECEIVER_...).

`--against REV` runs the same rows on another revision (bench/trees.py) in the same run
and prints both. PostgreSQL: CI_RECEIVER_TEST_POSTGRES_URL (default
postgresql://postgres@127.0.0.1:5432/test), a schema per row, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from tests.support.bursts import burst
from tests.support.databases import server_url
from tests.support.processes import free_port


async def measure(port: int, senders: int, body: str) -> dict[str, Any]:
    answers = await burst(port, senders, body)
    ok = sorted(answer.seconds for answer in answers if answer.status == "200")
    everything = sorted(answer.seconds for answer in answers)
    return {
        "answers": dict(sorted(Counter(answer.status for answer in answers).items())),
        "last_200_s": round(ok[-1], 2) if ok else None,
        "p50_ms": round(everything[len(everything) // 2] * 1000),
        "p99_ms": round(everything[int(len(everything) * 0.99)] * 1000),
    }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM")


def commits(postgres: str, schema: str) -> int:
    """The transactions that stored the burst: each receipt row's xmin is the one that
    wrote it."""

    async def count() -> int:
        connection = await asyncpg.connect(postgres, server_settings={"search_path": schema})
        try:
            return int(await connection.fetchval("SELECT count(DISTINCT xmin::text) FROM receipts"))
        finally:
            await connection.close()

    return asyncio.run(count())


def stored(work: Path, postgres: str | None, schema: str) -> int:
    query = "SELECT count(*) FROM events"
    if postgres is None:
        with contextlib.closing(
            sqlite3.connect(work / "ci-receiver-data" / "inbox.db")
        ) as connection:
            return int(connection.execute(query).fetchone()[0])

    async def count() -> int:
        connection = await asyncpg.connect(postgres, server_settings={"search_path": schema})
        try:
            return int(await connection.fetchval(query))
        finally:
            await connection.close()

    return asyncio.run(count())


def drop(postgres: str, schema: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(postgres)
        try:
            await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await connection.close()

    asyncio.run(run())


def wait_ready(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError("serve not ready")


def row(inbox: str, body: str, senders: int, args_env: Sequence[str] = ()) -> dict[str, Any]:
    """One fresh `serve` on its default config, one burst."""
    postgres = server_url("postgresql") if inbox == "postgres" else None
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as folder:
        work = Path(folder)
        port = free_port()
        env = {
            "PATH": "/usr/bin:/bin",
            "CI_RECEIVER_HTTP__PORT": str(port),
            "CI_RECEIVER_HTTP__HOST": "127.0.0.1",
            "CI_RECEIVER_ADMIN__PORT": str(free_port()),
            **dict(item.split("=", 1) for item in args_env),
        }
        if postgres is not None:
            env["CI_RECEIVER_INBOX__URL"] = postgres
            env["CI_RECEIVER_INBOX__POSTGRES_SCHEMA"] = schema
        with (work / "serve.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "receiver.cli", "serve"],
                cwd=work, env={**env, "PYTHONPATH": str(Path.cwd())},
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_ready(port, process)
            figures = asyncio.run(measure(port, senders, body))
            figures["rss_mib"] = peak_rss_mib(process.pid)
            figures["stored"] = stored(work, postgres, schema)
            figures["commits"] = None if postgres is None else commits(postgres, schema)
        finally:
            process.terminate()
            process.wait(60)
            if postgres is not None:
                drop(postgres, schema)
    return figures


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        {"inbox": inbox, "body": body, "senders": senders, **row(inbox, body, senders, args.env)}
        for inbox in args.inboxes.split(",")
        for body in args.bodies.split(",")
        for senders in map(int, args.senders.split(","))
    ]


def print_table(name: str, results: list[dict[str, Any]]) -> None:
    print(f"\n{name}")
    print(f"{'inbox':<9}{'body':<5}{'N':>6}  {'answers':<34}{'last 200':>9}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'RSS MiB':>9}{'stored':>8}{'commits':>9}")  # fmt: skip
    for result in results:
        answers = " ".join(f"{status}:{count}" for status, count in result["answers"].items())
        last = result["last_200_s"]
        print(
            f"{result['inbox']:<9}{result['body']:<5}{result['senders']:>6}  {answers:<34}"
            f"{'-' if last is None else f'{last:.2f} s':>9}{result['p50_ms']:>8}"
            f"{result['p99_ms']:>8}{result['rss_mib']:>9}{result['stored']:>8}"
            f"{'-' if result['commits'] is None else result['commits']:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", default="1000,2000,5000")
    parser.add_argument("--bodies", default="xml,json")
    parser.add_argument("--inboxes", default="sqlite,postgres")
    parser.add_argument("--against", help="a git revision measured beside this tree")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for serve")
    args = parser.parse_args()
    # Every sender is a socket of this process.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.json:
        print(json.dumps(rows(args)))
        return
    print_table("this tree", rows(args))
    if args.against:
        from bench import trees

        with tempfile.TemporaryDirectory(prefix="bench-burst-tree-") as folder:
            tree = trees.export(args.against, Path(folder) / "tree")
            arguments = [f"--senders={args.senders}", f"--bodies={args.bodies}",
                         f"--inboxes={args.inboxes}", "--json",
                         *(f"--env={item}" for item in args.env)]  # fmt: skip
            print_table(args.against, trees.measure(tree, "bench.burst", arguments))


if __name__ == "__main__":
    main()
