"""The overview's charts as geometry for inline SVG, drawn by the templates: callbacks
per minute stacked by outcome, and bars for counts by name. Pure functions: numbers in,
coordinates out; the labels stay plain text for the template to escape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from itertools import pairwise

from receiver.inbox import Traffic

# Drawn bottom up; the inbox calls a refused callback's receipt "rejected".
OUTCOMES = (("accepted", "accepted"), ("duplicate", "duplicate"), ("rejected", "refused"))
TICK_HOURS = 3


@dataclass(slots=True, frozen=True)
class Layer:
    outcome: str
    label: str
    path: str  # SVG path data of the layer's area
    total: int


@dataclass(slots=True, frozen=True)
class Tick:
    x: float
    label: str


@dataclass(slots=True, frozen=True)
class Band:
    """A stretch of the chart (an hour) that says its counts when pointed at."""

    x: float
    width: float
    title: str


@dataclass(slots=True, frozen=True)
class TrafficChart:
    width: int
    height: int
    peak: int  # callbacks in the busiest step: the top of the scale
    layers: list[Layer]
    outline: str  # the top of the stack, drawn as a line: a lone busy minute stays visible
    ticks: list[Tick]
    bands: list[Band]


@dataclass(slots=True, frozen=True)
class Bar:
    label: str
    count: int
    percent: float  # of the largest count
    rest: bool = False  # the bar of the counts past the limit, summed


def traffic_chart(
    traffic: Traffic, since: datetime, steps: int, zone: tzinfo, *, width: int = 960,
    height: int = 160,
) -> TrafficChart:  # fmt: skip
    """`steps` steps of `traffic.step` seconds from `since`, in `zone` for the labels."""
    counts = {outcome: [0] * steps for outcome, _ in OUTCOMES}
    for at, outcome, count in traffic.callbacks:
        index = int((at - since).total_seconds() // traffic.step)
        if 0 <= index < steps and outcome in counts:
            counts[outcome][index] += count
    peak = max((sum(column) for column in zip(*counts.values(), strict=True)), default=0)

    xs = [round(index * width / steps, 1) for index in range(steps + 1)]
    scale = height / max(peak, 1)

    def x(index: int) -> float:
        return xs[index]

    def y(value: int) -> float:
        return round(height - value * scale, 1)

    # Each level of the stack drawn once: the top of one layer is the bottom of the next.
    level = [0] * steps
    lines = [_points(_step_line(level, x, y))]
    for name, _ in OUTCOMES:
        level = [low + count for low, count in zip(level, counts[name], strict=True)]
        lines.append(_points(_step_line(level, x, y)))
    layers = [
        Layer(outcome, label, f"M{lines[n + 1]} {' '.join(reversed(lines[n].split(' ')))}Z",
              sum(counts[outcome]))
        for n, (outcome, label) in enumerate(OUTCOMES)
        if any(counts[outcome])
    ]  # fmt: skip
    outline = f"M{lines[-1]}"
    moments = [since + timedelta(seconds=traffic.step * i) for i in range(steps + 1)]
    hours = [i for i, moment in enumerate(moments) if _on_the_hour(moment, zone)]
    ticks = [
        Tick(x(i), f"{moments[i].astimezone(zone):%H:%M}")
        for i in hours
        if moments[i].astimezone(zone).hour % TICK_HOURS == 0
    ]
    edges = sorted({0, *hours, steps})
    bands = [
        Band(x(start), x(end) - x(start), _band_title(counts, start, end, moments, zone))
        for start, end in pairwise(edges)
    ]
    return TrafficChart(width, height, peak, layers, outline, ticks, bands)


def bars(counts: dict[str, int], limit: int = 10) -> list[Bar]:
    """The largest counts first; past `limit`, the rest summed as one bar."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    folded = len(ranked) > limit
    if folded:
        rest = sum(count for _, count in ranked[limit - 1 :])
        ranked = [*ranked[: limit - 1], (f"{len(ranked) - limit + 1} others", rest)]
    top = max((count for _, count in ranked), default=0) or 1
    return [
        Bar(label, count, round(100 * count / top, 1), rest=folded and position == limit)
        for position, (label, count) in enumerate(ranked, 1)
    ]


def _points(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{px:g},{py:g}" for px, py in points)


def _step_line(
    values: list[int], x: Callable[[int], float], y: Callable[[int], float]
) -> list[tuple[float, float]]:
    """A flat stretch per step; a run of one value is one stretch."""
    points: list[tuple[float, float]] = []
    start = 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            points += [(x(start), y(values[start])), (x(index), y(values[start]))]
            start = index
    return points


def _on_the_hour(moment: datetime, zone: tzinfo) -> bool:
    local = moment.astimezone(zone)
    return local.minute == 0 and local.second == 0


def _band_title(
    counts: dict[str, list[int]], start: int, end: int, moments: list[datetime], zone: tzinfo
) -> str:
    span = f"{moments[start].astimezone(zone):%H:%M}–{moments[end].astimezone(zone):%H:%M}"
    found = [
        f"{sum(counts[outcome][start:end]):,} {label}"
        for outcome, label in OUTCOMES
        if sum(counts[outcome][start:end])
    ]
    return f"{span}: {', '.join(found) or 'nothing'}"
