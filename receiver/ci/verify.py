"""Verification: an event from a source with `verify = "ci-api"` reaches no handler until
CI's job query API confirms it.

CI signs none of its callbacks: anyone who learns the CallBack URL can post a convincing
`State=Success`. But CI answers for every job it ran. Such a callback is committed and
answered at once, as any other; its handler runs wait `held` beside a run of this step
(`VERIFY_RUN`), which the dispatcher runs like a handler: leased, and retried with
backoff and jitter. One API request per event:

- **confirmed**: the API shows the same job (JobId, Tag, State, input object), workflow
  execution (RunId, WorkflowId, State, input object) or moderation job (JobId, State,
  verdict, input object), and the same outputs where it lists them: the held runs
  become pending;
- **forged**: the API knows no such job, or says otherwise, or the callback names a
  bucket `[ci]` does not list or an id CI never makes: the held runs become `forged`,
  this run ends `forged` with the reason, and no handler ever sees the event;
- **deferred**: CI unreachable or throttling, or still showing the job unfinished (its
  own lag, for up to `[ci] verify_lag` after the callback): tried again later; the first
  answer after CI was out of reach (no answer, or 5xx) makes every deferred verification
  due at once;
- **held** or **passed**: a kind no query API here covers, as `[ci] verify_uncovered`
  says (held until replayed by name, or handled unverified).

The API's answer goes through the callbacks' own normalizer, so both sides are compared
as Events: the same fields, read the same way.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter

from handlers import Retry
from receiver.callback.decode import PayloadError
from receiver.callback.event import Event, ObjectRef
from receiver.ci.api import (
    FINAL_STATES,
    MODERATION_FAMILIES,
    CiApi,
    CiApiError,
    events_of,
    job_document,
    workflow_document,
)
from receiver.config import CiConfig, HandlerConfig
from receiver.dispatch.outcomes import Forged
from receiver.dispatch.slots import Slot
from receiver.inbox import VERIFY_RUN, Storing

logger = structlog.get_logger("ci_receiver.verify")

# The job tags DescribeMediaJob (`GET /jobs/<JobId>`) answers for: the media-processing
# jobs whose callbacks CI documents. Picture (`/pic_jobs`), AI (`/ai_jobs`), file
# (`/file_jobs`) and document (`/doc_jobs`) jobs are asked elsewhere: not covered.
MEDIA_JOB_TAGS = frozenset(
    {
        "Animation", "Concat", "DigitalWatermark", "ExtractDigitalWatermark", "HighSpeedHd",
        "MediaInfo", "NoiseReduction", "QualityEstimate", "SDRtoHDR", "Segment",
        "SmartCover", "Snapshot", "SpeechRecognition", "StreamExtract", "SuperResolution",
        "Transcode", "Tts", "VideoMontage", "VideoProcess", "VideoTag", "VoiceSeparate",
    }
)  # fmt: skip
# What CI's ids look like; anything else (a path, a comma-separated list) is never sent
# to the API: it would ask for something else than the callback names.
CI_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Seconds: the verification's attempts back off up to this, and never give up. Ten
# minutes bounds what a long outage of CI's API costs (a request and an attempt's row per
# waiting event and try); when the API answers again after being out of reach, the
# others are tried at once.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 600.0
# The failures of CI's API that end when CI is back (not a throttling, which an answer to
# one request does not end, nor a refusal of this one request).
OUT_OF_REACH = frozenset({"network", "server"})
CONCURRENCY = 8


class Verifier:
    """The verification step, run by the dispatcher as the handler of `VERIFY_RUN`."""

    def __init__(
        self,
        config: CiConfig,
        api: CiApi,
        inbox: Storing,
        registry: CollectorRegistry | None,
        wake: Callable[[], None],
    ) -> None:
        self._config = config
        self._api = api
        self._inbox = inbox
        self._wake = wake
        self._watched = {bucket.name for bucket in config.buckets}
        # Whether asking CI's API failed since it last answered: its next answer ends the
        # others' wait.
        self._unanswered = False
        self._outcomes = Counter(
            "ci_receiver_verify",
            "Verifications of callbacks against CI's job API, by outcome (confirmed, forged,"
            " deferred, held, passed).",
            ["outcome"],
            registry=registry,
        )

    async def __call__(self, event: Event) -> None:
        problem = self._refusal(event)
        if problem is None:
            uncovered = _uncovered(event)
            if uncovered is not None:
                await self._uncovered(event, uncovered)
                return
            problem = self._compare(event, await self._fetch(event))
        if problem is None:
            if await self._inbox.settle(event.id, genuine=True):
                self._wake()
            self._outcomes.labels("confirmed").inc()
            logger.info("callback confirmed by CI's job API", job_id=event.subject)
            return
        await self._inbox.settle(event.id, genuine=False)
        self._outcomes.labels("forged").inc()
        logger.warning(
            "forged callback: CI's job API contradicts it; no handler will see it",
            reason=problem, job_id=event.subject, kind=event.kind, tag=event.tag,
            state=event.state, source=event.source,
            bucket=event.input.bucket if event.input else None,
        )  # fmt: skip
        raise Forged(problem)

    def _refusal(self, event: Event) -> str | None:
        """What makes the callback forged before asking anything."""
        bucket = event.input.bucket if event.input else None
        if not bucket:
            # Jobs and workflows always name theirs; a moderation of text may have none.
            return None if event.kind == "moderation" else "the callback names no bucket"
        if bucket not in self._watched:
            return f"bucket {bucket} is not one of [ci] buckets"
        if not CI_ID.fullmatch(event.subject):
            return f"{event.subject!r} is not an id CI makes"
        return None

    async def _fetch(self, event: Event) -> Event | None:
        """The event CI's API gives for the same job; None when it knows no such job."""
        bucket = event.input.bucket if event.input else None
        assert bucket  # `_uncovered` holds back the events that name none
        subject = event.subject
        try:
            if event.kind == "job":
                detail = await self._api.get_job(bucket, subject, attempts=1)
                document = job_document(detail) if detail else None
            elif event.kind == "workflow":
                execution = await self._api.get_workflow_execution(bucket, subject, attempts=1)
                document = workflow_document(execution) if execution else None
            else:
                family = MODERATION_FAMILIES[event.event_name or ""]
                detail = await self._api.get_moderation_job(bucket, family, subject, attempts=1)
                document = {"EventName": event.event_name, "JobsDetail": detail} if detail else None
            found = events_of(document) if document else []
        except (CiApiError, PayloadError) as error:
            # The event waits; the dispatcher tries again with backoff. Said without the
            # request, which is this event's: CI out of reach is then the same failure
            # for every event, which the dispatcher logs once (receiver/failing.py).
            self._outcomes.labels("deferred").inc()
            if isinstance(error, CiApiError) and error.reason in OUT_OF_REACH:
                self._unanswered = True
            said = error.detail if isinstance(error, CiApiError) else str(error)
            raise Retry(f"cannot ask CI's job API: {said}") from None
        if self._unanswered:
            self._unanswered = False
            await self._hasten_the_others()
        return next((e for e in found if e.subject == subject), None)

    async def _hasten_the_others(self) -> None:
        """CI answers again: the verifications that waited for it are due now."""
        try:
            if await self._inbox.hasten(VERIFY_RUN):
                self._wake()
        except Exception as exc:  # they are tried at the end of their backoff instead
            logger.warning("cannot make the waiting verifications due", error=str(exc))

    def _compare(self, claimed: Event, actual: Event | None) -> str | None:
        """Why the callback is forged, or None when CI's API says the same."""
        if actual is None:
            return f"CI's job API knows no {claimed.kind} {claimed.subject}"
        if actual.state not in FINAL_STATES and actual.state != claimed.state:
            # CI may call back a moment before its API shows the job finished.
            waited = (datetime.now(timezone.utc) - claimed.received_at).total_seconds()
            if waited < self._config.verify_lag:
                self._outcomes.labels("deferred").inc()
                raise Retry(f"CI's job API still shows State={actual.state}")
            return f"CI's job API still shows State={actual.state} {waited:.0f}s after it"
        for name, mine, theirs in _fields(claimed, actual):
            if mine != theirs:
                return f"the callback says {name}={mine!r}, CI's job API {theirs!r}"
        if not _same_object(claimed.input, actual.input):
            return (
                f"the callback's input is {_describe(claimed.input)},"
                f" CI's job API says {_describe(actual.input)}"
            )
        # Where the API names what the job wrote, the callback must name the same: the
        # outputs are what handlers pass on.
        if actual.outputs and _keys(claimed.outputs) != _keys(actual.outputs):
            return (
                f"the callback's outputs are {_keys(claimed.outputs)},"
                f" CI's job API says {_keys(actual.outputs)}"
            )
        return None

    async def _uncovered(self, event: Event, why: str) -> None:
        if self._config.verify_uncovered == "pass":
            if await self._inbox.settle(event.id, genuine=True):
                self._wake()
            self._outcomes.labels("passed").inc()
            logger.info("callback not verified, passed as [ci] verify_uncovered says", why=why)
            return
        self._outcomes.labels("held").inc()
        logger.warning(
            "callback cannot be verified; held until replayed by name", why=why,
            job_id=event.subject, tag=event.tag, event_name=event.event_name,
        )  # fmt: skip


def _uncovered(event: Event) -> str | None:
    """Why no query API here can confirm this event, or None when one can."""
    if event.kind == "job" and event.tag not in MEDIA_JOB_TAGS:
        return f"no job query API here for tag {event.tag!r}"
    if event.kind == "moderation" and event.event_name not in MODERATION_FAMILIES:
        return f"no moderation query API here for {event.event_name!r}"
    if not (event.input and event.input.bucket):
        return "the callback names no bucket to ask CI about"
    return None


def _fields(claimed: Event, actual: Event) -> list[tuple[str, Any, Any]]:
    if claimed.kind == "job":
        return [("Tag", claimed.tag, actual.tag), ("State", claimed.state, actual.state)]
    if claimed.kind == "workflow":
        return [
            ("WorkflowId", _workflow_id(claimed), _workflow_id(actual)),
            ("State", claimed.state, actual.state),
        ]
    mine, theirs = claimed.moderation, actual.moderation
    return [
        ("State", claimed.state, actual.state),
        ("Result", mine.result if mine else None, theirs.result if theirs else None),
    ]


def _workflow_id(event: Event) -> str | None:
    return event.workflow.workflow_id if event.workflow else None


def _same_object(claimed: ObjectRef | None, actual: ObjectRef | None) -> bool:
    """The same key; the same bucket where the API's answer names one (it was asked on
    the claimed bucket's own domain, so it speaks of that bucket); the same region where
    both name one."""
    if claimed is None or actual is None:
        return claimed is actual
    regions = {claimed.region, actual.region} - {None}
    return (
        claimed.key.lstrip("/") == actual.key.lstrip("/")
        and actual.bucket in (None, claimed.bucket)
        and len(regions) <= 1
    )


def _keys(refs: list[ObjectRef]) -> list[str]:
    return sorted(f"{ref.bucket}/{ref.key}" for ref in refs)


def _describe(ref: ObjectRef | None) -> str:
    return f"{ref.key} in {ref.bucket} ({ref.region})" if ref else "none"


def verify_slot(
    config: CiConfig,
    api: CiApi,
    inbox: Storing,
    registry: CollectorRegistry | None,
    wake: Callable[[], None],
) -> Slot:
    """The verification step as the dispatcher's slot: one request per attempt, retried
    without end (the event waits for CI), never dead-lettered."""
    settings = HandlerConfig(
        type="ci-api",
        timeout=config.request_timeout + 5,
        max_attempts=sys.maxsize,
        backoff_initial=BACKOFF_INITIAL,
        backoff_max=BACKOFF_MAX,
        concurrency=CONCURRENCY,
    )
    return Slot(VERIFY_RUN, Verifier(config, api, inbox, registry, wake), settings)
