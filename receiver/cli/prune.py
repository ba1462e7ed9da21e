"""`prune`: apply retention now, by hand."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from receiver.cli.common import config_option, load, with_inbox, with_writable_inbox
from receiver.inbox import Inbox, Pruned, Reading


@click.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
def prune(config_path: Path | None, dry_run: bool) -> None:
    """Remove what [retention] allows now: handled events older than `events`, bodies
    older than `bodies`, refused callbacks older than `refused`. Pending, held and
    dead-lettered work is never removed. Safe while receivers run."""
    from receiver.upkeep.retention import Pruner, retention_cutoffs

    config = load(config_path)

    async def plan(inbox: Reading) -> Pruned:
        return await inbox.prunable(retention_cutoffs(config.retention, datetime.now(timezone.utc)))

    async def run(inbox: Inbox) -> Pruned:
        pruner = Pruner(inbox, config.retention)
        planned = await plan(inbox)
        if not planned:
            return planned
        rows = planned.events + planned.receipts + planned.bodies
        with click.progressbar(length=rows, label="pruning", file=sys.stderr) as bar:
            return await pruner.prune(
                progress=lambda batch: bar.update(batch.events + batch.receipts + batch.bodies)
            )

    # A dry run only reads: the inbox is opened read-only.
    found = with_inbox(config, plan) if dry_run else with_writable_inbox(config, run)
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {found.events} event(s), {found.receipts} receipt(s) and {found.bodies}"
        f" body(ies) of receipts that stay: {_size(found.bytes)}"
    )


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
