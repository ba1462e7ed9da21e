"""Traces where CI's job API takes part: `serve` with verification and the reconciler (a
real process) against the loopback stand-in for CI's job API, exporting to the loopback
collector. A recovered job starts a trace of its own, marked so; a verified callback's
trace holds the verification's request to CI as a client span; the reconciler's own
listing, outside any callback, is not a trace."""

from __future__ import annotations

from tests.ci.test_verify_process import config
from tests.support.ci_api_server import BUCKET, REGION, SECRET_KEY, CiApiServer, callback_body, job
from tests.support.otlp_collector import OtlpCollector, Span
from tests.support.processes import Receiver

VERIFY = "handle (verify)"


def named(spans: list[Span], name: str) -> list[Span]:
    return [span for span in spans if span.name == name]


def test_recovered_and_verified_callbacks_are_traced(tmp_path, ci: CiApiServer):
    missed, posted = job(1, BUCKET, REGION), job(2, BUCKET, REGION)
    ci.add_jobs(BUCKET, missed)  # its callback never comes: the first pass recovers it
    path = config(tmp_path, ci)
    path.write_text(path.read_text() + "[otel]\nenabled = true\n")
    with OtlpCollector() as collector:
        receiver = Receiver(path).start(
            env={
                "CI_TEST_SECRET_KEY": SECRET_KEY,
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "50",
            }
        )
        try:
            receiver.wait_for_log("reconcile pass done")
            ci.add_jobs(BUCKET, posted)
            assert receiver.post(callback_body(posted)).status_code == 200
            spans = collector.wait_for(
                lambda spans: len(named(spans, "handle recorder")) == 2 and named(spans, VERIFY),
                what="both events handled, the posted one verified",
            )
        finally:
            receiver.stop()

    [recovered] = named(spans, "reconcile recover")
    assert recovered.parent_span_id is None
    assert recovered.attributes["ci_receiver.recovered"] is True
    assert recovered.attributes["ci_receiver.bucket"] == BUCKET
    [server] = named(spans, "POST /callbacks")
    by_trace = {span.trace_id: span for span in named(spans, "handle recorder")}
    # Each event's attempt is in its own callback's trace: recovered, or posted.
    assert by_trace[recovered.trace_id].parent_span_id == recovered.span_id
    assert by_trace[server.trace_id].parent_span_id == server.span_id
    # The posted one waited for verification: its request to CI inside the verify attempt.
    [verify] = named(spans, VERIFY)
    assert (verify.trace_id, verify.parent_span_id) == (server.trace_id, server.span_id)
    [asked] = [span for span in spans if span.parent_span_id == verify.span_id]
    assert asked.kind == "CLIENT"
    assert asked.name == "CI ci_get_media_jobs"
    assert asked.attributes["ci_receiver.bucket"] == BUCKET
    # The reconciler's listing calls began no trace: every client span has a parent.
    assert all(span.parent_span_id for span in spans if span.kind == "CLIENT")
