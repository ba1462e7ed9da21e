"""The CI job API client (the official SDK) against the loopback stand-in for CI, which
checks every request's COS signature."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from receiver import parse_callback
from receiver.ci.api import (
    MODERATION_FAMILIES,
    CiApi,
    CiApiError,
    CredentialsError,
    events_of,
    job_document,
    workflow_document,
)
from receiver.config import CiConfig
from receiver.metrics import Metrics
from tests.support.ci_api_server import (
    BUCKET,
    REGION,
    SECRET_ID,
    SECRET_KEY,
    CiApiServer,
    Failure,
    callback_body,
    execution,
    job,
)


def ci_config(server: CiApiServer, **overrides) -> CiConfig:
    options = {
        "secret_id": SECRET_ID,
        "secret_key": SECRET_KEY,
        "endpoint": server.url,
        "buckets": [{"name": BUCKET, "region": REGION, "tags": ["Transcode"], "workflows": ["w1"]}],
        **overrides,
    }
    return CiConfig(**options)


def client(server: CiApiServer, metrics: Metrics | None = None, **overrides) -> CiApi:
    registry = (metrics or Metrics()).registry
    return CiApi(ci_config(server, **overrides), registry, backoff_initial=0.01, backoff_max=0.05)


def errors(metrics: Metrics, reason: str) -> float:
    sample = "ci_receiver_ci_api_errors_total"
    return metrics.registry.get_sample_value(sample, {"reason": reason}) or 0


async def all_items(api: CiApi, list_page, *args, **kwargs) -> list[dict]:
    return [item async for page in api.pages(list_page, *args, **kwargs) for item in page.items]


async def test_jobs_are_listed_page_by_page_with_every_filter(ci):
    now = datetime.now(timezone.utc)
    old = now - timedelta(days=2)
    ci.add_jobs(BUCKET, *(job(n, BUCKET, REGION) for n in range(230)))
    ci.add_jobs(
        BUCKET,
        job(900, BUCKET, REGION, state="Running"),  # not finished
        job(901, BUCKET, REGION, tag="Snapshot"),  # another tag
        job(902, BUCKET, REGION, created=old),  # before the window
        job(903, BUCKET, REGION, queue_id="p-other", state="Failed"),
    )
    api = client(ci)
    window = {"since": now - timedelta(hours=1), "until": now + timedelta(minutes=1)}

    listed = await all_items(api, api.list_jobs, BUCKET, "Transcode", **window)
    assert sorted(j["JobId"] for j in listed) == sorted(
        [f"j{n:032x}" for n in range(230)] + [f"j{903:032x}"]
    )
    assert len(ci.served("/jobs")) == 3  # pages of 100, 100 and 31: NextToken followed
    only_queue = await all_items(
        api, api.list_jobs, BUCKET, "Transcode", queue_id="p-other", **window
    )
    assert [j["JobId"] for j in only_queue] == [f"j{903:032x}"]
    failed = await all_items(api, api.list_jobs, BUCKET, "Transcode", states=("Failed",), **window)
    assert [j["State"] for j in failed] == ["Failed"]
    # Every request was signed and checked, and named the bucket's CI domain.
    assert all(seen.status == 200 and seen.bucket == BUCKET for seen in ci.requests)
    assert {seen.query["orderByTime"] for seen in ci.requests} == {"Asc"}


async def test_a_job_from_the_api_is_the_event_its_callback_would_be(ci):
    detail = job(7, BUCKET, REGION)
    ci.add_jobs(BUCKET, detail, job(8, BUCKET, REGION, state="Failed"))
    api = client(ci)

    for n in (7, 8):
        from_api = await api.get_job(BUCKET, f"j{n:032x}")
        assert from_api is not None
        [recovered] = events_of(job_document(from_api))
        [called_back] = parse_callback(callback_body(from_api))
        assert recovered.source == "reconcile"
        mine, theirs = recovered.to_dict(), called_back.to_dict()
        for changes in ("source", "format", "received_at", "raw"):
            mine.pop(changes), theirs.pop(changes)
        assert mine == theirs
    assert recovered.id == f"job:j{8:032x}:Failed"
    assert await api.get_job(BUCKET, "j-unknown") is None


async def test_workflow_executions_are_listed_and_fetched_whole(ci):
    ci.executions[BUCKET] = [
        execution(n, BUCKET, REGION, "w1", state="Failed" if n == 2 else "Success")
        for n in range(3)
    ] + [execution(9, BUCKET, REGION, "w-other")]
    api = client(ci)
    now = datetime.now(timezone.utc)
    summaries = await all_items(
        api, api.list_workflow_executions, BUCKET, "w1",
        since=now - timedelta(hours=1), until=now + timedelta(minutes=1), size=2,
    )  # fmt: skip
    assert [s["RunId"] for s in summaries] == [f"i{n:032x}" for n in range(3)]
    assert "Tasks" not in summaries[0]  # the list gives summaries only

    whole = await api.get_workflow_execution(BUCKET, f"i{2:032x}")
    [event] = events_of(workflow_document(whole))
    # The summary and the whole execution name the same event: what the inbox is asked.
    assert event.id == events_of(workflow_document(summaries[2]))[0].id
    assert event.id == f"workflow:i{2:032x}:WorkflowFinish:Failed"
    assert [o.key for o in event.outputs] == ["output/video-2.mp4"]
    assert await api.get_workflow_execution(BUCKET, "i-unknown") is None


async def test_moderation_jobs_can_be_fetched_for_the_documented_families(ci):
    verdict = {"JobId": "sa0123", "State": "Success", "Result": "1", "Label": "Porn"}
    ci.moderation[(BUCKET, "image")] = [verdict]
    api = client(ci)
    assert set(MODERATION_FAMILIES.values()) == {"image", "video", "audio", "text"}
    assert await api.get_moderation_job(BUCKET, "image", "sa0123") == verdict
    assert await api.get_moderation_job(BUCKET, "video", "sa0123") is None


async def test_throttling_server_errors_and_dropped_connections_are_retried(ci):
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION))
    metrics = Metrics()
    api = client(ci, metrics)
    ci.fail_next(
        Failure(429, "TooManyRequests"),
        Failure(503, "SlowDown"),
        Failure(drop=True),
        Failure(500, "InternalError"),
    )
    assert (await api.get_job(BUCKET, f"j{1:032x}"))["State"] == "Success"
    assert [seen.status for seen in ci.requests] == [429, 503, 0, 500, 200]
    assert (errors(metrics, "throttled"), errors(metrics, "network")) == (2, 1)
    assert errors(metrics, "server") == 1

    # Past max_attempts the error is raised, marked as worth trying again later.
    ci.fail_next(*[Failure(503, "SlowDown")] * 3)
    with pytest.raises(CiApiError) as raised:
        await client(ci, max_attempts=3).get_job(BUCKET, f"j{1:032x}")
    assert raised.value.retryable
    assert "503 SlowDown" in str(raised.value)


@pytest.mark.parametrize(
    ("secret_id", "secret_key", "token", "code"),
    [
        ("AKIDunknown", SECRET_KEY, None, "InvalidAccessKeyId"),
        (SECRET_ID, "not-the-key", None, "SignatureDoesNotMatch"),
        ("AKIDtemporary", "temporary-key", None, "InvalidAccessKeyId"),  # token missing
    ],
)
async def test_refused_credentials_fail_at_once_without_retries(
    ci, secret_id, secret_key, token, code
):
    metrics = Metrics()
    api = client(ci, metrics, secret_id=secret_id, secret_key=secret_key, token=token)
    with pytest.raises(CredentialsError) as raised:
        await api.check()
    assert raised.value.code == code
    assert not raised.value.retryable
    assert "not-the-key" not in str(raised.value)
    assert len(ci.requests) == 1
    assert errors(metrics, "refused") == 1


async def test_temporary_credentials_send_their_token(ci):
    api = client(ci, secret_id="AKIDtemporary", secret_key="temporary-key", token="session-token")
    await api.check()
    assert [seen.status for seen in ci.requests] == [200]
