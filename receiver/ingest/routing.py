"""Which handlers an event goes to: `[[routes]]` from the config, matched in order.

Several routes may match; each handler runs once per event. With no routes at all,
every configured handler gets every event. `kind`, `state` and `verdict` reach here in
CI's own spelling (the config checks them); `event_name`, `tag` and `label` match
without regard to case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

import structlog

from receiver import envvars
from receiver.callback import vocabulary
from receiver.callback.event import Event
from receiver.config import Config, RouteConfig, RouteMatch

Predicate = Callable[[Event], bool]


class Router:
    def __init__(self, routes: Sequence[RouteConfig] | None, handler_names: Sequence[str]) -> None:
        if routes is None:
            self._routes: list[tuple[Predicate, list[str]]] = [(_always, list(handler_names))]
        else:
            self._routes = [(_predicate(route.match), route.handlers) for route in routes]

    def handlers_for(self, event: Event) -> list[str]:
        """The handler names for this event, in route order, each once."""
        names: dict[str, None] = {}
        for matches, handlers in self._routes:
            if matches(event):
                names.update(dict.fromkeys(handlers))
        return list(names)


def warnings(config: Config) -> list[str]:
    """What in the routes is allowed but likely a mistake: a handler no route reaches,
    an event name or tag CI is not known to send. (A route naming a handler that is not
    configured is an error of the config itself.)"""
    found = []
    if config.routes is not None:
        routed = {name for route in config.routes for name in route.handlers}
        for name in config.handlers:
            if name not in routed:
                found.append(f"handlers.{name}: no route sends it anything")
    for index, route in enumerate(config.routes or ()):
        for field, known in (
            ("event_name", vocabulary.EVENT_NAMES),
            ("tag", vocabulary.TAGS),
        ):
            for value in _values(getattr(route.match, field)) or ():
                if vocabulary.canonical(value, known) is None:
                    found.append(
                        f"{envvars.dotted(('routes', index, 'match', field))}: CI is not known"
                        f" to send {value!r}"
                        f" (known: {', '.join(known)})"
                    )
    return found


def log_warnings(config: Config) -> None:
    """`warnings` in the log, where a receiver starts or reloads its config."""
    logger = structlog.get_logger("ci_receiver.config")
    for warning in warnings(config):
        logger.warning("config may not do what was meant", warning=warning)


def _always(event: Event) -> bool:
    return True


def _predicate(match: RouteMatch) -> Predicate:
    """Whether an event matches: every key the route gives must."""
    checks: list[Predicate] = []

    def among(wanted: frozenset[str] | None, value: Callable[[Event], str | None]) -> None:
        if wanted is not None:
            checks.append(lambda e: value(e) in wanted)

    def globbed(patterns: frozenset[str] | None, value: Callable[[Event], str | None]) -> None:
        if patterns is not None:
            checks.append(lambda e: (text := value(e)) is not None and _glob(text, patterns))

    among(_values(match.kind), lambda e: e.kind)
    among(_values(match.state), lambda e: e.state)
    among(_folded(match.event_name), lambda e: _fold(e.event_name))
    among(_folded(match.tag), lambda e: _fold(e.tag))
    among(_values(match.verdict), _verdict)
    among(
        _folded(match.label), lambda e: None if e.moderation is None else _fold(e.moderation.label)
    )
    among(_values(match.bucket), lambda e: None if e.input is None else e.input.bucket)
    among(_values(match.region), lambda e: None if e.input is None else e.input.region)
    globbed(_values(match.key), lambda e: None if e.input is None else e.input.key)
    globbed(_values(match.user_data), lambda e: e.user_data)
    return lambda event: all(check(event) for check in checks)


def _verdict(event: Event) -> str | None:
    if event.moderation is None or event.moderation.result is None:
        return None
    return vocabulary.VERDICTS.get(event.moderation.result)


def _values(value: str | list[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else value)


def _folded(value: str | list[str] | None) -> frozenset[str] | None:
    values = _values(value)
    return None if values is None else frozenset(v.casefold() for v in values)


def _fold(text: str | None) -> str | None:
    return None if text is None else text.casefold()


def _glob(text: str, patterns: frozenset[str]) -> bool:
    return any(fnmatchcase(text, pattern) for pattern in patterns)
