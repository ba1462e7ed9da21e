"""`serve`, `consume` and `run`: the long-running commands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import structlog

from receiver.cli.common import config_option, listen_options, load, make_service, run_async
from receiver.config import Config, mask_url
from receiver.logs import configure_logging

logger = structlog.get_logger("ci_receiver.cli")


@click.command()
@config_option
@listen_options
def serve(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Run the HTTP receiver and the dispatcher (or, with [relay] topic, only relay)."""
    from receiver.runner import run_service

    config = load(config_path, host=host, port=port)
    configure_logging(config.log.level, config.log.format)
    if not config.relay.topic:
        service = make_service(config)
        sys.exit(run_async(run_service(service, _http_servers(service))))
    from receiver.sources.tdmq import TdmqError

    relay = _relay_service(config)
    try:
        sys.exit(run_async(run_service(relay, _http_servers(relay))))
    except TdmqError as exc:  # the topic cannot be reached at start
        raise click.ClickException(str(exc)) from None


@click.command()
@config_option
def consume(config_path: Path | None) -> None:
    """Consume callbacks from TDMQ topics ([tdmq]) and run the dispatcher."""
    from receiver.runner import run_service

    config = load(config_path)
    configure_logging(config.log.level, config.log.format)
    service = make_service(config)
    consumer = _consumer(config, service)
    sys.exit(run_async(run_service(service, [consumer, *_admin_server(service)])))


@click.command("run")
@config_option
@listen_options
def run_all(config_path: Path | None, host: str | None, port: int | None) -> None:
    """HTTP receiver, TDMQ consumer and dispatcher in one process."""
    from receiver.runner import run_service

    config = load(config_path, host=host, port=port)
    configure_logging(config.log.level, config.log.format)
    if config.relay.topic:
        click.echo("run stores HTTP callbacks itself: [relay] applies to serve only", err=True)
    service = make_service(config)
    consumer = _consumer(config, service)
    sys.exit(run_async(run_service(service, [*_http_servers(service), consumer])))


def _http_servers(service: Any) -> list[Any]:
    """The public receiver and (unless [admin] enabled = false) the admin listener."""
    from receiver.runner import HttpServer
    from receiver.sources.http_auth import open_to_anyone_warning

    warning = open_to_anyone_warning(service.config.http)
    if warning:
        click.echo(warning, err=True)
        logger.warning("no sender authentication", advice=warning)
    return [HttpServer.public(service, _announce(service.config)), *_admin_server(service)]


def _admin_server(service: Any) -> list[Any]:
    from receiver.runner import HttpServer

    if not service.config.admin.enabled:
        return []

    def announce(host: str, port: int) -> None:
        click.echo(f"admin listener on http://{host}:{port} (/metrics, /readyz)", err=True)

    return [HttpServer.admin(service, announce)]


def _announce(config: Config) -> Callable[[str, int], None]:
    def announce(bound_host: str, bound_port: int) -> None:
        path = "/callbacks/<token>" if config.http.tokens else "/callbacks"
        public = "<this host's public address>" if bound_host in ("0.0.0.0", "::") else bound_host
        click.echo(f"ci-receiver listening on http://{bound_host}:{bound_port}", err=True)
        click.echo(f"CallBack URL for CI: http://{public}:{bound_port}{path}", err=True)
        click.echo("  (CI calls back over the internet: it refuses private addresses)", err=True)

    return announce


def _consumer(config: Config, service: Any) -> Any:
    from receiver.sources.tdmq import TdmqConsumer

    missing = config.tdmq.missing_for_consumer()
    if missing:
        raise click.ClickException(f"config: set {' and '.join(missing)} to consume from TDMQ")
    consumer = TdmqConsumer(config.tdmq, service.ingestor, service.metrics)
    service.add_check("tdmq", consumer.check)
    click.echo(f"consuming {consumer.where} from {mask_url(config.tdmq.service_url)}", err=True)
    return consumer


def _relay_service(config: Config) -> Any:
    from receiver.sources.tdmq import RelayService

    if not config.tdmq.service_url:
        raise click.ClickException("config: relay.topic is set: set tdmq.service_url too")
    click.echo(f"relaying callbacks to {config.relay.topic}", err=True)
    return RelayService(config)
