"""What the backlog benchmarks share: peak RSS sampling, and draining a backlog through
one of ci-receiver's consumers into a fresh inbox."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

SAMPLE_SECONDS = 0.01


class PeakRss:
    """The highest RSS of this process seen by a sampling thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


def drain_through(
    config: Any, make_consumer: Callable[[Any], Any], metric: str, outcome: str, count: int
) -> dict[str, float]:
    """Run the consumer `make_consumer(service)` on a Service of `config` until its
    counter `metric{outcome}` reaches `count`; check that `count` events were stored.
    Returns the seconds taken, the CPU seconds of the process (every thread: the
    client's too) and the peak RSS."""
    import uvloop

    from receiver.logs import configure_logging
    from receiver.runtime.service import Service

    configure_logging("warning", "json")

    async def run() -> dict[str, float]:
        service = Service(config)
        await service.start()
        consumer = make_consumer(service)
        rss = PeakRss()
        began, cpu = time.perf_counter(), time.process_time()
        running = asyncio.create_task(consumer.run())
        labels = {"outcome": outcome}
        while (service.metrics.registry.get_sample_value(metric, labels) or 0) < count:
            if running.done():
                running.result()
            await asyncio.sleep(0.05)
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        peak = rss.stop()
        consumer.stop()
        await running
        stored = len(await service.inbox.events(limit=count + 1))
        await service.stop()
        if stored != count:
            raise RuntimeError(f"{stored} events stored, {count} expected")
        return {"seconds": seconds, "cpu": cpu, "peak_rss": peak}

    return uvloop.run(run())
