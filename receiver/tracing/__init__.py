"""OpenTelemetry traces of each callback, from its receipt to every handler attempt
(`[otel] enabled`, with the `otel` extra installed).

Off (the default), nothing imports OpenTelemetry: each hook below, where the flow calls
it, reads one global and gives back `OFF`, whose methods do nothing.

On, a callback's trace holds together across time and replicas like this: the span that
received it (the HTTP server span, a consumer's span of its message, the reconciler's
span that recovered it) is written into its receipt's `source_meta` as a W3C
`traceparent`, stored with it and given back with its event whenever its runs are
claimed, by whichever replica. Each attempt of a handler is a child of that span: one
trace shows receipt, store, verification and every attempt with its retries. (A batch
handler's attempt, over many callbacks, is a span of its own, linked to each.) The webhook
handler sends the attempt's `traceparent` on, the Pulsar handler and the relay put it in
message properties, and the consumer continues from them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from receiver.callback.event import Event
    from receiver.config import Config
    from receiver.tracing.spans import Spans

# How long a stopping process goes on sending the spans it still holds.
SHUTDOWN_SECONDS = 3.0
EXTRA_MISSING = (
    "[otel] enabled needs OpenTelemetry: pip install 'ci-receiver[otel]'; running without traces"
)


class SpanScope(Protocol):
    """A span as the flow holds it (`receiver.tracing.spans.Scope`, or `OFF`)."""

    def __enter__(self) -> SpanScope: ...

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None: ...

    def set(self, key: str, value: str | int | float | bool) -> None: ...

    def carrier(self) -> dict[str, str]: ...

    def fail(self, error_type: str, description: str | None = None) -> None: ...

    def http_status(self, status: int) -> None: ...

    def outcome(self, outcome: str, error_type: str | None, error: str | None) -> None: ...

    def end(self) -> None: ...


class _Off:
    """No span: what every hook gives while tracing is off."""

    __slots__ = ()

    def __enter__(self) -> _Off:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: Any
    ) -> None:
        return None

    def set(self, key: str, value: str | int | float | bool) -> None:
        return None

    def carrier(self) -> dict[str, str]:
        return {}

    def fail(self, error_type: str, description: str | None = None) -> None:
        return None

    def http_status(self, status: int) -> None:
        return None

    def outcome(self, outcome: str, error_type: str | None, error: str | None) -> None:
        return None

    def end(self) -> None:
        return None


OFF = _Off()

_spans: Spans | None = None
_provider: TracerProvider | None = None
_undo: list[Any] = []


def start(config: Config, exporter: SpanExporter | None = None) -> str | None:
    """Start tracing if `config` asks for it; what stands in the way if it cannot (the
    extra not installed), for the log: the service runs on without traces. `exporter`
    (tests): spans go there as they end, not to OTLP/HTTP."""
    global _spans, _provider, _undo
    if not config.otel.enabled or _spans is not None:
        return None
    try:
        from receiver.masking import Masker, secrets_in
        from receiver.tracing.provider import instrument, make_provider
        from receiver.tracing.spans import Spans
    except ImportError:
        return EXTRA_MISSING
    _provider = make_provider(exporter)
    _undo = instrument(_provider)
    _spans = Spans(
        _provider.get_tracer("ci-receiver"),
        Masker(secrets_in(config)),
        trust_traceparent=config.otel.trust_traceparent,
        inbox_backend="postgresql" if config.inbox.url else "sqlite",
    )
    return None


def stop() -> None:
    """Send the spans still held (for `SHUTDOWN_SECONDS` at most), and stop: a process's
    last act, a test's end."""
    global _spans, _provider, _undo
    provider, undo = _provider, _undo
    _spans, _provider, _undo = None, None, []
    for turn_off in undo:
        turn_off()
    if provider is not None:
        from receiver.tracing.provider import shut_down

        shut_down(provider, SHUTDOWN_SECONDS)


def active() -> bool:
    return _spans is not None


def mask_with(mask: Callable[[str], str]) -> None:
    """Mask errors' descriptions with this too (the handlers' secrets as they validated
    them, made again on every reload), besides the config's secrets and URLs."""
    if _spans is not None:
        _spans.mask_with(mask)


def destination(config: Config) -> str:
    """Where traces go, as `check-config` tells it: off, the extra missing, or the
    OTLP/HTTP endpoint the OTEL_* variables name."""
    if not config.otel.enabled:
        return "off"
    if any(
        importlib.util.find_spec(module) is None
        for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    ):
        return "enabled, but " + EXTRA_MISSING.removeprefix("[otel] enabled ")
    from receiver.masking import mask_url

    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/")
        + "/v1/traces"
    )
    return f"sent over OTLP/HTTP to {mask_url(endpoint)}"


def receiving_http(
    scope: Mapping[str, Any], route: str, headers: Mapping[str, str], agent: str | None
) -> SpanScope:
    spans = _spans
    return OFF if spans is None else spans.receiving_http(scope, route, headers, agent)


def consuming(
    system: str,
    destination: str,
    message_id: str | None,
    properties: Mapping[str, Any] | None = None,
    *,
    group: str | None = None,
    current: bool = False,
) -> SpanScope:
    spans = _spans
    if spans is None:
        return OFF
    return spans.consuming(
        system, destination, message_id, properties, group=group, current=current
    )


def storing(carriers: list[Mapping[str, Any]]) -> SpanScope:
    spans = _spans
    return OFF if spans is None else spans.storing(carriers)


def attempting(handler: str, event: Event, number: int) -> SpanScope:
    spans = _spans
    return OFF if spans is None else spans.attempting(handler, event, number)


def attempting_batch(handler: str, events: Iterable[Event]) -> SpanScope:
    spans = _spans
    return OFF if spans is None else spans.attempting_batch(handler, events)


def calling_ci(operation: str, bucket: str) -> SpanScope:
    spans = _spans
    return OFF if spans is None else spans.calling_ci(operation, bucket)


def recovering(bucket: str, watch: str) -> SpanScope:
    spans = _spans
    return OFF if spans is None else spans.recovering(bucket, watch)


def carrier() -> dict[str, str]:
    """The current span as a parent, in W3C fields (`traceparent`, `tracestate`), to send
    on with a delivery; empty when tracing is off or no span is current."""
    spans = _spans
    return {} if spans is None else spans.current_carrier()


def trace_of(carrier: Mapping[str, Any]) -> tuple[str, bool] | None:
    """The trace a stored `traceparent` names (`source_meta`), whether or not tracing is
    on now, and whether it was sampled (kept: the sampler may have dropped it): what the
    inspector shows."""
    value = carrier.get("traceparent")
    if not isinstance(value, str):
        return None
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32 or len(parts[3]) != 2:
        return None
    trace_id, flags = parts[1].lower(), parts[3].lower()
    if not all(c in "0123456789abcdef" for c in trace_id + flags):
        return None
    return trace_id, bool(int(flags, 16) & 1)


def add_trace_ids(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A structlog processor: `trace_id` and `span_id` on every line written inside a
    span (configured only while tracing is on)."""
    if _spans is not None:
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event.setdefault("trace_id", format(context.trace_id, "032x"))
            event.setdefault("span_id", format(context.span_id, "016x"))
    return event
