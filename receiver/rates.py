"""Rate limits of a handler: `rate = "20/min"` (or a list, `["100/min", "5/s"]`), at most
that many attempts started in any window of that length, by all the processes on the
inbox together, so that a vendor is never sent more than it takes.

Each handler's recent starts are a log kept in the inbox (`Inbox.update_state`, one
row, changed under its lock on the database's clock): the runs a claim got take their
turns from it, and those it has no turn for are handed back unattempted. A handler out
of turns waits, its runs pending in the inbox: waiting is no attempt and never
dead-letters. A batch is one attempt: it takes one turn as it starts, and is handed back
whole when it has none.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
UNIT_SECONDS |= {"h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", re.IGNORECASE)
# `rate = "off"`: no limit, not even the handler type's default.
OFF = "off"


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    seconds: float

    def __str__(self) -> str:
        """As it would be written: `20/min`, `5/s`, `30/10s`."""
        for unit, length in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
            times, rest = divmod(self.seconds, length)
            if not rest:
                return f"{self.count}/{'' if times == 1 else f'{times:g}'}{unit}"
        return f"{self.count}/{self.seconds:g}s"


def parse_rate(text: str) -> RateLimit:
    """`"20/min"`, `"5/s"`, `"1000/h"`, `"30/10s"`: how many starts in how long."""
    match = _RATE.fullmatch(text)
    unit = match and _unit_seconds(match.group(3).lower())
    if not match or not unit:
        raise ValueError(
            f"rate {text!r}: write it as COUNT/UNIT, e.g. '20/min', '5/s', '1000/h', '30/10s'"
        )
    count, times = int(match.group(1)), int(match.group(2) or 1)
    if count < 1 or times < 1:
        raise ValueError(f"rate {text!r}: the count and the length must be at least 1")
    return RateLimit(count, float(unit * times))


def _unit_seconds(unit: str) -> int | None:
    """A unit's length: `s`, `min`, `h`, `d` and their words, the words also plural."""
    if unit not in UNIT_SECONDS and len(unit) > 3 and unit.endswith("s"):
        unit = unit[:-1]  # seconds, minutes, hours, days, mins, secs
    return UNIT_SECONDS.get(unit)


def limits(configured: str | Sequence[str] | None, default: Sequence[str]) -> list[RateLimit]:
    """A handler's limits: as configured, else its type's default (`default_rate`)."""
    if configured is None:
        configured = default
    if isinstance(configured, str):
        configured = [] if configured.strip().lower() == OFF else [configured]
    return [parse_rate(text) for text in configured]


@dataclass(frozen=True, slots=True)
class Turns:
    granted: int
    # Seconds until the next turn frees, when fewer were granted than asked; else 0.
    wait: float


def take(log: str | None, now: float, want: int, rules: Sequence[RateLimit]) -> tuple[str, Turns]:
    """Take up to `want` turns at `now` from the log of recent starts (its JSON text):
    the log as it becomes, and what was granted."""
    starts = _starts(log, now, rules)
    granted = want
    for rule in rules:
        recent = [t for t in starts if t > now - rule.seconds]
        granted = min(granted, max(0, rule.count - len(recent)))
    starts += [now] * granted
    wait = 0.0
    if granted < want:
        # The next turn frees when, for every rule, the oldest start in the way leaves
        # the window.
        for rule in rules:
            recent = [t for t in starts if t > now - rule.seconds]
            over = len(recent) - rule.count + 1
            if over > 0:
                wait = max(wait, recent[over - 1] + rule.seconds - now)
    return _dump(starts), Turns(granted, wait)


def _starts(log: str | None, now: float, rules: Sequence[RateLimit]) -> list[float]:
    """The starts still within the longest window, oldest first; a log that cannot be
    read (not ours to explain) counts as empty."""
    try:
        starts = orjson.loads(log) if log else []
    except orjson.JSONDecodeError:
        starts = []
    if not isinstance(starts, list):
        starts = []
    longest = max((rule.seconds for rule in rules), default=0.0)
    # Starts "in the future" are of a clock set back since: dropped, or they would hold
    # the handler until the clock caught up.
    kept = [
        float(t)
        for t in starts
        if isinstance(t, (int, float)) and math.isfinite(t) and now - longest < t <= now
    ]
    return sorted(kept)


def _dump(starts: list[float]) -> str:
    return orjson.dumps(starts).decode()
