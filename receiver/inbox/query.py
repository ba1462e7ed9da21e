"""SQL both backends share: an `EventFilter` as conditions, and the conditions retention
and dispatch test. The backends differ only in how a parameter is written, how a glob is
matched and how a time is stored."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from receiver.inbox import Backlog, EventFilter
from receiver.inbox.records import as_datetime

# An event with such a run is kept by retention, and so is the body it is rebuilt from.
UNFINISHED_RUN = (
    "EXISTS (SELECT 1 FROM runs r WHERE r.event_id = e.id"
    " AND r.status IN ('pending', 'held', 'dead'))"
)


# The status a run takes when a handler reports each outcome.
RUN_STATUS = {
    "done": "done",
    "dead": "dead",
    "retry": "pending",
    "released": "pending",
    "forged": "forged",
}


def bodies_to_drop(before: str) -> str:
    """Receipts whose bodies retention may drop: kept (not refused) ones received before
    the parameter `before`; the caller keeps those an event still has work to do for."""
    return f"received_at < {before} AND body IS NOT NULL AND outcome != 'rejected'"


# An event verification found forged. It keeps its id only until another delivery of
# that id comes (the genuine callback, or the reconciler recovering it from CI's API),
# which replaces it, runs and all, instead of being dropped as its duplicate.
FORGED_EVENT = "EXISTS (SELECT 1 FROM runs f WHERE f.event_id = e.id AND f.status = 'forged')"


@dataclass(frozen=True, slots=True)
class Dialect:
    placeholder: Callable[[int], str]  # the n-th parameter (1-based): "?" or "$n"
    glob: Callable[[str, str], str]  # (column, placeholder) -> condition
    glob_pattern: Callable[[str], str]  # the user's glob as the parameter value
    time: Callable[[datetime], Any]  # a datetime as the time columns store it


class Conditions:
    """Conditions and their parameters, numbered from `first`."""

    def __init__(self, dialect: Dialect, first: int = 1) -> None:
        self.dialect = dialect
        self.parts: list[str] = []
        self.values: list[Any] = []
        self._first = first

    def param(self, value: Any) -> str:
        self.values.append(value)
        return self.dialect.placeholder(self._first + len(self.values) - 1)

    def add(self, condition: str) -> None:
        self.parts.append(condition)

    def where(self) -> str:
        return f"WHERE {' AND '.join(self.parts)}" if self.parts else ""


# What a list shows of each event `e`: the columns of `EventSummary`, but its runs.
SUMMARY_COLUMNS = (
    "e.seq, e.id, e.received_at, e.kind, e.event_name, e.tag, e.state, e.job_id, e.bucket,"
    " e.key, (SELECT r.source FROM receipts r WHERE r.id = e.receipt_id)"
)


def event_conditions(filter: EventFilter | None, dialect: Dialect, first: int = 1) -> Conditions:
    """Conditions over `events e` (and its runs) for a filter."""
    found = Conditions(dialect, first)
    if filter is None:
        return found
    for column in ("kind", "tag", "state", "job_id", "bucket"):
        value = getattr(filter, column)
        if value is not None:
            found.add(f"e.{column} = {found.param(value)}")
    if filter.key is not None:
        found.add(dialect.glob("e.key", found.param(dialect.glob_pattern(filter.key))))
    if filter.since is not None:
        found.add(f"e.received_at >= {found.param(dialect.time(filter.since))}")
    if filter.until is not None:
        found.add(f"e.received_at < {found.param(dialect.time(filter.until))}")
    if filter.status is None or filter.status == "done":
        # Most runs end done (and no index holds them by status): testing each event's own
        # runs (by its key) finds the newest matches at once.
        runs = ["r.event_id = e.id"]
        if filter.status is not None:
            runs.append(f"r.status = {found.param(filter.status)}")
        if filter.handler is not None:
            runs.append(f"r.handler = {found.param(filter.handler)}")
        if len(runs) > 1:
            found.add(f"EXISTS (SELECT 1 FROM runs r WHERE {' AND '.join(runs)})")
    else:
        # pending, dead, held and forged runs are few: start from them (runs_open, which
        # SQLite uses only when told `status <> 'done'`) rather than test every event's
        # runs, most of which would not match.
        runs = ["r.status <> 'done'", f"r.status = {found.param(filter.status)}"]
        if filter.handler is not None:
            runs.append(f"r.handler = {found.param(filter.handler)}")
        found.add(f"e.id IN (SELECT r.event_id FROM runs r WHERE {' AND '.join(runs)})")
    return found


# Pending and dead runs per handler, for the gauges (`backlogs`). `status <> 'done'` lets
# SQLite read them from runs_open, which holds no done run.
BACKLOG = (
    "SELECT handler, status, count(*), min(due_at) FROM runs"
    " WHERE status <> 'done' AND status IN ('pending', 'dead') GROUP BY status, handler"
)


def backlogs(rows: Iterable[Sequence[Any]]) -> dict[str, Backlog]:
    """Each handler's backlog, from rows of `BACKLOG`."""
    found: dict[str, Backlog] = {}
    for handler, status, count, oldest in rows:
        entry = found.setdefault(handler, Backlog(0, 0, None))
        if status == "pending":
            entry.pending, entry.oldest_due = count, as_datetime(oldest)
        else:
            entry.dead = count
    return found


def tallies(rows: Iterable[tuple[str, str, int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Counts by tag and by state, from counts by (tag, state)."""
    tags: dict[str, int] = {}
    states: dict[str, int] = {}
    for tag, state, count in rows:
        tags[tag] = tags.get(tag, 0) + count
        states[state] = states.get(state, 0) + count
    return tags, states


def glob_to_like(pattern: str) -> str:
    """`*` and `?` as LIKE's `%` and `_`, everything else literal (escaped with `\\`)."""
    out = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def glob_to_sqlite(pattern: str) -> str:
    """SQLite's GLOB would read `[` as a character class: make it literal, so that both
    backends match `*` and `?` only."""
    return pattern.replace("[", "[[]")
