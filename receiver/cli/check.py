"""`check-config`: validate the config and every handler's options, and print it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
import orjson

from handlers import HandlerConfigError, shown_options
from receiver import rates, tracing
from receiver.cli.common import config_option, inbox_errors, load
from receiver.config import Config, HandlerConfig
from receiver.masking import mask_credentials, mask_url

# What an option of a handler whose options were not checked shows.
UNCHECKED = "********** (not checked: a variable is unset)"


@click.command("check-config")
@config_option
@click.option(
    "--all", "show_all", is_flag=True, help="Print every key, defaults too (not only those set)."
)
@click.option(
    "--no-connect",
    is_flag=True,
    help="Open nothing (the inbox) and reach nothing over the network; a ${VAR} that is"
    " not set is a warning, not an error.",
)
def check_config(config_path: Path | None, show_all: bool, no_connect: bool) -> None:
    """Validate the config and every handler's options; print the keys set (file and
    environment), secrets masked, and where the inbox is."""
    from receiver.ingest.routing import warnings

    # Without a connection no secret is used: every reference may be left unresolved.
    config = load(config_path, needs=() if no_connect else None)
    served = _tls_served(config)
    unchecked = {str(u.key[1]) for u in config.unset if u.key[0] == "handlers" and len(u.key) > 2}
    effective = _effective(config, unchecked)
    if not show_all:
        effective = _only_set(effective, config.model_dump(exclude_unset=True))
    click.echo(orjson.dumps(effective, option=orjson.OPT_INDENT_2).decode())
    for unset in config.unset:
        click.echo(f"warning: {unset} (the commands that run need it)", err=True)
    for name in sorted(unchecked):
        click.echo(f"warning: handlers.{name}: options not checked, a variable is unset", err=True)
    for warning in warnings(config):
        click.echo(f"warning: {warning}", err=True)
    if no_connect:
        where = config.inbox_path if config.inbox.url is None else mask_url(config.inbox.url)
        click.echo(f"inbox: {where} (not opened: --no-connect)", err=True)
    else:
        from receiver.inbox.factory import probe

        with inbox_errors():
            found = asyncio.run(probe(config))
        click.echo(f"inbox: {found}", err=True)
    click.echo(f"traces: {tracing.destination(config)}", err=True)
    for line in served:
        click.echo(f"tls: {line}", err=True)
    click.echo("config OK", err=True)


def _tls_served(config: Config) -> list[str]:
    """What each listener with TLS serves, its certificate and key read as at start; a
    pair that cannot be served ends the command with the reason. (With --no-connect, a
    listener whose files or password are a variable not set is left unread.)"""
    from receiver.sources.tls import LISTENERS, TlsCertificate, TlsError, listeners

    unset = {unset.key[:2] for unset in config.unset}
    served = []
    for section, keys in listeners(config):
        name = LISTENERS[section]
        if {(section, key) for key in ("tls_cert", "tls_key", "tls_key_password")} & unset:
            served.append(f"the {name} listener's certificate not read: a variable is unset")
            continue
        try:
            certificate = TlsCertificate.of(section, keys)
        except TlsError as exc:
            raise click.ClickException(f"config: {exc}") from None
        if certificate is not None:
            served.append(f"the {name} listener serves {certificate.files.cert} (https)")
    return served


def _effective(config: Config, unchecked: set[str]) -> dict[str, Any]:
    """`Config.effective`, each handler's entry as the handler will run: its own view of
    its options, its rate limits, its batches (none for `unchecked` handlers, which are
    shown as configured)."""
    from receiver.runtime.service import build_slots

    checked = {k: v for k, v in config.handlers.items() if k not in unchecked}
    try:
        slots = build_slots(config.model_copy(update={"handlers": checked}))
    except HandlerConfigError as exc:
        raise click.ClickException(f"config: {exc}") from None
    effective = config.effective()
    for name in unchecked:
        # The handler does not say which of its options are secret until it is made:
        # unmade, every one of its own options is hidden.
        entry = effective["handlers"][name]
        for option in set(entry) - set(HandlerConfig.model_fields):
            entry[option] = UNCHECKED
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
    return effective


def _only_set(effective: Any, given: Any) -> Any:
    """The parts of `effective` whose keys the file or the environment gave (`given`, in
    the same shape), as `effective` shows them: normalized, secrets masked."""
    if isinstance(effective, dict) and isinstance(given, dict):
        return {k: _only_set(v, given[k]) for k, v in effective.items() if k in given}
    if isinstance(effective, list) and isinstance(given, list) and len(effective) == len(given):
        return [_only_set(e, g) for e, g in zip(effective, given, strict=True)]
    return effective
