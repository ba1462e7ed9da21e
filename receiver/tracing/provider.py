"""The OpenTelemetry SDK as ci-receiver runs it: a tracer provider of its own (not the
global one, which can be set once per process), configured by the standard `OTEL_*`
variables, exporting over OTLP/HTTP in batches from a thread; and the client libraries'
instrumentations that are installed (httpx, SQLAlchemy, asyncpg), so that a handler's own
requests and queries are spans inside its attempt."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.util.types import Attributes

from receiver.masking import Masker, origin

INSTRUMENTATION_SCOPE = "ci-receiver"
# Where the OTLP/HTTP span exporter logs its failures.
OTLP_LOGGER = OTLPSpanExporter.__module__

logger = structlog.get_logger("ci_receiver.tracing")
# The exporter's reason names the collector's URL, which may carry a token in its query.
_mask_urls = Masker()


class NoOrphanClients(Sampler):
    """The sampler the OTEL_TRACES_SAMPLER variables make, but a client span with no parent
    is dropped: the inbox polled, a queue long-polled, a table created at start, each
    would be a trace of its own with nothing to follow."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoOrphanClients{{{self._inner.get_description()}}}"


def resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, with `ci-receiver` and its version
    where they name no service."""
    found = Resource.create()
    named = str(found.attributes.get(SERVICE_NAME, ""))
    ours: dict[str, str] = {}
    if SERVICE_VERSION not in found.attributes:
        ours[SERVICE_VERSION] = _version()
    if not named or named.startswith("unknown_service"):
        ours[SERVICE_NAME] = INSTRUMENTATION_SCOPE
    return found.merge(Resource(ours))


def _version() -> str:
    try:
        return importlib.metadata.version("ci-receiver")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class WatchedExporter(SpanExporter):
    """The OTLP exporter, told of in the log as any dependency is: one line when the
    collector stops taking spans (with the exporter's own reason), one when it takes them
    again. The exporter's lines themselves (a warning per retry, an error per batch lost)
    are held back: while a collector is away they would come every few seconds."""

    def __init__(self, exporter: SpanExporter, logger_name: str) -> None:
        self._exporter = exporter
        self._failing = False
        self._reason = ""
        self._logger = logging.getLogger(logger_name)
        self._logger.addFilter(self._hold_back)

    def _hold_back(self, record: logging.LogRecord) -> bool:
        # The first says why (the connection refused, the status); the last only that
        # the exporter gave up.
        self._reason = self._reason or record.getMessage()
        return False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self._exporter.export(spans)
        reason, self._reason = self._reason, ""
        if result is SpanExportResult.SUCCESS:
            if self._failing:
                self._failing = False
                logger.info("sending traces to the collector again")
        elif not self._failing:
            self._failing = True
            logger.warning(
                "cannot send traces to the collector; spans are dropped until it takes them",
                reason=_mask_urls(reason)[:300],
            )
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()
        self._logger.removeFilter(self._hold_back)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def make_provider(exporter: SpanExporter | None = None) -> TracerProvider:
    """The provider; `exporter` (tests) in place of OTLP/HTTP, spans sent as they end.
    It is shut down by `receiver.tracing.stop`, within a bound, not at exit."""
    provider = TracerProvider(resource=resource(), shutdown_on_exit=False)
    # Set before any tracer is made: each takes the provider's sampler then.
    provider.sampler = NoOrphanClients(provider.sampler)
    processor: SpanProcessor
    if exporter is None:
        otlp = WatchedExporter(OTLPSpanExporter(), OTLP_LOGGER)
        processor = BatchSpanProcessor(otlp)
    else:
        processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return provider


def shut_down(provider: TracerProvider, seconds: float) -> None:
    """Send the spans still held, for at most `seconds`; what is left then is dropped.
    The SDK's own shutdown waits up to 30 s for an export retrying against a collector
    away: it is left behind, in a daemon thread, which the process's exit ends."""
    closing = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    closing.start()
    closing.join(seconds)


def instrument(provider: TracerProvider) -> list[Callable[[], None]]:
    """Turn on the instrumentations installed that take the installed library (one may
    decline a version it does not know); what turns each off again. An outgoing
    request's span shows its URL's `origin` alone."""

    def mask_url(span: trace.Span, request: Any) -> None:
        if span.is_recording():
            shown = origin(str(request.url))
            for key in ("url.full", "http.url"):
                span.set_attribute(key, shown)

    async def mask_url_async(span: trace.Span, request: Any) -> None:
        mask_url(span, request)

    undo: list[Callable[[], None]] = []
    for module, name, options in (
        ("opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor",
         {"request_hook": mask_url, "async_request_hook": mask_url_async}),
        ("opentelemetry.instrumentation.sqlalchemy", "SQLAlchemyInstrumentor", {}),
        ("opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor", {}),
    ):  # fmt: skip
        try:
            instrumentor = getattr(importlib.import_module(module), name)()
        except ImportError:
            continue
        # One that declines the installed library's version would say so at ERROR on
        # every start: left out quietly instead (SQLAlchemy's declines 2.1).
        if get_dependency_conflicts(instrumentor.instrumentation_dependencies()) is not None:
            continue
        instrumentor.instrument(tracer_provider=provider, **options)
        if instrumentor.is_instrumented_by_opentelemetry:
            undo.append(instrumentor.uninstrument)
    return undo
