"""`inbox copy`: move an SQLite inbox into PostgreSQL, with a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from receiver.cli.common import config_option, inbox_errors, load, run_async
from receiver.masking import mask_url


@click.group()
def inbox() -> None:
    """Move the inbox to PostgreSQL."""


@inbox.command("copy")
@config_option
@click.option(
    "--to",
    "target",
    metavar="postgresql://...",
    help="The PostgreSQL database (default: the configured inbox.url).",
)
@click.option("--postgres-schema", help="Its schema (default: inbox.postgres_schema).")
@click.option("--batch", default=500, show_default=True, help="Receipts per transaction.")
def copy(
    config_path: Path | None, target: str | None, postgres_schema: str | None, batch: int
) -> None:
    """Copy the SQLite inbox (receipts, events, runs, attempts, state) into PostgreSQL.

    The SQLite file is the configured one (inbox.path, or inbox.db in data_dir) and is
    only read: a receiver may keep running on it. Copying again adds only what is new,
    so a copy cut short is run again, and a last copy after stopping the old receivers
    brings over what they did meanwhile. The tables are created when missing.
    """
    from receiver.inbox.copy import copy_inbox

    config = load(config_path)
    url = target or config.inbox.url
    if url is None:
        raise click.UsageError("name the PostgreSQL inbox: --to postgresql://... (or inbox.url)")
    if not url.startswith(("postgresql://", "postgres://")):
        raise click.BadParameter("a postgresql:// URL", param_hint="--to")
    schema = postgres_schema or config.inbox.postgres_schema
    source = config.inbox_path
    click.echo(f"copying {source} to {mask_url(url)} (schema {schema})", err=True)
    bar = click.progressbar(length=0, label="receipts", file=sys.stderr)

    def total(count: int) -> None:
        bar.length = count

    try:
        with bar, inbox_errors():
            report = run_async(
                copy_inbox(source, url, schema, batch=batch, on_total=total, on_batch=bar.update)
            )
    except FileNotFoundError as exc:  # no SQLite inbox to copy
        raise click.ClickException(str(exc)) from None
    for table, tally in report.tables.items():
        updated = f", {tally.updated} brought up to date" if table == "runs" else ""
        click.echo(f"{table:<9} {tally.copied} copied{updated}, {tally.present} already there")
