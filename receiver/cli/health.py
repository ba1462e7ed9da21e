"""`health`: whether the receiver a config describes answers, asked where that config
says it listens: the container image's HEALTHCHECK, or anyone by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from receiver.cli.common import config_option
from receiver.config import ConfigError, load_config
from receiver.sources.addresses import local_base

# The keys that say where the receiver listens: a `${VAR}` in them must be set.
WHERE = {(section, key) for section in ("http", "admin") for key in ("host", "port", "tls_cert")}


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
    for unset in config.unset:
        if unset.key[:2] in WHERE:
            _unhealthy(f"config: {unset}")
    listener = config.admin if admin else config.http
    if admin and not config.admin.enabled:
        _unhealthy("[admin] enabled = false: there is no admin listener to ask")
    if listener.port == 0:
        _unhealthy("the port is 0 (any free one): set the port the receiver listens on")
    url = local_base(listener) + "/healthz"
    try:
        # No proxy from the environment: the receiver is on this host, and asked by the
        # loopback, which its certificate does not name (whether it answers is asked,
        # not its TLS).
        response = httpx.get(url, timeout=timeout, trust_env=False, verify=False)
    except httpx.TimeoutException:
        _unhealthy(f"{url}: no answer in {timeout:g} s")
    except httpx.HTTPError as exc:
        _unhealthy(f"{url}: {exc or type(exc).__name__}")
    if response.status_code != 200:
        _unhealthy(f"{url} answered {response.status_code} {response.reason_phrase}")
    click.echo(f"healthy: {url} answered 200")


def _unhealthy(why: str) -> NoReturn:
    click.echo(f"unhealthy: {why}", err=True)
    sys.exit(1)
