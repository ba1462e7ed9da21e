"""Draining a CMQ backlog: the consumer into the inbox, next to a bare receive+delete loop.

    python -m bench.cmq [--backlogs 10000] [--formats json xml]

For each format and backlog size, puts that many distinct SmartCover callbacks on a
queue of the loopback CMQ stand-in (tests/support/cmq_server.py, standing in for TDMQ for CMQ),
then drains the same backlog twice, each time from a fresh stand-in over a copy of the
filled queue, each in a process of its own so that its peak RSS is its own:
- bare: the same data-API client with the same pollers (default `[cmq]` batch and
  concurrency), receiving and deleting, nothing else;
- consumer: ci-receiver's CmqConsumer with the default `[cmq]` settings, committing
  every callback to a SQLite inbox (synchronous=full) before its delete; no handlers,
  so what is measured is the consumer and the ingest path, not a handler.
The stand-in runs on the same machine and is part of both measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.draining import PeakRss, drain_through
from bench.tdmq import backlog_body, distinct
from tests.support.cmq_stand_in import QUEUE, SECRET_ID, SECRET_KEY, CmqStandIn


def cmq_config(url: str):
    from receiver.config import CmqConfig

    return CmqConfig(endpoint=url, secret_id=SECRET_ID, secret_key=SECRET_KEY, queues=[QUEUE])


def drain_bare(url: str, count: int) -> dict[str, float]:
    import uvloop

    from receiver.sources.cmq.api import CmqApi

    config = cmq_config(url)

    async def run() -> dict[str, float]:
        api = CmqApi(config, connections=config.concurrency)
        drained = 0
        done = asyncio.Event()

        async def poller() -> None:
            nonlocal drained
            while True:
                messages = await api.receive(QUEUE, config.batch, config.polling_wait)
                if messages:
                    await api.delete(QUEUE, [m.receipt_handle for m in messages])
                drained += len(messages)
                if drained >= count:
                    done.set()

        rss = PeakRss()
        began = time.perf_counter()
        pollers = [asyncio.create_task(poller()) for _ in range(config.concurrency)]
        await done.wait()
        seconds = time.perf_counter() - began
        peak = rss.stop()
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        await api.close()
        return {"seconds": seconds, "peak_rss": peak}

    return uvloop.run(run())


def drain_consumer(url: str, count: int, data_dir: Path) -> dict[str, float]:
    from receiver.config import Config
    from receiver.sources.cmq import CmqConsumer

    config = Config(data_dir=data_dir, handlers={}, cmq=cmq_config(url))

    def consumer(service):
        return CmqConsumer(config.cmq, service.ingestor, service.metrics)

    return drain_through(config, consumer, "ci_receiver_cmq_messages_total", "deleted", count)


def child(kind: str, url: str, count: int, data_dir: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.cmq", "--child", kind, url, str(count), data_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def drain(kind: str, filled: Path, folder: Path, count: int) -> dict[str, float]:
    """Drain a copy of the filled queue from a fresh stand-in."""
    shutil.copytree(filled, folder / kind)
    stand_in = CmqStandIn(folder / kind).start()
    try:
        return child(kind, stand_in.url, count, str(folder / kind / "data"))
    finally:
        stand_in.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", type=int, nargs="+", default=[10_000])
    parser.add_argument("--formats", nargs="+", default=["json", "xml"])
    parser.add_argument("--child", nargs=4, metavar=("KIND", "URL", "COUNT", "DIR"))
    args = parser.parse_args()
    if args.child:
        kind, url, count, data_dir = args.child
        if kind == "bare":
            result = drain_bare(url, int(count))
        else:
            result = drain_consumer(url, int(count), Path(data_dir))
        print(json.dumps(result))
        return

    defaults = cmq_config("http://127.0.0.1")
    print(
        f"python {sys.version.split()[0]}, loopback CMQ stand-in,"
        f" batch {defaults.batch} x concurrency {defaults.concurrency}"
    )
    print(
        f"\n{'fmt':<5} {'backlog':>8} {'bare msg/s':>11} {'consumer msg/s':>15} {'ratio':>6}"
        f" {'bare peak RSS':>14} {'consumer peak RSS':>18}"
    )
    for fmt in args.formats:
        for count in args.backlogs:
            with tempfile.TemporaryDirectory(prefix="bench-cmq-") as temp:
                folder = Path(temp)
                filler = CmqStandIn(folder / "filled").start()
                try:
                    body = backlog_body(fmt)
                    filler.send(distinct(body, number) for number in range(count))
                finally:
                    filler.close()
                (folder / "filled" / "cmq-server.log").unlink()
                bare = drain("bare", folder / "filled", folder, count)
                ours = drain("consumer", folder / "filled", folder, count)
            bare_rate, our_rate = count / bare["seconds"], count / ours["seconds"]
            print(
                f"{fmt:<5} {count:>8} {bare_rate:>11,.0f} {our_rate:>15,.0f}"
                f" {our_rate / bare_rate:>5.2f}x {bare['peak_rss'] / 2**20:>11.0f} MiB"
                f" {ours['peak_rss'] / 2**20:>15.0f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
