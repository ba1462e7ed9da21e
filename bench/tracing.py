"""What OpenTelemetry traces cost per callback ([otel]): CPU µs of a callback end to end,
stored and handled, with tracing off, on (every trace sampled), and on with a sampler
that keeps one trace in ten, in one process, rounds interleaved.

    python -m bench.tracing [--callbacks 2000] [--concurrency 32] [--rounds 3]

Each callback goes through the receiver's app over a real `Service` (SQLite,
synchronous=full, the `log` handler on every event) until every run is done, as
`bench.stages`' "with `log`" stage (its driver, in memory, on uvloop). CPU is
`time.process_time`: every thread of the process, the exporter's thread too. Traces go
over OTLP/HTTP to a collector stand-in in another process (uvicorn serving
bench/sink.py, which answers 204 to every POST), as they would to a collector on the same
node; the log is the production one (JSON, with trace ids when on), to /dev/null. The
best of the rounds is printed, with the ratio to the same run's "off".

Whether tracing off costs anything against the code before it: `python -m bench.stages
--against REV`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import uvloop

from bench import sink
from bench.stages import SAMPLES, Bench, logging_to_devnull
from receiver import tracing
from receiver.config import Config

# The sampler of each mode (OTEL_TRACES_SAMPLER, _ARG); None: tracing off.
MODES: dict[str, tuple[str, str] | None] = {
    "off": None,
    "on, all sampled": ("parentbased_always_on", ""),
    "on, 1 in 10": ("parentbased_traceidratio", "0.1"),
}


def start_tracing(sampler: tuple[str, str] | None) -> None:
    """Start tracing with this sampler (None: leave it off)."""
    tracing.stop()
    if sampler is not None:
        os.environ["OTEL_TRACES_SAMPLER"], os.environ["OTEL_TRACES_SAMPLER_ARG"] = sampler
        assert tracing.start(Config(otel={"enabled": True})) is None


async def handled(bench: Bench, fmt: str, sampler: tuple[str, str] | None) -> float:
    """CPU seconds of `bench.count` callbacks stored and handled, traced with `sampler`,
    logged as `serve` then logs; the spans still held sent (their cost is the callbacks')."""
    start_tracing(sampler)
    with logging_to_devnull(trace_ids=tracing.active()):
        seconds = await bench.end_to_end(fmt, handler=True)
        began = time.process_time()
        tracing.stop()
        return seconds + time.process_time() - began


async def measure(count: int, concurrency: int, rounds: int) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    bench = Bench(work, count, concurrency)
    best: dict[str, dict[str, float]] = {fmt: {} for fmt in SAMPLES}
    try:
        for fmt in SAMPLES:  # warm up: imports, caches, the first inbox
            for sampler in MODES.values():
                await handled(bench, fmt, sampler)
        for _ in range(rounds):
            for fmt in SAMPLES:
                for mode, sampler in MODES.items():
                    us = await handled(bench, fmt, sampler) / count * 1e6
                    best[fmt][mode] = min(best[fmt].get(mode, float("inf")), us)
    finally:
        tracing.stop()
        shutil.rmtree(work, ignore_errors=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=2000, help="per mode and round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    collector, endpoint = sink.start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    try:
        best = uvloop.run(measure(args.callbacks, args.concurrency, args.rounds))
    finally:
        collector.terminate()
        collector.wait()
    print(
        f"CPU µs per callback stored and handled (`log`), best of {args.rounds} rounds of"
        f" {args.callbacks} callbacks, {args.concurrency} in flight; ratio: to tracing off"
    )
    print(f"\n{'tracing':<18}" + "".join(f"{fmt + ' µs':>10} {'ratio':>6}" for fmt in SAMPLES))
    for mode in MODES:
        cells = ""
        for fmt in SAMPLES:
            us = best[fmt][mode]
            cells += f"{us:>10.1f} {us / best[fmt]['off']:>5.2f}x"
        print(f"{mode:<18}{cells}")


if __name__ == "__main__":
    main()
