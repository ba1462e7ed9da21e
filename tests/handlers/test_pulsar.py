"""The `pulsar` handler against the pulsar-lite broker (the real Pulsar binary protocol),
read back with the official client as a subscriber would."""

from __future__ import annotations

import json
import uuid

import pulsar
import pulsar.asyncio
import pytest

import handlers
from handlers import Retry
from handlers.pulsar import PulsarHandler
from tests.support.processes import free_port
from tests.support.sample_events import event


def subscribe(broker_url: str, topic: str):
    client = pulsar.Client(broker_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    consumer = client.subscribe(
        topic, f"test-{uuid.uuid4().hex[:6]}", initial_position=pulsar.InitialPosition.Earliest
    )
    return client, consumer


def topic() -> str:
    return f"persistent://public/default/ci-events-{uuid.uuid4().hex[:8]}"


async def test_events_are_published_with_their_properties(pulsar_broker):
    name = topic()
    smartcover, failed = event("smartcover.xml"), event("smartcover_failed.xml")
    handler = PulsarHandler(
        {
            "service_url": pulsar_broker.url,
            "topic": name,
            # pulsar-lite takes the token without checking it: this shows the client
            # is built with token authentication, not that a broker verified it.
            "token": "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl",
            "properties": {"env": "test"},
            "include_raw": False,
        }
    )
    client, consumer = subscribe(pulsar_broker.url, name)
    try:
        await handler.start()
        try:
            await handler(smartcover)
            await handler(failed)
        finally:
            await handler.close()
        messages = [consumer.receive(timeout_millis=10_000) for _ in range(2)]
    finally:
        client.close()

    first, second = messages
    assert first.properties() == {
        "env": "test",
        "event_id": smartcover.id,
        "kind": "job",
        "state": "Success",
        "tag": "SmartCover",
        "event_name": "TaskFinish",
        "job_id": smartcover.job_id,
    }
    assert first.partition_key() == smartcover.job_id
    body = json.loads(first.data())
    assert body["id"] == smartcover.id
    assert body["outputs"] == [output.to_dict() for output in smartcover.outputs]
    assert "raw" not in body
    assert second.properties()["state"] == "Failed"
    assert json.loads(second.data())["code"] == failed.code


async def test_a_workflow_event_is_keyed_by_its_run(pulsar_broker):
    name = topic()
    workflow = event("workflow_finish.xml")
    handler = handlers.build("pulsar", {"service_url": pulsar_broker.url, "topic": name})
    client, consumer = subscribe(pulsar_broker.url, name)
    try:
        await handlers.start(handler)
        try:
            await handler(workflow)
        finally:
            await handlers.close(handler)
        message = consumer.receive(timeout_millis=10_000)
    finally:
        client.close()
    assert message.partition_key() == workflow.workflow.run_id
    assert message.properties()["job_id"] == workflow.workflow.run_id
    assert json.loads(message.data())["raw"] == workflow.raw


async def test_no_broker_at_start_is_a_clear_error():
    url = f"pulsar://127.0.0.1:{free_port()}"  # nothing listens there
    handler = PulsarHandler({"service_url": url, "topic": topic(), "operation_timeout": 2})
    with pytest.raises(RuntimeError, match=f"cannot publish to .* at {url}"):
        await handler.start()


async def test_a_broker_gone_after_start_is_retried(pulsar_broker):
    handler = PulsarHandler(
        {"service_url": pulsar_broker.url, "topic": topic(), "send_timeout": 1, "batching": False}
    )
    await handler.start()
    try:
        pulsar_broker.stop()
        with pytest.raises(Retry, match=r"publish to .* failed"):
            await handler(event())
    finally:
        await handler.close()


async def test_the_client_is_made_and_shut_down_as_the_tdmq_consumer_does(
    pulsar_broker, monkeypatch
):
    made, ended = [], []
    make = pulsar.asyncio.Client.__init__

    def init(client, service_url, **options):
        made.append(options)
        make(client, service_url, **options)

    async def close(client):
        ended.append("close")

    monkeypatch.setattr(pulsar.asyncio.Client, "__init__", init)
    monkeypatch.setattr(pulsar.asyncio.Client, "close", close)
    shutdown = pulsar.asyncio.Client.shutdown
    monkeypatch.setattr(
        pulsar.asyncio.Client,
        "shutdown",
        lambda client: (ended.append("shutdown"), shutdown(client)),
    )
    handler = PulsarHandler(
        {"service_url": pulsar_broker.url, "topic": topic(), "token": "t0ken", "batching": False}
    )
    await handler.start()
    try:
        await handler(event())
    finally:
        await handler.close()
    [options] = made
    # The library's own file logger, into a pipe we read: a Python logger can deadlock
    # with nacks on other threads (apache/pulsar-client-python#116).
    assert isinstance(options["logger"], pulsar.FileLogger)
    assert isinstance(options["authentication"], pulsar.AuthenticationToken)
    # shutdown(), never close(): its detached thread aborts the process at exit (#256).
    assert ended == ["shutdown"]


@pytest.mark.parametrize(
    "url",
    [
        "pulsar://127.0.0.1:6650",
        "pulsar+ssl://pulsar.internal:6651",
        "http://pulsar-xxxxxxxx.tdmq.ap-gz.public.tencenttdmq.com:8080",  # TDMQ's access address
        "https://pulsar.internal:8443",
    ],
)
def test_the_service_url_takes_the_forms_tdmq_does(url):
    handler = handlers.build("pulsar", {"service_url": url, "topic": "t"})
    assert handlers.shown_options(handler)["service_url"] == url


@pytest.mark.parametrize("url", ["broker:6650", "ftp://broker", "tcp://broker:6650"])
def test_another_service_url_is_refused(url):
    with pytest.raises(handlers.HandlerConfigError, match="service_url: String should match"):
        handlers.build("pulsar", {"service_url": url, "topic": "t"})
