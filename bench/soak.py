"""A bounded soak of `ci-receiver serve` on its defaults, under honest and abusive load.

    python -m bench.soak [--minutes 10] [--senders 16] [--report-every 60]

Honest senders post new XML and JSON callbacks (each a new job), duplicates of
acknowledged ones and bad bodies; meanwhile slow senders hold connections with heads
that never end (slowloris), and oversized senders post bodies over the limit and
headers of a megabyte. Every `--report-every` seconds it prints: callbacks answered 200
per second, their p99 latency, the receiver's RSS and open descriptors, the size of the
inbox, and the events acknowledged (answered 200) next to those stored. At the end,
every acknowledged event must be in the inbox: "lost" must be 0, and RSS and
descriptors should stay flat from the first report on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.support.callbacks import load
from tests.support.processes import REPO, free_port, wait_for_port

XML = load("transcode.xml")
XML_JOB = b"j68427030f84611ecb8546d80f2baf56f"
JSON = load("smartcover.json")
JSON_JOB = b"j6842765cf84611ecb8546d80f2baf56f"
SLOW_CONNECTIONS = 100


@dataclass
class Window:
    answered: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


@dataclass
class Soak:
    url: str
    port: int
    acknowledged: set[str] = field(default_factory=set)
    sent_bodies: list[bytes] = field(default_factory=list)
    window: Window = field(default_factory=Window)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def honest(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            roll = random.random()
            if roll < 0.1 and self.sent_bodies:
                body = random.choice(self.sent_bodies)  # a duplicate
            elif roll < 0.2:
                body = b"not a callback " + os.urandom(random.randint(10, 2000))
            elif roll < 0.6:
                body = XML.replace(XML_JOB, b"j" + uuid.uuid4().hex.encode())
            else:
                body = JSON.replace(JSON_JOB, b"j" + uuid.uuid4().hex.encode())
            began = time.perf_counter()
            try:
                answer = await client.post(self.url, content=body)
            except httpx.HTTPError:
                self._count(0)
                continue
            self._count(answer.status_code)
            if answer.status_code == 200:
                self.window.answered += 1
                self.window.latencies.append(time.perf_counter() - began)
                self.acknowledged.update(answer.json()["ids"])
                if len(self.sent_bodies) < 1000:
                    self.sent_bodies.append(body)

    def _count(self, status: int) -> None:
        self.window.statuses[status] = self.window.statuses.get(status, 0) + 1

    async def slow(self) -> None:
        """Heads that never end, a byte at a time; reopened when the server closes them."""
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"POST /callbacks HTTP/1.1\r\nHost: soak\r\nX-Slow: ")
                with contextlib.suppress(OSError):
                    while not self.stop.is_set() and not writer.is_closing():
                        writer.write(b"a")
                        await writer.drain()
                        await asyncio.sleep(1)
                writer.close()
            await asyncio.sleep(0.1)

    async def oversized(self) -> None:
        """A body over the limit (with Content-Length), then a head of a megabyte."""
        big_body = b"<" * (2 * 1024 * 1024)
        while not self.stop.is_set():
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(
                    b"POST /callbacks HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n"
                    % len(big_body)
                    + big_body
                )
                self._count(int((await reader.readuntil(b"\r\n")).split()[1]))
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 2**20 + b"\r\n\r\n")
                self._count(int((await reader.readuntil(b"\r\n")).split()[1]))
                writer.close()
            await asyncio.sleep(0.5)


def stored_ids(inbox: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{inbox}?mode=ro", uri=True)) as connection:
        return {row[0] for row in connection.execute("SELECT id FROM events")}


def inbox_bytes(inbox: Path) -> int:
    return sum(p.stat().st_size for p in inbox.parent.glob(inbox.name + "*"))


def report(soak: Soak, process: psutil.Process, inbox: Path, seconds: float, minute: float) -> None:
    window, soak.window = soak.window, Window()
    latencies = sorted(window.latencies)
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    median = statistics.median(latencies) * 1000 if latencies else float("nan")
    stored = len(stored_ids(inbox))
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(window.statuses.items()))
    print(
        f"{minute:6.1f}  {window.answered / seconds:10.0f}  {median:6.1f}  {p99:7.1f}"
        f"  {process.memory_info().rss / 2**20:7.0f}  {process.num_fds():4d}"
        f"  {inbox_bytes(inbox) / 2**20:8.1f}  {len(soak.acknowledged):8d}  {stored:8d}"
        f"  {statuses}",
        flush=True,
    )


async def run(args: argparse.Namespace, folder: Path) -> int:
    port = free_port()
    config = folder / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{folder / "data"}"\n[admin]\nport = {free_port()}\n'
        '[log]\nlevel = "warning"\n[handlers.log]\ntype = "log"\nlevel = "debug"\n'
    )
    log = (folder / "serve.log").open("wb")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "receiver.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_for_port(port, child)
    process, inbox = psutil.Process(child.pid), folder / "data" / "inbox.db"
    soak = Soak(f"http://127.0.0.1:{port}/callbacks", port)
    print(
        f"{args.minutes} min, {args.senders} honest senders, {SLOW_CONNECTIONS} slow, 1 oversized\n"
        "minute  callbacks/s  p50 ms  p99 ms  RSS MiB   fds  inbox MiB  acknowledged  stored"
        "  answers",
        flush=True,
    )
    limits = httpx.Limits(max_connections=args.senders)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        tasks = [asyncio.create_task(soak.honest(client)) for _ in range(args.senders)]
        tasks += [asyncio.create_task(soak.slow()) for _ in range(SLOW_CONNECTIONS)]
        tasks.append(asyncio.create_task(soak.oversized()))
        began = last = time.monotonic()
        end = began + args.minutes * 60
        while (now := time.monotonic()) < end:
            await asyncio.sleep(min(args.report_every - (now - last), end - now))
            now = time.monotonic()
            report(soak, process, inbox, now - last, (now - began) / 60)
            last = now
        soak.stop.set()
        await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()
    child.terminate()
    child.wait(60)
    lost = soak.acknowledged - stored_ids(inbox)
    print(f"acknowledged {len(soak.acknowledged)}, lost {len(lost)}; exit code {child.returncode}")
    return 1 if lost or child.returncode else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--report-every", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ci-receiver-soak-") as folder:
        sys.exit(asyncio.run(run(args, Path(folder))))


if __name__ == "__main__":
    main()
