"""Which handlers an event goes to: `[[routes]]` from the config, matched in order.

Several routes may match; each handler runs once per event. With no routes at all,
every configured handler gets every event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from receiver.config import RouteConfig, RouteMatch
from receiver.model import Event

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


def _always(event: Event) -> bool:
    return True


def _predicate(match: RouteMatch) -> Predicate:
    checks: list[Predicate] = []
    for field in ("kind", "event_name", "tag", "state"):
        if (wanted := _values(getattr(match, field))) is not None:
            checks.append(lambda e, f=field, w=wanted: getattr(e, f) in w)
    if (buckets := _values(match.bucket)) is not None:
        checks.append(lambda e, w=buckets: e.input is not None and e.input.bucket in w)
    if (regions := _values(match.region)) is not None:
        checks.append(lambda e, w=regions: e.input is not None and e.input.region in w)
    if (keys := _values(match.key)) is not None:
        checks.append(lambda e, w=keys: e.input is not None and _glob(e.input.key, w))
    if (user_data := _values(match.user_data)) is not None:
        checks.append(lambda e, w=user_data: e.user_data is not None and _glob(e.user_data, w))
    return lambda event: all(check(event) for check in checks)


def _values(value: str | list[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else value)


def _glob(text: str, patterns: frozenset[str]) -> bool:
    return any(fnmatchcase(text, pattern) for pattern in patterns)
