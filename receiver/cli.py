"""The `ci-receiver` command."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from handlers import HandlerConfigError, shown_options
from receiver.config import Config, ConfigError, load_config
from receiver.logs import configure_logging

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CI_RECEIVER_CONFIG",
    help="TOML config file (default: $CI_RECEIVER_CONFIG, or the embedded default).",
)


def listen_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--host and --port, for the commands that serve HTTP."""
    command = click.option("--port", type=int, help="Port to listen on (default 8080).")(command)
    return click.option("--host", help="Address to listen on (default 0.0.0.0).")(command)


def _load(config_path: Path | None, **overrides: Any) -> Config:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(f"config: {exc}") from None
    http = {k: v for k, v in overrides.items() if v is not None}
    if http:
        config = config.model_copy(update={"http": config.http.model_copy(update=http)})
    return config


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover (not on Windows)
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ci-receiver")
def main() -> None:
    """Receive Tencent Cloud Infinite (CI) job callbacks, keep them, and act on them."""


@main.command()
@config_option
@listen_options
def serve(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Run the HTTP receiver and the dispatcher (or, with [relay] topic, only relay)."""
    from receiver.runner import HttpServer, run_service

    config = _load(config_path, host=host, port=port)
    configure_logging(config.log.level, config.log.format)
    if not config.relay.topic:
        service = _service(config)
        sys.exit(_run(run_service(service, [HttpServer(service, _announce(config))])))
    from receiver.tdmq import TdmqError

    relay = _relay_service(config)
    try:
        sys.exit(_run(run_service(relay, [HttpServer(relay, _announce(config))])))
    except TdmqError as exc:  # the topic cannot be reached at start
        raise click.ClickException(str(exc)) from None


@main.command()
@config_option
def consume(config_path: Path | None) -> None:
    """Consume callbacks from TDMQ topics ([tdmq]) and run the dispatcher."""
    from receiver.runner import run_service

    config = _load(config_path)
    configure_logging(config.log.level, config.log.format)
    service = _service(config)
    consumer = _consumer(config, service)
    sys.exit(_run(run_service(service, [consumer])))


@main.command("run")
@config_option
@listen_options
def run_all(config_path: Path | None, host: str | None, port: int | None) -> None:
    """HTTP receiver, TDMQ consumer and dispatcher in one process."""
    from receiver.runner import HttpServer, run_service

    config = _load(config_path, host=host, port=port)
    configure_logging(config.log.level, config.log.format)
    if config.relay.topic:
        click.echo("run stores HTTP callbacks itself: [relay] applies to serve only", err=True)
    service = _service(config)
    consumer = _consumer(config, service)
    components = [HttpServer(service, _announce(config)), consumer]
    sys.exit(_run(run_service(service, components)))


def _announce(config: Config) -> Callable[[str, int], None]:
    def announce(bound_host: str, bound_port: int) -> None:
        path = "/callbacks/<token>" if config.http.tokens else "/callbacks"
        public = "<this host's public address>" if bound_host in ("0.0.0.0", "::") else bound_host
        click.echo(f"ci-receiver listening on http://{bound_host}:{bound_port}", err=True)
        click.echo(f"CallBack URL for CI: http://{public}:{bound_port}{path}", err=True)
        click.echo("  (CI calls back over the internet: it refuses private addresses)", err=True)

    return announce


def _consumer(config: Config, service: Any) -> Any:
    from receiver.tdmq import TdmqConsumer

    missing = config.tdmq.missing_for_consumer()
    if missing:
        raise click.ClickException(f"config: set {' and '.join(missing)} to consume from TDMQ")
    consumer = TdmqConsumer(config.tdmq, service.ingestor, service.metrics)
    service.add_check("tdmq", consumer.check)
    click.echo(f"consuming {consumer.where} from {config.tdmq.service_url}", err=True)
    return consumer


def _relay_service(config: Config) -> Any:
    from receiver.tdmq import RelayService

    if not config.tdmq.service_url:
        raise click.ClickException("config: relay.topic is set: set tdmq.service_url too")
    click.echo(f"relaying callbacks to {config.relay.topic}", err=True)
    return RelayService(config)


def _service(config: Config) -> Any:
    from receiver.service import Service

    try:
        return Service(config)
    except HandlerConfigError as exc:
        raise click.ClickException(f"config: {exc}") from None


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the config and every handler's options; print the effective config."""
    from receiver.service import build_slots

    config = _load(config_path)
    try:
        slots = build_slots(config)
    except HandlerConfigError as exc:
        raise click.ClickException(f"config: {exc}") from None
    effective = config.effective()
    for slot in slots:
        # The handler's own view of its options: defaults filled in, SecretStr masked.
        shown = shown_options(slot.handler)
        if shown is not None:
            effective["handlers"][slot.name].update(shown)
    click.echo(orjson.dumps(effective, option=orjson.OPT_INDENT_2).decode())
    click.echo("config OK", err=True)


@main.command()
@click.argument("file", type=click.File("rb"))
@click.option("--url", default="http://127.0.0.1:8080/callbacks", show_default=True)
@click.option("--header", "-H", "headers", multiple=True, help="Extra header, 'Name: value'.")
def send(file: Any, url: str, headers: tuple[str, ...]) -> None:
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


@main.group()
def events() -> None:
    """Look at stored events and rejected callbacks."""


def _with_inbox(config_path: Path | None, query: Callable[[Any], Awaitable[T]]) -> T:
    from receiver.inbox import open_inbox

    config = _load(config_path)
    if not config.inbox_path.exists():
        raise click.ClickException(f"no inbox at {config.inbox_path} (nothing received yet?)")

    async def run() -> T:
        inbox = open_inbox(
            config.inbox_path,
            synchronous=config.inbox.synchronous,
            rejected_body_bytes=config.inbox.rejected_body_bytes,
        )
        await inbox.open()
        try:
            return await query(inbox)
        finally:
            await inbox.close()

    return asyncio.run(run())


@events.command("list")
@config_option
@click.option("--kind", type=click.Choice(["job", "workflow", "moderation"]))
@click.option("--tag", help="Job tag, e.g. SmartCover.")
@click.option("--state", help="Job state, e.g. Failed.")
@click.option("--job", "job_id", help="A JobId.")
@click.option(
    "--status",
    type=click.Choice(["pending", "done", "dead"]),
    help="Events with a handler run in this status.",
)
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_events(config_path: Path | None, as_json: bool, limit: int, **filters: Any) -> None:
    """The latest events, newest first, with each handler's status."""
    found = _with_inbox(config_path, lambda inbox: inbox.events(limit=limit, **filters))
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
    detail = _with_inbox(config_path, lambda inbox: inbox.event(event_id))
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
        found = _with_inbox(config_path, lambda inbox: inbox.receipt(receipt_id))
        if found is None:
            raise click.ClickException(f"no receipt {receipt_id}")
        sys.stdout.buffer.write(found.body)
        return
    receipts = _with_inbox(
        config_path, lambda inbox: inbox.receipts(limit=limit, outcome="rejected")
    )
    for r in receipts:
        when = f"{r.received_at:%Y-%m-%d %H:%M:%S}"
        click.echo(
            f"#{r.id}  {when}  {r.source}  {r.size} bytes  {r.error_reason}: {r.error_detail}"
        )


@main.command()
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
    config = _load(config_path)
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
    count = _with_inbox(
        config_path,
        lambda inbox: inbox.requeue(
            list(event_ids) or None, list(handler_names) or None, dead_only=dead_only
        ),
    )
    click.echo(f"{count} run(s) queued again")


def _replay_receipt(config: Config, receipt_id: int) -> None:
    from receiver.payload import PayloadError

    service = _service(config)

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
            receipt.source = "replay"
            receipt.source_meta = {**receipt.source_meta, "replayed_receipt": receipt_id}
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


if __name__ == "__main__":
    main()
