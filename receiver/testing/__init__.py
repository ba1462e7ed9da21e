"""A test kit for handler authors: realistic events, and a handler run by the
dispatcher's own rules, without a server, an inbox or a wait.

    from receiver.testing import sample, run_handler

    async def test_failures_are_written(tmp_path):
        [run] = await run_handler(FailedJobs({"folder": tmp_path}), sample("transcode-failed"))
        assert run.outcome == "done"

`sample(name)` is an `Event` made from a callback as CI sends it (`SAMPLES` lists every
name; receiver/testing/samples/SOURCES.md says where each comes from); `many(name, n)`
gives n of them about different jobs; `event_from(bytes or path)` reads your own.

`run_handler(handler, *events, attempts=3)` starts the handler, gives it each event (in
batches when it takes them) until it succeeds, gives up or has had `attempts` attempts,
and closes it. Each attempt ends as it would under the dispatcher (`receiver/dispatch/
outcomes.py`, the same code): within `timeout`; `Retry(after=)` and any other exception
retried, `Fail` and the last failure dead-lettered, a batch's per-event answers applied.
It does not sleep between attempts: each `Attempt` says how long the dispatcher would
have waited (`retry_after`). Each run's handler gets a copy of its event.

With pytest, the fixtures `ci_sample`, `ci_samples` and `ci_run_handler` are these,
installed with ci-receiver (the `pytest11` entry point `ci_receiver`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import handlers as handler_api
from handlers import AnyHandler
from receiver.callback.event import Event
from receiver.callback.normalize import parse_callback
from receiver.config import HandlerConfig
from receiver.dispatch import outcomes
from receiver.dispatch.slots import Slot, SlotMetrics
from receiver.inbox import Claim
from receiver.metrics import Metrics

# Each sample's name, and the file (in receiver/testing/samples, which the project's own
# tests read too) it is made from.
SAMPLES: dict[str, str] = {
    "smartcover": "smartcover.xml",
    "smartcover-failed": "smartcover_failed.xml",
    "animation": "animation_workflow.json",
    "transcode": "transcode.xml",
    "transcode-failed": "transcode_failed.json",
    "transcode-cancelled": "transcode.xml",
    "snapshot": "snapshot.xml",
    "workflow": "workflow_finish.xml",
    "workflow-failed": "workflow_failed.xml",
    "moderation-simple": "moderation_video_simple.json",
    "moderation-detail": "moderation_video_detail.json",
    "moderation-suspected": "moderation_image_simple_hit.json",
}
# A sample no published callback shows, made from another's file: (a pattern of its
# text, what it says instead), in turn. CI documents no Code or Message for a cancelled
# job: kept; nor any output for one (as for a failed job: none).
VARIANTS: dict[str, tuple[tuple[bytes, bytes], ...]] = {
    "transcode-cancelled": (
        (rb"<State>Success</State>", b"<State>Cancel</State>"),
        (rb"\s*<MediaResult>.*?</MediaResult>", b""),
    ),
}

__all__ = [
    "SAMPLES",
    "Attempt",
    "Run",
    "event_from",
    "events_from",
    "many",
    "run_handler",
    "run_handler_sync",
    "sample",
    "sample_body",
    "samples",
]


def sample(name: str = "transcode") -> Event:
    """A new `Event` of the sample callback `name` (one of `SAMPLES`)."""
    return event_from(sample_body(name))


def sample_body(name: str = "transcode") -> bytes:
    """The callback `name` (one of `SAMPLES`) as CI sends it: what `send --sample` posts."""
    if name not in SAMPLES:
        known = ", ".join(SAMPLES)
        raise KeyError(f"no sample callback {name!r}; there are: {known}")
    body = files(__name__).joinpath("samples").joinpath(SAMPLES[name]).read_bytes()
    for pattern, instead in VARIANTS.get(name, ()):
        body = re.sub(pattern, instead, body, count=1, flags=re.DOTALL)
    return body


def samples() -> dict[str, Event]:
    """One event of every sample, by name."""
    return {name: sample(name) for name in SAMPLES}


def many(name: str, count: int) -> list[Event]:
    """`count` events like sample `name`, each about a job of its own (JobId `<id>-<n>`,
    and the event id to match): for batches, and for what dedups by job."""
    base = sample(name)
    made = []
    for n in range(count):
        job_id = f"{base.subject}-{n}"
        made.append(
            dataclasses.replace(base, job_id=job_id, id=base.id.replace(base.subject, job_id, 1))
        )
    return made


def events_from(source: bytes | str | Path) -> list[Event]:
    """Every event of a callback: its body (XML or JSON, as CI sends it) or a file."""
    body = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    return parse_callback(body, received_at=datetime.now(timezone.utc))


def event_from(source: bytes | str | Path) -> Event:
    """The first event of a callback (`events_from`)."""
    return events_from(source)[0]


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int
    outcome: Literal["done", "retry", "dead"]
    error: str | None
    # How long the dispatcher would have waited before the next attempt (seconds).
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class Run:
    """One event's run through the handler, attempt by attempt."""

    event: Event
    attempts: list[Attempt]

    @property
    def outcome(self) -> Literal["done", "dead"]:
        """`done`, or `dead` (dead-lettered: `Fail`, or the last attempt failed)."""
        return "done" if self.attempts[-1].outcome == "done" else "dead"

    @property
    def errors(self) -> list[str]:
        return [attempt.error for attempt in self.attempts if attempt.error]


async def run_handler(
    handler: AnyHandler,
    *events: Event,
    attempts: int = 3,
    timeout: float = 30.0,
    batch_size: int | None = None,
    name: str = "handler",
    inspector_url: str | None = None,
) -> list[Run]:
    """Run each event through the handler by the dispatcher's rules (see the module's
    doc): each event's `Run`, in the order given. `attempts` is the handler's
    `max_attempts`, `batch_size` its batches' size (a batch handler: all the events
    still due at once by default)."""
    config = HandlerConfig(
        type="test",
        max_attempts=attempts,
        timeout=timeout,
        batch_size=batch_size or max(1, len(events)),
    )
    slot = Slot(name, handler, config)
    metrics = SlotMetrics(Metrics(), name)
    runs = {id(event): Run(event, []) for event in events}
    # (the event as given, the attempts made) of every run still due.
    due: list[tuple[Event, int]] = [(event, 0) for event in events]
    await handler_api.start(handler)
    try:
        while due:
            claims = [Claim(event.copy(), name, made, "kit", None) for event, made in due]
            results = await _attempts(slot, claims, metrics, inspector_url)
            now = datetime.now(timezone.utc)
            again = []
            for (given, made), result in zip(due, results, strict=True):
                wait = (result.retry_at - now).total_seconds() if result.retry_at else None
                runs[id(given)].attempts.append(
                    Attempt(made + 1, _known(result.outcome), result.error, wait)
                )
                if result.outcome == "retry":
                    again.append((given, made + 1))
            due = again
    finally:
        await handler_api.close(handler)
    return [runs[id(event)] for event in events]


def run_handler_sync(handler: AnyHandler, *events: Event, **options: Any) -> list[Run]:
    """`run_handler` (the same options), for a test that is not async."""
    return asyncio.run(run_handler(handler, *events, **options))


async def _attempts(
    slot: Slot, claims: Sequence[Claim], metrics: SlotMetrics, inspector_url: str | None
) -> list[outcomes.Result]:
    if slot.batch is None:
        return [await outcomes.attempt(slot, claim, metrics, inspector_url) for claim in claims]
    results: list[outcomes.Result] = []
    for start in range(0, len(claims), slot.batch_size):
        batch = list(claims[start : start + slot.batch_size])
        results += await outcomes.attempt_batch(slot, batch, metrics, inspector_url)
    return results


def _known(outcome: str) -> Literal["done", "retry", "dead"]:
    if outcome in ("done", "retry", "dead"):
        return outcome  # type: ignore[return-value]
    raise ValueError(f"an attempt ended {outcome!r}, which a handler cannot make")
