"""The spans' rules with the real SDK and an in-memory exporter: whose context a sender's
`traceparent` may be, what a batch links to, what an error's description may show, the
log's trace ids, the config; and, in a real process, that tracing off imports nothing
of OpenTelemetry."""

from __future__ import annotations

import io
import json
import sys

import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from receiver import tracing
from receiver.config import Config, ConfigError, load_config
from receiver.logs import configure_logging
from receiver.runtime.service import build_slots, handler_secrets_masker
from tests.support.callbacks import load
from tests.support.cli import ci_receiver
from tests.support.processes import REPO, Receiver
from tests.support.sample_events import event

SENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SCOPE = {
    "type": "http",
    "scheme": "http",
    "http_version": "1.1",
    "server": ("127.0.0.1", 8080),
    "client": ("203.0.113.9", 40000),
    "headers": [(b"traceparent", SENT.encode()), (b"content-length", b"10")],
}


@pytest.fixture
def exported():
    """Start tracing as `serve` would, spans kept in memory; stop it after the test."""

    def start(**otel):
        exporter = InMemorySpanExporter()
        config = Config(
            otel={"enabled": True, **otel},
            http={"tokens": ["a-path-token-1234"]},
            handlers={"hook": {"type": "webhook", "url": "http://h/x", "secret": "hush-1234"}},
        )
        assert tracing.start(config, exporter) is None
        return exporter

    yield start
    tracing.stop()


def test_a_senders_traceparent_is_linked_unless_trusted(exported):
    exporter = exported()
    tracing.receiving_http(SCOPE, "/callbacks/{token}", {"content-length": "10"}, "CI").end()
    tracing.stop()
    trusted = exported(trust_traceparent=True)
    tracing.receiving_http(SCOPE, "/callbacks/{token}", {"content-length": "10"}, "CI").end()
    [linked] = exporter.get_finished_spans()
    [joined] = trusted.get_finished_spans()
    sent_trace = int(SENT.split("-")[1], 16)
    assert linked.kind is SpanKind.SERVER
    assert linked.parent is None
    assert linked.context.trace_id != sent_trace
    assert [link.context.trace_id for link in linked.links] == [sent_trace]
    assert joined.context.trace_id == sent_trace
    assert joined.parent.span_id == int(SENT.split("-")[2], 16)
    assert not joined.links
    assert linked.attributes["client.address"] == "203.0.113.9"
    assert linked.attributes["http.request.body.size"] == 10


def test_a_batch_of_many_links_to_each_callback_and_a_batch_of_one_continues_it(exported):
    exporter = exported()
    receipts = []
    for _ in range(2):
        with tracing.receiving_http(SCOPE, "/callbacks", {}, None) as span:
            receipts.append(span)
    first, second = (event("transcode.xml"), event("snapshot.xml"))
    first.source_meta, second.source_meta = receipts[0].carrier(), receipts[1].carrier()
    with tracing.attempting_batch("db", [first, second]) as span:
        span.outcome("done", None, None)
    with tracing.attempting_batch("db", [first]):
        pass
    with tracing.storing([first.source_meta, second.source_meta]):
        pass
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    many, alone, store = spans[2:]
    assert many.parent is None
    assert [link.context.span_id for link in many.links] == [s.context.span_id for s in servers]
    assert many.attributes["ci_receiver.batch.size"] == 2
    assert alone.parent.span_id == servers[0].context.span_id
    assert alone.context.trace_id == servers[0].context.trace_id
    assert [link.context.span_id for link in store.links] == [s.context.span_id for s in servers]


def test_an_attempt_without_a_stored_trace_begins_one(exported):
    exporter = exported()
    with tracing.attempting("hook", event("transcode.xml"), 1) as span:
        span.outcome("retry", "Retry", "http://peer.example/hook?key=abcdefgh answered 500")
    [attempt] = exporter.get_finished_spans()
    assert attempt.parent is None
    assert attempt.attributes["ci_receiver.attempt"] == 1
    assert attempt.attributes["error.type"] == "Retry"
    # A URL's query and any secret of the config are masked, as in the log.
    assert attempt.status.description == "http://peer.example/hook?key=*** answered 500"


def test_an_error_description_never_shows_a_config_secret(exported):
    exporter = exported()
    with (
        tracing.attempting("(verify)", event("transcode.xml"), 1),
        tracing.calling_ci("ci_get_media_jobs", "b-1250000000") as span,
    ):
        span.fail("network", "refused with hush-1234 and a-path-token-1234")
    call, _ = exporter.get_finished_spans()
    assert call.status.description == "refused with *** and ***"
    assert call.kind is SpanKind.CLIENT


def test_a_client_span_outside_any_trace_is_dropped(exported):
    exporter = exported()
    with tracing.calling_ci("ci_list_media_jobs", "b-1250000000"):  # the reconciler polling
        pass
    assert exporter.get_finished_spans() == ()


def test_log_lines_inside_a_span_carry_its_ids(exported, monkeypatch):
    exported()
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    configure_logging(fmt="json", trace_ids=True)
    log = structlog.get_logger("test")
    try:
        with tracing.receiving_http(SCOPE, "/callbacks", {}, None) as span:
            log.info("inside")
            trace_id = span.trace_id()
        log.info("outside")
    finally:
        configure_logging(fmt="json")
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["trace_id"] == trace_id
    assert len(inside["span_id"]) == 16
    assert "trace_id" not in outside


def test_a_stored_traceparent_names_its_trace_and_whether_it_was_kept():
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.trace_of({"traceparent": SENT}) == (trace_id, True)
    unsampled = SENT.removesuffix("01") + "00"
    assert tracing.trace_of({"traceparent": unsampled}) == (trace_id, False)
    for broken in ("", "00-zz-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01", 7):
        assert tracing.trace_of({"traceparent": broken}) is None
    assert tracing.trace_of({}) is None


def test_the_trace_url_must_name_the_trace(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[otel]\nenabled = true\ntrace_url = "https://traces.example.com/"\n')
    with pytest.raises(ConfigError, match=r"otel.trace_url.*\{trace_id\}"):
        load_config(config)
    config.write_text('[otel]\ntrace_url = "https://t.example.com/t/{trace_id}?x=1"\n')
    assert load_config(config).otel.link("ab12") == "https://t.example.com/t/ab12?x=1"


def test_without_the_extra_it_says_so_and_runs_on(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # not installed
    monkeypatch.delitem(sys.modules, "receiver.tracing.provider", raising=False)
    problem = tracing.start(Config(otel={"enabled": True}))
    assert problem == tracing.EXTRA_MISSING
    assert not tracing.active()


REPORT_MODULES = """
import atexit, os, sys

def report():
    with open(os.environ["MODULES_REPORT"], "w") as out:
        out.write("\\n".join(sorted(m for m in sys.modules if m.startswith("opentelemetry"))))

atexit.register(report)
"""


@pytest.mark.parametrize("enabled", [False, True])
def test_off_a_served_callback_imports_nothing_of_opentelemetry(tmp_path, enabled):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(REPORT_MODULES)
    report = tmp_path / "modules.txt"
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[otel]\nenabled = {str(enabled).lower()}\n'
    )
    receiver = Receiver(config).start(
        env={
            "PYTHONPATH": f"{hooks}:{REPO}",
            "MODULES_REPORT": str(report),
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nobody: spans dropped
        }
    )
    try:
        assert receiver.post(load("smartcover.xml")).status_code == 200
    finally:
        assert receiver.terminate() == 0
    imported = report.read_text().split()
    if enabled:  # the check sees the imports when there are some
        assert "opentelemetry.sdk.trace" in imported
    else:
        assert imported == []


def test_check_config_says_where_traces_go(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    off = ci_receiver(config, "check-config", text=True, ok=True)
    assert "traces: off" in off.stderr
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[otel]\nenabled = true\n')
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:pw@collector.example.com:4318/"}
    on = ci_receiver(config, "check-config", env=endpoint, text=True, ok=True)
    shown = "https://user:***@collector.example.com:4318/v1/traces"  # its password masked
    assert f"traces: sent over OTLP/HTTP to {shown}" in on.stderr


def test_a_handlers_validated_secrets_are_masked_too(exported):
    exporter = exported()
    hook = "https://hooks.slack.com/services/T000/B000/slack-path-secret-99"
    config = Config(handlers={"team": {"type": "slack", "url": hook}})
    tracing.mask_with(handler_secrets_masker(config, build_slots(config)))  # as Service does
    with tracing.attempting("team", event("transcode.xml"), 1) as span:
        span.outcome("retry", "Retry", f"posting to {hook} failed")
    [attempt] = exporter.get_finished_spans()
    assert "slack-path-secret-99" not in attempt.status.description
