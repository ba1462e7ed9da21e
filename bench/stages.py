"""CPU per callback, stage by stage, in one process: what each part of the ingest path
costs, so that the next change can be judged.

    python -m bench.stages [--callbacks 2000] [--concurrency 32] [--rounds 3]
    python -m bench.stages --against main   # this tree next to a git revision's
    python -m bench.stages --against A --this B   # two revisions


For a JSON and an XML callback (each request a new job), CPU µs per callback
(`time.process_time`: every thread of the process, the inbox's commit thread too) of:

  bare ASGI          bench/bare_app.py's Starlette endpoint (reads the body, answers):
                     the baseline every ratio is against;
  http layer         the receiver's app with an intake that answers at once: routing,
                     auth, request id, headers kept, the answer, the access log line;
  decode             bytes to a document (`receiver.callback.decode.decode`);
  normalize          document to Events (`receiver.callback.normalize.normalize`);
  route              the handlers of each event;
  inbox store        `SqliteInbox.store`, `concurrency` at a time (group commit,
                     synchronous=full);
  access log         the access log line alone, as configured for production (JSON);
  metrics            the per-callback metric updates of the ingest path;
  end to end         the app over a real `Service` (SQLite, synchronous=full), no handler;
  with `log`         the same with the default config (the `log` handler on every
                     event), until every run is done;
  dispatch           the difference of the two: claims, attempts, outcomes, the log line.

With `--against REV`, the same stages of the code at REV (exported with this tree's
measuring code, bench/trees.py) and of this tree (or of the revision `--this`), in separate
processes, rounds interleaved, with the ratio of the second's figure to the first's: a
change judged in one run.

Requests go through the ASGI app in memory (no sockets, no HTTP parsing: see
bench/http_server.py for the protocol's cost), `concurrency` of them in flight, on
uvloop as `serve` runs. Stages are measured in interleaved rounds; the best of the
rounds is printed (noise on a shared machine only ever adds time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog
import uvloop

from bench.bare_app import app as bare_app
from bench.trees import HERE, best_of, export
from receiver.callback.decode import DEFAULT_LIMITS, decode
from receiver.callback.normalize import normalize
from receiver.config import Config
from receiver.inbox import Receipt, Stored
from receiver.inbox.sqlite import SqliteInbox
from receiver.ingest.ingest import _state_label
from receiver.ingest.routing import Router
from receiver.logs import configure_logging
from receiver.metrics import Metrics
from receiver.runtime.service import Service
from receiver.sources.http import create_app
from tests.support.callbacks import load

SAMPLES = {
    "json": ("smartcover.json", b"j6842765cf84611ecb8546d80f2baf56f", b"application/json"),
    "xml": ("transcode.xml", b"j68427030f84611ecb8546d80f2baf56f", b"application/xml"),
}
_runs = 0  # distinguishes the job ids of every batch of bodies made


def events_of(normalized: Any) -> list[Any]:
    """normalize()'s events: it returns them with its field warnings now, and returned
    the list itself before (`--against` an older revision)."""
    return getattr(normalized, "events", normalized)


def bodies(fmt: str, count: int) -> list[bytes]:
    """`count` copies of the sample, each a job of its own."""
    global _runs
    _runs += 1
    name, job_id, _ = SAMPLES[fmt]
    template = load(name)
    return [template.replace(job_id, b"j%05d%08d" % (_runs, i)) for i in range(count)]


# --- the in-memory HTTP driver ----------------------------------------------------------


def scope_for(body: bytes, content_type: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/callbacks",
        "raw_path": b"/callbacks",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"user-agent", b"bench/stages"),
            (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }


async def post(app: Any, body: bytes, content_type: bytes) -> int:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # the client stays: no disconnect
        raise AssertionError

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope_for(body, content_type), receive, send)
    return status


async def drive(app: Any, fmt: str, count: int, concurrency: int) -> float:
    """CPU seconds to post `count` new callbacks, `concurrency` in flight."""
    content_type = SAMPLES[fmt][2]
    work = bodies(fmt, count)
    statuses: list[int] = []

    async def client(mine: list[bytes]) -> None:
        for body in mine:
            statuses.append(await post(app, body, content_type))

    began = time.process_time()
    await asyncio.gather(*(client(work[i::concurrency]) for i in range(concurrency)))
    spent = time.process_time() - began
    if set(statuses) != {200}:
        raise RuntimeError(f"unexpected answers: {sorted(set(statuses))}")
    return spent


# --- the stages -------------------------------------------------------------------------


class _AnsweringIntake:
    """An intake that stores nothing and answers at once: the HTTP layer alone."""

    def __init__(self) -> None:
        self._stored = Stored(1, ["e"], ["e"], [])

    async def ingest(self, receipt: Receipt) -> Stored:
        return self._stored

    async def reject(self, receipt: Receipt, error: Any, *, size: int | None = None) -> None:
        raise AssertionError("nothing is refused here")


class _HttpOnly:
    """A `Backend` around `_AnsweringIntake`."""

    draining = False

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.ingestor = _AnsweringIntake()


def per_call(function: Callable[[], object], count: int) -> float:
    began = time.process_time()
    for _ in range(count):
        function()
    return time.process_time() - began


class Bench:
    def __init__(self, work: Path, count: int, concurrency: int) -> None:
        self.work = work
        self.count = count
        self.concurrency = concurrency
        self._dirs = 0

    def config(self, **fields: Any) -> Config:
        self._dirs += 1
        return Config.model_validate({"data_dir": str(self.work / f"d{self._dirs}"), **fields})

    async def bare(self, fmt: str) -> float:
        return await drive(bare_app, fmt, self.count, self.concurrency)

    async def http_layer(self, fmt: str) -> float:
        app = create_app(_HttpOnly(self.config()))
        return await drive(app, fmt, self.count, self.concurrency)

    async def parts(self, fmt: str) -> tuple[dict[str, float], int]:
        """decode, normalize, route, metrics, access log: each on its own."""
        body = bodies(fmt, 1)[0]
        headers = {"content-type": SAMPLES[fmt][2].decode(), "user-agent": "bench/stages"}
        meta = {"request_id": "r"}
        now = datetime.now(timezone.utc)
        document = decode(body, headers, DEFAULT_LIMITS)
        events = events_of(normalize(document, source="http", source_meta=meta, received_at=now))
        router = Router(None, ["log"])
        metrics = Metrics()
        logger = structlog.get_logger("ci_receiver.sources.http")
        n = self.count * 5

        def metric_updates() -> None:
            # What Ingestor.ingest and _count do for one new event.
            metrics.series(metrics.callbacks, "http", "accepted").inc()
            for event in events:
                metrics.series(metrics.events, event.kind, _state_label(event.state)).inc()
            metrics.series(metrics.ingest_seconds, "http").observe(0.002)

        def access_log() -> None:
            with structlog.contextvars.bound_contextvars(request_id="0123456789abcdef"):
                logger.info(
                    "request",
                    method="POST",
                    path="/callbacks",
                    status=200,
                    ms=1.23,
                    client="127.0.0.1",
                    user_agent="bench/stages",
                )

        return {
            "decode": per_call(lambda: decode(body, headers, DEFAULT_LIMITS), n),
            "normalize": per_call(
                lambda: normalize(document, source="http", source_meta=meta, received_at=now), n
            ),
            "route": per_call(lambda: [router.handlers_for(e) for e in events], n),
            "access log": per_call(access_log, n),
            "metrics": per_call(metric_updates, n),
        }, n

    async def inbox_store(self, fmt: str) -> float:
        path = self.work / f"inbox-{fmt}-{time.monotonic_ns()}.db"
        inbox = SqliteInbox(path, synchronous="full", rejected_body_bytes=65536)
        await inbox.open()
        try:
            now = datetime.now(timezone.utc)
            receipts = []
            for i, body in enumerate(bodies(fmt, self.count)):
                headers = {"content-type": SAMPLES[fmt][2].decode()}
                receipt = Receipt(body, "http", now, f"r{i}", headers, {"request_id": f"r{i}"})
                document = decode(body, headers, DEFAULT_LIMITS)
                normalized = normalize(document, source="http", source_meta={}, received_at=now)
                events = events_of(normalized)
                receipts.append((receipt, [(event, ["log"]) for event in events]))

            async def client(mine: list[Any]) -> None:
                for receipt, routed in mine:
                    await inbox.store(receipt, routed)

            began = time.process_time()
            c = self.concurrency
            await asyncio.gather(*(client(receipts[i::c]) for i in range(c)))
            return time.process_time() - began
        finally:
            await inbox.close()

    async def end_to_end(self, fmt: str, *, handler: bool) -> float:
        config = self.config() if handler else self.config(routes=[])
        service = Service(config)
        await service.start()
        try:
            app = create_app(service)
            began = time.process_time()
            await drive(app, fmt, self.count, self.concurrency)
            if handler:
                await _all_runs_done(config.inbox_path, self.count)
            return time.process_time() - began
        finally:
            await service.stop()


async def _all_runs_done(inbox: Path, count: int) -> None:
    with contextlib.closing(sqlite3.connect(inbox)) as connection:
        while True:
            done = connection.execute("SELECT count(*) FROM runs WHERE status = 'done'").fetchone()
            if done[0] >= count:
                return
            await asyncio.sleep(0.02)


@contextlib.contextmanager
def logging_to_devnull(*, trace_ids: bool = False) -> Iterator[None]:
    """Production logging (JSON lines, info; `trace_ids` as `serve` logs with tracing
    on), written to /dev/null."""
    real = sys.stdout
    with open(os.devnull, "w") as devnull:
        sys.stdout = devnull
        try:
            configure_logging("info", "json", "UTC", trace_ids=trace_ids)
        finally:
            sys.stdout = real
        yield


STAGES = [
    "bare ASGI",
    "http layer",
    "decode",
    "normalize",
    "route",
    "inbox store",
    "access log",
    "metrics",
    "end to end",
    "with `log`",
]


async def measure(count: int, concurrency: int, rounds: int) -> dict[str, dict[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    bench = Bench(work, count, concurrency)
    best: dict[str, dict[str, float]] = {fmt: {} for fmt in SAMPLES}

    def keep(fmt: str, stage: str, seconds: float, calls: int) -> None:
        us = seconds / calls * 1e6
        best[fmt][stage] = min(best[fmt].get(stage, float("inf")), us)

    runs: list[tuple[str, Callable[[str], Awaitable[float]]]] = [
        ("bare ASGI", bench.bare),
        ("http layer", bench.http_layer),
        ("inbox store", bench.inbox_store),
        ("end to end", lambda fmt: bench.end_to_end(fmt, handler=False)),
        ("with `log`", lambda fmt: bench.end_to_end(fmt, handler=True)),
    ]
    try:
        for fmt in SAMPLES:  # warm up: imports, caches, the first inbox
            await bench.bare(fmt)
            await bench.end_to_end(fmt, handler=True)
        for _ in range(rounds):
            for fmt in SAMPLES:
                for stage, run in runs:
                    keep(fmt, stage, await run(fmt), count)
                parts, calls = await bench.parts(fmt)
                for stage, seconds in parts.items():
                    keep(fmt, stage, seconds, calls)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stages in best.values():
        stages["dispatch"] = stages["with `log`"] - stages["end to end"]
    return best


def table(best: dict[str, dict[str, float]], rounds: int, callbacks: int, concurrency: int) -> None:
    print(
        f"CPU µs per callback, best of {rounds} rounds of {callbacks} callbacks,"
        f" {concurrency} in flight; ratio: to the bare ASGI endpoint of the same run"
    )
    print(f"\n{'stage':<14}" + "".join(f"{fmt + ' µs':>10} {'ratio':>6}" for fmt in SAMPLES))
    for stage in [*STAGES, "dispatch"]:
        cells = ""
        for fmt in SAMPLES:
            us = best[fmt][stage]
            cells += f"{us:>10.1f} {us / best[fmt]['bare ASGI']:>5.2f}x"
        print(f"{stage:<14}{cells}")


def against(revision: str, args: argparse.Namespace) -> None:
    """This tree's (or `--this` revision's) stages next to REV's, each round a process
    of each, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="bench-stages-rev-"))
    this = "this tree" if args.this is None else args.this
    try:
        trees = {
            revision: export(revision, work / "before", own_bench=args.its_bench),
            this: HERE
            if args.this is None
            else export(args.this, work / "after", own_bench=args.its_bench),
        }
        arguments = ["--json", "--rounds", "1", "--callbacks", str(args.callbacks),
                     "--concurrency", str(args.concurrency)]  # fmt: skip
        best = best_of(args.rounds, trees, "bench.stages", arguments)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"CPU µs per callback, best of {args.rounds} interleaved rounds of {args.callbacks}"
        f" callbacks, {args.concurrency} in flight: {revision} -> {this}"
    )
    for fmt in SAMPLES:
        print(f"\n{fmt:<14}{revision[:12]:>12} {this[:12]:>12} {'ratio':>7}")
        for stage in [*STAGES, "dispatch"]:
            before, after = best[revision][fmt][stage], best[this][fmt][stage]
            ratio = f"{after / before:.2f}x" if before > 1 else ""
            print(f"{stage:<14}{before:>12.1f} {after:>12.1f} {ratio:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=2000, help="per stage and round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="compare with this git revision")
    parser.add_argument(
        "--this", metavar="REV", help="with --against: measure this revision, not the tree"
    )
    parser.add_argument(
        "--its-bench",
        action="store_true",
        help="with --against: measure each revision with its own bench/ (across the layout"
        " by stage, which this tree's measuring code cannot import from)",
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.against:
        against(args.against, args)
        return
    with logging_to_devnull():
        best = uvloop.run(measure(args.callbacks, args.concurrency, args.rounds))
    if args.json:
        print(json.dumps(best))
    else:
        table(best, args.rounds, args.callbacks, args.concurrency)


if __name__ == "__main__":
    main()
