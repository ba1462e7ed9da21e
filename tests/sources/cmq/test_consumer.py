"""The CMQ consumer in-process, with a real inbox (`inbox`: SQLite, then PostgreSQL),
against the loopback CMQ stand-in (tests/support/cmq_server.py), which stands in for TDMQ for
CMQ."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from structlog.testing import capture_logs

from receiver import parse_callback
from receiver.callback.decode import Limits, PayloadError
from receiver.config import CmqConfig, Config
from receiver.inbox import Inbox, Receipt, Stored
from receiver.inbox import writer as writer_module
from receiver.inbox.sqlite import SqliteInbox
from receiver.ingest.ingest import REJECTED_ROW_BYTES, Ingestor, RejectedBudget
from receiver.ingest.routing import Router
from receiver.metrics import Metrics
from receiver.sources.cmq import CmqConsumer, CmqError
from tests.support.callbacks import load
from tests.support.cmq_stand_in import QUEUE, SECRET_ID, SECRET_KEY, CmqStandIn
from tests.support.installations import variant
from tests.support.sqlite_lock import HeldLock
from tests.support.waiting import eventually

# As a config without a TDMQ dead-letter topic has it (`Config.refusals_wait_in`).
WAITING = Config().refusals_wait_in()
# A key CMQ no longer knows (deleted while in use, say): a 41xx code of its own.
KEY_GONE = {"code": 4104, "message": "the key does not exist"}


@pytest.fixture
def stand_in(tmp_path):
    server = CmqStandIn(tmp_path / "cmq", visibility_timeout=1).start()
    yield server
    server.close()


def cmq_config(stand_in: CmqStandIn, **keys) -> CmqConfig:
    return CmqConfig(
        **{
            "endpoint": stand_in.url,
            "secret_id": SECRET_ID,
            "secret_key": SECRET_KEY,
            "queues": [QUEUE],
            "polling_wait": 1,
            **keys,
        }
    )


def ingestor(inbox: Inbox, metrics: Metrics) -> Ingestor:
    return Ingestor(inbox, Router(None, []), metrics, Limits())


class Consuming:
    """A consumer running on the event loop, its metrics at hand."""

    def __init__(self, consumer: CmqConsumer, metrics: Metrics) -> None:
        self.consumer = consumer
        self.metrics = metrics
        self.task = asyncio.create_task(consumer.run())

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "ci_receiver_cmq_messages_total", {"outcome": outcome}
        )
        return value or 0

    async def stop(self) -> None:
        self.consumer.stop()
        await asyncio.wait_for(self.task, 30)


def consume(stand_in: CmqStandIn, intake, metrics: Metrics, **keys) -> Consuming:
    return Consuming(CmqConsumer(cmq_config(stand_in, **keys), intake, metrics), metrics)


async def queued(stand_in: CmqStandIn) -> int:
    return (await asyncio.to_thread(stand_in.stats))["queued"][QUEUE]


async def test_callbacks_are_committed_then_deleted(stand_in, inbox):
    metrics = Metrics()
    running = consume(stand_in, ingestor(inbox, metrics), metrics)
    body = load("smartcover.xml")
    try:
        await asyncio.to_thread(stand_in.send, [variant(body, n) for n in range(40)])
        await eventually(lambda: running.count("deleted") == 40, "all deleted")
        assert await queued(stand_in) == 0
        assert running.count("committed") == 40
        assert len(await inbox.events(limit=100)) == 40
        assert (await running.consumer.check()) == (True, f"{QUEUE}: receiving")
        latency = metrics.registry.get_sample_value("ci_receiver_cmq_receive_seconds_count")
        assert latency >= 1
    finally:
        await running.stop()
    [receipt] = await inbox.receipts(limit=1)
    kept = await inbox.receipt(receipt.id)
    assert kept.source == "cmq"
    assert set(kept.source_meta) == {"queue", "msg_id", "enqueue_time", "dequeue_count"}
    assert kept.source_meta["queue"] == QUEUE
    assert kept.source_meta["dequeue_count"] == 1
    assert kept.request_id == kept.source_meta["msg_id"]


async def test_an_inbox_failure_leaves_the_message_to_come_back(tmp_path, stand_in):
    inbox = SqliteInbox(tmp_path / "late.db", rejected_body_bytes=1024)  # not open: failing
    metrics = Metrics()
    running = consume(stand_in, ingestor(inbox, metrics), metrics)
    try:
        await asyncio.to_thread(stand_in.send, [load("smartcover.xml")])
        await eventually(lambda: running.count("failed") >= 1, "the failed commit")
        assert running.count("deleted") == 0
        assert await queued(stand_in) == 1  # not deleted
        await inbox.open()  # the inbox is back; the message too, after the visibility timeout
        await eventually(lambda: running.count("deleted") == 1, "deleted once stored")
        receipts = await inbox.receipts()
        assert [r.outcome for r in receipts] == ["accepted"]
        kept = await inbox.receipt(receipts[0].id)
        assert kept.source_meta["dequeue_count"] >= 2
        assert await queued(stand_in) == 0
    finally:
        await running.stop()
        await inbox.close()


async def test_while_the_inbox_is_away_messages_are_taken_ever_more_slowly(
    tmp_path, stand_in, monkeypatch
):
    # Each taking counts toward a queue's own dead-letter policy (maxReceiveCount): an
    # outage of the inbox must not take the backlog again every visibility timeout.
    # Away as a SQLite inbox is: another process keeps its write lock.
    monkeypatch.setattr(writer_module, "LOCK_TIMEOUT", 0.05)
    inbox = SqliteInbox(tmp_path / "late.db", rejected_body_bytes=1024)
    await inbox.open()
    metrics = Metrics()
    backlog = 40
    bodies = [load("smartcover.xml").replace(b"<JobId>j", b"<JobId>j%d" % i, 1)
              for i in range(backlog)]  # fmt: skip
    with HeldLock(tmp_path / "late.db") as lock:
        running = consume(stand_in, ingestor(inbox, metrics), metrics)
        try:
            await asyncio.to_thread(stand_in.send, bodies)
            await eventually(lambda: running.count("failed") >= 1, "the first failed commit")
            await asyncio.sleep(4)  # four visibility timeouts
            # Taken again every second, the backlog would fail 160 times and more
            # (176-200 measured). Paused 0.25-0.5, then 0.5-1, 1-2, 2-4 s (with jitter,
            # shared by the two pollers), at most 7 batches of 16 are taken: 112.
            assert running.count("failed") <= 112
            assert running.count("deleted") == 0
            lock.release()  # the inbox is back
            await eventually(lambda: running.count("deleted") == backlog, "all kept once back")
        finally:
            await running.stop()
            await inbox.close()


@pytest.mark.parametrize(
    ("raw_body", "reason"),
    [
        (None, "malformed_xml"),  # as sent: an XML document cut short
        ("null", "bad_message"),  # no msgBody string in CMQ's answer
        ('"\\ud800"', "not_xml_or_json"),  # a lone surrogate: not UTF-8 once encoded
        ('"\udcff"', "not_xml_or_json"),  # the byte 0xff as it came: not UTF-8
    ],
)
async def test_a_body_that_cannot_be_read_is_kept_as_rejected_and_deleted(
    stand_in, inbox, raw_body, reason
):
    metrics = Metrics()
    stand_in.control(raw_body=raw_body)
    await asyncio.to_thread(stand_in.send, [b"<Response><JobsDetail>", load("transcode.xml")])
    running = consume(stand_in, ingestor(inbox, metrics), metrics, batch=1)
    try:
        await eventually(lambda: running.count("deleted") == 2, "both deleted")
        assert running.count("rejected") == 1
        rejected = await inbox.receipts(outcome="rejected")
        assert [r.error_reason for r in rejected] == [reason]
        assert await queued(stand_in) == 0  # it does not loop
    finally:
        await running.stop()


async def test_a_refusal_with_no_room_to_keep_it_leaves_the_message_to_come_back(stand_in, inbox):
    # The hour's budget for refused bodies has room for one: the second garbage message
    # is counted, not deleted (the queue holds its only copy), and comes back after the
    # visibility timeout; kept once the budget has refilled, it is deleted then.
    metrics = Metrics()
    body = b"<Response><JobsDetail>"
    budget = RejectedBudget(body_bytes=len(body), bytes_per_hour=REJECTED_ROW_BYTES + len(body))
    intake = Ingestor(
        inbox, Router(None, []), metrics, Limits(), rejected=budget, refusals_wait_in=WAITING
    )
    await asyncio.to_thread(stand_in.send, [body, body + b"<"])
    running = consume(stand_in, intake, metrics, batch=1)
    try:
        await eventually(lambda: running.count("failed") >= 1, "the second one not kept")
        await eventually(lambda: running.count("deleted") == 1, "the first one kept, deleted")
        assert running.count("rejected") == 1
        assert await queued(stand_in) == 1  # still in the queue
        # Neither kept nor counted as refused yet: it is, once it is kept.
        refused = metrics.registry.get_sample_value(
            "ci_receiver_callbacks_total", {"source": "cmq", "outcome": "rejected"}
        )
        assert refused == 1
        budget._left = budget._capacity  # the hour gone by
        await eventually(lambda: running.count("deleted") == 2, "kept once there is room")
        rejected = await inbox.receipts(outcome="rejected")
        assert sorted(r.size for r in rejected) == [len(body), len(body) + 1]
        assert await queued(stand_in) == 0
    finally:
        await running.stop()


async def test_a_refusal_the_budget_never_has_room_for_is_counted_and_deleted(stand_in, inbox):
    # With no budget for refused bodies at all, waiting would not help: counted, deleted.
    metrics = Metrics()
    budget = RejectedBudget(body_bytes=64, bytes_per_hour=0)
    intake = Ingestor(
        inbox, Router(None, []), metrics, Limits(), rejected=budget, refusals_wait_in=WAITING
    )
    await asyncio.to_thread(stand_in.send, [b"<Response><JobsDetail>"])
    running = consume(stand_in, intake, metrics, batch=1)
    try:
        await eventually(lambda: running.count("deleted") == 1, "deleted")
        assert (running.count("rejected"), running.count("failed")) == (1, 0)
        assert await inbox.receipts(outcome="rejected") == []
        not_kept = metrics.registry.get_sample_value(
            "ci_receiver_rejected_not_kept_total", {"source": "cmq", "reason": "malformed_xml"}
        )
        assert not_kept == 1
        assert await queued(stand_in) == 0
    finally:
        await running.stop()


class Held:
    """An intake that holds every callback until released: messages stay in hand."""

    def __init__(self, inner: Ingestor) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.holding = 0

    async def ingest(self, receipt: Receipt) -> Stored:
        self.holding += 1
        await self.release.wait()
        return await self.inner.ingest(receipt)

    async def reject(self, receipt: Receipt, error: PayloadError, *, size=None) -> None:
        await self.inner.reject(receipt, error, size=size)


async def test_at_most_batch_times_concurrency_messages_are_in_hand(stand_in, inbox):
    metrics = Metrics()
    held = Held(ingestor(inbox, metrics))
    body = load("smartcover.json")
    await asyncio.to_thread(stand_in.send, [variant(body, n) for n in range(100)])
    running = consume(stand_in, held, metrics, batch=4, concurrency=2)
    try:
        await eventually(lambda: held.holding == 8, "two batches of four in hand")
        await asyncio.sleep(0.5)  # time to take more, if the bound did not hold
        stats = await asyncio.to_thread(stand_in.stats)
        assert stats["peak_hidden"] == {QUEUE: 8}
        assert held.holding == 8
        held.release.set()
        await eventually(lambda: running.count("deleted") == 100, "the backlog drained")
        assert (await asyncio.to_thread(stand_in.stats))["peak_hidden"] == {QUEUE: 8}
    finally:
        await running.stop()


async def test_stop_ends_the_long_poll_at_once_and_lets_batches_finish(stand_in, inbox):
    metrics = Metrics()
    held = Held(ingestor(inbox, metrics))
    idle = consume(stand_in, held, metrics, polling_wait=30)
    await asyncio.sleep(0.5)  # in its long poll
    await asyncio.wait_for(idle.stop(), 2)  # not after 30 s

    await asyncio.to_thread(stand_in.send, [load("smartcover.xml"), load("transcode.xml")])
    metrics = Metrics()
    held = Held(ingestor(inbox, metrics))
    busy = consume(stand_in, held, metrics, polling_wait=30)
    await eventually(lambda: held.holding == 2, "both in hand")
    busy.consumer.stop()
    await asyncio.sleep(0.2)
    assert not busy.task.done()  # waits for its batch
    held.release.set()
    await asyncio.wait_for(busy.task, 10)
    assert busy.count("deleted") == 2
    assert await queued(stand_in) == 0


@pytest.mark.parametrize(
    ("keys", "control", "code", "said"),
    [
        ({"secret_key": "wrong"}, {}, 4100, "check cmq.secret_id and cmq.secret_key"),
        ({"queues": ["no-such-queue"]}, {}, 4440, "check the queue name"),
        ({}, {"deny": ["BatchReceiveMessage"]}, 4000, "BatchDeleteMessage actions"),
        ({}, {"refuse": KEY_GONE}, 4104, "check cmq.secret_id and cmq.secret_key"),
        ({}, {"refuse": {"code": 4300, "message": "(10040)charge overdue"}}, 4300, "arrears"),
    ],
)
async def test_a_refused_key_queue_or_permission_stops_at_start(
    stand_in, inbox, keys, control, code, said
):
    stand_in.control(**control)
    metrics = Metrics()
    running = consume(stand_in, ingestor(inbox, metrics), metrics, **keys)
    with pytest.raises(CmqError) as error:
        await asyncio.wait_for(running.task, 10)
    assert f"code {code}:" in str(error.value)
    assert said in str(error.value)
    assert stand_in.url in str(error.value)


async def test_throttling_and_5xx_back_off_logged_once_per_change(stand_in, inbox):
    metrics = Metrics()
    body = load("smartcover.json")

    async def send(numbers: range) -> None:
        await asyncio.to_thread(stand_in.send, [variant(body, n) for n in numbers])

    def states() -> list[str]:
        return [e["event"] for e in logs if e["event"].startswith("cmq queue")]

    def met(trouble: str) -> bool:
        """The pollers met the trouble and came through it (answered again), and the
        stand-in has no trouble left to answer: it takes requests again, our own sends
        included (a long poll begun before the trouble may answer first)."""
        seen = states()
        if not (trouble in seen and seen[-1] == "cmq queue receiving"):
            return False
        left = stand_in.stats()
        return left["throttle"] == 0 and left["unavailable"] == 0

    await send(range(4))
    with capture_logs() as logs:
        running = consume(stand_in, ingestor(inbox, metrics), metrics, batch=2, concurrency=3)
        try:
            await eventually(lambda: running.count("deleted") == 4, "receiving")
            # The pollers keep asking (polling_wait is 1 s): they meet each trouble.
            stand_in.control(throttle=6)
            await eventually(lambda: met("cmq queue throttled; retrying"), "through throttling")
            await send(range(4, 14))
            await eventually(lambda: running.count("deleted") == 14, "receiving again")
            stand_in.control(unavailable=6)
            await eventually(lambda: met("cmq queue unavailable; retrying"), "through the 503s")
            await send(range(14, 30))
            await eventually(lambda: running.count("deleted") == 30, "all of them")
        finally:
            await running.stop()
    seen = states()
    # 6 throttled answers, then 6 503s, to 3 pollers: a line when the queue's state
    # changes, not one per answer.
    assert all(a != b for a, b in itertools.pairwise(seen))
    assert 1 <= seen.count("cmq queue throttled; retrying") < 6
    assert 1 <= seen.count("cmq queue unavailable; retrying") < 6
    assert seen[-1] == "cmq queue receiving"


@pytest.mark.parametrize(
    ("control", "code"),
    [({"deny": ["BatchReceiveMessage"]}, 4000), ({"refuse": KEY_GONE}, 4104)],
)
async def test_a_refusal_after_start_is_retried_and_shows_in_readiness(
    stand_in, inbox, monkeypatch, control, code
):
    monkeypatch.setattr("receiver.sources.cmq.consumer.REFUSED_RETRY", 0.2)
    metrics = Metrics()
    with capture_logs() as logs:
        running = consume(stand_in, ingestor(inbox, metrics), metrics)
        try:

            async def receiving() -> bool:
                return (await running.consumer.check())[0]

            await eventually(receiving, "receiving")
            stand_in.control(**control)

            async def refused() -> bool:
                ready, detail = await running.consumer.check()
                return not ready and f"refused: code {code}" in detail

            await eventually(refused, "refused, not stopped")
            assert not running.task.done()
            stand_in.control(deny=[], refuse=None)
            await asyncio.to_thread(stand_in.send, [load("transcode.xml")])
            await eventually(lambda: running.count("deleted") == 1, "receiving again")
            assert await running.consumer.check() == (True, f"{QUEUE}: receiving")
        finally:
            await running.stop()
    # An error with what to check (a poller whose long poll began before the refusal may
    # see the queue answer once more, so the state can change twice), not a warning.
    errors = [e for e in logs if e["event"] == "cmq queue refused; retrying"]
    assert errors
    assert all(e["log_level"] == "error" and e["hint"] for e in errors)
    assert not [e for e in logs if e["event"] == "cmq queue failing; retrying"]


async def test_a_refused_delete_is_an_error_and_the_message_a_duplicate_later(stand_in, inbox):
    metrics = Metrics()
    stand_in.control(deny=["DeleteMessage"])
    with capture_logs() as logs:
        running = consume(stand_in, ingestor(inbox, metrics), metrics, batch=1)
        try:
            await asyncio.to_thread(stand_in.send, [load("transcode.xml")])
            await eventually(lambda: running.count("delete_failed") >= 2, "back, not deleted")
            stand_in.control(deny=[])
            await eventually(lambda: running.count("deleted") == 1, "deleted at last")
        finally:
            await running.stop()
    errors = [e for e in logs if e["event"].startswith("cmq delete refused")]
    assert len(errors) == 1  # once, not per message
    assert "DeleteMessage" in errors[0]["hint"]
    outcomes = [r.outcome for r in await inbox.receipts()]
    assert outcomes.count("accepted") == 1
    assert set(outcomes) == {"accepted", "duplicate"}
    event_id = parse_callback(load("transcode.xml"))[0].id
    assert [e.id for e in await inbox.events()] == [event_id]
