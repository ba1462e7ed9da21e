"""Prometheus metrics, in a registry of their own per service (served on GET /metrics).

Under `serve --workers N` every worker process keeps its values in files of the folder
`PROMETHEUS_MULTIPROC_DIR` names (prometheus_client reads it at import: the supervisor
sets it for its workers) and /metrics adds up the files of all workers: counters and
histograms are summed, each gauge as its `multiprocess_mode` says (ignored otherwise).
"""

from __future__ import annotations

import os
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
Metric = TypeVar("Metric", bound=MetricWrapperBase)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text of GET /metrics: this process's registry, or every worker's values."""
    folder = os.environ.get(MULTIPROCESS_DIR)
    if not folder:
        return generate_latest(registry)
    from prometheus_client.multiprocess import MultiProcessCollector

    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=folder)
    return generate_latest(merged)


class Metrics:
    def __init__(self) -> None:
        self._series: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self.registry = CollectorRegistry()
        self.callbacks = Counter(
            "ci_receiver_callbacks",
            "Callbacks received, by source and outcome (accepted, duplicate, rejected,"
            " unavailable: not kept, to be sent again; busy: no room within http.admission_wait,"
            " 503, ...).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.events = Counter(
            "ci_receiver_events",
            "New events stored, by kind and state.",
            ["kind", "state"],
            registry=self.registry,
        )
        self.unrouted = Counter(
            "ci_receiver_unrouted_events",
            "New events that no route sent to any handler.",
            registry=self.registry,
        )
        self.ingest_seconds = Histogram(
            "ci_receiver_ingest_seconds",
            "Time from a callback's bytes to its durable commit.",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.attempts = Counter(
            "ci_receiver_handler_attempts",
            "Handler attempts, by handler and outcome (done, retry, dead, released).",
            ["handler", "outcome"],
            registry=self.registry,
        )
        self.handler_seconds = Histogram(
            "ci_receiver_handler_seconds",
            "Duration of handler attempts.",
            ["handler"],
            registry=self.registry,
        )
        self.running = Gauge(
            "ci_receiver_handler_running",
            "Handler attempts running now.",
            ["handler"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.handler_up = Gauge(
            "ci_receiver_handler_up",
            "1 when the handler started, 0 while its start keeps failing (in any worker).",
            ["handler"],
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.config_reloads = Counter(
            "ci_receiver_config_reloads_total",
            "Config reloads (SIGHUP): applied, or refused (the running config stays).",
            ["outcome"],
            registry=self.registry,
        )

        self.http_refused = Counter(
            "ci_receiver_http_refused",
            "Connections and requests refused by the HTTP server before the app, by server"
            " (public, admin) and reason (headers_too_large, header_timeout, body_timeout,"
            " idle_connection, too_many_connections, too_many_requests, bad_request,"
            " tls_handshake).",
            ["server", "reason"],
            registry=self.registry,
        )
        self.field_warnings = Counter(
            "ci_receiver_field_warnings",
            "Fields of newly stored events that only inform but could not be read as CI"
            " documents them (a time that is no time, a UserData, Code or TemplateId that is"
            " a list or an object), kept as sent in the event's raw document, by field"
            " (EndTime, UserData, ...).",
            ["field"],
            registry=self.registry,
        )
        self.rejected_not_kept = Counter(
            "ci_receiver_rejected_not_kept",
            "Refused callbacks not kept because the hour's budget for them was spent.",
            ["source", "reason"],
            registry=self.registry,
        )

    def series(self, metric: Metric, *labels: str) -> Metric:
        """`metric.labels(*labels)`, looked up once: labels() takes a lock every call."""
        key = (id(metric), labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = metric.labels(*labels)
        # What `metric.labels` made, kept under the metric's id: of the metric's type.
        return cast(Metric, found)
