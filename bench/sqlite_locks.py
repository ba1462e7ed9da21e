"""Several processes writing one SQLite inbox file (`serve --workers N`): what the write
lock costs them, and how a BEGIN that meets it waits.

    python -m bench.sqlite_locks [--seconds 3] [--writers 2] [--concurrency 32]

Each writer process runs the inbox's own `Writer` (group commit, `synchronous=full`)
with `concurrency` tasks storing a small row each, back to back, for `seconds`. Runs,
in one go: one writer alone (the baseline); then `writers` writers whose BEGIN waits
with SQLite's busy handler (`busy_timeout`, as the inbox did); then `writers` writers
with the inbox's prompt retry (`writer._begin_waiting`). Per run: rows per second, CPU
µs per row (all writers' process time), and the waits of the BEGINs that met the lock.
Wall-clock figures are for this machine at this moment (it may be shared); the
comparisons are within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _busy_handler_begin(connection: sqlite3.Connection) -> None:
    """How the inbox waited before: SQLite's busy handler, with the lock timeout."""
    from receiver.inbox.writer import LOCK_TIMEOUT

    connection.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT * 1000)}")
    try:
        connection.execute("BEGIN IMMEDIATE")
    finally:
        connection.execute("PRAGMA busy_timeout=0")


def _setup(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, data BLOB)")


def _writer(
    path: str, seconds: float, concurrency: int, strategy: str, start: Any, out: Any
) -> None:
    from receiver.inbox import writer as module

    waiting = _busy_handler_begin if strategy == "busy_timeout" else module._begin_waiting
    waits: list[float] = []

    def timed_begin(connection: sqlite3.Connection) -> None:
        began = time.perf_counter()
        try:
            waiting(connection)
        finally:
            waits.append(time.perf_counter() - began)

    module._begin_waiting = timed_begin  # type: ignore[assignment]
    data = b"x" * 600  # about an event's row

    def insert(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO rows (data) VALUES (?)", (data,))

    async def main() -> tuple[int, float, int]:
        writer = module.Writer(Path(path), synchronous="full", setup=_setup)
        await writer.start()
        start.wait()
        cpu, deadline = time.process_time(), time.monotonic() + seconds
        rows = 0

        async def submitter() -> None:
            nonlocal rows
            while time.monotonic() < deadline:
                await writer.submit(insert)
                rows += 1

        await asyncio.gather(*(submitter() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
        await writer.stop()
        return rows, cpu, writer.commits

    rows, cpu, commits = asyncio.run(main())
    out.put((rows, cpu, commits, waits))


def run(writers: int, strategy: str, seconds: float, concurrency: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "inbox.db")
        sqlite3.connect(path).execute("PRAGMA journal_mode=WAL").close()
        start, out = context.Event(), context.Queue()
        processes = [
            context.Process(target=_writer, args=(path, seconds, concurrency, strategy, start, out))
            for _ in range(writers)
        ]
        for process in processes:
            process.start()
        time.sleep(1.0)  # every writer connected
        start.set()
        results = [out.get() for _ in processes]
        for process in processes:
            process.join()
    rows = sum(r[0] for r in results)
    cpu = sum(r[1] for r in results)
    commits = sum(r[2] for r in results)
    waits = sorted(w for r in results for w in r[3])
    return {
        "rows_per_second": rows / seconds,
        "cpu_us_per_row": cpu / rows * 1e6,
        "rows_per_commit": rows / commits,
        "lock_waits": len(waits),
        "wait_ms_median": statistics.median(waits) * 1000 if waits else 0.0,
        "wait_ms_p99": waits[int(len(waits) * 0.99)] * 1000 if waits else 0.0,
        "wait_share": sum(waits) / (seconds * writers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    runs = [
        ("1 writer (baseline)", 1, "prompt"),
        (f"{args.writers} writers, busy_timeout", args.writers, "busy_timeout"),
        (f"{args.writers} writers, prompt retry", args.writers, "prompt"),
    ]
    baseline: dict[str, float] | None = None
    print(
        f"{'run':<32} {'rows/s':>8} {'x base':>7} {'CPU µs/row':>11} {'x base':>7}"
        f" {'rows/commit':>11} {'lock waits':>10} {'median ms':>9} {'p99 ms':>7} {'waiting':>8}"
    )
    for name, writers, strategy in runs:
        figures = run(writers, strategy, args.seconds, args.concurrency)
        baseline = baseline or figures
        print(
            f"{name:<32} {figures['rows_per_second']:>8.0f}"
            f" {figures['rows_per_second'] / baseline['rows_per_second']:>7.2f}"
            f" {figures['cpu_us_per_row']:>11.1f}"
            f" {figures['cpu_us_per_row'] / baseline['cpu_us_per_row']:>7.2f}"
            f" {figures['rows_per_commit']:>11.1f} {figures['lock_waits']:>10.0f}"
            f" {figures['wait_ms_median']:>9.2f} {figures['wait_ms_p99']:>7.2f}"
            f" {figures['wait_share']:>8.0%}"
        )


if __name__ == "__main__":
    main()
