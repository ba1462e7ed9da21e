"""The handler contract, and how a handler type is found by name.

A handler is an async callable on an `Event`:

    async def handle(event: Event) -> None

made by a factory that takes the handler's config table (a class whose `__init__` takes
the table is such a factory). It may define `async def start()` (open connections,
check credentials) and `async def close()`. Returning is success; raising `Retry`
asks for another attempt, `Fail` gives up at once (dead letter); any other exception
counts as a retry.

A `type` in the config names a built-in (`log`, `jsonl`, `sql`, `webhook`, ...), an
entry point of the group `ci_receiver.handlers`, or a dotted path
`package.module:attribute`. A handler that keeps its validated options as a pydantic
model in `self.options` gets them printed by `check-config`, secrets masked.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, cast, runtime_checkable

from pydantic import BaseModel, ValidationError

from receiver.callback.event import Event

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


@runtime_checkable
class Handler(Protocol):
    async def __call__(self, event: Event) -> None: ...


HandlerFactory = Callable[[Mapping[str, Any]], Handler]


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
            known = ", ".join(sorted({*BUILTINS, *entry_point_names()}))
            raise HandlerConfigError(
                f"unknown handler type {type_name!r}: not built in ({known}), not an entry "
                f"point of {ENTRY_POINT_GROUP!r}, not a dotted path like 'package.module:Class'"
            )
        try:
            target = next(iter(found)).load()
        except Exception as exc:
            raise HandlerConfigError(f"cannot load entry point {type_name!r}: {exc}") from exc
    return _as_factory(type_name, target)


def build(type_name: str, options: Mapping[str, Any]) -> Handler:
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
    if not callable(handler):
        raise HandlerConfigError(f"handler type {type_name!r} made {handler!r}, not a callable")
    return handler


def shown_options(handler: Handler) -> dict[str, Any] | None:
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
    # A bare `async def handle(event)` is a handler that takes no options.
    if inspect.iscoroutinefunction(target):

        def factory(options: Mapping[str, Any]) -> Handler:
            if options:
                raise HandlerConfigError(
                    f"handler {type_name!r} is a plain function and takes no options,"
                    f" got {sorted(options)}"
                )
            return cast(Handler, target)

        return factory
    if not callable(target):
        raise HandlerConfigError(f"handler type {type_name!r} is not a class or function")
    return cast(HandlerFactory, target)


async def start(handler: Handler) -> None:
    await _maybe(getattr(handler, "start", None))


async def close(handler: Handler) -> None:
    await _maybe(getattr(handler, "close", None))


async def _maybe(hook: Callable[[], Awaitable[None]] | None) -> None:
    if hook is not None:
        await hook()
