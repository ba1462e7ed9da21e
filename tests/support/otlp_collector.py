"""A stand-in for an OpenTelemetry collector: a loopback OTLP/HTTP server that decodes
each `POST /v1/traces` (protobuf `ExportTraceServiceRequest`, as opentelemetry-proto
defines it, gzip or not) into plain spans, and answers as the collector does (200 with an
empty `ExportTraceServiceResponse`). It checks what the collector checks: the path, the
content type, a body that decodes."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from tests.support.http_peers import HttpPeer, Reply, Request
from tests.support.waiting import wait_until


@dataclass
class Span:
    name: str
    kind: str  # SERVER, CLIENT, CONSUMER, PRODUCER, INTERNAL
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    status: str  # UNSET, OK, ERROR
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpCollector:
    def __init__(self) -> None:
        self.refused: list[str] = []
        self.spans: list[Span] = []
        # While set, every export is answered 503, as a collector that is overloaded or
        # restarting answers.
        self.down = False
        self.peer = HttpPeer(self._receive)
        self.endpoint = self.peer.url

    def __enter__(self) -> OtlpCollector:
        self.peer.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.peer.__exit__(*exc_info)

    def _receive(self, request: Request) -> Reply:
        if self.down:
            return Reply(503, "unavailable")
        if request.path != "/v1/traces":
            self.refused.append(f"path {request.path}")
            return Reply(404)
        if request.headers.get("content-type") != "application/x-protobuf":
            self.refused.append(f"content type {request.headers.get('content-type')}")
            return Reply(415)
        body = request.body
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        try:
            export.ParseFromString(body)
        except Exception as exc:  # what the collector answers an undecodable body
            self.refused.append(f"undecodable: {exc}")
            return Reply(400)
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(_plain(span, resource, scope_spans.scope.name))
        reply = ExportTraceServiceResponse().SerializeToString()
        return Reply(200, reply, {"Content-Type": "application/x-protobuf"})

    def wait_for(self, test: Any, what: str, timeout: float = 30) -> list[Span]:
        """Wait until `test(spans)` holds; the spans then."""
        wait_until(lambda: test(list(self.spans)), what=what, timeout=timeout)
        return list(self.spans)


def _plain(span: ProtoSpan, resource: dict[str, Any], scope: str) -> Span:
    return Span(
        name=span.name,
        kind=ProtoSpan.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        attributes=_attributes(span.attributes),
        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
        status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        status_message=span.status.message,
        resource=resource,
        scope=scope,
    )
