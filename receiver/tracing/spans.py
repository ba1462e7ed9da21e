"""The spans of a callback's trace, made with the OpenTelemetry API (imported only when
[otel] is on: `receiver.tracing.start`).

Attributes follow OpenTelemetry's semantic conventions (HTTP server, messaging, database
client); what is ci-receiver's own is under `ci_receiver.*`. No attribute carries a
secret: a callback's route is its template (`/callbacks/{token}`), never its path, and
an error's description is masked as the log masks it (URLs' user info and query, every
secret value of the config).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from receiver.callback.event import Event
from receiver.tracing.fields import FIELDS

# What is stored with a callback and sent on with its events: W3C Trace Context alone,
# whatever OTEL_PROPAGATORS says (baggage from a sender is not kept).
W3C = TraceContextTextMapPropagator()
# The same names as ASGI gives headers.
_HEADER_FIELDS = tuple(name.encode() for name in FIELDS)
# An error's description on a span is cut to this many characters.
MAX_DESCRIPTION = 300


def carried(carrier: Mapping[str, Any]) -> otel_context.Context | None:
    """The span context a W3C carrier (headers, properties, `source_meta`) names; None
    when it names none that is valid."""
    fields = {name: value for name in FIELDS if isinstance(value := carrier.get(name), str)}
    if "traceparent" not in fields:
        return None
    context = W3C.extract(fields)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def carrier_of(span: trace.Span) -> dict[str, str]:
    """The W3C fields that name `span` as a parent."""
    carrier: dict[str, str] = {}
    W3C.inject(carrier, trace.set_span_in_context(span))
    return carrier


def link_to(context: otel_context.Context | None) -> list[Link]:
    if context is None:
        return []
    return [Link(trace.get_current_span(context).get_span_context())]


class Scope:
    """One span: the current span from its start (`current=True`) until `end`, in the
    task that started it. Used as a context manager, an exception ends it as an error
    (by its type alone: an exception's text may hold anything)."""

    __slots__ = ("_mask", "_span", "_token")

    def __init__(self, span: trace.Span, mask: Masking, *, current: bool) -> None:
        self._span = span
        self._mask = mask
        self._token = otel_context.attach(trace.set_span_in_context(span)) if current else None

    def __enter__(self) -> Scope:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        if kind is not None:
            self.fail(kind.__qualname__)
        self.end()

    def set(self, key: str, value: str | int | float | bool) -> None:
        self._span.set_attribute(key, value)

    def carrier(self) -> dict[str, str]:
        """This span as a parent, in W3C fields (`traceparent`, `tracestate`)."""
        return carrier_of(self._span)

    def trace_id(self) -> str:
        return format(self._span.get_span_context().trace_id, "032x")

    def fail(self, error_type: str, description: str | None = None) -> None:
        self._span.set_attribute("error.type", error_type)
        text = None if description is None else self._mask.apply(description)[:MAX_DESCRIPTION]
        self._span.set_status(Status(StatusCode.ERROR, text))

    def http_status(self, status: int) -> None:
        """The answer of a server span: a 5xx is the server's error (a 4xx the client's)."""
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.fail(str(status))

    def outcome(self, outcome: str, error_type: str | None, error: str | None) -> None:
        """How a handler's attempt ended (`Result` of receiver.dispatch.outcomes)."""
        self._span.set_attribute("ci_receiver.outcome", outcome)
        if outcome != "done" and error is not None:
            self.fail(error_type or outcome, error)

    def end(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        self._span.end()


class Masking:
    """What an error's description goes through: the config's secrets and URLs, then the
    handlers' secrets as they validated them (`also`, set again on every reload)."""

    def __init__(self, first: Callable[[str], str]) -> None:
        self.first = first
        self.also: Callable[[str], str] = str

    def apply(self, text: str) -> str:
        return self.also(self.first(text))


class Spans:
    """Makes the spans of the flow, from the tracer of ci-receiver's provider."""

    def __init__(
        self,
        tracer: trace.Tracer,
        mask: Callable[[str], str],
        *,
        trust_traceparent: bool,
        inbox_backend: str,
    ) -> None:
        self._tracer = tracer
        self._mask = Masking(mask)
        self._trust_traceparent = trust_traceparent
        self._inbox_backend = inbox_backend

    def mask_with(self, mask: Callable[[str], str]) -> None:
        self._mask.also = mask

    def _scope(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        *,
        parent: otel_context.Context | None = None,
        links: list[Link] | None = None,
        current: bool = True,
    ) -> Scope:
        span = self._tracer.start_span(
            name, parent, kind=kind, attributes=attributes, links=links or None
        )
        return Scope(span, self._mask, current=current)

    def receiving_http(
        self, scope: Mapping[str, Any], route: str, headers: Mapping[str, str], agent: str | None
    ) -> Scope:
        """The server span of one `POST /callbacks[/{token}]`. A `traceparent` the sender
        sent is its parent when [otel] trust_traceparent is on; otherwise a link, so that
        whoever can reach the public port cannot join or steer (sampling) its traces."""
        sent = carried(_header_fields(scope))
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "http.route": route,
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        size = headers.get("content-length", "")
        if size.isdigit():
            attributes["http.request.body.size"] = int(size)
        if agent:
            attributes["user_agent.original"] = agent
        server = scope.get("server")
        if server and server[1] is not None:
            attributes["server.port"] = server[1]
        client = scope.get("client")
        if client:
            attributes["client.address"] = client[0]
        trusted = self._trust_traceparent
        return self._scope(
            f"POST {route}",
            SpanKind.SERVER,
            attributes,
            parent=sent if trusted else None,
            links=None if trusted else link_to(sent),
        )

    def consuming(
        self,
        system: str,
        destination: str,
        message_id: str | None,
        properties: Mapping[str, Any] | None = None,
        *,
        group: str | None = None,
        current: bool = False,
    ) -> Scope:
        """The consumer span of one message (a broker's: its W3C properties, which the
        relay or the Pulsar handler wrote, are its parent; `group`: the subscription).
        Current only when asked: a batch's messages are each in their own span at once."""
        values: dict[str, Any] = {
            "messaging.system": system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": destination,
        }
        if message_id:
            values["messaging.message.id"] = message_id
        if group:
            values["messaging.destination.subscription.name"] = group
        parent = carried(properties) if properties else None
        return self._scope(
            f"process {destination}", SpanKind.CONSUMER, values, parent=parent, current=current
        )

    def storing(self, carriers: list[Mapping[str, Any]]) -> Scope:
        """The inbox commit of callbacks (each one's `source_meta`): a child of the
        current span (the request's), else of the one callback's span, else (several
        committed together) a span linked to each one's."""
        attributes = {
            "ci_receiver.inbox": self._inbox_backend,
            "ci_receiver.callbacks": len(carriers),
        }
        if trace.get_current_span().get_span_context().is_valid:
            return self._scope("inbox store", SpanKind.INTERNAL, attributes)
        if len(carriers) == 1:
            parent = carried(carriers[0])
            return self._scope("inbox store", SpanKind.INTERNAL, attributes, parent=parent)
        links = [link for carrier in carriers for link in link_to(carried(carrier))]
        return self._scope("inbox store", SpanKind.INTERNAL, attributes, links=links)

    def attempting(self, handler: str, event: Event, number: int) -> Scope:
        """One attempt of a handler on an event: a child of the span that received the
        event (its `source_meta` names it), however long after and on whichever replica,
        so that the callback's one trace shows each attempt and its retries."""
        attributes = {
            **_event_attributes(event),
            "ci_receiver.handler": handler,
            "ci_receiver.attempt": number,
        }
        return self._scope(
            f"handle {handler}",
            SpanKind.INTERNAL,
            attributes,
            parent=carried(event.source_meta) or otel_context.Context(),
        )

    def attempting_batch(self, handler: str, events: Iterable[Event]) -> Scope:
        """One attempt of a batch handler. A batch of one event continues that event's
        trace, as `attempting` does; a larger one is a span of its own trace (it cannot
        be the child of every callback's), linked to the span that received each."""
        listed = list(events)
        attributes: dict[str, Any] = {
            "ci_receiver.handler": handler,
            "ci_receiver.batch.size": len(listed),
        }
        if len(listed) == 1:
            attributes.update(_event_attributes(listed[0]))
            parent = carried(listed[0].source_meta) or otel_context.Context()
            return self._scope(f"handle {handler}", SpanKind.INTERNAL, attributes, parent=parent)
        links = [link for event in listed for link in link_to(carried(event.source_meta))]
        return self._scope(
            f"handle {handler}",
            SpanKind.INTERNAL,
            attributes,
            parent=otel_context.Context(),
            links=links,
        )

    def calling_ci(self, operation: str, bucket: str) -> Scope:
        """A request to CI's job API (a client span: verification, the reconciler)."""
        return self._scope(
            f"CI {operation}",
            SpanKind.CLIENT,
            {"rpc.system": "tencent_ci", "rpc.method": operation, "ci_receiver.bucket": bucket},
        )

    def recovering(self, bucket: str, watch: str) -> Scope:
        """A callback the reconciler recovered from CI's job API: a trace of its own (no
        callback came to start one), marked as recovered."""
        return self._scope(
            "reconcile recover",
            SpanKind.INTERNAL,
            {
                "ci_receiver.recovered": True,
                "ci_receiver.bucket": bucket,
                "ci_receiver.watch": watch,
            },
            parent=otel_context.Context(),
        )

    def current_carrier(self) -> dict[str, str]:
        """The current span as a parent, in W3C fields; empty outside any span."""
        span = trace.get_current_span()
        return carrier_of(span) if span.get_span_context().is_valid else {}


def _header_fields(scope: Mapping[str, Any]) -> dict[str, str]:
    """A request's W3C header fields, as sent."""
    fields: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name in _HEADER_FIELDS:
            fields[name.decode()] = value.decode("latin-1")
    return fields


def _event_attributes(event: Event) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "ci_receiver.event.id": event.id,
        "ci_receiver.event.kind": event.kind,
    }
    for key, value in (
        ("ci_receiver.event.tag", event.tag),
        ("ci_receiver.event.name", event.event_name),
        ("ci_receiver.event.state", event.state),
        ("ci_receiver.job.id", event.job_id),
    ):
        if value:
            attributes[key] = value
    return attributes
