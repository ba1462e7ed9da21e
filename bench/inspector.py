"""How fast each inspector page and API answer with a large inbox, from a real `serve`.

    python -m bench.inspector [--events 100000] [--repeat 7] [--postgres] [--short]

Fills an inbox (SQLite in a temporary folder; with --postgres a schema of its own on
CI_RECEIVER_TEST_POSTGRES_URL, dropped afterwards) with `--events` callbacks received
over the last 24 hours, busier by day, through the inbox's own `store` (every index
kept as in production): job events of five tags, 5% failed, a workflow event in 50,
a callback in 50 sent twice, a refused body in 100. Then sets the runs' outcomes in
place (claiming and finishing 200,000 runs one by one would take minutes and measure
nothing here): `log` done everywhere, `db` dead for the failed events, done for the
others.

A `ci-receiver serve` on that inbox then answers each page `--repeat` times (after one
warm-up request); the median and the slowest are printed, with the median as a ratio
to `/healthz` of the same listener in the same run (the floor: HTTP, auth, routing).
The inspector's goal is every page under 200 ms with 100,000 events.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import orjson

from receiver import parse_callback
from receiver.config import Config
from receiver.inbox import Inbox, Receipt
from receiver.inbox.factory import open_inbox
from tests.support.callbacks import load
from tests.support.databases import server_url
from tests.support.inbox_places import drop_schema
from tests.support.processes import Receiver

TAGS = ("Transcode", "Snapshot", "SmartCover", "Animation", "Concat")
BATCH = 1000
GOAL_MS = 200.0


def callback(n: int, rng: random.Random) -> bytes:
    if n % 50 == 0:
        body = load("workflow_finish.xml").decode()
        return body.replace("i166ee19017b011eda8a5525400c540df", f"i{n:032x}").encode()
    state = "Failed" if rng.random() < 0.05 else "Success"
    return orjson.dumps(
        {
            "EventName": "TaskFinish",
            "JobsDetail": {
                "JobId": f"j{n:032x}",
                "State": state,
                "Tag": TAGS[n % len(TAGS)],
                "Code": "Success" if state == "Success" else "InternalError",
                "Message": "" if state == "Success" else "decode input stream failed",
                "Input": {
                    "BucketId": "media-1250000000",
                    "Region": "ap-guangzhou",
                    "Object": f"input/{n % 100}/video-{n}.mp4",
                },
                "Operation": {
                    "Output": {"Bucket": "media-1250000000", "Object": f"output/{n}.mp4"},
                    "UserData": f"order-{n}",
                },
            },
        }
    )


def arrival_times(events: int, rng: random.Random) -> list[datetime]:
    """`events` moments over the last 24 hours, busier by day than by night, in order."""
    now = datetime.now(timezone.utc)
    moments: list[float] = []
    while len(moments) < events:
        seconds = rng.random() * 86400
        busy = 1 + 0.7 * math.sin(2 * math.pi * seconds / 86400) + 0.3 * rng.random()
        if rng.random() * 2 < busy:
            moments.append(seconds)
    return [now - timedelta(seconds=86400 - s) for s in sorted(moments)]


async def fill(inbox: Inbox, events: int) -> float:
    """Store `events` callbacks over the last 24 hours (one in 50 sent twice, one in
    100 refused); seconds it took."""
    rng = random.Random(13)
    times = arrival_times(events, rng)
    began = time.perf_counter()
    for start in range(0, events, BATCH):
        stores = []
        for n in range(start, min(events, start + BATCH)):
            body = callback(n, rng)
            routed = [(e, ["db", "log"]) for e in parse_callback(body)]
            arrived = Receipt(body, "http", times[n], f"bench-{n}",
                              {"content-type": "application/json"})  # fmt: skip
            stores.append(inbox.store(arrived, routed))
            if n % 50 == 25:  # CI sending it again
                stores.append(inbox.store(Receipt(body, "http", times[n], f"again-{n}"), routed))
            if n % 100 == 99:
                stores.append(inbox.reject(Receipt(b"<oops" + body[:200], "http", times[n],
                                                   f"bad-{n}"),
                                           "malformed_xml", "no element found"))  # fmt: skip
        await asyncio.gather(*stores)
    return time.perf_counter() - began


async def settle_runs(config: Config) -> None:
    """The runs' outcomes, set in place (see the module's docstring)."""
    statements = [
        "UPDATE runs SET status = 'done', attempts = 1",
        "UPDATE runs SET status = 'dead', attempts = 3, last_error = 'HTTP 502 from the"
        " database proxy' WHERE handler = 'db' AND event_id IN"
        " (SELECT id FROM events WHERE state = 'Failed')",
    ]
    if config.inbox.url is None:
        import sqlite3

        connection = sqlite3.connect(config.inbox_path)
        with connection:
            for statement in statements:
                connection.execute(statement)
        connection.close()
        return
    import asyncpg

    connection = await asyncpg.connect(
        config.inbox.url, server_settings={"search_path": config.inbox.postgres_schema}
    )
    try:
        for statement in statements:
            await connection.execute(statement)
        await connection.execute("ANALYZE")
    finally:
        await connection.close()


def pages(sample: dict) -> list[tuple[str, str]]:
    event, job, tag = sample["id"], sample["job_id"], sample["tag"]
    return [
        ("healthz (the floor)", "/healthz"),
        ("overview", "/inspector"),
        ("events", "/inspector/events"),
        ("events, page 2", f"/inspector/events?before={sample['seq']}"),
        ("events by state", "/inspector/events?state=Failed"),
        ("events by tag", f"/inspector/events?tag={tag}"),
        ("events by key prefix", "/inspector/events?key=input/7/*"),
        ("events by key, none match", "/inspector/events?key=*nope*"),
        ("events by state, none match", "/inspector/events?state=Nope"),
        ("dead letters of db (filter)", "/inspector/events?status=dead&handler=db"),
        ("handler status, none match", "/inspector/events?status=forged"),
        ("events of the last hour", "/inspector/events?since=1h"),
        ("event detail", f"/inspector/events/{event}"),
        ("job timeline", f"/inspector/jobs/{job}"),
        ("dead letters", "/inspector/dead"),
        ("replay-all confirmation", "/inspector/dead/replay?handler=db"),
        ("refused", "/inspector/refused"),
        ("API overview", "/api/overview"),
        ("API events", "/api/events?limit=100"),
        ("API dead letters", "/api/events?status=dead&handler=db"),
        ("API event", f"/api/events/{event}"),
    ]


def measure(url: str, repeat: int) -> tuple[float, float, int]:
    """(median ms, slowest ms, status) of `repeat` GETs after a warm-up one."""
    with httpx.Client(timeout=60) as client:
        status = client.get(url).status_code
        times = []
        for _ in range(repeat):
            began = time.perf_counter()
            status = client.get(url).status_code
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), max(times), status


def run(args: argparse.Namespace, work: Path) -> int:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    inbox_config = ""
    if args.postgres:
        url = server_url("postgresql")
        inbox_config = f'[inbox]\nurl = "{url}"\npostgres_schema = "{schema}"\n'
    config_path = work / "ci-receiver.toml"
    config_path.write_text(
        f'data_dir = "{work / "data"}"\n{inbox_config}[admin]\ninspector = true\n'
        '[http]\naccess_log = false\n[log]\nlevel = "warning"\n'
        # Handlers that never start: the inbox stays as filled while it is measured.
        '[handlers.db]\ntype = "tests.support.handler_doubles:CannotStart"\n'
        'token = "t"\nurl = "u"\n'
        '[handlers.log]\ntype = "tests.support.handler_doubles:CannotStart"\n'
        'token = "t"\nurl = "u"\n'
    )
    from receiver.config import load_config

    config = load_config(config_path)
    try:

        async def prepare() -> float:
            inbox = open_inbox(config)
            await inbox.open()
            try:
                return await fill(inbox, args.events)
            finally:
                await inbox.close()

        where = "PostgreSQL" if args.postgres else "SQLite"
        print(f"filling the {where} inbox with {args.events:,} events ...", file=sys.stderr)
        took = asyncio.run(prepare())
        asyncio.run(settle_runs(config))
        print(f"filled in {took:.0f} s", file=sys.stderr)
        receiver = Receiver(config_path).start()
        try:
            newest = httpx.get(receiver.admin_url + "/api/events?limit=2&tag=Transcode").json()
            sample = newest["events"][1]
            rows = []
            for name, path in pages(sample):
                rows.append((name, *measure(receiver.admin_url + path, args.repeat)))
        finally:
            receiver.terminate()
    finally:
        if args.postgres:
            asyncio.run(drop_schema(url, schema))
    floor = rows[0][1]
    print(f"\n{args.events:,} events in a {where} inbox; {args.repeat} requests per page\n")
    print(f"{'page':<30} {'median ms':>10} {'slowest':>9} {'x healthz':>10}  status")
    over = 0
    for name, median, slowest, status in rows:
        mark = "  > 200 ms" if median > GOAL_MS else ""
        over += bool(mark)
        print(f"{name:<30} {median:>10.1f} {slowest:>9.1f} {median / floor:>10.1f}  {status}{mark}")
    return 1 if over or any(row[3] != 200 for row in rows) else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--postgres", action="store_true", help="a PostgreSQL inbox")
    parser.add_argument("--short", action="store_true", help="5,000 events, 2 requests a page")
    args = parser.parse_args()
    if args.short:
        args.events, args.repeat = 5000, 2
    with tempfile.TemporaryDirectory(prefix="bench-inspector-") as folder:
        sys.exit(run(args, Path(folder)))


if __name__ == "__main__":
    main()
