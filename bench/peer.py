"""ci-receiver next to the receiver a team would write by hand, in one run: callbacks/s,
latency, CPU per callback, and database round trips per callback.

    python -m bench.peer [--duration 6] [--connections 32] [--db-rtt MS [MS ...]]
                         [--body json xml] [--rounds 2] [--short] [--against REV]
                         [--peer-access-log] [--variant CI_RECEIVER_KEY=VALUE [...]] ...

Needs wrk (Debian: apt-get install wrk) and a PostgreSQL server
(CI_RECEIVER_TEST_POSTGRES_URL, default postgresql://postgres@127.0.0.1:5432/test; each
run gets a schema of its own, dropped afterwards). The receivers:
  - hand-written: bench/hand_written.py, a Starlette endpoint that decodes the body
    (xmltodict or orjson) and runs one INSERT ... ON CONFLICT DO NOTHING per callback
    through an asyncpg pool of 16, or on SQLite (WAL, synchronous=FULL) a commit per
    callback in a thread; uvicorn with uvloop and httptools, no access log (the ratios
    are against it); with `--peer-access-log`, also the same with uvicorn's access log
    on, as uvicorn runs by default;
  - ci-receiver: `serve` in its default config (the `log` handler on every event, the
    access log and the default logging to the process's log file), its inbox on SQLite
    or PostgreSQL (`[inbox] url`);
  - with `--against REV`, also ci-receiver at that git revision (bench/trees.py);
  - with `--variant`, also ci-receiver with those config overrides (receiver/envvars.py),
    one more receiver per `--variant`: what a part of the default config costs, e.g.
    `--variant CI_RECEIVER_HTTP__ACCESS_LOG=false --variant CI_RECEIVER_ROUTES=[]`.
The setups, each for every body: both on SQLite; both on PostgreSQL directly; and for
every `--db-rtt MS`, both on PostgreSQL behind bench/delay_proxy.py holding every chunk
MS/2 in each direction (a database across a network; this kernel has no netem).

For each setup and body, the receivers run in turn, `--rounds` times, and each one's
best run (most callbacks/s answered 2xx) is what its row shows, every figure from that one run: the
machine's noise only ever takes away. Every run starts its receiver afresh; wrk drives
it (-t2, `--connections`, each request a new job) for `--duration` s. Measured from the
start of the load until the receiver's work is done (the hand-written one's when the
load ends; ci-receiver's when every run of every stored event is, the backlog read over
a direct connection):
  - CPU µs/cb: user + system CPU of the receiver's processes (psutil), per request wrk
    completed;
  - PG CPU µs/cb: the same of the PostgreSQL server: the backends of the receiver's
    connections and the server's own processes (WAL writer, checkpointer, ...; those
    also work for whoever else uses the server meanwhile);
  - round trips/cb (behind the proxy): client chunks that follow an answer, counted by
    the proxy, per callback stored (each of these bodies is one job: one event).
The ratio is of callbacks/s against the hand-written receiver's in the same setup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from sqlalchemy import make_url

from bench import needs
from bench.delay_proxy import DelayProxy, database_behind
from bench.http import BODIES, PROGRESS, body_template, counts, cpu_seconds, start, stop, wrk
from bench.trees import HERE, export
from receiver.config import Config
from receiver.envvars import PREFIX, EnvironmentProblem, overrides
from tests.support.inbox_places import drop_schema
from tests.support.processes import free_port

DRAIN_TIMEOUT = 300.0
HAND_WRITTEN = "hand-written"
# The same under uvicorn's defaults: its access log on, at info (ci-receiver's default
# logs each request too).
HAND_WRITTEN_LOGGED = "hand-written +access log"
PEERS = (HAND_WRITTEN, HAND_WRITTEN_LOGGED)


@dataclass(frozen=True)
class Setup:
    name: str
    postgres: bool = True
    rtt: float | None = None  # ms, behind the delay proxy; None: no proxy


@dataclass(frozen=True)
class Receiver:
    name: str
    tree: Path  # the code it runs
    overrides: tuple[str, ...] = ()  # CI_RECEIVER_KEY=VALUE, its config's


@dataclass
class Run:
    """One receiver under load in one setup: what the measuring needs to reach."""

    setup: Setup
    receiver: Receiver
    process: subprocess.Popen[bytes]
    work: Path
    schema: str
    proxy: DelayProxy | None


def launch(
    run_dir: Path, setup: Setup, receiver: Receiver, database: str, schema: str, port: int
) -> tuple[list[str], dict[str, str]]:
    """The receiver's command and environment."""
    if receiver.name in PEERS:
        where = database if setup.postgres else str(run_dir / "hand_written.db")
        command = [sys.executable, "-m", "uvicorn", "bench.hand_written:app",
                   "--port", str(port), "--loop", "uvloop", "--http", "httptools"]  # fmt: skip
        if receiver.name == HAND_WRITTEN:
            command += ["--no-access-log", "--log-level", "warning"]
        return command, {"HAND_WRITTEN_DATABASE": where, "HAND_WRITTEN_SCHEMA": schema}
    config = run_dir / "receiver.toml"
    # The default config, but for an admin port of its own (the default one may be taken)
    # and the inbox's place.
    text = f'data_dir = "{run_dir / "data"}"\n[admin]\nport = {free_port()}\n'
    if setup.postgres:
        text += f'[inbox]\nurl = "{database}"\npostgres_schema = "{schema}"\n'
    config.write_text(text)
    command = [sys.executable, "-m", "receiver.cli", "serve", "--config", str(config),
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return command, dict(override.split("=", 1) for override in receiver.overrides)


async def progress(run: Run, observer: asyncpg.Connection | None) -> tuple[int, int]:
    """(callbacks stored, callbacks whose handling is done)."""
    if run.receiver.name in PEERS:  # done once stored
        query = "SELECT count(*) FROM callbacks"
        (stored,) = await counts(run.work / "hand_written.db", observer, [query])
        return stored, stored
    stored, done = await counts(run.work / "data" / "inbox.db", observer, PROGRESS)
    return stored, done


def postgres_server(port: int) -> psutil.Process | None:
    """The postmaster listening on `port` on this machine (None: elsewhere)."""
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return psutil.Process(connection.pid) if connection.pid else None
    return None


def cpu_by_process(server: psutil.Process) -> dict[int, float]:
    times: dict[int, float] = {}
    for process in (server, *server.children()):
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
    return times


async def receivers_backends(run: Run, observer: asyncpg.Connection, port: int) -> set[int]:
    """The server's own processes and the backends of the receiver's connections, known
    by their client ports: the receiver's own, or the proxy's toward the server."""
    ports = set(run.proxy.upstream_ports if run.proxy else ())
    root = psutil.Process(run.process.pid)
    for process in (root, *root.children(recursive=True)):
        for connection in process.net_connections("tcp"):
            if connection.raddr and connection.raddr.port == port:
                ports.add(connection.laddr.port)
    rows = await observer.fetch(
        "SELECT pid FROM pg_stat_activity"
        " WHERE backend_type <> 'client backend' OR client_port = ANY($1::int[])",
        sorted(ports),
    )
    return {row["pid"] for row in rows}


async def measure(
    run: Run, args: argparse.Namespace, url: str, body: Path, port: int, label: str
) -> dict[str, Any]:
    observer = None
    if run.setup.postgres:  # direct, so that its queries are not counted
        observer = await asyncpg.connect(url, server_settings={"search_path": run.schema})
    try:
        pg_port = make_url(url).port or 5432
        server = postgres_server(pg_port) if observer else None
        server_before = cpu_by_process(server) if server else {}
        cpu_before = cpu_seconds(run.process.pid)
        trips_before = run.proxy.round_trips if run.proxy else 0
        began = time.monotonic()
        _, content_type = BODIES[body.stem][1:]
        result = await asyncio.to_thread(
            wrk, f"http://127.0.0.1:{port}/callbacks", body, label, content_type,
            args.connections, args.duration,
        )  # fmt: skip
        # Done when every stored callback is handled and no request wrk left in flight
        # is still being stored.
        previous, (stored, done) = -1, await progress(run, observer)
        while (done < stored or stored != previous) and time.monotonic() - began < DRAIN_TIMEOUT:
            await asyncio.sleep(0.1)
            previous, (stored, done) = stored, await progress(run, observer)
        result["cpu"] = (cpu_seconds(run.process.pid) - cpu_before) / result["requests"] * 1e6
        if run.proxy:
            result["trips"] = (run.proxy.round_trips - trips_before) / stored
        if server and observer:
            backends = await receivers_backends(run, observer, pg_port)
            after = cpu_by_process(server)
            spent = sum(after[pid] - server_before.get(pid, 0.0) for pid in backends & after.keys())
            result["pg_cpu"] = spent / result["requests"] * 1e6
        result["backlog"] = stored - done
        return result
    finally:
        if observer is not None:
            await observer.close()


def run_one(
    setup: Setup, receiver: Receiver, args: argparse.Namespace, root: Path, url: str,
    body: Path, label: str,
) -> dict[str, Any]:  # fmt: skip
    work = root / label
    work.mkdir()
    schema = f"peer_{uuid.uuid4().hex[:10]}"
    port = free_port()
    with database_behind(url, setup.rtt) as (database, proxy):
        command, env = launch(work, setup, receiver, database, schema, port)
        process = start(command, port, work / "receiver.log", receiver.tree, env)
        try:
            run = Run(setup, receiver, process, work, schema, proxy)
            return asyncio.run(measure(run, args, url, body, port, label))
        finally:
            stop(process)
            if setup.postgres:
                asyncio.run(drop_schema(url, schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=6, help="seconds of load per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--db-rtt", type=float, nargs="+", default=[], metavar="MS",
        help="also PostgreSQL behind the delay proxy at each of these round-trip times",
    )  # fmt: skip
    parser.add_argument("--body", nargs="+", choices=sorted(BODIES), default=["json", "xml"])
    parser.add_argument("--short", action="store_true", help="2 s per run: a smoke run")
    parser.add_argument(
        "--rounds", type=int, default=2, choices=range(1, 21), metavar="N",
        help="runs of each receiver, in turn; the best is kept (1-20)",
    )  # fmt: skip
    parser.add_argument("--against", metavar="REV", help="also ci-receiver at this revision")
    parser.add_argument(
        "--peer-access-log", action="store_true",
        help="also the hand-written receiver with uvicorn's access log on (its default)",
    )  # fmt: skip
    parser.add_argument(
        "--variant", nargs="+", action="append", default=[], type=_override,
        metavar="CI_RECEIVER_KEY=VALUE",
        help="also ci-receiver with these config overrides (repeat for more receivers)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.short:
        args.duration = 2
    needs.wrk("bench/peer.py")
    url = needs.postgres("bench/peer.py")

    root = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        receivers = [Receiver(HAND_WRITTEN, HERE), Receiver("ci-receiver", HERE)]
        if args.peer_access_log:
            receivers.insert(1, Receiver(HAND_WRITTEN_LOGGED, HERE))
        if args.against:
            tree = export(args.against, root / "against", own_bench=True)
            receivers.append(Receiver(f"ci-receiver {args.against}", tree))
        for variant in args.variant:
            name = "ci-receiver " + " ".join(item[len(PREFIX) :] for item in variant)
            if name in {receiver.name for receiver in receivers}:
                parser.error(f"--variant {' '.join(variant)} is given twice")
            receivers.append(Receiver(name, HERE, tuple(variant)))
        setups = [Setup("SQLite", postgres=False), Setup("PostgreSQL")]
        setups += [Setup(f"PostgreSQL {rtt:g} ms", rtt=rtt) for rtt in args.db_rtt]
        bodies = {fmt: body_template(root, fmt) for fmt in args.body}
        report(setups, receivers, bodies, args, root, url)
    finally:
        shutil.rmtree(root)


def report(
    setups: list[Setup], receivers: list[Receiver], bodies: dict[str, Path],
    args: argparse.Namespace, root: Path, url: str,
) -> None:  # fmt: skip
    print(
        f"{args.connections} connections, {args.duration} s a run, best of {args.rounds}, wrk -t2, "
        f"{os.cpu_count()} cores; PostgreSQL at {make_url(url).render_as_string()}"
    )
    width = max(len(receiver.name) for receiver in receivers)
    cells = "{:<18} {:<4} {:<" + str(width) + "} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>6} {:>8}"
    header = ("setup", "body", "receiver", "cb/s", "p50 ms", "p99 ms", "non-2xx", "CPU µs/cb",
              "PG µs/cb", "ratio", "trips/cb")  # fmt: skip
    print("\n" + cells.format(*header))
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    backlog = []
    runs = 0
    for setup in setups:
        for fmt, body in bodies.items():
            # Rounds of the receivers in turn, the best of each kept (the machine's noise
            # only ever takes away): its run's figures, all from that one run.
            for _ in range(args.rounds):
                for receiver in receivers:
                    runs += 1
                    result = run_one(setup, receiver, args, root, url, body, f"r{runs}")
                    kept = results.get((setup.name, fmt, receiver.name))
                    if kept is None or _better(result, kept):
                        results[setup.name, fmt, receiver.name] = result
            for receiver in receivers:
                result = results[setup.name, fmt, receiver.name]
                base = results[setup.name, fmt, HAND_WRITTEN]
                ratio = "" if result is base else f"{result['rps'] / base['rps']:.2f}x"
                row = (setup.name, fmt, receiver.name, f"{result['rps']:.0f}",
                       f"{result['p50']:.2f}", f"{result['p99']:.2f}", result["errors"],
                       f"{result['cpu']:.0f}", _figure(result, "pg_cpu", "{:.0f}"), ratio,
                       _figure(result, "trips", "{:.2f}"))  # fmt: skip
                print(cells.format(*row), flush=True)
                if result["backlog"]:
                    backlog.append(f"{setup.name} {fmt} {receiver.name}: {result['backlog']}")
    print()
    for setup in setups:
        for peer in (r.name for r in receivers if r.name in PEERS):
            parts = []
            for receiver in (r for r in receivers if r.name not in PEERS):
                for fmt in bodies:
                    ours = results[setup.name, fmt, receiver.name]
                    base = results[setup.name, fmt, peer]
                    parts.append(
                        f"{receiver.name} {fmt} {ours['rps'] / base['rps']:.2f}x cb/s,"
                        f" {ours['cpu'] / base['cpu']:.2f}x CPU"
                    )
            print(f"{setup.name}, against {peer}: " + "; ".join(parts))
    if backlog:
        print(f"\nruns not done after {DRAIN_TIMEOUT:.0f} s: " + ", ".join(backlog))


def _override(text: str) -> str:
    """A `--variant` item: a config override as `serve` reads it from the environment,
    refused unless it names a key of the config (one `serve` would pass over unread)."""
    name, equals, value = text.partition("=")
    try:
        data, _ = overrides(Config, {name: value}) if equals else ({}, {})
    except EnvironmentProblem as problem:
        raise argparse.ArgumentTypeError(str(problem)) from None
    if not data:
        raise argparse.ArgumentTypeError(f"{text!r}: not {PREFIX}KEY=VALUE of a config key")
    return text


def _better(result: dict[str, Any], than: dict[str, Any]) -> bool:
    """More callbacks answered 2xx a second (fast refusals are no better run)."""
    return bool(_answered(result) > _answered(than))


def _answered(result: dict[str, Any]) -> float:
    return float(result["rps"]) * (1 - result["errors"] / max(1, result["requests"]))


def _figure(result: dict[str, Any], key: str, form: str) -> str:
    return form.format(result[key]) if key in result else "-"


if __name__ == "__main__":
    main()
