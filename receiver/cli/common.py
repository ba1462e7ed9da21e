"""What the commands share: the config option, loading it, running a coroutine, the inbox."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from receiver.callback.matching import FIELDS
from receiver.config import Config, ConfigError, load_config, parse_moment
from receiver.inbox import EventFilter, Inbox, InboxUnavailable, ReadOnlyInbox, SchemaError
from receiver.inbox.roles import Lifecycle
from receiver.ownership import NotOurs

if TYPE_CHECKING:  # imported by the commands that make one
    from receiver.runtime.service import Service

T = TypeVar("T")
Opened = TypeVar("Opened", bound=Lifecycle)

# What the commands that only look at the inbox use of the config: a `${NAME}` elsewhere
# (the path token, passwords, handlers' secrets) need not be set for them.
INBOX_ONLY = ("data_dir", "inbox", "log")

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


if TYPE_CHECKING:  # generic to a type checker since click 8.4, a plain class before
    TimeParamType = click.ParamType[datetime]
else:
    TimeParamType = click.ParamType


class Moment(TimeParamType):
    """A time: ISO 8601 (`2026-11-30T08:00:00+08:00`; UTC when it names no zone), or a
    duration back from now (`90m`, `24h`, `7d`)."""

    name = "time"

    def convert(
        self, value: str | datetime, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_moment(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _as_routes_match(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A filter's value as a route's key of its name takes it: one CI never sends (a
    state, kind or verdict) is refused, since it could never match."""
    if value is None or param.name is None:
        return value
    try:
        return FIELDS[param.name].spell(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options choosing events (`events list`, `replay`): each one given must match,
    as a route's key of its name matches (without regard to case)."""
    options = [
        click.option("--kind", help="job, workflow or moderation.", callback=_as_routes_match),
        click.option("--event-name", help="CI's EventName: TaskFinish, WorkflowFinish, ..."),
        click.option(
            "--tag",
            help="The job's Tag (SmartCover, ...), or the event name of an event"
            " without one (WorkflowFinish, ReviewVideo, ...).",
        ),
        click.option(
            "--state", help="Submitted, Running, Success, Failed, ...", callback=_as_routes_match
        ),
        click.option(
            "--verdict",
            help="A moderation event's: normal, violation or suspected.",
            callback=_as_routes_match,
        ),
        click.option("--job", "job_id", help="A JobId (or a workflow's RunId)."),
        click.option("--bucket", help="The input object's bucket."),
        click.option("--key", help="A glob over the input object's key: 'videos/*.mp4'."),
        click.option("--since", type=Moment(), help="Received since: ISO 8601, or 24h ago."),
        click.option("--until", type=Moment(), help="Received before: ISO 8601, or 1h ago."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def event_filter(**options: Any) -> EventFilter:
    return EventFilter(**{k: v for k, v in options.items() if k in EventFilter.__slots__})


def load(
    config_path: Path | None, needs: Collection[str] | None = None, **overrides: Any
) -> Config:
    """The config, with --host / --port / --workers applied; a bad one ends the command
    with its error. `needs`: as `load_config`'s (None: every `${NAME}` must be set)."""
    try:
        return read_config(config_path, needs, **overrides)
    except ConfigError as exc:
        raise click.ClickException(f"config: {exc}") from None


def read_config(
    config_path: Path | None, needs: Collection[str] | None = None, **overrides: Any
) -> Config:
    """The config, with --host / --port / --workers applied; raises ConfigError."""
    config = load_config(config_path, needs=needs)
    http = {k: v for k, v in overrides.items() if v is not None}
    if http:
        config = config.model_copy(update={"http": config.http.model_copy(update=http)})
    return config


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover (not on Windows)
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def make_service(config: Config) -> Service:
    """The service of a one-off command (replay, reconcile): it fails at once, rather than
    wait, when the inbox's database cannot be reached."""
    from receiver.runtime.assemble import CannotAssemble, service_for

    try:
        return service_for(config, wait=False)
    except CannotAssemble as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def inbox_errors() -> Iterator[None]:
    """An inbox that cannot be used (its database away, a schema of another version)
    ends the command with one line saying why, and exit code 1."""
    from receiver.ingest.ingest import IntakeUnavailable  # a callback decoded again

    try:
        yield
    except (InboxUnavailable, IntakeUnavailable, SchemaError, NotOurs) as exc:
        raise click.ClickException(f"inbox: {exc}") from None


def with_inbox(config: Config, query: Callable[[ReadOnlyInbox], Awaitable[T]]) -> T:
    """Open the config's inbox read-only, run `query` on it, close it: the inspection
    commands take no lock a running receiver could wait for. (A config loaded with
    `needs=INBOX_ONLY` will do: the inbox is all it reads.)"""
    from receiver.inbox.factory import open_inbox

    return _with(lambda: open_inbox(config, read_only=True), query)


def with_writable_inbox(config: Config, query: Callable[[Inbox], Awaitable[T]]) -> T:
    """`with_inbox` for the commands that change the inbox (replay, prune)."""
    from receiver.inbox.factory import open_inbox

    return _with(lambda: open_inbox(config), query)


def _with(opening: Callable[[], Opened], query: Callable[[Opened], Awaitable[T]]) -> T:
    async def run() -> T:
        inbox = opening()
        try:
            await inbox.open()
        except FileNotFoundError as exc:  # no SQLite file yet
            raise click.ClickException(str(exc)) from None
        try:
            return await query(inbox)
        finally:
            await inbox.close()

    with inbox_errors():
        return asyncio.run(run())
