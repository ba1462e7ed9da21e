"""`health`: whether the receiver a config describes answers, asked where that config
says it listens: the container image's HEALTHCHECK, or anyone by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from receiver.cli.common import config_option
from receiver.config import ConfigError, load_config

# A listener on every address is asked on the loopback of its family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@click.command()
@config_option
@click.option(
    "--admin",
    is_flag=True,
    help="Ask the admin listener ([admin] host and port): what `consume` serves.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    help="Seconds to wait for the answer.",
)
def health(config_path: Path | None, admin: bool, timeout: float) -> None:
    """GET /healthz where the config (read as `serve` reads it) says the receiver listens:
    [http] host and port, or with --admin the admin listener's. Exit 0 when it answers
    200, else 1; one line says which."""
    import httpx

    try:
        # No secret is used: a check run without them (the database password, the
        # tokens) still finds the port.
        config = load_config(config_path, needs=())
    except ConfigError as exc:
        _unhealthy(f"config: {exc}")
    listener = config.admin if admin else config.http
    if admin and not config.admin.enabled:
        _unhealthy("[admin] enabled = false: there is no admin listener to ask")
    if listener.port == 0:
        _unhealthy("the port is 0 (any free one): set the port the receiver listens on")
    url = f"http://{address(listener.host, listener.port)}/healthz"
    try:
        # No proxy from the environment: the receiver is on this host.
        response = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.TimeoutException:
        _unhealthy(f"{url}: no answer in {timeout:g} s")
    except httpx.HTTPError as exc:
        _unhealthy(f"{url}: {exc or type(exc).__name__}")
    if response.status_code != 200:
        _unhealthy(f"{url} answered {response.status_code} {response.reason_phrase}")
    click.echo(f"healthy: {url} answered 200")


def address(host: str, port: int) -> str:
    """host:port to connect to for a listener on `host` (brackets around IPv6)."""
    host = LOOPBACK.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _unhealthy(why: str) -> NoReturn:
    click.echo(f"unhealthy: {why}", err=True)
    sys.exit(1)
