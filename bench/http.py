"""Callbacks/s, latency and server CPU per callback through the whole HTTP path, next
to a bare Starlette endpoint.

    python -m bench.http [--duration 10] [--connections 32] [--workers N]

Needs wrk (Debian: apt-get install wrk). For an XML and a JSON callback, each request a
new job, wrk drives 32 connections at:
  - a bare Starlette endpoint under uvicorn that only reads the body (the baseline);
  - `ci-receiver serve` with no handler (`routes = []`): decode, normalize, commit to
    the durable SQLite inbox (synchronous=full), answer;
  - `ci-receiver serve` in its default config: the `log` handler on every event, the
    access log and the default logging (JSON lines, info) written to a file;
  - the same with the `jsonl` handler (fsync'd) instead of `log`.
All on the same uvicorn settings (uvloop, httptools), in the same run, with the access
log and logging as configured (the defaults). For each run, the CPU time (user +
system) the server's processes spent, from their own accounting (psutil), divided by
the requests wrk completed: the figure that does not depend on the load generator
sharing the cores. Afterwards, how much of the handler backlog was done.

`--workers N` runs every target with N worker processes: uvicorn's `--workers` for the
bare endpoint, `serve --workers N` for the receiver (that option must exist in the
`serve` under test; without `--workers`, neither is passed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg
import psutil

from bench import needs
from tests.support.callbacks import load
from tests.support.processes import REPO, free_port, wait_for_port

LUA = Path(__file__).with_name("unique_ids.lua")
BODIES = {
    "xml": ("transcode.xml", b"j68427030f84611ecb8546d80f2baf56f", "application/xml"),
    "json": ("smartcover.json", b"j6842765cf84611ecb8546d80f2baf56f", "application/json"),
}


def body_template(folder: Path, fmt: str) -> Path:
    """The sample callback of `fmt` (a key of BODIES) written to `folder`, its JobId the
    placeholder unique_ids.lua replaces with a new job id in every request."""
    name, job_id, _ = BODIES[fmt]
    path = folder / f"{fmt}.body"
    path.write_bytes(load(name).replace(job_id, b"j@@ID@@"))
    return path


def start(
    command: list[str], port: int, log: Path, tree: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`command` on the code of `tree` (first on PYTHONPATH, and the working directory,
    which `python -m` puts before it), with `env` added to the environment."""
    process = subprocess.Popen(
        command,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree), **(env or {})},
    )
    wait_for_port(port, process)
    return process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (the workers)."""
    root = psutil.Process(pid)
    total = 0.0
    for process in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(60)


def wrk(url: str, body: Path, run: str, content_type: str, connections: int, duration: int) -> dict:
    env = {
        **os.environ,
        "BENCH_BODY": str(body),
        "BENCH_RUN": run,
        "BENCH_CONTENT_TYPE": content_type,
    }
    done = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(LUA), url],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if done.returncode:
        failed = f"wrk against {url} failed ({done.returncode})"
        raise RuntimeError(f"{failed}: {done.stderr}{done.stdout}")
    out = done.stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": _ms(latency["50"]),
        "p99": _ms(latency["99"]),
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": "Socket errors" in out,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, help="worker processes per target (needs `serve --workers`)"
    )
    args = parser.parse_args()
    needs.wrk("bench/http.py")

    work = Path(tempfile.mkdtemp(prefix="bench-http-"))
    bodies = {}
    for fmt, (_, _, content_type) in BODIES.items():
        bodies[fmt] = (body_template(work, fmt), content_type)

    # The logging and access log are the defaults (JSON lines at info, one line per
    # request, and one per event for `log`), to the process's log file.
    configs = {
        "no handler": f'data_dir = "{work / "data-none"}"\nroutes = []\n',
        "default (log)": f'data_dir = "{work / "data-log"}"\n',
        "jsonl": (
            f'data_dir = "{work / "data"}"\n'
            f'[handlers.jsonl]\ntype = "jsonl"\npath = "{work / "events.jsonl"}"\n'
            "concurrency = 64\n"
        ),
    }
    uvicorn = [
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    workers = ("--workers", str(args.workers)) if args.workers else ()
    ports = {name: free_port() for name in ("bare Starlette", *configs)}
    targets = {
        "bare Starlette": [
            *(sys.executable, "-m", "uvicorn", "bench.bare_app:app"),
            *("--port", str(ports["bare Starlette"]), *uvicorn, *workers),
        ],
    }
    for name, text in configs.items():
        config = work / f"{name.split()[0]}.toml"
        config.write_text(text)
        targets[name] = [
            *(sys.executable, "-m", "receiver.cli", "serve", "--config", str(config)),
            *("--host", "127.0.0.1", "--port", str(ports[name]), *workers),
        ]

    print(
        f"{args.connections} connections, {args.duration} s a run, wrk -t2, {os.cpu_count()} cores,"
        f" {args.workers or 1} worker process(es) per target"
    )
    header = ("target", "body", "callbacks/s", "p50 ms", "p99 ms", "non-2xx", "ratio", "CPU µs")
    row_format = "{:<15} {:<5} {:>12} {:>8} {:>8} {:>8} {:>6} {:>8}"
    print("\n" + row_format.format(*header))
    results: dict[tuple[str, str], dict] = {}
    for run, (target, command) in enumerate(targets.items()):
        process = start(command, ports[target], work / f"{run}.log")
        try:
            for fmt, (body, content_type) in bodies.items():
                url = f"http://127.0.0.1:{ports[target]}/callbacks"
                cpu_before = cpu_seconds(process.pid)
                result = wrk(
                    url, body, f"{fmt[0]}{run}", content_type, args.connections, args.duration
                )
                cpu = (cpu_seconds(process.pid) - cpu_before) / result["requests"] * 1e6
                results[target, fmt] = result
                base = results[("bare Starlette", fmt)]
                ratio = f"{result['rps'] / base['rps']:.2f}x" if target != "bare Starlette" else ""
                row = (target, fmt, f"{result['rps']:.0f}", f"{result['p50']:.2f}",
                       f"{result['p99']:.2f}", result["errors"], ratio, f"{cpu:.0f}")  # fmt: skip
                print(row_format.format(*row))
        finally:
            stop(process)
    print()
    for name, folder in (("default (log)", "data-log"), ("jsonl", "data")):
        stored, handled = asyncio.run(counts(work / folder / "inbox.db", None, PROGRESS))
        print(f"{name}: {stored} events stored, {handled} handled before the process was stopped")
    shutil.rmtree(work)


# A ci-receiver inbox's progress: the events it stored, and those whose runs are all done
# (an event routed to no handler is done once stored).
PROGRESS = [
    "SELECT count(*) FROM events",
    "SELECT (SELECT count(*) FROM events)"
    " - (SELECT count(DISTINCT event_id) FROM runs WHERE status <> 'done')",
]


async def counts(
    sqlite_file: Path, postgres: asyncpg.Connection | None, queries: list[str]
) -> list[int]:
    """The counts `queries` read: on `postgres` (its search_path the inbox's schema), or
    else in the SQLite file."""
    if postgres is not None:
        return [await postgres.fetchval(query) for query in queries]
    with contextlib.closing(sqlite3.connect(sqlite_file)) as connection:
        return [connection.execute(query).fetchone()[0] for query in queries]


if __name__ == "__main__":
    main()
