"""`events list / show / rejected`: what the inbox holds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson

from receiver.cli.common import config_option, with_inbox
from receiver.inbox import RUN_STATUSES, EventFilter


@click.group()
def events() -> None:
    """Look at stored events and rejected callbacks."""


@events.command("list")
@config_option
@click.option("--kind", type=click.Choice(["job", "workflow", "moderation"]))
@click.option("--tag", help="Job tag, e.g. SmartCover.")
@click.option("--state", help="Job state, e.g. Failed.")
@click.option("--job", "job_id", help="A JobId.")
@click.option(
    "--status",
    type=click.Choice(list(RUN_STATUSES)),
    help="Events with a run in this status (held: waiting for verification; forged: the"
    " verification contradicted it).",
)
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_events(config_path: Path | None, as_json: bool, limit: int, **filters: Any) -> None:
    """The latest events, newest first, with each handler's status."""
    found = with_inbox(config_path, lambda inbox: inbox.events(EventFilter(**filters), limit=limit))
    for summary in found:
        runs = {
            r.handler: {"status": r.status, "attempts": r.attempts, "error": r.last_error}
            for r in summary.runs
        }
        if as_json:
            row = {
                "id": summary.id,
                "received_at": summary.received_at.isoformat(),
                "kind": summary.kind,
                "event_name": summary.event_name,
                "tag": summary.tag,
                "state": summary.state,
                "job_id": summary.job_id,
                "handlers": runs,
            }
            click.echo(orjson.dumps(row).decode())
        else:
            handlers = (
                " ".join(f"{name}={run['status']}" for name, run in runs.items()) or "(no route)"
            )
            what = summary.tag or summary.event_name
            when = f"{summary.received_at:%Y-%m-%d %H:%M:%S}"
            click.echo(f"{when}  {summary.id}  {what}  {summary.state}  {handlers}")


@events.command("show")
@config_option
@click.argument("event_id")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
def show_event(config_path: Path | None, event_id: str, as_json: bool) -> None:
    """One event, its handler runs and every attempt."""
    detail = with_inbox(config_path, lambda inbox: inbox.event(event_id))
    if detail is None:
        raise click.ClickException(f"no event {event_id!r}")
    record = {
        "event": detail.event.to_dict(include_raw=as_json),
        "receipt_id": detail.receipt_id,
        "request_id": detail.request_id,
        "runs": [
            {"handler": r.handler, "status": r.status, "attempts": r.attempts,
             "due_at": r.due_at.isoformat() if r.due_at else None, "error": r.last_error}
            for r in detail.runs
        ],
        "attempts": [
            {"handler": a.handler, "number": a.number, "outcome": a.outcome,
             "started_at": a.started_at.isoformat(), "finished_at": a.finished_at.isoformat(),
             "error": a.error}
            for a in detail.attempts
        ],
    }  # fmt: skip
    click.echo(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode())


@events.command("rejected")
@config_option
@click.option("--limit", default=20, show_default=True)
@click.option("--body", "receipt_id", type=int, help="Print the kept body of this receipt.")
def rejected(config_path: Path | None, limit: int, receipt_id: int | None) -> None:
    """Callbacks that could not be decoded, with why; `--body N` prints one's bytes."""
    if receipt_id is not None:
        found = with_inbox(config_path, lambda inbox: inbox.receipt(receipt_id))
        if found is None:
            raise click.ClickException(f"no receipt {receipt_id}")
        sys.stdout.buffer.write(found.body)
        return
    receipts = with_inbox(
        config_path, lambda inbox: inbox.receipts(limit=limit, outcome="rejected")
    )
    for r in receipts:
        when = f"{r.received_at:%Y-%m-%d %H:%M:%S}"
        click.echo(
            f"#{r.id}  {when}  {r.source}  {r.size} bytes  {r.error_reason}: {r.error_detail}"
        )
