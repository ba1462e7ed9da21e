"""What only the PostgreSQL inbox does: wake other replicas, create its schema once when
replicas start together, and ride out a database that goes away and comes back.

The outage is a loopback TCP proxy in front of the machine's server (tests/support/tcp_proxy.py),
cut and restored by the test: the server itself keeps serving the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import asyncpg
import orjson
import psutil
import pytest
from sqlalchemy import make_url

from receiver import parse_callback
from receiver.inbox import InboxUnavailable, Lease, Receipt, postgres
from receiver.inbox.connector import Delivery, Finished
from receiver.inbox.postgres import PostgresInbox
from receiver.inbox.records import pack
from tests.support.tcp_proxy import TcpProxy


def inbox_at(url: str, schema: str, pool_size: int = 4, **options) -> PostgresInbox:
    return PostgresInbox(
        url, schema=schema, pool_size=pool_size, rejected_body_bytes=1024, **options
    )


@contextlib.asynccontextmanager
async def opened(url: str, schema: str, **options) -> AsyncIterator[PostgresInbox]:
    """`inbox_at`'s inbox, open for the block."""
    inbox = inbox_at(url, schema, **options)
    await inbox.open()
    try:
        yield inbox
    finally:
        await inbox.close()


@contextlib.asynccontextmanager
async def direct(url: str, schema: str | None = None):
    """A connection of the test's own beside the inbox's, in `schema` when given."""
    settings = {"search_path": schema} if schema else None
    connection = await asyncpg.connect(url, server_settings=settings)
    try:
        yield connection
    finally:
        await connection.close()


def through(proxy: TcpProxy, url: str) -> str:
    return make_url(url).set(port=proxy.port).render_as_string(hide_password=False)


def receipt_for(job_id: str) -> tuple[Receipt, list]:
    body = orjson.dumps({"JobsDetail": {"JobId": job_id, "State": "Success"}})
    routed = [(event, ["a"]) for event in parse_callback(body)]
    return Receipt(body, "http", datetime.now(timezone.utc), "r"), routed


async def store_new(inbox: PostgresInbox, prefix: str, count: int) -> None:
    """`count` callbacks stored at one moment, each a new job's."""
    stored = await asyncio.gather(
        *(inbox.store(*receipt_for(f"{prefix}{i}")) for i in range(count))
    )
    assert all(len(s.new) == 1 for s in stored)


async def eventually(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_store_wakes_the_other_replicas(postgres_schema):
    url, schema = postgres_schema
    storing, idle = inbox_at(url, schema), inbox_at(url, schema)
    await storing.open()
    await idle.open()
    wakes = []
    idle.watch(lambda: wakes.append(1))
    try:
        await eventually(lambda: wakes)  # connecting wakes once: something may be due
        before = len(wakes)
        await storing.store(*receipt_for("jwake"))
        await eventually(lambda: len(wakes) > before, timeout=2)
        before = len(wakes)
        await storing.requeue(None, ["b"], dead_only=False)  # a replay wakes them too
        await eventually(lambda: len(wakes) > before, timeout=2)
        before = len(wakes)
        await storing.store(*receipt_for("jwake"))  # a duplicate makes nothing due
        # Nor do runs the storer leased to start them itself.
        leased_receipt, routed = receipt_for("jleased")
        leases = {(routed[0][0].id, "a"): Lease("t", 30)}
        assert (await storing.store(leased_receipt, routed, leases=leases)).new
        await asyncio.sleep(0.3)
        assert len(wakes) == before
    finally:
        await storing.close()
        await idle.close()


async def test_a_verified_event_wakes_the_other_replicas_when_released(postgres_schema):
    url, schema = postgres_schema
    verifying, idle = inbox_at(url, schema), inbox_at(url, schema)
    await verifying.open()
    await idle.open()
    wakes = []
    idle.watch(lambda: wakes.append(1))
    try:
        await eventually(lambda: wakes)
        receipt, routed = receipt_for("jgenuine")
        (genuine,) = (await verifying.store(receipt, routed, verify=True)).new
        receipt, routed = receipt_for("jforged")
        (forged,) = (await verifying.store(receipt, routed, verify=True)).new
        await asyncio.sleep(0.3)
        before = len(wakes)
        await verifying.settle(forged, genuine=False)  # nothing became due
        await asyncio.sleep(0.3)
        assert len(wakes) == before
        await verifying.settle(genuine, genuine=True)
        await eventually(lambda: len(wakes) > before, timeout=2)
    finally:
        await verifying.close()
        await idle.close()


async def test_replicas_starting_together_create_the_schema_once(postgres_schema):
    url, schema = postgres_schema
    replicas = [inbox_at(url, schema) for _ in range(6)]
    await asyncio.gather(*(replica.open() for replica in replicas))
    try:
        results = await asyncio.gather(*(r.store(*receipt_for("jsame")) for r in replicas))
        assert sorted(len(result.new) for result in results) == [0, 0, 0, 0, 0, 1]
    finally:
        await asyncio.gather(*(replica.close() for replica in replicas))


async def test_an_outage_fails_operations_and_service_resumes_by_itself(postgres_schema):
    url, schema = postgres_schema
    async with (
        TcpProxy(make_url(url).port) as proxy,
        opened(through(proxy, url), schema) as inbox,
    ):
        wakes = []
        inbox.watch(lambda: wakes.append(1))
        await inbox.store(*receipt_for("jbefore"))
        await inbox.ping()
        await eventually(lambda: wakes)

        await proxy.cut()
        where = re.escape(f"PostgreSQL at 127.0.0.1:{proxy.port}/{make_url(url).database}")
        with pytest.raises(InboxUnavailable, match=f"^{where} unreachable") as first:
            await inbox.store(*receipt_for("jduring"))
        # The write before it no longer vouches for the inbox: ping asks the server.
        with pytest.raises(InboxUnavailable, match=f"^{where} unreachable since ") as later:
            await inbox.ping()
        assert later.value.since == first.value.since is not None

        await proxy.restore()
        woken = len(wakes)
        stored = await retrying(lambda: inbox.store(*receipt_for("jafter")))
        assert stored.new == ["job:jafter:Success"]
        await inbox.ping()
        # The listening connection comes back too, and wakes: work may have come
        # meanwhile.
        await eventually(lambda: len(wakes) > woken, timeout=40)
        assert await inbox.known(["job:jbefore:Success", "job:jduring:Success"]) == {
            "job:jbefore:Success"
        }


async def test_a_database_that_stops_answering_fails_each_store_within_the_timeout(
    postgres_schema, monkeypatch
):
    # A network that stops carrying packets (not a server that refuses): the batch's
    # statement times out, and the next batch's connection must not wait asyncpg's own
    # minute to connect, nor each caller behind it a minute more.
    monkeypatch.setattr(postgres, "COMMAND_TIMEOUT", 1.0)
    url, schema = postgres_schema
    async with (
        TcpProxy(make_url(url).port) as proxy,
        opened(through(proxy, url), schema) as inbox,
    ):
        await inbox.store(*receipt_for("jbefore"))
        proxy.stall()
        loop = asyncio.get_running_loop()

        async def store_failing(job_id: str) -> float:
            began = loop.time()
            with pytest.raises(InboxUnavailable):
                await inbox.store(*receipt_for(job_id))
            return loop.time() - began

        first = asyncio.create_task(store_failing("jfirst"))
        await asyncio.sleep(0.3)  # the first batch under way: these wait behind it
        later = [asyncio.create_task(store_failing(f"jlater{i}")) for i in range(3)]
        waits = await asyncio.wait_for(asyncio.gather(first, *later), 30)
        # Each failed within about one timeout of the statement, or of the connection
        # its batch waited for: not asyncpg's 60 s to connect.
        assert max(waits) < 4, waits

        proxy.flow()
        stored = await retrying(lambda: inbox.store(*receipt_for("jafter")), timeout=20)
        assert stored.new == ["job:jafter:Success"]


async def retrying(operation, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await operation()
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_service_waits_for_the_database_at_start(postgres_schema):
    url, schema = postgres_schema
    proxy = TcpProxy(make_url(url).port)  # not listening yet: the database is away
    waiting = inbox_at(through(proxy, url), schema, wait=True)
    opening = asyncio.create_task(waiting.open())
    await asyncio.sleep(1.5)
    assert not opening.done()
    await proxy.restore()
    try:
        await asyncio.wait_for(opening, 30)
        assert (await waiting.store(*receipt_for("jlate"))).new
    finally:
        await waiting.close()
        await proxy.cut()


async def test_a_command_does_not_wait_for_an_absent_database(postgres_schema):
    url, schema = postgres_schema
    proxy = TcpProxy(make_url(url).port)
    where = re.escape(f"PostgreSQL at 127.0.0.1:{proxy.port}/{make_url(url).database}")
    with pytest.raises(InboxUnavailable, match=f"^{where} unreachable: "):
        await asyncio.wait_for(inbox_at(through(proxy, url), schema).open(), 10)


async def test_a_database_that_does_not_exist_is_an_error_at_once(postgres_schema):
    url, schema = postgres_schema
    missing = make_url(url).set(database=f"nope_{uuid.uuid4().hex[:8]}")
    inbox = inbox_at(missing.render_as_string(hide_password=False), schema, wait=True)
    with pytest.raises(InboxUnavailable, match="refused"):
        await asyncio.wait_for(inbox.open(), 10)


async def test_the_tables_live_in_their_own_schema(postgres_schema):
    url, schema = postgres_schema
    inbox = inbox_at(url, schema)
    await inbox.open()
    await inbox.close()
    async with direct(url) as connection:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1", schema
        )
    assert [t[0] for t in tables] == ["attempts", "events", "meta", "receipts", "runs", "state"]


async def transactions_of_receipts(url: str, schema: str) -> int:
    """How many transactions wrote the receipts (each row's xmin is the one that did)."""
    async with direct(url, schema) as connection:
        return await connection.fetchval("SELECT count(DISTINCT xmin::text) FROM receipts")


async def test_callbacks_stored_at_one_moment_are_committed_together(postgres_schema):
    url, schema = postgres_schema
    async with opened(url, schema) as inbox:
        await store_new(inbox, "j", 300)
        alone = await inbox.store(*receipt_for("jalone"))  # a callback alone commits at once
        assert len(alone.new) == 1
    # A burst is a few large commits, not one per callback.
    assert await transactions_of_receipts(url, schema) <= 10


async def test_connections_killed_under_the_inbox_fail_a_batch_at_most_then_stores_resume(
    postgres_schema,
):
    # The group commit holds a connection through a run of batches: one killed must be
    # given back (the pool replaces it), never kept to fail the batches after it.
    url, schema = postgres_schema
    async with opened(url, schema) as inbox:
        await store_new(inbox, "j", 50)
        async with direct(url) as connection:
            killed = await connection.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'ci-receiver' AND pid <> pg_backend_pid()"
                " AND query LIKE '%WITH batch AS%'"
            )
        assert killed >= 1
        failed = 0
        for attempt in range(5):  # the pool's connections that were killed: each fails once
            try:
                await inbox.store(*receipt_for(f"jafter{attempt}"))
                break
            except InboxUnavailable:
                failed += 1
        assert failed <= killed
        await store_new(inbox, "k", 200)


async def test_a_burst_of_stores_never_keeps_the_one_connection_from_other_statements(
    postgres_schema,
):
    # The store's group commit holds a connection through batches in a row, but gives
    # it back after a while: with a pool of one, a statement beside a long burst (a
    # claim, a readiness probe) gets its turn before the burst ends.
    url, schema = postgres_schema
    async with opened(url, schema, pool_size=1) as inbox:
        burst = asyncio.gather(*(inbox.store(*receipt_for(f"j{i}")) for i in range(6000)))
        await asyncio.sleep(0.02)  # the first batches under way
        assert await inbox.size() > 0
        assert not burst.done()
        assert all(len(s.new) == 1 for s in await burst)


async def test_a_store_the_server_refuses_fails_alone_and_its_batch_is_kept(postgres_schema):
    url, schema = postgres_schema
    async with opened(url, schema) as inbox:
        broken, routed = receipt_for("jbroken")
        broken.received_at = None  # receipts.received_at is NOT NULL: the server refuses it
        stores = [inbox.store(*receipt_for(f"j{i}")) for i in range(20)]
        stores.insert(10, inbox.store(broken, routed))
        outcomes = await asyncio.gather(*stores, return_exceptions=True)
        assert isinstance(outcomes[10], asyncpg.NotNullViolationError)
        assert all(len(o.new) == 1 for i, o in enumerate(outcomes) if i != 10)
        # Those of its batch were committed: the same callback again is a duplicate.
        assert len((await inbox.store(*receipt_for("j3"))).duplicates) == 1


async def test_outcomes_caught_in_a_deadlock_are_recorded_one_by_one(postgres_schema):
    """FINISH locks its runs as its UPDATE meets them, in key order; a statement of someone
    else's that takes them in another order makes a cycle, which PostgreSQL breaks by
    aborting one side. When that side is a batch of outcomes, each is written again
    alone, and none is lost."""
    url, schema = postgres_schema
    async with opened(url, schema) as inbox:
        outcomes = inbox.connector._outcomes
        written: list[int] = []  # the size of every batch FINISH was run on
        write = outcomes._write

        async def counting(session, items):
            written.append(len(items))
            return await write(session, items)

        outcomes._write = counting
        stored = [await inbox.store(*receipt_for(f"jdeadlock{i}")) for i in range(2)]
        first, second = sorted(s.new[0] for s in stored)
        claims = await inbox.claim("a", 2, lease_seconds=60)
        assert sorted(claim.event.id for claim in claims) == [first, second]
        async with direct(url, schema) as other, direct(url) as observer:
            # The batch looks for a cycle 1 s into its wait (the server's default), the
            # other side only after 10: the batch is the one to find it.
            await other.execute("SET deadlock_timeout = '10s'")
            other_pid = await other.fetchval("SELECT pg_backend_pid()")
            locking = "SELECT 1 FROM runs WHERE event_id = $1 FOR UPDATE"
            async with other.transaction():
                await other.execute(locking, second)
                finishing = asyncio.gather(
                    *(inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))
                      for claim in claims)
                )  # fmt: skip
                # The batch holds the first run and waits for the second ...
                blocked = (
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
                )
                deadline = asyncio.get_running_loop().time() + 10
                while not await observer.fetchval(blocked, other_pid):
                    assert not finishing.done(), "the batch ended without waiting"
                    assert asyncio.get_running_loop().time() < deadline, "the batch never waited"
                    await asyncio.sleep(0.02)
                # ... which waits for the first: the server aborts the batch.
                try:
                    await other.execute(locking, first)
                except asyncpg.DeadlockDetectedError:
                    pytest.fail("the test lost the race: its own side was aborted, not the batch")
            assert await finishing == [True, True]
            assert written == [2, 1, 1]  # the batch, then each outcome alone
            runs = await other.fetch("SELECT status, attempts FROM runs ORDER BY event_id")
            assert [tuple(row) for row in runs] == [("done", 1), ("done", 1)]
            assert await other.fetchval("SELECT count(*) FROM attempts") == 2


async def test_a_forged_event_is_replaced_in_the_transaction_storing_its_new_delivery(
    postgres_schema,
):
    url, schema = postgres_schema
    async with opened(url, schema) as inbox, direct(url, schema) as connection:
        (forged,) = (await inbox.store(*receipt_for("jtaken"), verify=True)).new
        await inbox.settle(forged, genuine=False)
        # The replacement's runs cannot be written: the delivery must leave nothing
        # behind, its receipt included, and the forged event as it was.
        await connection.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$;"
            " CREATE TRIGGER refuse BEFORE INSERT ON runs FOR EACH ROW"
            " EXECUTE FUNCTION refuse()"
        )
        with pytest.raises(asyncpg.RaiseError, match="refused"):
            await inbox.store(*receipt_for("jtaken"))
        await connection.execute("DROP TRIGGER refuse ON runs; DROP FUNCTION refuse()")
        assert await connection.fetchval("SELECT count(*) FROM receipts") == 1
        assert await inbox.known([forged], forged=False) == set()
        # Once it can, the same delivery replaces it.
        assert (await inbox.store(*receipt_for("jtaken"))).new == [forged]


async def test_a_batch_of_unusual_values_is_stored_and_finished_exactly(postgres_schema):
    """STORE and FINISH take their batch as one JSON text: every value comes back as it
    went in (bytes byte for byte, times to the microsecond whatever their offset, a
    lease's float seconds, NULL as NULL, and text as the inbox always stores it: NUL,
    which PostgreSQL refuses in text, as U+FFFD)."""
    url, schema = postgres_schema
    every_byte = bytes(range(256))
    west = timezone(-timedelta(hours=3, minutes=30))
    # An offset with seconds (a local mean time, or any producer's): not cut to minutes.
    odd = timezone(timedelta(hours=5, minutes=30, seconds=15))
    received = [
        datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=west),
        datetime(2025, 1, 1, 8, 0, 0, 1, tzinfo=odd),
    ]
    receipts = [
        Receipt(
            every_byte,
            "http",
            received[0],
            "请求\x00一",
            headers={"x-名字": "值\x00", "content-type": "application/json"},
            source_meta={"queue": "队列", "none": None, "number": 1.5},
        ),
        # No request id.
        Receipt(every_byte[::-1], "tdmq", received[1], None, headers={}, source_meta={}),
    ]
    events = [
        (
            "job:事件\x00一",
            "job",
            "任务完成",
            "j\x00一",
            None,
            "Success",
            "桶-1",
            "键/文件.mp4",
            None,
        ),
        ("job:two", "moderation", None, None, "标签", None, None, None, "violation"),
    ]
    ids = ["job:事件\ufffd一", "job:two"]
    deliveries = [
        Delivery(
            receipts[0],
            [(events[0], [("a", "pending", Lease("令牌", 12.345678)), ("b", "pending", None)])],
        ),
        Delivery(receipts[1], [(events[1], [("a", "held", None)])]),
    ]
    started = datetime(2024, 3, 1, 0, 0, 0, 123_456, tzinfo=odd)
    retry_at = datetime(2024, 3, 1, 0, 5, 0, 654_321, tzinfo=west)
    outcomes = [
        Finished(
            ids[0], "a", "令牌", "pending", 1, retry_at, "错误\x00 \u2028", 1, started, "retry"
        ),
        Finished(ids[0], "b", "not its lease", "done", 1, None, None, 1, started, "done"),
    ]
    async with opened(url, schema) as inbox, direct(url, schema) as connection:
        stored = await inbox.connector.store_many(deliveries)
        assert [d.stored for d in stored] == [[ids[0]], [ids[1]]]
        assert await transactions_of_receipts(url, schema) == 1  # one batch
        leases = await connection.fetch(
            "SELECT event_id, handler, lease_token, lease_until - updated_at FROM runs"
        )
        assert {(row[0], row[1]): tuple(row[2:]) for row in leases} == {
            (ids[0], "a"): ("令牌", timedelta(seconds=12, microseconds=345_678)),
            (ids[0], "b"): (None, None),
            (ids[1], "a"): (None, None),
        }
        assert await asyncio.gather(*map(inbox.connector.finish, outcomes)) == [True, False]

        kept = await connection.fetch(
            "SELECT received_at, source, request_id, headers, source_meta, body, size,"
            " event_ids, outcome FROM receipts ORDER BY id"
        )
        assert [tuple(row) for row in kept] == [
            (
                received[0],
                "http",
                "请求\ufffd一",
                orjson.dumps(receipts[0].headers),
                orjson.dumps(receipts[0].source_meta),
                pack(every_byte),
                len(every_byte),
                orjson.dumps([events[0][0]]),
                "accepted",
            ),
            (
                received[1],
                "tdmq",
                None,
                b"{}",
                b"{}",
                pack(every_byte[::-1]),
                len(every_byte),
                b'["job:two"]',
                "accepted",
            ),
        ]
        assert [row[0].microsecond for row in kept] == [received[0].microsecond, 1]
        rows = await connection.fetch(
            "SELECT id, kind, event_name, job_id, tag, state, bucket, key, verdict,"
            " received_at, data FROM events ORDER BY seq"
        )
        assert [tuple(row) for row in rows] == [
            (ids[0], *events[0][1:3], "j\ufffd一", *events[0][4:], received[0], None),
            (*events[1], received[1], None),
        ]
        runs = await connection.fetch(
            "SELECT event_id, handler, status, attempts, due_at, lease_token, last_error FROM runs"
        )
        by_key = {(row[0], row[1]): tuple(row[2:]) for row in runs}
        assert by_key[ids[0], "a"] == ("pending", 1, retry_at, None, "错误\ufffd \u2028")
        assert by_key[ids[0], "b"][:2] == ("pending", 0)
        assert by_key[ids[1], "a"][:2] == ("held", 0)
        attempts = await connection.fetch(
            "SELECT event_id, handler, number, started_at, outcome, error FROM attempts"
        )
        assert [tuple(row) for row in attempts] == [
            (ids[0], "a", 1, started, "retry", "错误\ufffd \u2028")
        ]


def ports_toward(url: str) -> list[int]:
    """The local ports of this process's connections to the server at `url`."""
    port = make_url(url).port or 5432
    connections = psutil.Process().net_connections("tcp")
    return [c.laddr.port for c in connections if c.raddr and c.raddr.port == port]


async def rows_of_runs_read(url: str, schema: str, ports: list[int]) -> int:
    """Rows of `runs` read whole or fetched through an index, once the connections from
    `ports` (the inbox's) have ended (each writes its statistics as it exits); other
    processes' connections to the same database are not waited for."""
    async with direct(url) as connection:
        for _ in range(100):
            if not await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY($1::int[])",
                ports,
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the inbox's connections did not end")
        return await connection.fetchval(
            "SELECT seq_tup_read + COALESCE(idx_tup_fetch, 0) FROM pg_stat_user_tables"
            " WHERE schemaname = $1 AND relname = 'runs'",
            schema,
        )


async def test_plans_made_while_the_inbox_was_new_never_read_runs_whole(postgres_schema):
    url, schema = postgres_schema
    async with opened(url, schema) as inbox:

        async def store_claim_finish(prefix: str) -> None:
            for i in range(10):
                await inbox.store(*receipt_for(f"{prefix}{i}"))
                for claim in await inbox.claim("a", 5, 30):
                    assert await inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))

        # Each statement prepared, and its generic plan made (after 5 executions), while
        # `runs` is all but empty ...
        await store_claim_finish("jnew")
        # ... then the table grows, as it does under load, and the same connections go on.
        async with direct(url, schema) as connection:
            await connection.execute(
                "INSERT INTO runs (event_id, handler, status, due_at, updated_at)"
                " SELECT 'grown' || g, 'a', 'done', now(), now() FROM generate_series(1, 20000) g"
            )
        await store_claim_finish("jgrown")
        ports = ports_toward(url)
    # No statement read the 20,000 rows to find the few it wanted.
    assert await rows_of_runs_read(url, schema, ports) < 20_000
