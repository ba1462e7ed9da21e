"""`serve`, `consume` and `run`: the long-running commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click
import structlog

from receiver.cli.common import (
    config_option,
    inbox_errors,
    listen_options,
    load,
    make_service,
    read_config,
    run_async,
)
from receiver.config import Config
from receiver.ingest.routing import log_warnings
from receiver.logs import configure_logging
from receiver.masking import mask_url
from receiver.runtime.worker import SupervisorLink, WorkerSpec

logger = structlog.get_logger("ci_receiver.cli")


@click.command()
@config_option
@listen_options
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes serving the port, each with its dispatcher, over the shared"
    " inbox (default [http] workers, 1: this process alone).",
)
@click.option("--worker", "worker_spec", hidden=True, help="Internal: started as a worker.")
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    worker_spec: str | None,
) -> None:
    """Run the HTTP receiver and the dispatcher (or, with [relay] topic, only relay)."""
    from receiver.runtime.runner import hold_reloads_while_starting

    hold_reloads_while_starting()
    overrides = {"host": host, "port": port, "workers": workers}
    config = load(config_path, **overrides)
    worker = None if worker_spec is None else WorkerSpec.parse(worker_spec)
    if worker is None and config.http.workers > 1:
        sys.exit(_supervise(config, config_path))
    start_logging(config, worker)
    link = None if worker is None else SupervisorLink(worker)
    if not config.relay.topic:
        service = make_service(config, wait=True)
        servers = _http_servers(service, worker, link)
        reload = _reloader(service, config_path, overrides, worker)
        components = _reconciler(config, service, worker)
        sys.exit(_run_serve(service, servers, components, link, reload))
    from receiver.sources.tdmq import TdmqError

    relay = _relay_service(config)
    try:
        sys.exit(_run_serve(relay, _http_servers(relay, worker, link), [], link, None))
    except TdmqError as exc:  # the topic cannot be reached at start
        raise click.ClickException(str(exc)) from None


def _reloader(
    service: Any,
    config_path: Path | None,
    overrides: dict[str, Any] | None = None,
    worker: WorkerSpec | None = None,
) -> Callable[[], Awaitable[bool]]:
    """What SIGHUP runs: the config read again as at start (file, environment and the
    command's options), its handlers and routes applied."""
    from receiver.runtime.reload import Reloader

    def read() -> Config:
        return read_config(config_path, **(overrides or {}))

    return Reloader(service, read, warn=worker is None or worker.index == 0).reload


def _run_serve(
    service: Any,
    servers: list[Any],
    components: list[Any],
    link: SupervisorLink | None,
    reload: Callable[[], Awaitable[bool]] | None,
) -> int:
    exit_code = _run(service, servers, components, reload, link)
    if link is not None:  # what it did, for the log (the public server comes first)
        logger.info("worker stopped", pid=os.getpid(), requests=servers[0].requests_served)
    return exit_code


def _run(
    service: Any,
    servers: list[Any],
    components: list[Any],
    reload: Callable[[], Awaitable[bool]] | None,
    link: SupervisorLink | None = None,
) -> int:
    """Run until stopped (`receiver.runtime.runner.run_service`): the servers once the service
    runs, or while it waits for its database, the other components once it runs; an
    inbox that cannot be used (refused credentials, a newer schema) ends the command
    with its reason."""
    from receiver.runtime.runner import run_service

    ready = None if link is None else link.ready
    running = run_service(service, components, reload, serving=servers, on_ready=ready)
    with inbox_errors():
        return run_async(running)


def _supervise(config: Config, config_path: Path | None) -> int:
    """`serve --workers N` (N > 1): bind the ports here, and keep N workers on them."""
    from receiver.runtime.supervisor import Supervisor, worker_command
    from receiver.sources.listen import listen

    configure_logging(config.log.level, config.log.format, config.log.timezone)
    http, admin = config.http, config.admin
    with listen_errors():
        public = listen("public", http.host, http.port)
        admin_socket = listen("admin", admin.host, admin.port) if admin.enabled else None
    host, port = public.getsockname()[:2]
    _announce(config)(host, port)
    click.echo(f"  ({http.workers} worker processes on this port)", err=True)
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


@click.command()
@config_option
def consume(config_path: Path | None) -> None:
    """Consume callbacks from CMQ queues ([cmq]) and/or TDMQ topics ([tdmq]), run the
    dispatcher."""
    from receiver.runtime.runner import hold_reloads_while_starting

    hold_reloads_while_starting()
    config = load(config_path)
    start_logging(config)
    service = make_service(config, wait=True)
    components = [*_consumers(config, service), *_reconciler(config, service)]
    reload = _reloader(service, config_path)
    sys.exit(_run(service, _admin_server(service), components, reload))


@click.command("run")
@config_option
@listen_options
def run_all(config_path: Path | None, host: str | None, port: int | None) -> None:
    """HTTP receiver, CMQ and/or TDMQ consumers and dispatcher in one process."""
    from receiver.runtime.runner import hold_reloads_while_starting

    hold_reloads_while_starting()
    config = load(config_path, host=host, port=port)
    start_logging(config)
    if config.relay.topic:
        click.echo("run stores HTTP callbacks itself: [relay] applies to serve only", err=True)
    if config.http.workers > 1:
        click.echo("run is one process: [http] workers applies to serve only", err=True)
    service = make_service(config, wait=True)
    components = [*_consumers(config, service), *_reconciler(config, service)]
    reload = _reloader(service, config_path, {"host": host, "port": port})
    sys.exit(_run(service, _http_servers(service), components, reload))


def _http_servers(
    service: Any, worker: WorkerSpec | None = None, link: SupervisorLink | None = None
) -> list[Any]:
    """The public receiver and (unless [admin] enabled = false) the admin listener; for a
    worker of `serve --workers`, on the supervisor's sockets, with its `link` to it."""
    from receiver.runtime.runner import HttpServer
    from receiver.sources.http_auth import open_to_anyone_warning

    warning = open_to_anyone_warning(service.config.http)
    if warning and (worker is None or worker.index == 0):
        click.echo(warning, err=True)
        logger.warning("no sender authentication", advice=warning)
    with listen_errors():
        if worker is None or link is None:
            public = HttpServer.public(service, _announce(service.config))
            return [public, *_admin_server(service)]
        public = HttpServer.public(service, link.listening, worker.public_socket())
    admin = _admin_server(service, worker.admin_socket()) if worker.admin_fd is not None else []
    return [public, *admin, link]


def _admin_server(service: Any, sock: Any = None) -> list[Any]:
    from receiver.runtime.runner import HttpServer

    if not service.config.admin.enabled:
        return []

    def announce(host: str, port: int) -> None:
        routes = "/metrics, /readyz"
        if service.config.admin.inspector:
            routes += ", /api, the inspector at /inspector"
        click.echo(f"admin listener on http://{host}:{port} ({routes})", err=True)

    with listen_errors():
        return [HttpServer.admin(service, announce, sock)]


@contextlib.contextmanager
def listen_errors() -> Iterator[None]:
    """A port that cannot be had ends the command with the reason and what to change."""
    from receiver.sources.listen import CannotListen

    try:
        yield
    except CannotListen as exc:
        raise click.ClickException(str(exc)) from None


def start_logging(config: Config, worker: WorkerSpec | None = None) -> None:
    """Configure the log, and say there what in the config is likely a mistake (a worker
    of `serve --workers` names itself in every line; worker 0 alone warns)."""
    fields = {} if worker is None else {"worker": worker.index}
    configure_logging(config.log.level, config.log.format, config.log.timezone, fields)
    if worker is None or worker.index == 0:
        log_warnings(config)


def _announce(config: Config) -> Callable[[str, int], None]:
    def announce(bound_host: str, bound_port: int) -> None:
        path = "/callbacks/<token>" if config.http.tokens else "/callbacks"
        public = "<this host's public address>" if bound_host in ("0.0.0.0", "::") else bound_host
        click.echo(f"ci-receiver listening on http://{bound_host}:{bound_port}", err=True)
        click.echo(f"CallBack URL for CI: http://{public}:{bound_port}{path}", err=True)
        click.echo("  (CI calls back over the internet: it refuses private addresses)", err=True)

    return announce


def _consumers(config: Config, service: Any) -> list[Any]:
    """The consumers of the configured sections: [cmq], [tdmq] (Pulsar), or both."""
    tdmq = config.tdmq
    wanted = {
        "cmq": config.cmq.configured,
        "tdmq": bool(tdmq.service_url or tdmq.topics or tdmq.topic_pattern),
    }
    if not any(wanted.values()):
        raise click.ClickException(
            "config: nothing to consume: set [cmq] region (or endpoint), secret_id,"
            " secret_key and queues for the TDMQ for CMQ queues CI delivers to, and/or"
            " [tdmq] service_url and topics for TDMQ for Pulsar"
        )
    consumers = []
    if wanted["cmq"]:
        consumers.append(_cmq_consumer(config, service))
    if wanted["tdmq"]:
        consumers.append(_tdmq_consumer(config, service))
    return consumers


def _cmq_consumer(config: Config, service: Any) -> Any:
    from receiver.sources.cmq import CmqConsumer

    missing = config.cmq.missing_for_consumer()
    if missing:
        raise click.ClickException(f"config: set {' and '.join(missing)} to consume from CMQ")
    consumer = CmqConsumer(config.cmq, service.ingestor, service.metrics)
    service.add_check("cmq", consumer.check)
    click.echo(f"consuming CMQ queues {consumer.where}", err=True)
    return consumer


def _tdmq_consumer(config: Config, service: Any) -> Any:
    from receiver.sources.tdmq import TdmqConsumer

    missing = config.tdmq.missing_for_consumer()
    if missing:
        raise click.ClickException(f"config: set {' and '.join(missing)} to consume from TDMQ")
    consumer = TdmqConsumer(config.tdmq, service.ingestor, service.metrics)
    service.add_check("tdmq", consumer.check)
    click.echo(f"consuming {consumer.where} from {mask_url(config.tdmq.service_url)}", err=True)
    return consumer


def _reconciler(config: Config, service: Any, worker: WorkerSpec | None = None) -> list[Any]:
    """The reconciler, when [ci] watches buckets (in worker 0 alone of `serve --workers`);
    CI refusing the credentials ends the command before it serves."""
    if not config.ci.enabled or (worker is not None and worker.index != 0):
        return []
    from receiver.ci.api import CiApiError
    from receiver.sources.reconcile import reconciler_for

    try:
        reconciler = reconciler_for(config, service)
    except CiApiError as exc:
        raise click.ClickException(f"[ci]: {exc}") from None
    click.echo(f"reconciling {len(config.ci.buckets)} bucket(s) with CI's job API", err=True)
    return [reconciler]


def _relay_service(config: Config) -> Any:
    from receiver.sources.tdmq import RelayService

    if not config.tdmq.service_url:
        raise click.ClickException("config: relay.topic is set: set tdmq.service_url too")
    click.echo(f"relaying callbacks to {config.relay.topic}", err=True)
    return RelayService(config)
