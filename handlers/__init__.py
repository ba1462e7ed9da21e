"""The handler contract, and how a handler type is found by name.

A handler is an async callable on an `Event`, given the attempt's `Context` when it
takes a second parameter (required, or named `ctx` or `context`):

    async def handle(event: Event, ctx: Context) -> None
    async def handle(event: Event) -> None          # the first contract, still kept

made by a factory that takes the handler's config table (a class whose `__init__` takes
the table is such a factory). It may define `async def start()` (open connections,
check credentials) and `async def close()` (`Handler` types them; a class that
subclasses it gets both as no-ops). Returning is success; raising `Retry` asks for
another attempt, `Fail` gives up at once (dead letter); any other exception counts as a
retry. The event is the handler's own: no other handler sees a change made to it.

A handler that defines `handle_batch` (`BatchHandler`) is given many events at once
instead: up to its `batch_size` due runs, gathered for at most `batch_wait` seconds.
It returns the events that did not succeed, by id, each with what it would have raised
alone (`Retry`, `Fail`, another exception); the others succeeded. Raising fails them all.
Its `batching` attribute, if it has one, gives its own `batch_size` / `batch_wait`
defaults (`Batching`), or None to take events one by one after all (a robot without a
digest).

A `type` in the config names a built-in (`log`, `jsonl`, `sql`, `webhook`, ...), an
entry point of the group `ci_receiver.handlers`, or a dotted path
`package.module:attribute`. A handler that keeps its validated options as a pydantic
model in `self.options` (a `HandlerOptions`) gets them printed by `check-config`, secrets
masked.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, cast, runtime_checkable

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from receiver.callback.event import Event
from receiver.spelling import did_you_mean

ENTRY_POINT_GROUP = "ci_receiver.handlers"

# Built-in handler types: name -> "module:attribute", imported only when used.
BUILTINS: dict[str, str] = {
    "log": "handlers.log:LogHandler",
    "jsonl": "handlers.jsonl:JsonLinesHandler",
    "sql": "handlers.sql:SqlHandler",
    "sqlite": "handlers.sql:SqliteHandler",
    "webhook": "handlers.webhook:WebhookHandler",
    "wecom": "handlers.chat:WeComHandler",
    "dingtalk": "handlers.chat:DingTalkHandler",
    "feishu": "handlers.chat:FeishuHandler",
    "slack": "handlers.chat:SlackHandler",
    "email": "handlers.email:EmailHandler",
    "pulsar": "handlers.pulsar:PulsarHandler",
}


class Retry(Exception):
    """Try this event again later; `after` (seconds) overrides the backoff."""

    def __init__(self, reason: str = "", *, after: float | None = None) -> None:
        super().__init__(reason)
        self.after = after


class Fail(Exception):
    """Give up on this event for this handler: dead-letter it without more attempts."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may know of the attempt it is running: asked for by taking a second
    argument, `async def __call__(self, event, ctx)`."""

    handler: str  # the handler's name in the config (`[handlers.<name>]`)
    attempt: int  # this attempt's number, from 1
    max_attempts: int  # the handler's `max_attempts`: after that one, a dead letter
    deadline: float  # `time.monotonic()` by which the attempt must end (its `timeout`)
    log: structlog.stdlib.BoundLogger  # bound to the event, the handler and the attempt
    # The inspector's public base URL (`[admin] public_url`), for a link a person can
    # follow to the event; None when not configured.
    inspector_url: str | None = None

    @property
    def last(self) -> bool:
        """Whether a failure of this attempt dead-letters the event rather than retry."""
        return self.attempt >= self.max_attempts

    def seconds_left(self) -> float:
        """Seconds until the attempt times out (never below 0)."""
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class BatchContext:
    """What a batch handler may know of the attempt: the batch's own deadline and logger,
    and each event's `Context` (`of`): a batch can hold first attempts and retries."""

    handler: str
    deadline: float  # `time.monotonic()` by which the whole batch must end
    log: structlog.stdlib.BoundLogger  # bound to the handler and the batch's size
    runs: Mapping[str, Context]  # each event's context, by event id
    inspector_url: str | None = None  # as `Context.inspector_url`

    def of(self, event: Event) -> Context:
        return self.runs[event.id]

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class Batching:
    """A batch handler's own defaults for `batch_size` and `batch_wait` (the config's
    keys, when given, win); None leaves the config's default."""

    size: int | None = None
    wait: float | None = None


# What `handle_batch` returns: the events that did not succeed, by event id, each with
# what it would have raised alone; None (or an empty mapping): all succeeded.
BatchResult = Mapping[str, BaseException] | None


class HandlerOptions(BaseModel):
    """A handler's options as its table in the config gives them (`[handlers.NAME]`, the
    keys every handler takes removed), for a handler's own model to subclass: a key it
    does not know stops the start and is named, and a number must be finite, as
    everywhere in the config (TOML allows `inf` and `nan`: a `request_timeout = inf`
    would wait for ever)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@runtime_checkable
class Handler(Protocol):
    """A handler: called once per attempt. A class may subclass this to be checked
    against it by mypy and to get `start` and `close` as no-ops."""

    async def __call__(self, event: Event, ctx: Context, /) -> None: ...

    async def start(self) -> None:
        """Open connections, check credentials: called once before the first attempt,
        again later while it fails (its events wait in the inbox meanwhile)."""

    async def close(self) -> None:
        """Let go of what `start` opened: called once, at shutdown or when a config
        reload removes or changes the handler."""


@runtime_checkable
class BatchHandler(Protocol):
    """A handler given many events at once (see the module's doc). A class may subclass
    this to be checked against it by mypy and to get `start` and `close` as no-ops."""

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext, /) -> BatchResult:
        """Handle the events; return those that did not succeed (`BatchResult`)."""

    async def start(self) -> None:
        """As `Handler.start`."""

    async def close(self) -> None:
        """As `Handler.close`."""


@runtime_checkable
class EventHandler(Protocol):
    """The first contract, kept: a handler that takes the event alone."""

    async def __call__(self, event: Event, /) -> None: ...


# What a factory may make: any of the three, with or without `start` and `close`.
AnyHandler = Handler | EventHandler | BatchHandler
HandlerFactory = Callable[[Mapping[str, Any]], AnyHandler]
# How the dispatcher calls a handler, whichever contract it follows (`calling`).
Call = Callable[[Event, Context | None], Awaitable[None]]
BatchCall = Callable[[Sequence[Event], BatchContext], Awaitable[BatchResult]]


class HandlerConfigError(Exception):
    """A handler's type cannot be found or its options are wrong; names the handler."""


def load_factory(type_name: str) -> HandlerFactory:
    """The factory behind a `type`: built-in, entry point, or `package.module:attribute`."""
    if type_name in BUILTINS:
        target = _import(BUILTINS[type_name])
    elif ":" in type_name:
        target = _import(type_name)
    else:
        found = entry_points(group=ENTRY_POINT_GROUP, name=type_name)
        if not found:
            names = {*BUILTINS, *entry_point_names()}
            raise HandlerConfigError(
                f"unknown handler type {type_name!r}{did_you_mean(type_name, names)}: not built"
                f" in ({', '.join(sorted(names))}), not an entry "
                f"point of {ENTRY_POINT_GROUP!r}, not a dotted path like 'package.module:Class'"
            )
        try:
            target = next(iter(found)).load()
        except Exception as exc:
            raise HandlerConfigError(f"cannot load entry point {type_name!r}: {exc}") from exc
    return _as_factory(type_name, target)


def build(type_name: str, options: Mapping[str, Any]) -> AnyHandler:
    """Find the factory and make the handler; option errors become `HandlerConfigError`."""
    factory = load_factory(type_name)
    try:
        handler = factory(options)
    except HandlerConfigError:
        raise
    except ValidationError as exc:
        # Name each key, and never echo the input: it may be a secret.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'options'}: "
            + (
                "unknown option"
                if item["type"] == "extra_forbidden"
                else item["msg"].removeprefix("Value error, ")
            )
            for item in exc.errors()
        )
        raise HandlerConfigError(
            f"bad options for handler type {type_name!r}: {problems}"
        ) from None
    except Exception as exc:  # TypeError, ValueError, ...
        raise HandlerConfigError(f"bad options for handler type {type_name!r}: {exc}") from exc
    if not callable(handler) and batch_call(handler) is None:
        raise HandlerConfigError(
            f"handler type {type_name!r} made {handler!r}: neither a callable nor a batch"
            " handler (handle_batch)"
        )
    return handler


def shown_options(handler: object) -> dict[str, Any] | None:
    """The handler's validated options (defaults filled in, secrets masked), if it keeps
    them as a pydantic model in `options`."""
    options = getattr(handler, "options", None)
    if isinstance(options, BaseModel):
        return options.model_dump(mode="json", by_alias=True)
    return None


def entry_point_names() -> list[str]:
    return [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]


def _import(path: str) -> object:
    module_name, _, attribute = path.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise HandlerConfigError(f"cannot import handler {path!r}: {exc}") from exc
    return target


def _as_factory(type_name: str, target: object) -> HandlerFactory:
    """What the config names, as a factory: taken on trust as far as Python can tell (a
    coroutine function is a handler, a callable a factory); `build` checks what it makes."""
    # A bare `async def handle(event)` is a handler that takes no options, and so is a
    # class with no `__init__` of its own (made as the test kit makes it: `Handler()`).
    plain = inspect.iscoroutinefunction(target)
    if plain or (inspect.isclass(target) and _no_init(target)):
        what = "a plain function" if plain else "a class without __init__(self, options)"

        def factory(options: Mapping[str, Any]) -> AnyHandler:
            if options:
                raise HandlerConfigError(
                    f"handler {type_name!r} is {what} and takes no options, got {sorted(options)}"
                )
            return cast(AnyHandler, target if plain else cast(type, target)())

        return factory
    if not callable(target):
        raise HandlerConfigError(f"handler type {type_name!r} is not a class or function")
    return cast(HandlerFactory, target)


def _no_init(cls: type) -> bool:
    """Whether the class has no `__init__` but object's (or a Protocol's placeholder,
    which a class subclassing `Handler` inherits)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            return init is object.__init__ or init.__name__ == "_no_init_or_replace_init"
    return True


def takes_context(handler: object) -> bool:
    """Whether the handler takes the `Context`: a second positional parameter that is
    required, or named `ctx` or `context`. (One with a default, or `*args`, may be a
    handler of the first contract with an argument of its own: it is not given one.)"""
    try:
        parameters = inspect.signature(cast(Callable[..., Any], handler)).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the first contract
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        return False
    second = positional[1]
    return second.default is second.empty or second.name in ("ctx", "context")


def batch_call(handler: object) -> BatchCall | None:
    """The handler's `handle_batch`, if it takes batches (its `batching` is not None)."""
    method = getattr(handler, "handle_batch", None)
    if not callable(method) or getattr(handler, "batching", Batching()) is None:
        return None
    return cast(BatchCall, method)


def batching(handler: object) -> Batching:
    """The handler's own batch defaults (none: the config's)."""
    return getattr(handler, "batching", None) or Batching()


def calling(handler: AnyHandler) -> Call:
    """How to call the handler: with the context when it takes one (`takes_context`),
    else with the event alone. No coroutine of its own: the handler's is awaited."""
    if takes_context(handler):
        with_context = cast(Handler, handler)

        def call_with_context(event: Event, ctx: Context | None) -> Awaitable[None]:
            if ctx is None:
                raise TypeError("this handler takes a Context")
            return with_context(event, ctx)

        return call_with_context
    alone = cast(EventHandler, handler)

    def call_alone(event: Event, ctx: Context | None) -> Awaitable[None]:
        if not callable(alone):  # a batch handler alone: its events come in batches
            raise TypeError("this handler takes batches only (handle_batch)")
        return alone(event)

    return call_alone


async def start(handler: object) -> None:
    await _maybe(getattr(handler, "start", None))


async def close(handler: object) -> None:
    await _maybe(getattr(handler, "close", None))


async def _maybe(hook: Callable[[], Awaitable[None]] | None) -> None:
    if hook is not None:
        await hook()
