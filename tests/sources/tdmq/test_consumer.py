"""The TDMQ consumer and message mapping in-process, against the pulsar-lite broker."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone

import pulsar
import pulsar.asyncio
import pytest

from receiver.callback.decode import Limits, PayloadError
from receiver.config import Config, ConfigError, TdmqConfig, load_config
from receiver.inbox import Inbox, Receipt
from receiver.inbox import writer as writer_module
from receiver.inbox.sqlite import SqliteInbox
from receiver.ingest.ingest import REJECTED_ROW_BYTES, Ingestor, RejectedBudget
from receiver.ingest.routing import Router
from receiver.metrics import Metrics
from receiver.pulsar_client.connect import client_options, subscribe_options
from receiver.sources.tdmq import TdmqConsumer, TdmqError, messages
from tests.support.callbacks import load
from tests.support.installations import TOKEN, publish
from tests.support.processes import free_port
from tests.support.sqlite_lock import HeldLock
from tests.support.waiting import eventually

TOPIC = "persistent://public/default/ci-callbacks"


def consumer_config(url: str, **options) -> TdmqConfig:
    return TdmqConfig(service_url=url, token=TOKEN, topics=[TOPIC], nack_delay=0.2, **options)


def counter(metrics: Metrics):
    """How many messages the consumer has acked, nacked, ... so far."""

    def count(outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "ci_receiver_tdmq_messages_total", {"outcome": outcome}
        )
        return value or 0

    return count


def ingestor(inbox: Inbox, metrics: Metrics, budget: RejectedBudget | None = None) -> Ingestor:
    # Refusals wait as they do with no dead-letter topic (`Config.refusals_wait_in`).
    waiting = Config().refusals_wait_in()
    return Ingestor(
        inbox, Router(None, []), metrics, Limits(), rejected=budget, refusals_wait_in=waiting
    )


@contextlib.asynccontextmanager
async def consuming(
    broker_url: str, inbox: Inbox, budget: RejectedBudget | None = None
) -> AsyncIterator[tuple[TdmqConsumer, Callable[[str], float]]]:
    """A consumer of the topic into `inbox` (refused bodies kept within `budget`),
    running on the event loop, and what it has counted; stopped, then the inbox closed,
    at the end."""
    metrics = Metrics()
    intake = ingestor(inbox, metrics, budget)
    consumer = TdmqConsumer(consumer_config(broker_url), intake, metrics)
    running = asyncio.create_task(consumer.run())
    try:
        yield consumer, counter(metrics)
    finally:
        consumer.stop()
        await asyncio.wait_for(running, 30)
        await inbox.close()


async def test_an_inbox_failure_is_nacked_and_the_message_comes_back(tmp_path, pulsar_broker):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=1024)  # not open: failing

    async def stored() -> bool:
        return bool(await inbox.events())

    async with consuming(pulsar_broker.url, inbox) as (consumer, count):
        await asyncio.to_thread(publish, pulsar_broker.url, TOPIC, [load("smartcover.xml")])
        await eventually(lambda: count("nacked") >= 1, "the failed commit nacked")
        assert count("acked") == 0
        await inbox.open()  # the inbox is back
        await eventually(stored, "stored once the inbox is back")
        receipts = await inbox.receipts()
        assert [r.outcome for r in receipts] == ["accepted"]
        kept = await inbox.receipt(receipts[0].id)
        assert kept is not None
        assert kept.source_meta["redelivery_count"] >= 1
        await eventually(lambda: count("acked") == 1, "acked")
        assert (await consumer.check())[0]


async def test_while_the_inbox_is_away_messages_are_taken_ever_more_slowly(
    tmp_path, pulsar_broker, monkeypatch
):
    # A backlog nacked while the inbox is away comes back after nack_delay (0.2 s here):
    # taken again each time, it would only spin.
    # Away as a SQLite inbox is: another process keeps its write lock.
    monkeypatch.setattr(writer_module, "LOCK_TIMEOUT", 0.05)
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=1024)
    await inbox.open()
    backlog = 100
    bodies = [load("smartcover.xml").replace(b"<JobId>j", b"<JobId>j%d" % i, 1)
              for i in range(backlog)]  # fmt: skip
    with HeldLock(tmp_path / "inbox.db") as lock:
        async with consuming(pulsar_broker.url, inbox) as (_, count):
            await asyncio.to_thread(publish, pulsar_broker.url, TOPIC, bodies)
            await eventually(lambda: count("nacked") >= 1, "the first failed commit")
            await asyncio.sleep(3)
            # Taken again after every nack_delay, the backlog would have been nacked
            # about fifteen times over.
            assert count("nacked") < 2 * backlog
            lock.release()  # the inbox is back
            await eventually(lambda: count("acked") == backlog, "all kept once back")
            assert len(await inbox.events(limit=2 * backlog)) == backlog


# Relay properties that are not what the relay writes, and an event time past the year
# 9999: messages `messages.read` cannot make sense of.
UNREADABLE = {
    "relay size": (
        {messages.SOURCE: "http", messages.REJECTED: "too_large", messages.SIZE: "²"},
        {},
    ),
    "relay time": ({messages.SOURCE: "http", messages.RECEIVED_AT: "yesterday"}, {}),
    "event time": ({}, {"event_timestamp": 2**62}),
}


@pytest.mark.parametrize("unreadable", UNREADABLE, ids=str)
async def test_a_message_it_cannot_read_is_kept_as_rejected_and_acked(
    tmp_path, pulsar_broker, unreadable
):
    properties, send = UNREADABLE[unreadable]
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=65536)
    await inbox.open()
    body = load("smartcover.xml")
    async with consuming(pulsar_broker.url, inbox) as (_, count):
        await asyncio.to_thread(publish, pulsar_broker.url, TOPIC, [(body, properties)], **send)
        await eventually(lambda: count("acked") == 1, "acked")
        [kept] = await inbox.receipts()
        assert (kept.outcome, kept.error_reason) == ("rejected", "bad_message")
        assert kept.size == len(body)
        receipt = await inbox.receipt(kept.id)
        assert receipt is not None
        assert receipt.body == body
        assert receipt.source_meta["properties"] == properties  # what was wrong, kept
        assert count("nacked") == 0


async def test_a_refusal_with_no_room_to_keep_it_is_nacked_and_kept_when_there_is(
    tmp_path, pulsar_broker
):
    # No dead-letter topic: the topic holds the only copy. The hour's budget for refused
    # bodies has room for one; the second is counted, nacked, and delivered again until
    # the budget has refilled.
    body = b"<Response><JobsDetail>"
    budget = RejectedBudget(body_bytes=len(body), bytes_per_hour=REJECTED_ROW_BYTES + len(body))
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=len(body))
    await inbox.open()
    async with consuming(pulsar_broker.url, inbox, budget) as (_, count):
        await asyncio.to_thread(publish, pulsar_broker.url, TOPIC, [(body, {}), (body, {})])
        await eventually(lambda: count("nacked") >= 2, "the second one nacked, again")
        assert count("acked") == 1
        assert len(await inbox.receipts(outcome="rejected")) == 1
        budget._left = budget._capacity  # the hour gone by
        await eventually(lambda: count("acked") == 2, "kept once there is room")
        assert len(await inbox.receipts(outcome="rejected")) == 2


async def test_a_relayed_refusal_past_the_budget_is_counted_and_acked(tmp_path, pulsar_broker):
    # An HTTP callback the relay refused had its answer already: past the budget it is
    # counted, as over HTTP, and acked, not delivered again and again.
    body = b"<Response><JobsDetail>"
    budget = RejectedBudget(body_bytes=len(body), bytes_per_hour=REJECTED_ROW_BYTES + len(body))
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=len(body))
    await inbox.open()
    refused = {messages.SOURCE: "http", messages.REJECTED: "malformed_xml"}
    async with consuming(pulsar_broker.url, inbox, budget) as (_, count):
        await asyncio.to_thread(
            publish, pulsar_broker.url, TOPIC, [(body, refused), (body, refused)]
        )
        await eventually(lambda: count("acked") == 2, "both acked")
        assert count("nacked") == 0
        assert len(await inbox.receipts(outcome="rejected")) == 1


async def test_a_message_whose_properties_are_not_text_is_kept_as_rejected_beside_the_others(
    tmp_path, pulsar_broker
):
    # Another client may set a property to bytes that are not UTF-8, which the Python
    # client cannot read: that message is kept as rejected and acked, and the callbacks
    # taken with it are stored as ever (none of them left unacked, to come back for ever).
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=65536)
    await inbox.open()
    body = load("smartcover.xml")
    not_text: dict = {"origin": b"\xff\xfe"}
    async with consuming(pulsar_broker.url, inbox) as (_, count):
        await asyncio.to_thread(
            publish, pulsar_broker.url, TOPIC, [(body, not_text), load("transcode.xml")]
        )
        await eventually(lambda: count("acked") == 2, "both acked")
        receipts = await inbox.receipts()
        assert sorted(r.outcome for r in receipts) == ["accepted", "rejected"]
        [kept] = [r for r in receipts if r.outcome == "rejected"]
        assert kept.error_reason == "bad_message"
        receipt = await inbox.receipt(kept.id)
        assert receipt is not None
        assert receipt.body == body
        assert receipt.source_meta["properties"] is None  # not text: not kept
        assert count("nacked") == 0


async def test_a_refusal_the_inbox_cannot_record_is_nacked_not_lost(tmp_path, pulsar_broker):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=1024)  # not open: failing
    refused_by_relay = {messages.SOURCE: "http", messages.REJECTED: "malformed_xml"}
    async with consuming(pulsar_broker.url, inbox) as (_, count):
        await asyncio.to_thread(
            publish,
            pulsar_broker.url,
            TOPIC,
            [(b"<a", refused_by_relay), (load("smartcover.xml"), UNREADABLE["relay size"][0])],
        )
        await eventually(lambda: count("nacked") >= 2, "both refusals nacked")
        assert count("acked") == 0
        await inbox.open()  # the inbox is back
        await eventually(lambda: count("acked") == 2, "both recorded and acked")
        kept = await inbox.receipts()
        assert sorted((r.outcome, r.error_reason) for r in kept) == [
            ("rejected", "bad_message"),
            ("rejected", "malformed_xml"),
        ]


def receiving_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tdmq-receive")]


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_closing_waits_for_the_receiving_thread_and_leaves_the_loop_free(
    pulsar_broker, monkeypatch, how
):
    seen = {}
    close_consumer, shutdown_client = pulsar.asyncio.Consumer.close, pulsar.asyncio.Client.shutdown

    async def close(consumer) -> None:
        seen["receiving while closing"] = receiving_threads()
        await close_consumer(consumer)

    def shutdown(client) -> None:
        seen["shut down on"] = threading.current_thread()
        shutdown_client(client)

    monkeypatch.setattr(pulsar.asyncio.Consumer, "close", close)
    monkeypatch.setattr(pulsar.asyncio.Client, "shutdown", shutdown)
    consumer = TdmqConsumer(consumer_config(pulsar_broker.url), _NoIntake(), Metrics())
    running = asyncio.create_task(consumer.run())
    await eventually(receiving_threads, "the receiving thread started")
    if how == "stop":
        consumer.stop()
    else:  # as when the process is interrupted
        running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)
    # Not closed under the thread's batch_receive(); the client's threads are joined off
    # the event loop, which meanwhile serves HTTP requests in `run`.
    assert seen["receiving while closing"] == []
    assert seen["shut down on"] is not threading.current_thread()


async def test_stop_while_the_broker_cannot_be_reached(tmp_path):
    metrics = Metrics()
    config = TdmqConfig(service_url=f"pulsar://127.0.0.1:{free_port()}", topics=[TOPIC])
    consumer = TdmqConsumer(config, _NoIntake(), metrics)
    running = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.5)
    ready, detail = await consumer.check()
    assert not ready
    assert detail.startswith("subscribing")
    consumer.stop()
    await asyncio.wait_for(running, 30)  # returns instead of waiting for the broker


async def test_a_wrong_topic_name_fails_at_once_with_a_clear_error(pulsar_broker):
    config = TdmqConfig(service_url=pulsar_broker.url, topics=["persistent://no-namespace"])
    consumer = TdmqConsumer(config, _NoIntake(), Metrics())
    with pytest.raises(TdmqError, match="cannot subscribe to persistent://no-namespace"):
        await asyncio.wait_for(consumer.run(), 60)


class _NoIntake:
    async def ingest(self, receipt: Receipt):
        raise AssertionError("no message expected")

    async def ingest_many(self, receipts: list[Receipt]):
        raise AssertionError("no message expected")

    async def reject(self, receipt: Receipt, error: PayloadError, *, size=None) -> None:
        raise AssertionError("no message expected")


# --- a callback as a message and back ---------------------------------------------------


def received(broker_url: str, body: bytes, properties: dict[str, str], **send) -> pulsar.Message:
    client = pulsar.Client(broker_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
    try:
        consumer = client.subscribe(TOPIC, "read", initial_position=pulsar.InitialPosition.Earliest)
        client.create_producer(TOPIC).send(body, properties=properties, **send)
        message = consumer.receive(timeout_millis=30_000)
        consumer.acknowledge(message)
        return message
    finally:
        client.close()


def test_a_bridge_message_keeps_its_properties_and_gives_headers(pulsar_broker):
    properties = {"X-Ci-Content-Version": "Simple", "tenant": "a"}
    message = received(
        pulsar_broker.url,
        b"{}",
        properties,
        partition_key="job-1",
        event_timestamp=1_700_000_000_000,
    )
    receipt = messages.read(message).receipt
    assert receipt.source == "tdmq"
    assert receipt.headers == {"x-ci-content-version": "Simple"}
    assert receipt.request_id == str(message.message_id())
    meta = receipt.source_meta
    assert meta["topic"] == TOPIC
    assert meta["properties"] == properties
    assert meta["key"] == "job-1"
    assert meta["event_time"] == "2023-11-14T22:13:20+00:00"
    assert meta["redelivery_count"] == 0


def test_a_relayed_callback_reads_back_as_the_http_callback_it_was(pulsar_broker):
    sent = Receipt(
        body=load("moderation_video_simple.json"),
        source="http",
        received_at=datetime(2025, 3, 1, 8, 0, tzinfo=timezone.utc),
        request_id="req-1",
        headers={"x-ci-content-version": "Simple", "content-length": "404"},
        source_meta={"request_id": "req-1"},
    )
    message = received(pulsar_broker.url, sent.body, messages.relay_properties(sent))
    delivery = messages.read(message)
    got = delivery.receipt
    assert delivery.refused is None
    assert (got.body, got.source, got.received_at, got.request_id) == (
        sent.body, "http", sent.received_at, "req-1"
    )  # fmt: skip
    assert got.headers == {"x-ci-content-version": "Simple"}
    assert got.source_meta["request_id"] == "req-1"
    assert got.source_meta["relay"]["topic"] == TOPIC


def test_a_body_the_relay_refused_reads_back_with_its_reason_and_size(pulsar_broker):
    sent = Receipt(b"<a", "http", datetime.now(timezone.utc), "req-2")
    refused = PayloadError("too_large", "the body is over the 1048576-byte limit")
    properties = messages.relay_properties(sent, refused, size=5_000_000)
    delivery = messages.read(received(pulsar_broker.url, sent.body, properties))
    assert delivery.refused is not None
    assert (delivery.refused.reason, delivery.refused.message) == ("too_large", refused.message)
    assert delivery.size == 5_000_000


# --- configuration ----------------------------------------------------------------------


def test_tdmq_config_from_file_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(
        '[tdmq]\nservice_url = "http://pulsar-x.tdmq.ap-gz.public.tencenttdmq.com:8080"\n'
        'topics = ["persistent://pulsar-x/ns/callbacks"]\nsubscription_type = "key_shared"\n'
        'tls_trust_certs_file = "/etc/ssl/ca.pem"\n'
    )
    monkeypatch.setenv("CI_RECEIVER_TDMQ__TOKEN", "role-token")
    config = load_config(path)
    assert config.effective()["tdmq"]["token"] == "**********"
    options = client_options(config.tdmq)
    assert isinstance(options["authentication"], pulsar.AuthenticationToken)
    assert options["tls_trust_certs_file_path"] == "/etc/ssl/ca.pem"
    subscribe = subscribe_options(config.tdmq)
    assert subscribe["consumer_type"] == pulsar.ConsumerType.KeyShared
    assert subscribe["topic"] == "persistent://pulsar-x/ns/callbacks"
    assert not subscribe["is_pattern_topic"]


def test_topics_and_a_pattern_are_exclusive(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[tdmq]\ntopics = ["a"]\ntopic_pattern = "persistent://t/ns/ci-.*"\n')
    with pytest.raises(ConfigError, match="set topics or topic_pattern, not both"):
        load_config(path)
    pattern = TdmqConfig(topic_pattern="persistent://t/ns/ci-.*")
    assert subscribe_options(pattern)["is_pattern_topic"]
    assert TdmqConfig().missing_for_consumer() == [
        "tdmq.service_url",
        "tdmq.topics (or tdmq.topic_pattern)",
    ]
