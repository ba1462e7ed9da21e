"""The `pulsar` handler against the pulsar-lite broker (the real Pulsar binary protocol),
read back with the official client as a subscriber would."""

from __future__ import annotations

import json
import uuid

import pulsar
import pytest

import handlers
from handlers import Retry
from handlers.pulsar import PulsarHandler
from tests.processes import free_port
from tests.sample_events import event


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
    assert "job_id" not in message.properties()
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


def test_a_service_url_must_be_pulsar():
    with pytest.raises(handlers.HandlerConfigError, match="service_url: String should match"):
        handlers.build("pulsar", {"service_url": "http://broker:8080", "topic": "t"})
