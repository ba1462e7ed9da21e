"""`stats`: what arrived lately, and what the handlers made of it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import click
import orjson

from receiver.cli.common import INBOX_ONLY, Moment, config_option, load, with_inbox
from receiver.inbox import Counts


@click.command()
@config_option
@click.option(
    "--since", type=Moment(), help="Since when: ISO 8601, or a duration back (default 24h)."
)
@click.option("--json", "as_json", is_flag=True, help="The counts as one JSON object.")
def stats(config_path: Path | None, since: datetime | None, as_json: bool) -> None:
    """Callbacks by outcome, events by tag, state and verdict, and handler runs by
    outcome."""
    start = since or datetime.now(timezone.utc) - timedelta(hours=24)
    config = load(config_path, INBOX_ONLY)
    counts: Counts = with_inbox(config, lambda inbox: inbox.counts(start))
    if as_json:
        record = {
            "since": start.isoformat(),
            "callbacks": counts.receipts,
            "tags": counts.tags,
            "states": counts.states,
            "verdicts": counts.verdicts,
            "handlers": counts.runs,
        }
        click.echo(orjson.dumps(record).decode())
        return
    click.echo(f"since {start:%Y-%m-%d %H:%M:%S %Z}")
    if not (counts.receipts or counts.runs):
        click.echo("nothing received")
        return
    _table("callbacks", counts.receipts)
    _table("events by tag", counts.tags)
    _table("events by state", counts.states)
    if counts.verdicts:
        _table("moderation events by verdict", counts.verdicts)
    for handler, by_status in sorted(counts.runs.items()):
        _table(f"handler {handler}", by_status)


def _table(title: str, counts: dict[str, int]) -> None:
    click.echo(f"\n{title}")
    width = max((len(name) for name in counts), default=0)
    for name, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        click.echo(f"  {name:<{width}}  {count:>8}")
