"""How a route or a filter compares an event's fields with the values someone wrote:
one rule, which the router applies to an Event (receiver/ingest/routing.py) and the
inbox to its columns (receiver/inbox/query.py), so that `--state failed` finds exactly
the events a route `state = "failed"` sends.

- `kind`, `state` and `verdict` take only what CI can send, in any case: a value CI
  never sends is an error (it could never match), not a filter that finds nothing.
- `event_name`, `tag` and `label` match without regard to the case of ASCII letters
  (as SQL's `lower()` folds them in both databases). `tag` is the job's Tag or, for an
  event without one (a workflow's, a moderation verdict's), its event name: what
  `stats` and the inspector list under "events by tag".
- `bucket` and `region` match exactly; `key` and `user_data` are glob patterns: `*` any
  run of characters (`/` too), `?` one, every other character itself (`[` too), as both
  databases' filters take them (receiver/inbox/query.py `glob_to_like`, `glob_to_sqlite`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from receiver.callback import vocabulary
from receiver.callback.event import Event
from receiver.callback.vocabulary import fold

Comparison = Literal["known", "folded", "exact", "glob"]


def verdict(event: Event) -> str | None:
    """A moderation event's verdict (`normal`, `violation`, `suspected`); None for
    other events, or when CI gave no result."""
    if event.moderation is None or event.moderation.result is None:
        return None
    return vocabulary.VERDICTS.get(event.moderation.result)


def label(event: Event) -> str | None:
    return None if event.moderation is None else event.moderation.label


@dataclass(frozen=True)
class Matched:
    """One field routes and filters match on: how it compares, and where its value is."""

    name: str
    comparison: Comparison
    value: Callable[[Event], str | None]
    # "known": the values CI sends; "folded": the values it is known to send (another is
    # a warning in a route, since CI adds job types now and then).
    known: tuple[str, ...] = ()

    def wanted(self, values: Iterable[str]) -> frozenset[str]:
        """The values as compared: CI's spelling, or folded. Raises ValueError for a
        value this field can never have."""
        values = list(values)
        if self.comparison == "folded":
            return frozenset(fold(v) for v in values)
        if self.comparison != "known":
            return frozenset(values)
        return frozenset(self.spelled(values))

    def spelled(self, values: list[str]) -> list[str]:
        """CI's spelling of each value (for a "known" field; others as given)."""
        if self.comparison != "known":
            return values
        spelled = [vocabulary.canonical(v, self.known) for v in values]
        unknown = [v for v, s in zip(values, spelled, strict=True) if s is None]
        if unknown:
            raise ValueError(
                f"{', '.join(map(repr, unknown))} can never match: CI sends"
                f" {', '.join(self.known)} (in any case)"
            )
        return [s for s in spelled if s is not None]

    def spell(self, value: str) -> str:
        """One value as `spelled` gives it (a filter's)."""
        (spelled,) = self.spelled([value])
        return spelled

    def unknown(self, values: Iterable[str]) -> list[str]:
        """The values of a "folded" field CI is not known to send."""
        if self.comparison != "folded" or not self.known:
            return []
        return [v for v in values if vocabulary.canonical(v, self.known) is None]

    def matches(self, wanted: frozenset[str], event: Event) -> bool:
        value = self.value(event)
        if value is None:
            return False
        if self.comparison == "glob":
            return any(_glob(pattern).fullmatch(value) for pattern in wanted)
        return (fold(value) if self.comparison == "folded" else value) in wanted


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """A glob as a regular expression: `*` any run of characters, `?` one."""
    parts = {"*": ".*", "?": "."}
    return re.compile("".join(parts.get(c) or re.escape(c) for c in pattern), re.DOTALL)


def _input(part: Literal["bucket", "region", "key"]) -> Callable[[Event], str | None]:
    return lambda event: None if event.input is None else getattr(event.input, part)


FIELDS: dict[str, Matched] = {
    matched.name: matched
    for matched in (
        Matched("kind", "known", lambda e: e.kind, vocabulary.KINDS),
        Matched("event_name", "folded", lambda e: e.event_name, vocabulary.EVENT_NAMES),
        Matched(
            "tag",
            "folded",
            lambda e: e.tag or e.event_name,
            (*vocabulary.TAGS, *vocabulary.EVENT_NAMES),
        ),
        Matched("state", "known", lambda e: e.state, vocabulary.STATES),
        Matched("verdict", "known", verdict, tuple(vocabulary.VERDICTS.values())),
        Matched("label", "folded", label),
        Matched("bucket", "exact", _input("bucket")),
        Matched("region", "exact", _input("region")),
        Matched("key", "glob", _input("key")),
        Matched("user_data", "glob", lambda e: e.user_data),
    )
}
