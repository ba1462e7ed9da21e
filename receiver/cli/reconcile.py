"""`reconcile`: one pass of the reconciler, by hand, with a progress bar."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from receiver.cli.common import config_option, inbox_errors, load, make_service, run_async
from receiver.config import parse_duration

if TYPE_CHECKING:  # imported when the command runs: the CLI starts without them
    from receiver.sources.reconcile import Found, Report, Watch


@click.command()
@config_option
@click.option("--since", help="Look back this far (24h, 90m, 7d) instead of from the cursors.")
@click.option("--bucket", help="Only this bucket (one of [ci] buckets).")
@click.option("--dry-run", is_flag=True, help="Show what is missing; store nothing.")
@click.option(
    "--settle",
    help="Leave jobs that ended less than this long ago to a later pass (default: [ci]"
    " settle); 0 takes them now.",
)
def reconcile(
    config_path: Path | None,
    since: str | None,
    bucket: str | None,
    dry_run: bool,
    settle: str | None,
) -> None:
    """Find finished jobs whose callback never came, and store them.

    Asks CI's job API what finished in each watched bucket ([ci]) and stores every job
    the inbox lacks as if its callback had come; a running receiver then runs its
    handlers. Without --since a pass starts from where the last one ended, as the
    receiver's own passes do, and moves their cursors on; --since and --dry-run move
    none. A job that ended less than [ci] settle (or --settle) ago is shown as settling
    and left to a later pass: its callback may still be on its way.
    """
    from receiver.ci.api import CiApiError
    from receiver.sources.reconcile import Reconciler, watches

    config = load(config_path)
    if not config.ci.enabled:
        nothing = config.located("[ci] watches no buckets (see [[ci.buckets]])")
        raise click.ClickException(f"config: {nothing}")
    names = [b.name for b in config.ci.buckets]
    if bucket is not None and bucket not in names:
        raise click.ClickException(f"{bucket} is not in [ci] buckets ({', '.join(names)})")
    look_back = _duration(since, "--since")
    settle_for = _duration(settle, "--settle")
    service = make_service(config)
    todo = watches(config.ci, bucket)

    async def run() -> Report:
        api = service.ci_api
        assert api is not None  # [ci] names buckets: checked above
        await api.check()
        await service.inbox.open()
        try:
            reconciler = Reconciler(
                config.ci, api, service.inbox, service.ingestor,
                events_kept=config.retention.events,
            )  # fmt: skip
            with click.progressbar(
                length=len(todo), label="reconciling", file=sys.stderr,
                item_show_func=_shown,
            ) as bar:  # fmt: skip

                def advance(watch: Watch, _: Report) -> None:
                    bar.update(1, watch)

                return await reconciler.reconcile(
                    since=look_back,
                    bucket=bucket,
                    dry_run=dry_run,
                    settle=settle_for,
                    on_watch=advance,
                )
        finally:
            await service.inbox.close()

    try:
        with inbox_errors():
            report = run_async(run())
    except CiApiError as exc:
        raise click.ClickException(f"[ci]: {exc}") from None
    for found in report.found:
        what = "recovered" if found.recovered else ("missing" if dry_run else "stored already")
        _echo(what, found)
    for found in report.settling:
        _echo("settling", found)
    for watch, error in report.failed.items():
        click.echo(f"failed  {watch}: {error}", err=True)
    summary = f"{report.checked} finished checked, {len(report.found)} missing"
    summary += " (dry run: nothing stored)" if dry_run else f", {len(report.recovered)} recovered"
    if report.settling:
        summary += f"; {len(report.settling)} ended too recently, left to a later pass"
    click.echo(summary)
    if report.failed:
        sys.exit(1)


def _shown(watch: Watch | None) -> str | None:
    """The watch being listed, beside the progress bar."""
    return str(watch) if watch else None


def _duration(value: str | None, option: str) -> timedelta | None:
    try:
        return timedelta(seconds=parse_duration(value)) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _echo(what: str, found: Found) -> None:
    event = found.event
    key = event.input.key if event.input else ""
    click.echo(f"{what}  {event.id}  {event.tag or event.kind}  {found.watch.bucket}  {key}")
