"""`replay`: run handlers again on stored events, or decode a stored callback again."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from receiver.cli.common import (
    config_option,
    event_filter,
    filter_options,
    inbox_errors,
    load,
    make_service,
    with_writable_inbox,
)
from receiver.config import Config
from receiver.inbox import EventFilter, Inbox, Stored

if TYPE_CHECKING:  # imported when the command runs
    from receiver.upkeep.presence import Process


@click.command()
@config_option
@click.argument("event_ids", nargs=-1)
@click.option("--all", "all_events", is_flag=True, help="Every stored event.")
@filter_options
@click.option("--dead", "dead_only", is_flag=True, help="Only dead-lettered runs.")
@click.option(
    "--handler", "handler_names", multiple=True, help="Runs of this handler (created if missing)."
)
@click.option(
    "--ignore-routes", is_flag=True, help="Create runs even for events the routes do not send."
)
@click.option("--dry-run", is_flag=True, help="Say what would be queued; change nothing.")
@click.option(
    "--receipt",
    "receipt_id",
    type=int,
    help="Decode a stored callback again (e.g. after an upgrade).",
)
def replay(
    config_path: Path | None,
    event_ids: tuple[str, ...],
    all_events: bool,
    dead_only: bool,
    handler_names: tuple[str, ...],
    ignore_routes: bool,
    dry_run: bool,
    receipt_id: int | None,
    **filters: Any,
) -> None:
    """Run handlers again: dead letters, chosen events, or a stored callback.

    \b
      ci-receiver replay --dead                     every dead-lettered run
      ci-receiver replay --dead --handler db        dead runs of one handler
      ci-receiver replay job:j68...:Success         every run of one event
      ci-receiver replay --tag Transcode --since 24h --handler db --dry-run
      ci-receiver replay --all --handler db         a new handler over all history
      ci-receiver replay --receipt 42               decode callback #42 again

    Named handlers get runs only for events the routes send them (--ignore-routes
    for all). A running receiver picks the runs up at once (PostgreSQL) or within its
    poll interval (SQLite).
    """
    config = load(config_path)
    if receipt_id is not None:
        _replay_receipt(config, receipt_id)
        return
    matching = event_filter(**filters)
    if not (event_ids or all_events or dead_only or matching != EventFilter()):
        raise click.UsageError(
            "say what to replay: EVENT_IDS, a filter (--tag, --since, ...), --dead, --all"
            " or --receipt"
        )
    if all_events and not (handler_names or dead_only):
        raise click.UsageError(
            "--all runs handlers over every stored event: name them with --handler"
        )
    unknown = [name for name in handler_names if name not in config.handlers]
    if unknown:
        raise click.ClickException(f"handler(s) not configured: {', '.join(unknown)}")
    if dead_only:
        matching.status = "dead"

    async def run(inbox: Inbox) -> None:
        from receiver.dispatch.replay import chosen, replay
        from receiver.ingest.routing import Router
        from receiver.upkeep.presence import runnable, running

        events = await chosen(inbox, list(event_ids), matching)
        if not events.count:
            click.echo("no event matches: nothing to replay", err=True)
            return
        processes = await running(inbox)
        with click.progressbar(
            length=events.count, label="replaying", file=sys.stderr, show_pos=True
        ) as bar:
            done = await replay(
                inbox,
                Router(config.routes, list(config.handlers)),
                events,
                handlers=list(handler_names),
                runnable=runnable(processes, config.handlers),
                dead_only=dead_only,
                ignore_routes=ignore_routes,
                dry_run=dry_run,
                release=bool(event_ids),  # named ones run whatever verification said
                progress=bar.update,
            )
        verb = "would be queued" if dry_run else "queued again"
        click.echo(f"{done.runs} run(s) {verb}, of {done.events} event(s)")
        for handler, count in done.unrouted.items():
            if count:
                click.echo(
                    f"{count} event(s) not sent to {handler} by the routes: left alone"
                    " (--ignore-routes to run them anyway)",
                    err=True,
                )
        for handler, count in sorted(done.unrun.items()):
            click.echo(
                f"{count} run(s) of {handler} left as they are: no receiver runs that handler"
                " (not in this config, nor in a running receiver's)",
                err=True,
            )
        if done.runs and not dry_run:
            _warn_if_nobody_runs(processes, list(handler_names))

    with_writable_inbox(config, run)


def _warn_if_nobody_runs(processes: list[Process], handlers: list[str]) -> None:
    """Runs only run where a receiver has their handler: say so when none has."""
    if not processes:
        click.echo(
            "no receiver is running on this inbox now: the runs wait until one starts",
            err=True,
        )
        return
    for handler in handlers:
        if not any(handler in process.handlers for process in processes):
            click.echo(
                f"no running receiver has handler {handler!r} (they run an older config):"
                " its runs wait until one does; send them SIGHUP (`systemctl reload"
                " ci-receiver`, `kill -HUP <pid>`) to load the new handlers and routes, or"
                " restart them",
                err=True,
            )


def _replay_receipt(config: Config, receipt_id: int) -> None:
    from receiver.ingest.again import NotDecodedAgain, decode_again

    service = make_service(config)

    async def run() -> Stored:
        await service.inbox.open()
        try:
            return await decode_again(service.inbox, service.ingestor, receipt_id)
        finally:
            await service.inbox.close()

    try:
        with inbox_errors():
            stored = asyncio.run(run())
    except NotDecodedAgain as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(stored.new)} new event(s), {len(stored.duplicates)} already stored")
