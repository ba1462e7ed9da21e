"""`events list / show / tail / rejected`: what the inbox holds, for people (or `--json`)."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any

import click
import orjson

from receiver.cli.common import (
    INBOX_ONLY,
    config_option,
    event_filter,
    filter_options,
    load,
    with_inbox,
)
from receiver.cli.views import event_lines, printable, summary_row
from receiver.config import Config
from receiver.inbox import RUN_STATUSES, EventDetail, EventSummary, ReadOnlyInbox
from receiver.inbox.as_json import detail_json, summary_json
from receiver.timezones import parse_timezone
from receiver.upkeep import presence

# How many of the newest events `tail` reads on each look.
TAIL_PAGE = 200


@click.group()
def events() -> None:
    """Look at stored events and rejected callbacks."""


def event_filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """What `list` and `tail` select on: the common filters, and a run status."""
    command = click.option(
        "--status",
        type=click.Choice(RUN_STATUSES),
        help="Events with a run in this status (held: waiting for verification; forged: the"
        " verification contradicted it).",
    )(command)
    return filter_options(command)


def _zone(config: Config) -> tzinfo:
    return parse_timezone(config.log.timezone)


@events.command("list")
@config_option
@event_filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_events(config_path: Path | None, as_json: bool, limit: int, **filters: Any) -> None:
    """The latest events, newest first, with each handler's status.

    TAG is the job's Tag: workflow and moderation events have none (-), and EVENT tells
    them apart (WorkflowFinish, ReviewVideo, ...). VERDICT is a moderation event's:
    normal, violation or suspected. The filters match as routes do, without regard to
    case; --tag takes an event name too.
    """
    config = load(config_path, INBOX_ONLY)
    zone = _zone(config)
    found = with_inbox(config, lambda inbox: inbox.events(event_filter(**filters), limit=limit))
    if not found:
        _say_none(filters)
        return
    if as_json:
        for summary in found:
            click.echo(orjson.dumps(summary_json(summary)).decode())
        return
    rows = [summary_row(summary, zone) for summary in found]
    header = ("RECEIVED", "ID", "EVENT", "TAG", "STATE", "VERDICT", "HANDLERS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo(_aligned(row, widths))


def _aligned(row: tuple[str, ...], widths: list[int]) -> str:
    cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
    return "  ".join([*cells, row[-1]]).rstrip()


def _say_none(filters: dict[str, Any]) -> None:
    chosen = " ".join(
        f"--{name.replace('_id', '').replace('_', '-')} {value}"
        for name, value in filters.items()
        if value
    )
    click.echo(f"no events{' match ' + chosen if chosen else ' stored yet'}", err=True)


@events.command("show")
@config_option
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON, callback too.")
def show_event(config_path: Path | None, event_id: str, as_json: bool) -> None:
    """One event, its handler runs and every attempt."""
    config = load(config_path, INBOX_ONLY)
    zone = _zone(config)

    async def read(inbox: ReadOnlyInbox) -> tuple[EventDetail | None, dict[str, str]]:
        detail = await inbox.event(event_id)
        return detail, {} if detail is None else await presence.names(inbox, detail.runs)

    detail, names = with_inbox(config, read)
    if detail is None:
        raise click.ClickException(f"no event {printable(event_id)!r}")
    if not as_json:
        for line in event_lines(detail, zone, names):
            click.echo(line)
        return
    record = detail_json(detail, names)
    click.echo(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())


@events.command("tail")
@config_option
@event_filters
@click.option("--lines", "-n", default=10, show_default=True, help="Events shown at first.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between looks.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail(
    config_path: Path | None, lines: int, interval: float, as_json: bool, **filters: Any
) -> None:
    """Follow events as they are stored, until Ctrl-C or SIGTERM.

    Each event shows once, when it is stored, with its handlers' status then. Works
    while a receiver runs on the same data folder.
    """
    config = load(config_path, INBOX_ONLY)
    zone = _zone(config)

    def show(summary: EventSummary) -> None:
        if as_json:
            click.echo(orjson.dumps(summary_json(summary)).decode())
        else:
            click.echo("  ".join(summary_row(summary, zone)))

    async def follow(inbox: ReadOnlyInbox) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        found = await inbox.events(event_filter(**filters), limit=TAIL_PAGE)
        for summary in reversed(found[:lines]):
            show(summary)
        seen = {summary.id for summary in found}
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
                break
            except TimeoutError:
                pass
            found = await inbox.events(event_filter(**filters), limit=TAIL_PAGE)
            new = [summary for summary in found if summary.id not in seen]
            if seen and len(new) == TAIL_PAGE:
                click.echo(
                    f"(more than {TAIL_PAGE} events since the last look: older ones left out)",
                    err=True,
                )
            for summary in reversed(new):
                show(summary)
            # The newest page is enough: an event once out of it never comes back to it.
            seen = {summary.id for summary in found}

    with_inbox(config, follow)


def _safe_on_a_terminal(body: bytes) -> bool:
    """Whether the body is text a terminal only shows: a sender's bytes may hold escape
    sequences (a refused body is anybody's)."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return False
    lines = text.replace("\r\n", "\n").replace("\t", " ").split("\n")
    return all(printable(line) == line for line in lines)


@events.command("rejected")
@config_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--body", "receipt_id", type=int, help="Print the kept body of this receipt.")
def rejected(config_path: Path | None, limit: int, receipt_id: int | None) -> None:
    """Callbacks that could not be decoded, with why; `--body N` prints one's bytes."""
    config = load(config_path, INBOX_ONLY)
    if receipt_id is not None:
        found = with_inbox(config, lambda inbox: inbox.receipt(receipt_id))
        if found is None:
            raise click.ClickException(f"no receipt {receipt_id}")
        if sys.stdout.isatty() and not _safe_on_a_terminal(found.body):
            raise click.ClickException(
                f"receipt {receipt_id}'s body holds control characters or bytes that are not"
                " UTF-8, which a terminal would act on: send it to a file (> body.bin)"
            )
        sys.stdout.buffer.write(found.body)
        return
    zone = _zone(config)
    receipts = with_inbox(config, lambda inbox: inbox.receipts(limit=limit, outcome="rejected"))
    if not receipts:
        click.echo("no rejected callbacks", err=True)
    for r in receipts:
        when = f"{r.received_at.astimezone(zone):%Y-%m-%d %H:%M:%S}"
        detail = printable(f"{r.error_reason}: {r.error_detail}")
        click.echo(f"#{r.id}  {when}  {r.source}  {r.size} bytes  {detail}")
