"""`replay`: run handlers again on stored events, or decode a stored callback again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from receiver.cli.common import config_option, load, make_service, with_inbox
from receiver.config import Config


@click.command()
@config_option
@click.argument("event_ids", nargs=-1)
@click.option("--dead", "dead_only", is_flag=True, help="Only dead-lettered runs.")
@click.option(
    "--handler", "handler_names", multiple=True, help="Only (or also: new) runs of this handler."
)
@click.option(
    "--all", "all_events", is_flag=True, help="Every stored event (needs --handler: a backfill)."
)
@click.option(
    "--receipt",
    "receipt_id",
    type=int,
    help="Decode a stored callback again (e.g. after an upgrade).",
)
def replay(
    config_path: Path | None,
    event_ids: tuple[str, ...],
    dead_only: bool,
    handler_names: tuple[str, ...],
    all_events: bool,
    receipt_id: int | None,
) -> None:
    """Run handlers again: dead letters, chosen events, or a stored callback.

    \b
      ci-receiver replay --dead                 every dead-lettered run
      ci-receiver replay --dead --handler db    dead runs of one handler
      ci-receiver replay job:j68...:Success     every run of one event
      ci-receiver replay --all --handler db     run a new handler over all history
      ci-receiver replay --receipt 42           decode callback #42 again

    A running receiver picks the runs up within its poll interval.
    """
    config = load(config_path)
    if receipt_id is not None:
        _replay_receipt(config, receipt_id)
        return
    if not (event_ids or dead_only or all_events):
        raise click.UsageError("say what to replay: EVENT_IDS, --dead, --all or --receipt")
    if all_events and not handler_names:
        raise click.UsageError(
            "--all runs handlers over every stored event: name them with --handler"
        )
    unknown = [name for name in handler_names if name not in config.handlers]
    if unknown:
        raise click.ClickException(f"handler(s) not configured: {', '.join(unknown)}")
    count = with_inbox(
        config_path,
        lambda inbox: inbox.requeue(
            list(event_ids) or None, list(handler_names) or None, dead_only=dead_only
        ),
        read_only=False,
    )
    click.echo(f"{count} run(s) queued again")


def _replay_receipt(config: Config, receipt_id: int) -> None:
    from receiver.payload import PayloadError

    service = make_service(config)

    async def run() -> Any:
        await service.inbox.open()
        try:
            receipt = await service.inbox.receipt(receipt_id)
            if receipt is None:
                raise click.ClickException(f"no receipt {receipt_id}")
            if receipt.cut_from is not None:
                raise click.ClickException(
                    f"receipt {receipt_id} was refused at {receipt.cut_from} bytes and only its"
                    f" first {len(receipt.body)} were kept: it cannot be decoded again"
                )
            receipt.source_meta = {
                **receipt.source_meta,
                "replayed_receipt": receipt_id,
                "replayed_source": receipt.source,
            }
            receipt.source = "replay"
            return await service.ingestor.ingest(receipt)
        finally:
            await service.inbox.close()

    try:
        stored = asyncio.run(run())
    except PayloadError as exc:
        raise click.ClickException(
            f"receipt {receipt_id} still cannot be decoded: {exc.reason}: {exc.message}"
        ) from None
    click.echo(f"{len(stored.new)} new event(s), {len(stored.duplicates)} already stored")
