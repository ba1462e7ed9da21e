"""The trace goes on through brokers: `serve` relaying to a topic and `consume` storing
from it (two real processes, the pulsar-lite broker) make one trace, which the `pulsar`
handler's message carries on in its properties; a CMQ queue's message (the loopback CMQ
stand-in) has a consumer span of its own. Both export to the loopback collector."""

from __future__ import annotations

from tests.handlers.test_pulsar import subscribe
from tests.support.callbacks import load
from tests.support.cmq_stand_in import CmqStandIn, cmq_section
from tests.support.otlp_collector import OtlpCollector, Span
from tests.support.processes import Receiver
from tests.support.sample_events import event

TOPIC = "persistent://public/default/ci-callbacks-traced"
OUT = "persistent://public/default/ci-events-traced"


def exporting_to(collector: OtlpCollector) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}


def traced_config(tmp_path, sections: str):
    """A config with tracing on, and `sections` (TOML) after it."""
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[dispatch]\npoll_interval = 0.2\n'
        f"[otel]\nenabled = true\n{sections}"
    )
    return config


def one(spans: list[Span], name: str) -> Span:
    [span] = [span for span in spans if span.name == name]
    return span


def test_relay_consumer_and_pulsar_handler_continue_one_trace(tmp_path, pulsar_broker):
    config = traced_config(
        tmp_path,
        f"""
[relay]
topic = "{TOPIC}"
[tdmq]
service_url = "{pulsar_broker.url}"
topics = ["{TOPIC}"]
[handlers.out]
type = "pulsar"
service_url = "{pulsar_broker.url}"
topic = "{OUT}"
""",
    )
    client, reader = subscribe(pulsar_broker.url, OUT)
    relay, consumer = Receiver(config, "serve"), Receiver(config, "consume")
    with OtlpCollector() as collector:
        try:
            relay.start(env=exporting_to(collector))
            consumer.start(env=exporting_to(collector), wait_http=False)
            consumer.wait_for_log("tdmq consumer connected")
            assert relay.post(load("transcode.xml")).status_code == 200
            message = reader.receive(timeout_millis=20_000)
            spans = collector.wait_for(
                lambda spans: any(s.name == "handle out" for s in spans),
                what="the pulsar handler's attempt span",
            )
        finally:
            relay.stop()
            consumer.stop()
            client.close()

    server = one(spans, "POST /callbacks")
    received = one(spans, f"process {TOPIC}")
    store = one(spans, "inbox store")
    attempt = one(spans, "handle out")
    trace_id = server.trace_id
    # serve's request -> consume's message -> its commit, and the attempt: one trace.
    assert received.kind == "CONSUMER"
    assert (received.trace_id, received.parent_span_id) == (trace_id, server.span_id)
    assert received.attributes["messaging.system"] == "pulsar"
    assert received.attributes["messaging.destination.name"] == TOPIC
    assert received.attributes["messaging.destination.subscription.name"] == "ci-receiver"
    assert (store.trace_id, store.parent_span_id) == (trace_id, received.span_id)
    assert (attempt.trace_id, attempt.parent_span_id) == (trace_id, received.span_id)
    assert attempt.attributes["ci_receiver.event.id"] == event("transcode.xml").id
    # The published event names the attempt as its parent, for whoever consumes it next.
    _, sent_trace, sent_parent, _ = message.properties()["traceparent"].split("-")
    assert (sent_trace, sent_parent) == (trace_id, attempt.span_id)
    assert message.properties()["event_id"] == event("transcode.xml").id


def test_a_cmq_message_is_a_consumer_span_and_its_attempts_follow(tmp_path):
    cmq = CmqStandIn(tmp_path / "cmq", queues=["ci-jobs"]).start()
    config = traced_config(tmp_path, f'{cmq_section(cmq)}[handlers.log]\ntype = "log"\n')
    consumer = Receiver(config, "consume")
    with OtlpCollector() as collector:
        try:
            consumer.start(env=exporting_to(collector), wait_http=False)
            cmq.send([load("snapshot.xml")], queue="ci-jobs")
            spans = collector.wait_for(
                lambda spans: any(s.name == "handle log" for s in spans),
                what="the log handler's attempt span",
            )
        finally:
            consumer.stop()
            cmq.close()

    received = one(spans, "process ci-jobs")
    store = one(spans, "inbox store")
    attempt = one(spans, "handle log")
    assert received.kind == "CONSUMER"
    assert received.parent_span_id is None
    assert received.attributes["messaging.system"] == "tencent_cmq"
    assert received.attributes["messaging.message.id"]
    assert (store.trace_id, store.parent_span_id) == (received.trace_id, received.span_id)
    assert (attempt.trace_id, attempt.parent_span_id) == (received.trace_id, received.span_id)
