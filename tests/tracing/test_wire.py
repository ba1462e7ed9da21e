"""One callback's trace on the wire: `ci-receiver serve`, a real process with [otel] on,
exports over OTLP/HTTP to a loopback collector stand-in that decodes the protobuf
(tests/support/otlp_collector.py). The callback fails once in a webhook and then
succeeds; its trace shows the receipt, the inbox commit and each attempt with the
handlers' own client spans inside, and no attribute holds a secret."""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from tests.support.callbacks import load
from tests.support.databases import drop_tables, require_server
from tests.support.http_peers import HttpPeer, Reply, wecom_robot
from tests.support.otlp_collector import OtlpCollector, Span
from tests.support.processes import Receiver
from tests.support.sample_events import event

PATH_TOKEN = "path-token-7d1e0c9a"
ROBOT_KEY = "robot-key-3f9b2a71"
SECRET = "whsec_" + base64.b64encode(b"a webhook secret of 32 bytes....").decode()
DB_PASSWORD = "db-password-6c0d"
# A sender's own trace context (a proxy in front, say): linked, not joined, by default.
SENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENT_SPAN = "00f067aa0ba902b7"


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [span for span in spans if span.name == name]


@pytest.fixture
def sql_target():
    url = require_server("postgresql")
    table = f"traced_{uuid.uuid4().hex[:10]}"
    with_password = make_url(url).set(password=DB_PASSWORD)
    yield with_password.render_as_string(hide_password=False), table
    import asyncio

    asyncio.run(drop_tables(url, [table]))


def test_a_callback_that_fails_once_then_succeeds_is_one_trace(tmp_path, sql_target):
    db_url, table = sql_target
    with (
        OtlpCollector() as collector,
        HttpPeer() as hook,
        HttpPeer(wecom_robot(ROBOT_KEY)) as robot,
    ):
        hook.replies = [Reply(status=500, body="not now")]
        config = tmp_path / "ci-receiver.toml"
        config.write_text(
            f"""
data_dir = "{tmp_path / "data"}"
[http]
tokens = ["{PATH_TOKEN}"]
[dispatch]
poll_interval = 0.2
[admin]
inspector = true
[otel]
enabled = true
trace_url = "https://traces.example.com/trace/{{trace_id}}"
[handlers.hook]
type = "webhook"
url = "{hook.url}/ci"
secret = "{SECRET}"
backoff_initial = 0.05
backoff_max = 0.2
[handlers.robot]
type = "wecom"
url = "{robot.url}/cgi-bin/webhook/send?key={ROBOT_KEY}"
[handlers.db]
type = "sql"
url = "{db_url}"
table = "{table}"
"""
        )
        receiver = Receiver(config).start(
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_SERVICE_NAME": "ci-receiver-under-test",
            }
        )
        try:
            body = load("smartcover.xml")
            answer = receiver.post(
                body,
                path=f"/callbacks/{PATH_TOKEN}",
                headers={"traceparent": f"00-{SENT_TRACE}-{SENT_SPAN}-01"},
            )
            assert answer.status_code == 200
            first, second = hook.wait_for(2)
            robot.wait_for(1)
            spans = collector.wait_for(
                lambda spans: (
                    len(by_name(spans, "handle hook")) == 2
                    and by_name(spans, "handle db")
                    and by_name(spans, "handle robot")
                ),
                what="the spans of both webhook attempts, the robot's and the database's",
            )
            log = receiver.log()
            page = httpx.get(f"{receiver.admin_url}/inspector/events/{event('smartcover.xml').id}")
        finally:
            receiver.stop()

    assert collector.refused == []
    smartcover = event("smartcover.xml")
    [server] = by_name(spans, "POST /callbacks/{token}")
    trace_id = server.trace_id

    # The receipt: HTTP server conventions, the route and never the path with its token.
    assert server.kind == "SERVER"
    assert server.parent_span_id is None
    assert server.attributes["http.route"] == "/callbacks/{token}"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.request.body.size"] == len(body)
    # The sender's context is linked, not joined (trust_traceparent is off).
    assert trace_id != SENT_TRACE
    assert server.links == [(SENT_TRACE, SENT_SPAN)]
    assert server.resource["service.name"] == "ci-receiver-under-test"

    # The commit, inside the request.
    [store] = by_name(spans, "inbox store")
    assert (store.trace_id, store.parent_span_id) == (trace_id, server.span_id)
    assert store.attributes["ci_receiver.inbox"] == "sqlite"

    # Each attempt continues the receipt's trace, its retry included.
    attempts = sorted(
        by_name(spans, "handle hook"), key=lambda s: s.attributes["ci_receiver.attempt"]
    )
    for span in [*attempts, *by_name(spans, "handle robot"), *by_name(spans, "handle db")]:
        assert (span.trace_id, span.parent_span_id) == (trace_id, server.span_id), span
        assert span.attributes["ci_receiver.event.id"] == smartcover.id
    failed, done = attempts
    assert failed.attributes["ci_receiver.attempt"] == 1
    assert failed.attributes["ci_receiver.outcome"] == "retry"
    assert failed.status == "ERROR"
    assert failed.attributes["error.type"] == "Retry"
    assert "answered 500" in failed.status_message
    assert done.attributes["ci_receiver.attempt"] == 2
    assert done.attributes["ci_receiver.outcome"] == "done"
    assert done.status != "ERROR"

    # The webhook's own request is a client span inside each attempt, and the delivery
    # carries it as the peer's parent.
    for attempt, delivery in ((failed, first), (done, second)):
        [client] = [s for s in spans if s.kind == "CLIENT" and s.parent_span_id == attempt.span_id]
        assert client.attributes.get("url.full", client.attributes.get("http.url")) == hook.url
        _, sent_trace, sent_parent, _ = delivery.headers["traceparent"].split("-")
        assert (sent_trace, sent_parent) == (trace_id, client.span_id)

    # The sql handler's queries (asyncpg, under SQLAlchemy) inside its attempt.
    [db_attempt] = by_name(spans, "handle db")
    queries = [s for s in spans if s.kind == "CLIENT" and s.parent_span_id == db_attempt.span_id]
    assert queries
    assert all(q.attributes.get("db.system") == "postgresql" for q in queries)

    # No secret anywhere: attributes, status messages, resource.
    everything = orjson.dumps(
        [
            [span.name, span.attributes, span.status_message, span.resource]
            for span in collector.spans
        ]
    ).decode()
    for secret in (PATH_TOKEN, ROBOT_KEY, SECRET, DB_PASSWORD, SECRET.removeprefix("whsec_")):
        assert secret not in everything

    # The request's log lines carry its trace.
    request_line = next(
        orjson.loads(line) for line in log.splitlines() if '"event":"request"' in line
    )
    assert request_line["trace_id"] == trace_id
    assert request_line["span_id"] == server.span_id

    # The inspector shows the event's trace, linked to the trace viewer.
    assert page.status_code == 200
    assert f'<span class="mono" id="trace-id">{trace_id}</span>' in page.text
    assert f'href="https://traces.example.com/trace/{trace_id}"' in page.text


def test_a_collector_away_is_one_line_and_callbacks_go_on(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[log]\nformat = "json"\n[otel]\nenabled = true\n'
    )
    with OtlpCollector() as collector:
        collector.down = True
        receiver = Receiver(config).start(
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "3",  # the exporter gives a batch up after 3 s
            }
        )
        try:
            for name in ("transcode.xml", "snapshot.xml", "smartcover.xml"):
                assert receiver.post(load(name)).status_code == 200
                time.sleep(1.5)
            receiver.wait_for_log("cannot send traces to the collector")
            collector.down = False
            assert receiver.post(load("workflow_finish.xml")).status_code == 200
            receiver.wait_for_log("sending traces to the collector again")
            assert collector.wait_for(
                lambda spans: any(s.name == "POST /callbacks" for s in spans), "spans again"
            )
            assert receiver.terminate() == 0
        finally:
            receiver.stop()
    lines = [orjson.loads(line) for line in receiver.log().splitlines() if line.startswith("{")]
    told = [line for line in lines if line["logger"].startswith(("ci_receiver.tracing", "opentel"))]
    assert [line["event"] for line in told] == [
        "cannot send traces to the collector; spans are dropped until it takes them",
        "sending traces to the collector again",
    ]
    assert "Service Unavailable" in told[0]["reason"]  # the 503, as the exporter says it
