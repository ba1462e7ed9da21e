"""Callbacks/s and handler events/s with 1, 2 and 3 `serve` replicas on one PostgreSQL
inbox, next to one process on its SQLite inbox, in one run.

    python -m bench.replicas [--duration 10] [--connections 32] [--body json|xml] [--short]
                             [--db-rtt MS]

With `--db-rtt MS`, the replicas reach PostgreSQL through bench/delay_proxy.py, holding
every chunk MS/2 in each direction (a database across a network), and the database
round trips per callback stored and handled are counted there (`trips/cb`).

Needs wrk (Debian: apt-get install wrk) and a PostgreSQL server
(CI_RECEIVER_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test; each
run gets a schema of its own, dropped afterwards). For each setup the replicas start
fresh, each with a `jsonl` handler (no fsync: the inbox is what is measured, not the
disk) writing a file of its own, and one wrk per replica drives its share of the
connections at once, every request a new job (as a load balancer would spread them).
  - callbacks/s: 2xx answers per second, all replicas together;
  - handled/s: events whose handler run is done, per second, from the start of the
    load until the last one is done (the dispatchers run during the load and drain the
    backlog after it).
Ratios are against the SQLite process of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import needs
from bench.delay_proxy import DelayProxy, database_behind
from bench.http import BODIES, PROGRESS, body_template, counts, start, stop, wrk
from tests.support.inbox_places import drop_schema
from tests.support.processes import free_port

DRAIN_TIMEOUT = 300.0


@dataclass
class Setup:
    name: str
    replicas: int
    postgres: bool


SETUPS = [
    Setup("SQLite", 1, postgres=False),
    Setup("PostgreSQL", 1, postgres=True),
    Setup("PostgreSQL", 2, postgres=True),
    Setup("PostgreSQL", 3, postgres=True),
]


def write_configs(work: Path, setup: Setup, url: str, schema: str) -> list[Path]:
    inbox = f'[inbox]\nurl = "{url}"\npostgres_schema = "{schema}"\n' if setup.postgres else ""
    configs = []
    for replica in range(setup.replicas):
        path = work / f"replica{replica}.toml"
        # As on hosts of their own: each its data_dir and admin listener (on one host
        # the second replica to bind the default admin port would fail to start).
        path.write_text(
            f'data_dir = "{work / f"data{replica}"}"\n'
            '[http]\naccess_log = false\n[log]\nlevel = "warning"\n'
            f"[admin]\nport = {free_port()}\n"
            f'[handlers.jsonl]\ntype = "jsonl"\npath = "{work / f"events{replica}.jsonl"}"\n'
            f"fsync = false\nconcurrency = 64\n{inbox}"
        )
        configs.append(path)
    return configs


def progress_reader(
    setup: Setup, work: Path, url: str, schema: str
) -> Callable[[], tuple[int, int]]:
    """(events stored, events handled) of the setup's inbox."""

    async def read() -> tuple[int, int]:
        if not setup.postgres:
            stored, done = await counts(work / "data0" / "inbox.db", None, PROGRESS)
            return stored, done
        connection = await asyncpg.connect(url, server_settings={"search_path": schema})
        try:
            stored, done = await counts(Path(), connection, PROGRESS)
            return stored, done
        finally:
            await connection.close()

    return lambda: asyncio.run(read())


def run_setup(setup: Setup, args: argparse.Namespace, work: Path, url: str, body: Path) -> dict:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    rtt = args.db_rtt if setup.postgres else None
    with database_behind(url, rtt) as (reached, proxy):
        return _run_replicas(setup, args, work, reached, url, schema, body, proxy)


def _run_replicas(
    setup: Setup,
    args: argparse.Namespace,
    work: Path,
    reached: str,
    url: str,
    schema: str,
    body: Path,
    proxy: DelayProxy | None,
) -> dict:
    """The setup's replicas on the inbox at `reached` (the server at `url`, or the proxy
    in front of it); progress is read directly from `url`, outside the proxy's count."""
    configs = write_configs(work, setup, reached, schema)
    ports = [free_port() for _ in configs]
    processes = []
    try:
        for config, port in zip(configs, ports, strict=True):
            command = [sys.executable, "-m", "receiver.cli", "serve", "--config", str(config),
                       "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            processes.append(start(command, port, work / f"{config.stem}.log"))
        share = max(2, args.connections // setup.replicas)
        _, content_type = BODIES[args.body][1:]
        trips_before = proxy.round_trips if proxy else 0
        began = time.monotonic()
        with ThreadPoolExecutor(setup.replicas) as pool:
            results = list(
                pool.map(
                    lambda index: wrk(
                        f"http://127.0.0.1:{ports[index]}/callbacks", body,
                        f"{setup.name[0]}{setup.replicas}{index}", content_type, share,
                        args.duration,
                    ),
                    range(setup.replicas),
                )
            )  # fmt: skip
        progress = progress_reader(setup, work, url, schema)
        stored, handled = progress()
        while handled < stored and time.monotonic() - began < DRAIN_TIMEOUT:
            time.sleep(0.2)
            stored, handled = progress()
        elapsed = time.monotonic() - began
        trips = proxy.round_trips - trips_before if proxy else None
    finally:
        for process in processes:
            stop(process)
        if setup.postgres:
            asyncio.run(drop_schema(url, schema))
    return {
        "rps": sum(r["rps"] for r in results),
        "p99": max(r["p99"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "stored": stored,
        "handled/s": handled / elapsed,
        "backlog": stored - handled,
        "trips/cb": trips / stored if trips is not None and stored else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per setup")
    parser.add_argument("--connections", type=int, default=32, help="over all replicas")
    parser.add_argument("--body", choices=sorted(BODIES), default="json")
    parser.add_argument("--short", action="store_true", help="2 s per setup: a smoke run")
    parser.add_argument(
        "--db-rtt", type=float, metavar="MS", help="PostgreSQL behind the delay proxy at this RTT"
    )
    args = parser.parse_args()
    if args.short:
        args.duration = 2
    needs.wrk("bench/replicas.py")
    url = needs.postgres("bench/replicas.py")

    root = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    body = body_template(root, args.body)
    print(
        f"{args.connections} connections over the replicas, {args.duration} s a run, "
        f"one wrk -t2 per replica, {args.body} body, {os.cpu_count()} cores"
        + (f"; PostgreSQL {args.db_rtt:g} ms away" if args.db_rtt is not None else "")
    )
    header = ("inbox", "replicas", "callbacks/s", "p99 ms", "non-2xx", "ratio", "handled/s",
              "ratio", "backlog", "trips/cb")  # fmt: skip
    line = "{:<11} {:>8} {:>12} {:>8} {:>8} {:>6} {:>10} {:>6} {:>8} {:>8}"
    print("\n" + line.format(*header))
    baseline: dict | None = None
    try:
        for number, setup in enumerate(SETUPS):
            work = root / f"setup{number}"
            work.mkdir()
            result = run_setup(setup, args, work, url, body)
            baseline = baseline or result
            ratios = [result[key] / baseline[key] for key in ("rps", "handled/s")]
            row = (setup.name, setup.replicas, f"{result['rps']:.0f}", f"{result['p99']:.1f}",
                   result["errors"], f"{ratios[0]:.2f}x", f"{result['handled/s']:.0f}",
                   f"{ratios[1]:.2f}x", result["backlog"],
                   "-" if result["trips/cb"] is None else f"{result['trips/cb']:.2f}")  # fmt: skip
            print(line.format(*row), flush=True)
    finally:
        shutil.rmtree(root)
    print(
        "\nhandled/s: from the start of the load until the last run was done (or "
        f"{DRAIN_TIMEOUT:.0f} s); backlog: runs not done by then"
    )


if __name__ == "__main__":
    main()
