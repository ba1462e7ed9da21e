"""The reconciler: finished jobs whose callback never came, found through CI's job API.

CI documents no retries for its callbacks: one lost while the receiver was down or
unreachable is lost for good. Every `interval` a pass asks CI, for each watch (a
bucket's job tag, per queue when queues are named, or a bucket's workflow), for what
finished (`Success`, `Failed`, `Cancel`) among the jobs created in the window, page by
page, and asks the inbox which of their event ids it holds. Each one missing goes
through the normal ingest path as a callback document with `source = "reconcile"`, so
routes and handlers treat it like the callback it stands for; its dedup id is the
callback's, so a callback that arrives afterwards is a duplicate.

A job that ended less than `settle` ago is left to a later pass: its callback may still
be on its way, and what a pass recovers should be what never came.

The window reaches back `window` before the watch's cursor: the end of its last
completed pass, kept in the inbox. A receiver that was down for longer than the window
catches up from where it stopped; a pass that fails (CI unreachable after the retries,
or the inbox) leaves the cursor where it was; a pass that left jobs to settle moves it
only so far that the next pass's window still reaches back to their creation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter

from receiver import tracing
from receiver.callback.decode import PayloadError
from receiver.callback.event import Event
from receiver.callback.fields import text
from receiver.ci.api import (
    FINAL_STATES,
    CiApi,
    CiApiError,
    events_of,
    job_document,
    workflow_document,
)
from receiver.config import CiConfig
from receiver.failing import Failing
from receiver.ids import new_id
from receiver.inbox import InboxUnavailable, KeptState, Reading, Receipt
from receiver.ingest.ingest import Intake, IntakeUnavailable

logger = structlog.get_logger("ci_receiver.sources.reconcile")

# How far inside [retention] events a pass stays: CI's clock and this one may disagree.
RETENTION_MARGIN = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Watch:
    """One listing a pass makes: a bucket's jobs of one tag (and queue), or the
    executions of one of its workflows."""

    bucket: str
    tag: str | None = None
    queue_id: str | None = None
    workflow_id: str | None = None
    workflow_jobs: bool = False  # a tag's: also the jobs a workflow started

    @property
    def cursor_key(self) -> str:
        what = f"workflow:{self.workflow_id}" if self.workflow_id else f"tag:{self.tag}"
        return f"reconcile:{self.bucket}:{what}" + (f":{self.queue_id}" if self.queue_id else "")

    def __str__(self) -> str:
        what = f"workflow {self.workflow_id}" if self.workflow_id else str(self.tag)
        return f"{self.bucket} {what}" + (f" (queue {self.queue_id})" if self.queue_id else "")


def watches(config: CiConfig, bucket: str | None = None) -> list[Watch]:
    found = []
    for watched in config.buckets:
        if bucket is not None and watched.name != bucket:
            continue
        queues: list[str | None] = [*watched.queue_ids] or [None]  # None: every queue
        for tag in watched.tags:
            found += [
                Watch(watched.name, tag, queue, workflow_jobs=watched.workflow_jobs)
                for queue in queues
            ]
        found += [Watch(watched.name, workflow_id=w) for w in watched.workflows]
    return found


@dataclass(slots=True)
class Found:
    """A finished job (or workflow execution) the inbox did not hold."""

    watch: Watch
    event: Event
    recovered: bool


@dataclass(slots=True)
class Report:
    checked: int = 0
    found: list[Found] = field(default_factory=list)
    # Missing, but ended less than `settle` ago: left to a later pass.
    settling: list[Found] = field(default_factory=list)
    # Watches whose listing failed, with why; their cursors did not move.
    failed: dict[Watch, str] = field(default_factory=dict)

    @property
    def recovered(self) -> list[Found]:
        return [f for f in self.found if f.recovered]


class Reconciled(Reading, KeptState, Protocol):
    """The reconciler reads which events are stored, and keeps its cursor."""


class Reconciler:
    name = "reconcile"

    def __init__(
        self, config: CiConfig, api: CiApi, inbox: Reconciled, intake: Intake,
        registry: CollectorRegistry | None = None, *, events_kept: float = 0.0,
    ) -> None:  # fmt: skip
        """`events_kept`: [retention] events, how long handled events stay (0: for ever)."""
        self._config = config
        self._events_kept = events_kept
        self._failing = Failing()
        self._api = api
        self._inbox = inbox
        self._intake = intake
        self._checked = Counter(
            "ci_receiver_reconcile_checked",
            "Finished jobs and workflow executions the reconciler listed from CI's API.",
            registry=registry,
        )
        self._recovered = Counter(
            "ci_receiver_reconcile_recovered",
            "Events the reconciler stored because their callback never came, by kind.",
            ["kind"],
            registry=registry,
        )
        self._stopping = asyncio.Event()
        self._pass: asyncio.Task[Report] | None = None

    async def run(self) -> None:
        """A pass now, then one every `interval`, until stopped."""
        while not self._stopping.is_set():
            self._pass = asyncio.create_task(self.reconcile(), name="reconcile-pass")
            try:
                report = await self._pass
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            except (InboxUnavailable, IntakeUnavailable) as exc:  # the inbox says so, once
                logger.debug("reconcile pass failed: the inbox is unavailable", error=str(exc))
            except Exception:  # the inbox failed: try again next interval
                logger.exception("reconcile pass failed")
            else:
                logger.info(
                    "reconcile pass done",
                    checked=report.checked,
                    recovered=len(report.recovered),
                    settling=len(report.settling),
                    failed=[str(w) for w in report.failed],
                )
            finally:
                self._pass = None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._config.interval)

    def stop(self) -> None:
        """Stop at once: a pass cut short leaves its cursors where they were."""
        self._stopping.set()
        if self._pass is not None:
            self._pass.cancel()

    async def reconcile(
        self,
        *,
        since: timedelta | None = None,
        bucket: str | None = None,
        dry_run: bool = False,
        settle: timedelta | None = None,
        now: datetime | None = None,
        on_watch: Callable[[Watch, Report], None] | None = None,
    ) -> Report:
        """One pass over every watch (of `bucket`). `since` looks back that far instead of
        from the cursors, and moves none; `dry_run` stores nothing and moves no cursor;
        `settle` replaces `[ci] settle`; `now` is the clock's reading (tests)."""
        report = Report()
        if settle is None:
            settle = timedelta(seconds=self._config.settle)
        for watch in watches(self._config, bucket):
            try:
                until = now or datetime.now(timezone.utc)
                await self._reconcile(watch, report, since, dry_run, until, until - settle)
            except CiApiError as error:
                report.failed[watch] = str(error)
                # CI out of reach fails every watch alike, pass after pass: said once
                # (the API client says when it answers again).
                self._failing.say_failed(
                    logger, "error", "cannot list from CI's job API", error.reason,
                    watch=str(watch), error=str(error),
                )  # fmt: skip
            else:
                self._failing.over()
            if on_watch is not None:
                on_watch(watch, report)
        return report

    async def _reconcile(
        self,
        watch: Watch,
        report: Report,
        since: timedelta | None,
        dry_run: bool,
        until: datetime,
        settled: datetime,
    ) -> None:
        """List what finished up to `until`; recover what the inbox lacks and ended by
        `settled`."""
        if since is not None:
            start = until - since
        else:
            cursor = await self._inbox.get_state(watch.cursor_key)
            last = datetime.fromisoformat(cursor) if cursor else until
            start = min(last, until) - timedelta(seconds=self._config.window)
        if self._events_kept:
            # A job created before then may have had its event handled and pruned since:
            # recovered, it would run its handlers again. (A callback comes after its job
            # was created, and retention goes by when the callback came.)
            kept_since = until - timedelta(seconds=self._events_kept) + RETENTION_MARGIN
            if start < kept_since:
                logger.info(
                    "reconcile looks back only as far as retention keeps events",
                    watch=str(watch), wanted=start.isoformat(), since=kept_since.isoformat(),
                )  # fmt: skip
                start = kept_since
        # A listed item as the callback it stands for.
        document: Callable[[dict[str, Any]], dict[str, Any]]
        if watch.workflow_id:
            pages = self._api.pages(
                self._api.list_workflow_executions, watch.bucket, watch.workflow_id,
                since=start, until=until,
            )  # fmt: skip
            document = workflow_document
        else:
            assert watch.tag is not None
            pages = self._api.pages(
                self._api.list_jobs, watch.bucket, watch.tag, queue_id=watch.queue_id,
                since=start, until=until,
            )  # fmt: skip
            document = job_document
        done_until = until
        async for page in pages:
            finished = [
                item for item in page.items
                if text(item.get("State")) in FINAL_STATES
                and (watch.workflow_id or watch.workflow_jobs or not _by_a_workflow(item))
            ]  # fmt: skip
            report.checked += len(finished)
            self._checked.inc(len(finished))
            candidates = []
            for item in finished:
                body = document(item)
                try:
                    candidates.append((item, body, events_of(body)))
                except PayloadError as error:
                    _unreadable(watch, item, error)
            # A forged event holds the id of a job CI did finish: recover it over that.
            ids = [e.id for _, _, events in candidates for e in events]
            known = await self._inbox.known(ids, forged=False)
            for item, body, events in candidates:
                missing = [event for event in events if event.id not in known]
                if not missing:
                    continue
                if watch.workflow_id:  # the list gives summaries: the execution in full
                    full = await self._execution(watch, item)
                    if full is None:
                        continue
                    try:
                        body, events = full, events_of(full)
                    except PayloadError as error:
                        _unreadable(watch, item, error)
                        continue
                if _ended_after(events, settled):
                    report.settling += [Found(watch, event, recovered=False) for event in missing]
                    # The next pass must list it again: its window has to reach back to the
                    # job's creation (within this pass's, or CI would not have listed it),
                    # and a second before, since CI lists jobs created strictly after
                    # startCreationTime, to the second.
                    created = min(e.created_at or start for e in missing) - timedelta(seconds=1)
                    done_until = min(done_until, created + timedelta(seconds=self._config.window))
                elif dry_run:
                    report.found += [Found(watch, event, recovered=False) for event in missing]
                else:
                    await self._recover(watch, body, missing, report)
        if since is None and not dry_run:
            await self._inbox.set_state(watch.cursor_key, done_until.isoformat())

    async def _execution(self, watch: Watch, item: dict[str, Any]) -> dict[str, Any] | None:
        """The callback document of a listed workflow execution: the execution with its
        tasks, as the callback carried it."""
        run_id = text(item.get("RunId")) or ""
        execution = await self._api.get_workflow_execution(watch.bucket, run_id)
        if execution is None:
            logger.warning("CI listed a workflow execution it cannot show", run_id=run_id)
            return None
        return workflow_document(execution)

    async def _recover(
        self, watch: Watch, body: dict[str, Any], missing: list[Event], report: Report
    ) -> None:
        # No callback began a trace: the recovery begins one of its own.
        with tracing.recovering(watch.bucket, str(watch)) as span:
            receipt = Receipt(
                body=orjson.dumps(body),
                source="reconcile",
                received_at=datetime.now(timezone.utc),
                request_id=new_id(),
                headers={"content-type": "application/json"},
                source_meta={"bucket": watch.bucket, "watch": str(watch), **span.carrier()},
            )
            try:
                stored = await self._intake.ingest(receipt)
            except PayloadError as error:  # kept (or counted) as rejected by the ingestor
                logger.error("a job from CI's API cannot be stored", error=str(error))
                return
        new = set(stored.new)
        for event in missing:
            recovered = event.id in new
            report.found.append(Found(watch, event, recovered))
            if recovered:
                self._recovered.labels(event.kind).inc()
                logger.info(
                    "recovered an event whose callback never came",
                    event_id=event.id, job_id=event.subject, tag=event.tag, state=event.state,
                    bucket=watch.bucket, key=event.input.key if event.input else None,
                )  # fmt: skip


def _unreadable(watch: Watch, item: dict[str, Any], error: PayloadError) -> None:
    """A job or execution CI lists that cannot be read as a callback: said, and passed
    over, so that it never holds up the others nor the watch's cursor."""
    logger.warning(
        "CI listed a job that cannot be read; passed over",
        watch=str(watch), job_id=str(item.get("JobId") or item.get("RunId"))[:100],
        error=str(error),
    )  # fmt: skip


def _by_a_workflow(item: dict[str, Any]) -> bool:
    """Whether a listed job was started by a workflow (it names the execution)."""
    workflow = item.get("Workflow")
    return isinstance(workflow, dict) and bool(text(workflow.get("RunId")))


def _ended_after(events: list[Event], moment: datetime) -> bool:
    """Whether the job (or execution) ended after `moment`; one whose end CI does not
    give counts as ended long ago."""
    ended = [e.finished_at for e in events if e.finished_at is not None]
    return bool(ended) and max(ended) > moment


def reconciler_for(
    config: CiConfig, api: CiApi, inbox: Reconciled, intake: Intake, registry: CollectorRegistry,
    *, events_kept: float,
) -> Reconciler:  # fmt: skip
    """The reconciler of `serve`, `consume` and `run`, its credentials tried first (one
    cheap call per bucket): raises `CiApiError` when CI refuses them, a bucket or a tag.
    CI out of reach is no reason not to start: the passes keep trying."""
    try:
        asyncio.run(api.check())  # before the service's own event loop starts
    except CiApiError as error:
        if not error.retryable:
            raise
        logger.warning("CI's job API cannot be reached yet", error=str(error))
    return Reconciler(config, api, inbox, intake, registry, events_kept=events_kept)
