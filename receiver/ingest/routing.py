"""Which handlers an event goes to: `[[routes]]` from the config, matched in order.

Several routes may match; each handler runs once per event. With no routes at all,
every configured handler gets every event. How each key compares is written once, in
receiver/callback/matching.py, which the inbox's filters follow as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from receiver import envvars
from receiver.callback.event import Event
from receiver.callback.matching import FIELDS, Matched
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
        for name in ("event_name", "tag"):
            matched = FIELDS[name]
            for value in matched.unknown(_values(getattr(route.match, name)) or ()):
                found.append(
                    f"{envvars.dotted(('routes', index, 'match', name))}: CI is not known"
                    f" to send {value!r} (known: {', '.join(matched.known)})"
                )
    return found


def changes(before: Sequence[RouteConfig] | None, after: Sequence[RouteConfig] | None) -> list[str]:
    """What differs between two configs' routes, by route number (from 1, as
    check-config counts): `+3` added, `~1` changed, `-4` removed. No routes at all
    (every handler gets every event) is none to compare."""
    old, new = list(before or ()), list(after or ())
    found = []
    for number in range(1, max(len(old), len(new)) + 1):
        if number > len(old):
            found.append(f"+{number}")
        elif number > len(new):
            found.append(f"-{number}")
        elif old[number - 1] != new[number - 1]:
            found.append(f"~{number}")
    return found


def log_warnings(config: Config) -> None:
    """`warnings` in the log, where a receiver starts or reloads its config."""
    logger = structlog.get_logger("ci_receiver.config")
    for warning in warnings(config):
        logger.warning("config may not do what was meant", warning=warning)


def _always(event: Event) -> bool:
    return True


def _predicate(match: RouteMatch) -> Predicate:
    """Whether an event matches: every key the route gives must (receiver/callback/
    matching.py says how each compares)."""
    checks: list[tuple[Matched, frozenset[str]]] = []
    for name, matched in FIELDS.items():
        values = _values(getattr(match, name))
        if values is not None:
            checks.append((matched, matched.wanted(values)))
    return lambda event: all(matched.matches(wanted, event) for matched, wanted in checks)


def _values(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else value
