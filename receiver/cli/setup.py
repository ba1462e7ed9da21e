"""`check-config` and `send`: for setting a receiver up and trying it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import BinaryIO

import click
import orjson

from handlers import HandlerConfigError, shown_options
from receiver import rates, tracing
from receiver.cli.common import config_option, inbox_errors, load
from receiver.config import AdminConfig, Config, HttpConfig
from receiver.inbox.factory import probe
from receiver.masking import mask_credentials


@click.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the config and every handler's options; print the effective config."""
    from receiver.ingest.routing import warnings
    from receiver.runtime.service import build_slots

    config = load(config_path)
    try:
        slots = build_slots(config)
    except HandlerConfigError as exc:
        raise click.ClickException(f"config: {exc}") from None
    served = _tls_served(config)
    effective = config.effective()
    for slot in slots:
        # The handler's own view of its options: defaults filled in, SecretStr masked.
        shown = shown_options(slot.handler)
        entry = effective["handlers"][slot.name]
        if shown is not None:
            entry.update(mask_credentials(shown))
        # What dispatch will use: its limits (the type's default unless configured), the
        # batch keys only where the handler takes batches.
        entry["rate"] = [str(limit) for limit in slot.limits] or rates.OFF
        if slot.batch is None:
            del entry["batch_size"], entry["batch_wait"]
        else:
            entry["batch_size"], entry["batch_wait"] = slot.batch_size, slot.batch_wait
    click.echo(orjson.dumps(effective, option=orjson.OPT_INDENT_2).decode())
    for warning in warnings(config):
        click.echo(f"warning: {warning}", err=True)
    with inbox_errors():
        found = asyncio.run(probe(config))
    click.echo(f"inbox: {found}", err=True)
    click.echo(f"traces: {tracing.destination(config)}", err=True)
    for line in served:
        click.echo(f"tls: {line}", err=True)
    click.echo("config OK", err=True)


def _tls_served(config: Config) -> list[str]:
    """What each listener with TLS serves, its certificate and key read as at start; a
    pair that cannot be served ends the command with the reason."""
    from receiver.sources.tls import TlsCertificate, TlsError

    listeners: list[tuple[str, str, HttpConfig | AdminConfig]] = [("public", "http", config.http)]
    if config.admin.enabled:
        listeners.append(("admin", "admin", config.admin))
    served = []
    for name, section, keys in listeners:
        try:
            certificate = TlsCertificate.of(name, section, keys)
        except TlsError as exc:
            raise click.ClickException(f"config: {exc}") from None
        if certificate is not None:
            served.append(f"the {name} listener serves {certificate.files.cert} (https)")
    return served


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option("--url", default="http://127.0.0.1:8080/callbacks", show_default=True)
@click.option("--header", "-H", "headers", multiple=True, help="Extra header, 'Name: value'.")
def send(file: BinaryIO, url: str, headers: tuple[str, ...]) -> None:
    """POST a callback file to a receiver, as CI would (for testing a setup)."""
    import httpx

    extra = dict(_header(h) for h in headers)
    body = file.read()
    content_type = "application/json" if body.lstrip()[:1] in (b"{", b"[") else "application/xml"
    try:
        response = httpx.post(
            url, content=body, headers={"Content-Type": content_type, **extra}, timeout=30
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot POST to {url}: {exc}") from None
    click.echo(f"{response.status_code} {response.reason_phrase}", err=True)
    click.echo(response.text)
    if not response.is_success:
        sys.exit(1)


def _header(text: str) -> tuple[str, str]:
    name, separator, value = text.partition(":")
    if not separator:
        raise click.BadParameter(f"{text!r} is not 'Name: value'", param_hint="--header")
    return name.strip(), value.strip()


@click.command("new-handler")
@click.argument("name")
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The folder to write the package's folder in.",
)
def new_handler(name: str, into: Path) -> None:
    """Write a package of a handler of your own, NAME (`type = "NAME"` once installed):
    the handler with typed options, and tests on sample callbacks that pass as written."""
    from receiver.scaffold import Names, ScaffoldError, write

    try:
        root = write(name, into)
    except ScaffoldError as exc:
        raise click.ClickException(str(exc)) from None
    names = Names.of(name)
    click.echo(f"wrote {root}")
    click.echo(
        "\nnext:\n"
        f"  pip install -e '{root}[test]'   # where ci-receiver runs\n"
        f"  pytest {root}\n"
        f"  edit {root / names.module / '__init__.py'}\n"
        f'  and in the config: [handlers.{names.name}] type = "{names.name}"'
    )
