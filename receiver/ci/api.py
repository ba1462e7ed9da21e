"""CI's job query API, through Tencent's official SDK (`cos-python-sdk-v5`).

What the reconciler (and verification) ask of CI: list the jobs of a bucket by tag,
queue, state and creation time (DescribeMediaJobs, paged), get jobs by id
(DescribeMediaJob), list and get workflow executions, get a moderation job.

- **The SDK, pointed anywhere.** `CosConfig(IP=, Port=, Scheme=)` sends every request to
  one address while the Host header, and the signature over it, still name the bucket's
  CI domain `<bucket>.ci.<region>.myqcloud.com`; that is how `[ci] endpoint` reaches a
  private gateway, a proxy, or the loopback stand-in the tests run.
- **Off the event loop.** The SDK is synchronous (requests): each call runs in a worker
  thread, bounded by `request_timeout`.
- **Retries are ours.** The SDK's own (a fixed sleep, 5xx and network errors only) are
  off; throttling (429, 503), other 5xx and network errors are retried here with
  exponential backoff and full jitter, up to `max_attempts`, and each failure is counted.
  A refusal (wrong key, missing permission) raises `CredentialsError` at once.
- **Documents, not the SDK's dicts.** A job (`JobsDetail`) or a workflow execution is
  handed on as the document a callback would carry, `{"EventName": "TaskFinish",
  "JobsDetail": {...}}`, and `events_of()` normalizes it with the callbacks' own
  normalizer: an event recovered from the API gets the id its callback would have had.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Counter
from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from receiver import tracing
from receiver.callback.decode import Document, PayloadError, decode
from receiver.callback.event import Event
from receiver.callback.fields import text
from receiver.callback.normalize import normalize
from receiver.config import CiConfig
from receiver.failing import Failing

logger = structlog.get_logger("ci_receiver.ci_api")

# What urllib3 adds to a failure of a request: its path (`with url: /jobs/<id>`).
_REQUEST_PATH = re.compile(r" with url: \S+")

# The SDK logs each request's headers at DEBUG (a temporary credential's token among
# them) and every failure with a traceback; we log each failure once, with its retry.
logging.getLogger("qcloud_cos").setLevel(logging.CRITICAL)

T = TypeVar("T")

FINAL_STATES = ("Success", "Failed", "Cancel")
# CI's time format for the list filters, e.g. 2001-01-01T00:00:00+0800.
CI_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
BEIJING = timezone(timedelta(hours=8))
PAGE_SIZE = 100  # the most the list APIs return at once
# A NextToken that comes back again (or a runaway listing) ends the listing here.
MAX_PAGES = 10_000
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0

# Moderation (审核) results that can be fetched again by job id: the callback's
# EventName -> the family CI's query API (`GET /<family>/auditing/<JobId>`) names.
# Document, web-page and live-stream reviews have query APIs too (`document`,
# `webpage`, `video`), but their callbacks' EventName values are not documented.
MODERATION_FAMILIES = {
    "ReviewImage": "image",
    "ReviewVideo": "video",
    "ReviewAudio": "audio",
    "ReviewText": "text",
}


class CiApiError(Exception):
    """A request to CI's API failed; `retryable` when trying again later may help.
    `detail`: what went wrong without naming the request (the same for every request
    while CI is out of reach)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retryable: bool = False, detail: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.retryable = retryable
        self.detail = detail or message

    @property
    def reason(self) -> str:
        """Why, in a word (`network`, `refused`, `throttled`, `server`, `other`)."""
        if self.status is None:
            return "network"
        if isinstance(self, CredentialsError):
            return "refused"
        if self.status == 429 or self.code in ("SlowDown", "RequestLimitExceeded"):
            return "throttled"
        return "server" if self.status >= 500 else "other"


class CredentialsError(CiApiError):
    """CI refused the credentials (wrong key, expired token, or no permission)."""


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]]
    next_token: str | None


def job_document(detail: dict[str, Any]) -> dict[str, Any]:
    """A job from the API as the document its TaskFinish callback carries."""
    return {"EventName": "TaskFinish", "JobsDetail": detail}


def workflow_document(execution: dict[str, Any]) -> dict[str, Any]:
    """A workflow execution from the API as its WorkflowFinish callback document."""
    return {"EventName": "WorkflowFinish", "WorkflowExecution": execution}


def events_of(document: dict[str, Any]) -> list[Event]:
    """Normalize a callback document made from an API answer, as a callback would be."""
    return normalize(Document(data=document, format="json"), source="reconcile").events


def ci_time(moment: datetime) -> str:
    return moment.astimezone(BEIJING).strftime(CI_TIME_FORMAT)


class CiApi:
    """CI's job query API for the buckets of `[ci]`, one SDK client per region."""

    def __init__(
        self,
        config: CiConfig,
        registry: CollectorRegistry | None = None,
        *,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self._config = config
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._clients: dict[str, CosS3Client] = {}
        # CI out of reach fails every request alike: said once, and once when it answers.
        self._failing = Failing()
        self._lock = threading.Lock()
        self.errors = Counter(
            "ci_receiver_ci_api_errors",
            "Failed requests to CI's job query API, by reason (throttled, server, network,"
            " refused, other); retried ones included.",
            ["reason"],
            registry=registry,
        )
        self._regions = {bucket.name: bucket.region for bucket in config.buckets}

    # --- the calls -----------------------------------------------------------------

    async def check(self) -> None:
        """One cheap call per bucket (a list of one item), at start: wrong credentials,
        a missing permission or a bucket not bound to CI raise `CiApiError` now.
        Network errors are not retried here (the caller decides)."""
        for bucket in self._config.buckets:
            if bucket.tags:
                call = functools.partial(
                    self._client(bucket.name).ci_list_media_jobs,
                    Bucket=bucket.name, Tag=bucket.tags[0], States="All", Size=1,
                )  # fmt: skip
            else:
                call = functools.partial(
                    self._client(bucket.name).ci_list_workflowexecution,
                    Bucket=bucket.name, WorkflowId=bucket.workflows[0], Size=1,
                )  # fmt: skip
            await self._call(call, what=f"check {bucket.name}", attempts=1)

    async def list_jobs(
        self,
        bucket: str,
        tag: str,
        *,
        since: datetime,
        until: datetime,
        queue_id: str | None = None,
        states: tuple[str, ...] = FINAL_STATES,
        next_token: str | None = None,
        size: int = PAGE_SIZE,
    ) -> Page:
        """One page of DescribeMediaJobs, oldest first."""
        data = await self._call(
            functools.partial(
                self._client(bucket).ci_list_media_jobs,
                Bucket=bucket, Tag=tag, QueueId=queue_id, States=",".join(states),
                StartCreationTime=ci_time(since), EndCreationTime=ci_time(until),
                OrderByTime="Asc", Size=size, NextToken=next_token or "",
            ),
            what=f"list {tag} jobs of {bucket}",
        )  # fmt: skip
        return Page(_entries(data.get("JobsDetail")), text(data.get("NextToken")))

    async def list_workflow_executions(
        self,
        bucket: str,
        workflow_id: str,
        *,
        since: datetime,
        until: datetime,
        states: tuple[str, ...] = FINAL_STATES,
        next_token: str | None = None,
        size: int = PAGE_SIZE,
    ) -> Page:
        """One page of a workflow's executions (summaries: RunId, State, CreateTime...)."""
        data = await self._call(
            functools.partial(
                self._client(bucket).ci_list_workflowexecution,
                Bucket=bucket, WorkflowId=workflow_id, States=",".join(states),
                StartCreationTime=ci_time(since), EndCreationTime=ci_time(until),
                OrderByTime="Asc", Size=size, NextToken=next_token or "",
            ),
            what=f"list executions of workflow {workflow_id} in {bucket}",
        )  # fmt: skip
        return Page(_entries(data.get("WorkflowExecutionList")), text(data.get("NextToken")))

    async def pages(
        self, list_page: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Page]:
        """Every page of `list_jobs` or `list_workflow_executions`, following NextToken."""
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            page: Page = await list_page(*args, next_token=token, **kwargs)
            yield page
            token = page.next_token
            if not page.items or not token or token in seen:
                return
            seen.add(token)
        logger.warning("listing stopped after the page limit", pages=MAX_PAGES)

    async def get_job(
        self, bucket: str, job_id: str, *, attempts: int | None = None
    ) -> dict[str, Any] | None:
        """The JobsDetail of one media job, or None when CI does not know the id.
        `attempts` overrides `[ci] max_attempts` (each getter takes it: verification
        tries once and leaves retrying to the dispatcher)."""
        data = await self._call(
            functools.partial(self._client(bucket).ci_get_media_jobs, Bucket=bucket, JobIDs=job_id),
            what=f"get job {job_id} of {bucket}",
            attempts=attempts,
        )
        found = [d for d in _entries(data.get("JobsDetail")) if text(d.get("JobId")) == job_id]
        return found[0] if found else None

    async def get_workflow_execution(
        self, bucket: str, run_id: str, *, attempts: int | None = None
    ) -> dict[str, Any] | None:
        """The WorkflowExecution of one run (with its Tasks), or None when unknown."""
        try:
            data = await self._call(
                functools.partial(
                    self._client(bucket).ci_get_workflowexecution, Bucket=bucket, RunId=run_id
                ),
                what=f"get workflow execution {run_id} of {bucket}",
                attempts=attempts,
            )
        except CiApiError as error:
            if error.status == 404:
                return None
            raise
        found = [e for e in _entries(data.get("WorkflowExecution")) if text(e.get("RunId"))]
        return found[0] if found else None

    async def get_moderation_job(
        self, bucket: str, family: str, job_id: str, *, attempts: int | None = None
    ) -> dict[str, Any] | None:
        """The JobsDetail of one moderation job; `family` is a value of
        `MODERATION_FAMILIES` (or `document`, `webpage`). None when unknown."""
        try:
            data = await self._call(
                functools.partial(
                    self._client(bucket).ci_auditing_query_common,
                    Bucket=bucket, Type=family, JobID=job_id,
                ),
                what=f"get {family} moderation job {job_id} of {bucket}",
                attempts=attempts,
            )  # fmt: skip
        except CiApiError as error:
            if error.status == 404:
                return None
            raise
        found = _entries(data.get("JobsDetail"))
        return found[0] if found and text(found[0].get("JobId")) == job_id else None

    # --- the machinery -------------------------------------------------------------

    def _client(self, bucket: str) -> CosS3Client:
        region = self._regions.get(bucket)
        if region is None:
            raise CiApiError(f"bucket {bucket} is not in [ci] buckets")
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._clients[region] = CosS3Client(self._cos_config(region), retry=0)
            return client

    def _cos_config(self, region: str) -> CosConfig:
        config = self._config
        assert config.secret_id is not None
        assert config.secret_key is not None
        options: dict[str, Any] = {
            "Region": region,
            "SecretId": config.secret_id.get_secret_value(),
            "SecretKey": config.secret_key.get_secret_value(),
            "Token": config.token.get_secret_value() if config.token else None,
            "Timeout": config.request_timeout,
            "Scheme": "https",
        }
        if config.endpoint:
            # Every request to this address; the SDK then sets the Host header (and signs
            # it) as <bucket>.<Endpoint>, which must be the bucket's CI domain.
            address = urlsplit(config.endpoint)
            options.update(
                Scheme=address.scheme,
                IP=address.hostname,
                Port=address.port,
                Endpoint=f"ci.{region}.myqcloud.com",
            )
        return CosConfig(**options)

    async def _call(self, call: Callable[[], T], *, what: str, attempts: int | None = None) -> T:
        """Run an SDK call in a thread; retry what may pass later, with backoff + jitter."""
        attempts = attempts or self._config.max_attempts
        delay = self._backoff_initial
        # For a trace: the SDK method (`ci_get_media_jobs`) and the bucket each call site's
        # partial names.
        operation = getattr(getattr(call, "func", call), "__name__", "call")
        bucket = str(getattr(call, "keywords", {}).get("Bucket", ""))
        for attempt in range(1, attempts + 1):
            with tracing.calling_ci(operation, bucket) as span:
                try:
                    answer = await asyncio.to_thread(call)
                except (CosServiceError, CosClientError) as exc:
                    error = _error(exc, what)
                except Exception as exc:  # the SDK could not read the answer (a proxy's page?)
                    error = _failed(what, f"unreadable answer ({exc!r})", retryable=True)
                else:
                    self._failing.say_succeeded(logger, "CI's job API answers again")
                    return answer
                span.fail(error.reason, str(error))
            self.errors.labels(error.reason).inc()
            if not error.retryable or attempt == attempts:
                raise error
            # Full jitter: a random wait up to the backoff, so that many receivers
            # throttled at once do not come back at once.
            wait = random.uniform(0, delay)
            # The reason alone decides whether it is news: the request's own words differ.
            self._failing.say_failed(
                logger, "warning", "CI API request failed; trying again", error.reason,
                request=what, error=str(error), attempt=attempt, retry_in=round(wait, 2),
            )  # fmt: skip
            await asyncio.sleep(wait)
            delay = min(delay * 2, self._backoff_max)
        raise AssertionError("unreachable")  # pragma: no cover


def _entries(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [entry for entry in value if isinstance(entry, dict)]
    return []


def _error(exc: CosServiceError | CosClientError, what: str) -> CiApiError:
    if isinstance(exc, CosClientError):  # no answer: connection refused, reset, timeout
        # urllib3 names the request's path ("with url: /jobs/<id>"): what went wrong is the
        # same for every request while CI is out of reach.
        cause = _REQUEST_PATH.sub("", str(exc))
        return _failed(what, f"no answer from CI ({cause})", retryable=True)
    status = exc.get_status_code()
    code, message = _error_body(exc)
    detail = f"HTTP {status} {code or ''}{': ' + message if message else ''}".rstrip()
    if status in (401, 403):
        detail += (
            " (check [ci] secret_id, secret_key and token, and that the key may call"
            " ci:DescribeMediaJobs and the workflow queries)"
        )
        return CredentialsError(f"{what}: {detail}", status=status, code=code, detail=detail)
    retryable = status == 429 or status >= 500
    return _failed(what, detail, status=status, code=code, retryable=retryable)


def _failed(what: str, detail: str, **how: Any) -> CiApiError:
    return CiApiError(f"{what}: {detail}", detail=detail, **how)


def _error_body(exc: CosServiceError) -> tuple[str | None, str | None]:
    """CI's error body (`<Error>` or `<Response>` with Code and Message), read with the
    callbacks' safe decoder: the SDK's own reading needs fields CI does not always send."""
    digest = exc.get_digest_msg()
    if isinstance(digest, dict) and digest.get("code"):
        return text(digest.get("code")), text(digest.get("message"))
    origin = exc.get_origin_msg()
    if not isinstance(origin, str) or not origin:
        return None, None
    try:
        data = decode(origin.encode()).data
    except PayloadError:
        return None, origin[:200]
    error = data.get("Error")
    body = error if isinstance(error, dict) else data
    return text(body.get("Code")), text(body.get("Message"))
