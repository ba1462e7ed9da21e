"""The long-running commands put together from the config: `serve`, `consume` and `run`
each as an `Assembly` (the backend, its HTTP servers, its other sources, what SIGHUP
reloads), and `serve --workers N` as a supervisor on the ports it binds.

Made in the order the commands have always made them: what each says on the terminal
(`say`), and which config problem or port that cannot be had ends it first, stay the
same. A config that asks for what cannot be run raises `CannotAssemble` with the message
to show; a port that cannot be had, `CannotListen` (receiver.sources.listen).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from handlers import HandlerConfigError
from receiver import tracing
from receiver.admin.listener import admin_listener
from receiver.config import Config
from receiver.ingest.routing import log_warnings
from receiver.logs import configure_logging
from receiver.masking import mask_url
from receiver.runtime.reload import Reloader
from receiver.runtime.runner import run_service
from receiver.runtime.service import Service
from receiver.runtime.worker import SupervisorLink, WorkerSpec
from receiver.sources.addresses import base, callback_url
from receiver.sources.backend import Backend
from receiver.sources.http_auth import open_to_anyone_refusal, open_to_anyone_warning
from receiver.sources.http_source import HttpServer
from receiver.sources.source import Source
from receiver.sources.tls import TlsCertificate, certificates

# The commands' logger, as when this was theirs: the log lines are the same.
logger = structlog.get_logger("ci_receiver.cli")

# A line for the operator on the terminal (the command writes it to stderr).
Say = Callable[[str], None]
# What SIGHUP runs: whether the config read again was applied.
Reload = Callable[[], Awaitable[bool]]


class CannotAssemble(Exception):
    """The config asks for what cannot be run; the message says what to set."""


def _unusable(config: Config, needed: str) -> CannotAssemble:
    """What a command raises when the config lacks what it needs, said as its other
    errors are (naming the file)."""
    return CannotAssemble(f"config: {config.located(needed)}")


@dataclass(frozen=True, slots=True)
class Assembly:
    """What a long-running command runs (`receiver.runtime.runner.run_service`): the
    HTTP servers (`serving`) once the backend runs, or while it waits for its database,
    the other `sources` once it runs; `reload` on SIGHUP; a worker's `link` to its
    supervisor, told when the worker is ready."""

    backend: Backend
    serving: list[Source]
    sources: list[Source]
    reload: Reload | None
    link: SupervisorLink | None = None
    # The public server, whose requests a worker counts in its last line.
    public: HttpServer | None = None

    async def run(self) -> int:
        """Run until stopped; the process's exit code. Raises what made the backend's
        start fail (an inbox it cannot use, a relay topic it cannot publish to)."""
        ready = None if self.link is None else self.link.ready
        try:
            exit_code = await run_service(
                self.backend, self.sources, self.reload, serving=self.serving, on_ready=ready
            )
        finally:
            # The spans still held sent (for tracing.SHUTDOWN_SECONDS at most), in a
            # thread: the event loop is not held while they go.
            await asyncio.to_thread(tracing.stop)
        if self.link is not None and self.public is not None:  # what it did, for the log
            logger.info("worker stopped", pid=os.getpid(), requests=self.public.requests_served)
        return exit_code


def start_logging(config: Config, worker: WorkerSpec | None = None) -> None:
    """Start tracing ([otel]) and configure the log, and say there what in the config is
    likely a mistake (a worker of `serve --workers` names itself in every line; worker 0
    alone warns). Each process traces on its own: the exporter's thread would not
    survive a fork."""
    fields = {} if worker is None else {"worker": worker.index}
    problem = tracing.start(config)
    log = config.log
    configure_logging(log.level, log.format, log.timezone, fields, trace_ids=tracing.active())
    if worker is None or worker.index == 0:
        if problem is not None:
            logger.warning(problem)
        log_warnings(config)


def for_serve(
    config: Config, read: Callable[[], Config], say: Say, worker: WorkerSpec | None = None
) -> Assembly:
    """`serve` (or one worker of `serve --workers`): the HTTP receiver and the dispatcher,
    the reconciler when [ci] watches buckets; with [relay] topic, the relay alone.
    `read` reads the config again as at start, for SIGHUP."""
    _refuse_open_to_anyone(config)
    link = None if worker is None else SupervisorLink(worker)
    if not config.relay.topic:
        service = service_for(config)
        public, servers = _http_servers(service, say, worker, link)
        reload = _reloader(service, read, servers, worker)
        reconciler = _reconciler(config, service, say, worker)
        return Assembly(service, servers, reconciler, reload, link, public)
    relay = _relay_service(config, say)
    public, servers = _http_servers(relay, say, worker, link)
    return Assembly(relay, servers, [], _certificate_reloader(relay, servers), link, public)


def for_consume(config: Config, read: Callable[[], Config], say: Say) -> Assembly:
    """`consume`: the CMQ and/or TDMQ consumers and the dispatcher (the reconciler, the
    admin listener)."""
    service = service_for(config)
    sources = [*_consumers(config, service, say), *_reconciler(config, service, say)]
    servers = _admin_server(service, say)
    return Assembly(service, servers, sources, _reloader(service, read, servers))


def for_run(config: Config, read: Callable[[], Config], say: Say) -> Assembly:
    """`run`: the HTTP receiver, the consumers and the dispatcher in one process."""
    if config.relay.topic:
        say("run stores HTTP callbacks itself: [relay] applies to serve only")
    if config.http.workers > 1:
        say("run is one process: [http] workers applies to serve only")
    _refuse_open_to_anyone(config)
    service = service_for(config)
    sources = [*_consumers(config, service, say), *_reconciler(config, service, say)]
    public, servers = _http_servers(service, say)
    return Assembly(service, servers, sources, _reloader(service, read, servers), public=public)


def supervise(config: Config, config_path: Path | None, say: Say) -> int:
    """`serve --workers N` (N > 1): bind the ports here, and keep N workers on them; the
    process's exit code."""
    from receiver.runtime.supervisor import Supervisor, worker_command
    from receiver.sources.listen import listen

    _refuse_open_to_anyone(config)
    configure_logging(config.log.level, config.log.format, config.log.timezone)
    http, admin = config.http, config.admin
    # Each worker reads the certificates itself; read here first, so that one that
    # cannot be served ends the command with its reason rather than a worker.
    certificates(config)
    public = listen("public", http.host, http.port)
    admin_socket = listen("admin", admin.host, admin.port) if admin.enabled else None
    host, port = public.getsockname()[:2]
    _announce(config, say)(host, port)
    say(f"  ({http.workers} worker processes on this port)")
    supervisor = Supervisor(
        http.workers,
        worker_command(None if config_path is None else str(config_path)),
        public,
        admin_socket,
        stop_timeout=http.graceful_timeout + config.dispatch.drain_timeout,
    )
    try:
        return asyncio.run(supervisor.run())
    finally:
        public.close()
        if admin_socket is not None:
            admin_socket.close()


def _refuse_open_to_anyone(config: Config) -> None:
    """With [http] require_auth, a public port nothing guards ends the command before
    anything is made (the inbox, a port)."""
    refusal = open_to_anyone_refusal(config.http)
    if refusal is not None:
        raise CannotAssemble(refusal)


def service_for(config: Config, *, wait: bool = True) -> Service:
    """The service of `config`. `wait`: a long-running command's, whose start waits for an
    inbox database that cannot be reached yet (a one-off command fails at once instead)."""
    try:
        return Service(config, wait=wait)
    except HandlerConfigError as exc:
        raise CannotAssemble(f"config: {exc}") from None


def _reloader(
    service: Service,
    read: Callable[[], Config],
    servers: list[Source],
    worker: WorkerSpec | None = None,
) -> Reload:
    """What SIGHUP runs: the config read again as at start (file, environment and the
    command's options), its handlers and routes applied; the certificates of the HTTP
    `servers` served over TLS read again."""
    warn = worker is None or worker.index == 0
    return Reloader(service, read, service.metrics, _certificates(servers), warn=warn).reload


def _certificate_reloader(backend: Backend, servers: list[Source]) -> Reload | None:
    """What SIGHUP runs for a relay, which has no handlers or routes: the certificates
    read again, if any."""
    certificates = _certificates(servers)
    if not certificates:
        return None
    return Reloader(None, None, backend.metrics, certificates).reload


def _certificates(servers: list[Source]) -> list[TlsCertificate]:
    return [s.tls for s in servers if isinstance(s, HttpServer) and s.tls is not None]


def _http_servers(
    backend: Backend, say: Say, worker: WorkerSpec | None = None, link: SupervisorLink | None = None
) -> tuple[HttpServer, list[Source]]:
    """The public receiver, and what runs beside it: (unless [admin] enabled = false)
    the admin listener; for a worker of `serve --workers`, on the supervisor's sockets,
    its `link` to it."""
    warning = open_to_anyone_warning(backend.config.http)
    if warning and (worker is None or worker.index == 0):
        say(warning)
        logger.warning("no sender authentication", advice=warning)
    if worker is None or link is None:
        public = HttpServer.public(backend, _announce(backend.config, say))
        return public, [public, *_admin_server(backend, say)]
    public = HttpServer.public(backend, link.listening, worker.public_socket())
    admin = (
        _admin_server(backend, say, worker.admin_socket()) if worker.admin_fd is not None else []
    )
    return public, [public, *admin, link]


def _admin_server(backend: Backend, say: Say, sock: socket.socket | None = None) -> list[Source]:
    if not backend.config.admin.enabled:
        return []

    def announce(host: str, port: int) -> None:
        routes = "/metrics, /readyz"
        if backend.config.admin.inspector:
            routes += ", /api, the inspector at /inspector"
        say(f"admin listener on {backend.config.admin.scheme}://{host}:{port} ({routes})")

    return [admin_listener(backend, announce, sock)]


def _announce(config: Config, say: Say) -> Callable[[str, int], None]:
    def announce(bound_host: str, bound_port: int) -> None:
        public = "<this host's public address>" if bound_host in ("0.0.0.0", "::") else bound_host
        url = callback_url(config, public, reveal_token=False, port=bound_port)
        say(f"ci-receiver listening on {base(config.http, bound_host, bound_port)}")
        say(f"CallBack URL for CI: {url}")
        say("  (CI calls back over the internet: it refuses private addresses)")

    return announce


def _consumers(config: Config, service: Service, say: Say) -> list[Source]:
    """The consumers of the configured sections: [cmq], [tdmq] (Pulsar), or both."""
    tdmq = config.tdmq
    wanted = {
        "cmq": config.cmq.configured,
        "tdmq": bool(tdmq.service_url or tdmq.topics or tdmq.topic_pattern),
    }
    if not any(wanted.values()):
        raise _unusable(
            config,
            "nothing to consume: set [cmq] region (or endpoint), secret_id, secret_key and"
            " queues for the TDMQ for CMQ queues CI delivers to, and/or [tdmq] service_url"
            " and topics for TDMQ for Pulsar",
        )
    consumers: list[Source] = []
    if wanted["cmq"]:
        consumers.append(_cmq_consumer(config, service, say))
    if wanted["tdmq"]:
        consumers.append(_tdmq_consumer(config, service, say))
    return consumers


def _cmq_consumer(config: Config, service: Service, say: Say) -> Source:
    from receiver.sources.cmq import CmqConsumer

    missing = config.cmq.missing_for_consumer()
    if missing:
        needed = f"set {' and '.join(missing)} to consume from CMQ"
        raise _unusable(config, needed)
    consumer = CmqConsumer(config.cmq, service.ingestor, service.metrics)
    service.add_check("cmq", consumer.check)
    say(f"consuming CMQ queues {consumer.where}")
    return consumer


def _tdmq_consumer(config: Config, service: Service, say: Say) -> Source:
    from receiver.sources.tdmq import TdmqConsumer

    missing = config.tdmq.missing_for_consumer()
    if missing:
        needed = f"set {' and '.join(missing)} to consume from TDMQ"
        raise _unusable(config, needed)
    consumer = TdmqConsumer(config.tdmq, service.ingestor, service.metrics)
    service.add_check("tdmq", consumer.check)
    say(f"consuming {consumer.where} from {mask_url(config.tdmq.service_url or '')}")
    return consumer


def _reconciler(
    config: Config, service: Service, say: Say, worker: WorkerSpec | None = None
) -> list[Source]:
    """The reconciler, when [ci] watches buckets (in worker 0 alone of `serve --workers`);
    CI refusing the credentials ends the command before it serves."""
    if not config.ci.enabled or (worker is not None and worker.index != 0):
        return []
    from receiver.ci.api import CiApiError
    from receiver.sources.reconcile import reconciler_for

    api = service.ci_api
    assert api is not None  # made by the service when [ci] names buckets
    try:
        reconciler = reconciler_for(
            config.ci, api, service.inbox, service.ingestor, service.metrics.registry,
            events_kept=config.retention.events,
        )  # fmt: skip
    except CiApiError as exc:
        raise CannotAssemble(f"[ci]: {exc}") from None
    say(f"reconciling {len(config.ci.buckets)} bucket(s) with CI's job API")
    return [reconciler]


def _relay_service(config: Config, say: Say) -> Backend:
    from receiver.sources.tdmq import RelayService

    if not config.tdmq.service_url:
        needed = "relay.topic is set: set tdmq.service_url too"
        raise _unusable(config, needed)
    say(f"relaying callbacks to {config.relay.topic}")
    return RelayService(config)
