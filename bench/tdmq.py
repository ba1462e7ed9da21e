"""Draining a TDMQ backlog: the consumer into the inbox, next to a bare receive+ack loop.

    python -m bench.tdmq [--backlogs 10000 50000] [--formats json xml]

For each format and backlog size, publishes that many distinct SmartCover callbacks
(one message each, unbatched, as independent publishers would) to a fresh pulsar-lite
broker, then drains the same backlog twice, on two subscriptions, each in a process of
its own so that its peak RSS is its own:
- bare: the official client's blocking `receive()` + `acknowledge()`, nothing else;
- consumer: ci-receiver's TdmqConsumer with the default `[tdmq]` settings, committing
  every callback to a SQLite inbox (synchronous=full) before its ack; no handlers, so
  what is measured is the consumer and the ingest path, not a handler.
A third process feeds the same bodies straight to the ingest path (no broker), as many
at once as the consumer's `concurrency`: the ceiling any consumer in front of it has.
Peak RSS is sampled with psutil every 10 ms. CPU µs per message is the draining
process's own (every thread, the client's included; not the broker's): on a shared
machine a steadier figure than the rates, which move with whatever else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pulsar

from bench.draining import PeakRss, drain_through
from tests.support.callbacks import ci_json_from_xml, load
from tests.support.processes import PulsarLite

TOPIC = "persistent://public/default/bench-callbacks"


def backlog_body(fmt: str) -> bytes:
    xml = load("smartcover.xml")
    return xml if fmt == "xml" else ci_json_from_xml(xml)


def distinct(body: bytes, number: int) -> bytes:
    return body.replace(b"j6842765cf84611ecb8546d80f2baf56f", f"j{number:032x}".encode())


def publish(url: str, fmt: str, count: int) -> None:
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    producer = client.create_producer(TOPIC, batching_enabled=False, block_if_queue_full=True)
    body = backlog_body(fmt)
    for number in range(count):
        producer.send_async(distinct(body, number), None)
    producer.flush()
    client.close()


def drain_bare(url: str, count: int) -> dict[str, float]:
    client = pulsar.Client(url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    consumer = client.subscribe(
        TOPIC,
        "bare",
        consumer_type=pulsar.ConsumerType.Shared,
        initial_position=pulsar.InitialPosition.Earliest,
    )
    rss = PeakRss()
    began, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        consumer.acknowledge(consumer.receive())
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    peak = rss.stop()
    client.close()
    return {"seconds": seconds, "cpu": cpu, "peak_rss": peak}


def drain_consumer(url: str, count: int, data_dir: Path) -> dict[str, float]:
    from receiver.config import Config, TdmqConfig
    from receiver.sources.tdmq import TdmqConsumer

    tdmq = TdmqConfig(service_url=url, topics=[TOPIC], subscription="consumer")
    config = Config(data_dir=data_dir, handlers={}, tdmq=tdmq)

    def consumer(service):
        return TdmqConsumer(config.tdmq, service.ingestor, service.metrics)

    return drain_through(config, consumer, "ci_receiver_tdmq_messages_total", "acked", count)


def ingest_alone(fmt: str, count: int, data_dir: Path) -> dict[str, float]:
    import uvloop

    from receiver.config import Config, TdmqConfig
    from receiver.inbox import Receipt
    from receiver.logs import configure_logging
    from receiver.runtime.service import Service

    configure_logging("warning", "json")
    config = Config(data_dir=data_dir, handlers={})
    body = backlog_body(fmt)

    async def run() -> dict[str, float]:
        service = Service(config)
        await service.start()
        slots = asyncio.Semaphore(TdmqConfig().concurrency)

        async def one(number: int) -> None:
            async with slots:
                now = datetime.now(timezone.utc)
                receipt = Receipt(distinct(body, number), "tdmq", now, str(number))
                await service.ingestor.ingest(receipt)

        began = time.perf_counter()
        await asyncio.gather(*(one(number) for number in range(count)))
        seconds = time.perf_counter() - began
        await service.stop()
        return {"seconds": seconds}

    return uvloop.run(run())


def child(kind: str, url: str, count: int, data_dir: str) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.tdmq", "--child", kind, url, str(count), data_dir]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--formats", nargs="+", default=["json", "xml"])
    parser.add_argument("--child", nargs=4, metavar=("KIND", "URL|FORMAT", "COUNT", "DIR"))
    args = parser.parse_args()
    if args.child:
        kind, where, count, data_dir = args.child
        if kind == "bare":
            result = drain_bare(where, int(count))
        elif kind == "consumer":
            result = drain_consumer(where, int(count), Path(data_dir))
        else:
            result = ingest_alone(where, int(count), Path(data_dir))
        print(json.dumps(result))
        return

    print(f"python {sys.version.split()[0]}, pulsar-client {pulsar.__version__}, pulsar-lite")
    print(
        f"\n{'fmt':<5} {'backlog':>8} {'bare msg/s':>11} {'consumer msg/s':>15} {'ratio':>6}"
        f" {'bare peak RSS':>14} {'consumer peak RSS':>18} {'ingest alone/s':>15}"
        f" {'bare CPU µs':>12} {'consumer CPU µs':>16}"
    )
    for fmt in args.formats:
        for count in args.backlogs:
            with tempfile.TemporaryDirectory(prefix="bench-tdmq-") as folder:
                broker = PulsarLite(Path(folder) / "pulsar")
                broker.start()
                try:
                    publish(broker.url, fmt, count)
                    bare = child("bare", broker.url, count, folder)
                    ours = child("consumer", broker.url, count, str(Path(folder) / "data"))
                finally:
                    broker.stop()
                alone = child("ingest", fmt, count, str(Path(folder) / "alone"))
            bare_rate, our_rate = count / bare["seconds"], count / ours["seconds"]
            print(
                f"{fmt:<5} {count:>8} {bare_rate:>11,.0f} {our_rate:>15,.0f}"
                f" {our_rate / bare_rate:>5.2f}x {bare['peak_rss'] / 2**20:>11.0f} MiB"
                f" {ours['peak_rss'] / 2**20:>15.0f} MiB {count / alone['seconds']:>15,.0f}"
                f" {bare['cpu'] / count * 1e6:>12.1f} {ours['cpu'] / count * 1e6:>16.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
