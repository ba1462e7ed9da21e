"""Verification in-process: the service as `serve` builds it (inbox on SQLite and
PostgreSQL, dispatcher, the verification step, a recording handler), the official SDK,
and the loopback stand-in for CI (tests/support/ci_api_server.py), which checks every signature
and stands in for CI's job API, which cannot be reached from here."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import xmltodict
from structlog.testing import capture_logs

from receiver.ci import verify
from receiver.config import Config
from receiver.inbox import VERIFY_RUN, EventFilter, Receipt
from receiver.runtime.service import Service
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
from tests.support.handler_doubles import recorded

WORKFLOW = "w0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    # The verification's backoff is seconds to a minute; the tests need not wait that.
    monkeypatch.setattr(verify, "BACKOFF_INITIAL", 0.05)
    monkeypatch.setattr(verify, "BACKOFF_MAX", 0.2)


class Receiver:
    """The service `serve` runs, with `[http] verify = "ci-api"`, taking callbacks the
    way the HTTP source hands them over."""

    def __init__(self, inbox_place, tmp_path: Path, ci: CiApiServer, **ci_options) -> None:
        self.handled_path = tmp_path / "handled.jsonl"
        self.config = Config(
            data_dir=tmp_path / "data",
            inbox=inbox_place.config.inbox,
            http={"verify": "ci-api"},
            dispatch={"poll_interval": 0.05},
            handlers={
                "recorder": {
                    "type": "tests.support.handler_doubles:Recorder",
                    "path": str(self.handled_path),
                }
            },
            ci={
                "secret_id": SECRET_ID,
                "secret_key": SECRET_KEY,
                "endpoint": ci.url,
                "buckets": [{"name": BUCKET, "region": REGION, "tags": ["Transcode"]}],
                **ci_options,
            },
        )
        self.service = Service(self.config)

    async def __aenter__(self) -> Receiver:
        await self.service.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.service.stop()

    async def post(self, body: bytes, source: str = "http", headers: dict | None = None) -> str:
        receipt = Receipt(body, source, datetime.now(timezone.utc), "r", headers=headers or {})
        (event_id,) = (await self.service.ingestor.ingest(receipt)).new
        return event_id

    def handled(self) -> list[str]:
        return recorded(self.handled_path)

    async def runs(self, event_id: str) -> dict[str, str]:
        detail = await self.service.inbox.event(event_id)
        return {run.handler: run.status for run in detail.runs}

    async def settled(self, event_id: str) -> dict[str, str]:
        """The runs once the verification is over (and any released run has run)."""
        for _ in range(400):
            runs = await self.runs(event_id)
            if not {"pending", "held"} & set(runs.values()) or (
                runs.get(VERIFY_RUN) == "done" and "pending" not in runs.values()
            ):
                return runs
            await asyncio.sleep(0.025)
        raise AssertionError(f"{event_id} still {runs}")

    async def reason(self, event_id: str) -> str | None:
        detail = await self.service.inbox.event(event_id)
        return next(r.last_error for r in detail.runs if r.handler == VERIFY_RUN)

    def count(self, outcome: str) -> float:
        registry = self.service.metrics.registry
        return registry.get_sample_value("ci_receiver_verify_total", {"outcome": outcome}) or 0


def workflow_callback(run: dict) -> bytes:
    return xmltodict.unparse(
        {"Response": {"EventName": "WorkflowFinish", "WorkflowExecution": run}}
    ).encode()


def image_verdict(job_id: str, result: int, key: str = "uploads/cat.jpg") -> dict:
    """A ReviewImage JobsDetail as the moderation query API answers it."""
    return {
        "JobId": job_id,
        "State": "Success",
        "Object": key,
        "Url": f"https://{BUCKET}.cos.{REGION}.myqcloud.com/{key}",
        "Label": "Porn" if result else "Normal",
        "Result": result,
        "Score": 90 if result else 0,
    }


def moderation_callback(detail: dict, event_name: str = "ReviewImage") -> bytes:
    return orjson.dumps({"EventName": event_name, "JobsDetail": {**detail, "BucketId": BUCKET}})


# --- jobs ------------------------------------------------------------------------------


async def test_a_genuine_callback_reaches_its_handler_once_confirmed(inbox_place, tmp_path, ci):
    detail = job(1, BUCKET, REGION)
    ci.add_jobs(BUCKET, detail)
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        event_id = await receiver.post(callback_body(detail))
        assert await receiver.settled(event_id) == {VERIFY_RUN: "done", "recorder": "done"}
        assert receiver.handled() == [event_id]
        assert receiver.count("confirmed") == 1
    # One request, signed and answered, asked for exactly this job.
    assert [(s.path, s.status) for s in ci.requests] == [(f"/jobs/{detail['JobId']}", 200)]


@pytest.mark.parametrize(
    ("claimed", "reason"),
    [
        ({"JobId": f"j{99:032x}"}, f"CI's job API knows no job j{99:032x}"),
        ({"State": "Success"}, "the callback says State='Success', CI's job API 'Failed'"),
        ({"Tag": "Snapshot"}, "the callback says Tag='Snapshot', CI's job API 'Transcode'"),
        (
            {"Input": {"BucketId": BUCKET, "Region": REGION, "Object": "input/other.mp4"}},
            "the callback's input is input/other.mp4 in media-1250000000 (ap-guangzhou),"
            " CI's job API says input/video-2.mp4 in media-1250000000 (ap-guangzhou)",
        ),
    ],
    ids=["unknown job", "Success for Failed", "another tag", "another input"],
)
async def test_a_forged_callback_never_reaches_a_handler(
    inbox_place, tmp_path, ci, claimed, reason
):
    failed = job(2, BUCKET, REGION, state="Failed")
    ci.add_jobs(BUCKET, failed)
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        forged = await receiver.post(callback_body({**failed, **claimed}))
        assert await receiver.settled(forged) == {VERIFY_RUN: "forged", "recorder": "forged"}
        assert await receiver.reason(forged) == f"forged: {reason}"
        listed = await receiver.service.inbox.events(EventFilter(status="forged"))
        assert [e.id for e in listed] == [forged]
        assert receiver.count("forged") == 1
        assert receiver.handled() == []
        # The genuine callback of the job gets through, even when the forgery took its
        # dedup id (same JobId and State) first: it replaces the forged event.
        receipt = Receipt(callback_body(failed), "http", datetime.now(timezone.utc), "r")
        stored = await receiver.service.ingestor.ingest(receipt)
        (genuine,) = stored.new
        assert (await receiver.settled(genuine))["recorder"] == "done"
        assert receiver.handled() == [genuine]


@pytest.mark.parametrize(
    ("bucket", "job_id", "reason"),
    [
        ("other-1250000000", f"j{3:032x}", "bucket other-1250000000 is not one of [ci] buckets"),
        (BUCKET, f"j{3:032x},j{4:032x}", f"'j{3:032x},j{4:032x}' is not an id CI makes"),
        (BUCKET, "../workflowexecution/x", "'../workflowexecution/x' is not an id CI makes"),
    ],
)
async def test_what_cannot_be_a_callback_of_ours_is_forged_without_asking(
    inbox_place, tmp_path, ci, bucket, job_id, reason
):
    ci.add_jobs(BUCKET, job(3, BUCKET, REGION), job(4, BUCKET, REGION))
    detail = {**job(3, bucket, REGION), "JobId": job_id}
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        forged = await receiver.post(callback_body(detail))
        assert (await receiver.settled(forged))["recorder"] == "forged"
        assert await receiver.reason(forged) == f"forged: {reason}"
    assert ci.requests == []


async def test_the_event_waits_while_ci_is_unreachable_or_throttling(inbox_place, tmp_path, ci):
    detail = job(5, BUCKET, REGION)
    ci.add_jobs(BUCKET, detail)
    ci.fail_next(
        Failure(503, "SlowDown"), Failure(429, "RequestLimitExceeded"), Failure(drop=True),
        Failure(500, "InternalError"),
    )  # fmt: skip
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        event_id = await receiver.post(callback_body(detail))
        assert await receiver.settled(event_id) == {VERIFY_RUN: "done", "recorder": "done"}
        assert receiver.handled() == [event_id]
        assert receiver.count("deferred") == 4
        detail_runs = await receiver.service.inbox.event(event_id)
        tries = [a.outcome for a in detail_runs.attempts if a.handler == VERIFY_RUN]
        assert tries == ["retry"] * 4 + ["done"]
    assert [s.status for s in ci.requests] == [503, 429, 0, 500, 200]


async def test_ci_out_of_reach_while_events_wait_is_said_once(inbox_place, tmp_path, ci):
    # Every event's verification fails alike, each asking about its own job: one line,
    # and one more when CI answers again.
    details = [job(n, BUCKET, REGION) for n in range(6, 10)]
    ci.add_jobs(BUCKET, *details)
    ci.fail_next(*[Failure(drop=True)] * 12)
    with capture_logs() as logs:
        async with Receiver(inbox_place, tmp_path, ci) as receiver:
            ids = [await receiver.post(callback_body(detail)) for detail in details]
            for event_id in ids:
                assert (await receiver.settled(event_id))[VERIFY_RUN] == "done"
    said = [line for line in logs if line["event"] == "handler failed; will retry"]
    assert len(said) == 12
    assert [line["log_level"] for line in said].count("warning") == 1
    assert "/jobs/" not in said[0]["error"]
    assert len([line for line in logs if line["event"] == "handler succeeds again"]) == 1


@pytest.mark.parametrize(
    ("failure", "hastened", "asked"),
    [
        (Failure(drop=True), True, [0, 200, 200]),
        (Failure(429, "RequestLimitExceeded"), False, [429, 200]),
    ],
    ids=["out of reach", "throttling"],
)
async def test_ci_back_in_reach_ends_the_wait_of_the_deferred_verifications(
    inbox_place, tmp_path, ci, monkeypatch, failure, hastened, asked
):
    # Out of reach, CI is asked again after a backoff of up to ten minutes; its first
    # answer since makes the others due at once rather than at the end of theirs. An
    # answer does not end a throttling: then they wait out their backoff rather than
    # join a burst against an API asking for fewer requests.
    monkeypatch.setattr(verify, "BACKOFF_INITIAL", 60.0)
    monkeypatch.setattr(verify, "BACKOFF_MAX", 600.0)
    first, second = job(11, BUCKET, REGION), job(12, BUCKET, REGION)
    ci.add_jobs(BUCKET, first, second)
    ci.fail_next(failure)
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        waiting = await receiver.post(callback_body(first))
        for _ in range(400):
            if receiver.count("deferred"):
                break
            await asyncio.sleep(0.025)
        assert await receiver.runs(waiting) == {VERIFY_RUN: "pending", "recorder": "held"}
        answered = await receiver.post(callback_body(second))
        assert (await receiver.settled(answered))[VERIFY_RUN] == "done"
        if hastened:
            # Within the seconds `settled` waits, not the 30 to 60 of its backoff.
            assert await receiver.settled(waiting) == {VERIFY_RUN: "done", "recorder": "done"}
        else:
            await asyncio.sleep(1.0)  # a hastened verification would be done by now
            assert await receiver.runs(waiting) == {VERIFY_RUN: "pending", "recorder": "held"}
    assert [s.status for s in ci.requests] == asked


async def test_a_job_ci_still_shows_running_is_asked_again(inbox_place, tmp_path, ci):
    detail = job(6, BUCKET, REGION)
    ci.add_jobs(BUCKET, {**detail, "State": "Running"})
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        event_id = await receiver.post(callback_body(detail))
        while len(ci.served("/jobs/")) < 2:  # asked, told Running, asked again
            await asyncio.sleep(0.02)
        assert await receiver.runs(event_id) == {VERIFY_RUN: "pending", "recorder": "held"}
        ci.jobs[BUCKET] = [detail]  # CI's API catches up
        assert await receiver.settled(event_id) == {VERIFY_RUN: "done", "recorder": "done"}
        assert receiver.count("deferred") >= 2


async def test_a_job_still_running_after_the_lag_is_forged(inbox_place, tmp_path, ci):
    detail = job(7, BUCKET, REGION)
    ci.add_jobs(BUCKET, {**detail, "State": "Running"})
    async with Receiver(inbox_place, tmp_path, ci, verify_lag="0.3s") as receiver:
        event_id = await receiver.post(callback_body(detail))
        assert (await receiver.settled(event_id))["recorder"] == "forged"
        assert "CI's job API still shows State=Running" in await receiver.reason(event_id)
    assert receiver.handled() == []


async def test_events_of_sources_that_do_not_verify_are_not_held(inbox_place, tmp_path, ci):
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        # Recovered by the reconciler: from CI's API already.
        event_id = await receiver.post(callback_body(job(8, BUCKET, REGION)), source="reconcile")
        assert await receiver.settled(event_id) == {"recorder": "done"}
    assert ci.requests == []


# --- workflows and moderation ------------------------------------------------------------


async def test_workflow_callbacks_are_checked_against_the_execution(inbox_place, tmp_path, ci):
    genuine = execution(1, BUCKET, REGION, WORKFLOW)
    failed = execution(2, BUCKET, REGION, WORKFLOW, state="Failed")
    ci.executions[BUCKET] = [genuine, failed]
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        confirmed = await receiver.post(workflow_callback(genuine))
        lying = await receiver.post(workflow_callback({**failed, "State": "Success"}))
        unknown = await receiver.post(workflow_callback({**genuine, "RunId": f"i{9:032x}"}))
        assert (await receiver.settled(confirmed))["recorder"] == "done"
        for forged in (lying, unknown):
            assert (await receiver.settled(forged))["recorder"] == "forged"
        assert await receiver.reason(lying) == (
            "forged: the callback says State='Success', CI's job API 'Failed'"
        )
        assert await receiver.reason(unknown) == f"forged: CI's job API knows no workflow i{9:032x}"
        assert receiver.handled() == [confirmed]
    assert {s.path for s in ci.served()} == {
        f"/workflowexecution/{run}" for run in (genuine["RunId"], failed["RunId"])
    }


async def test_moderation_verdicts_are_checked_where_ci_has_a_query(inbox_place, tmp_path, ci):
    ci.moderation[(BUCKET, "image")] = [image_verdict("si01", 1), image_verdict("si02", 0)]
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        confirmed = await receiver.post(moderation_callback(image_verdict("si01", 1)))
        # A "normal" verdict for an image CI found to be porn, or the other way round.
        flipped = await receiver.post(moderation_callback(image_verdict("si02", 1)))
        assert (await receiver.settled(confirmed))["recorder"] == "done"
        assert (await receiver.settled(flipped))["recorder"] == "forged"
        assert await receiver.reason(flipped) == (
            "forged: the callback says Result=1, CI's job API 0"
        )
        assert receiver.handled() == [confirmed]
    assert {s.path for s in ci.served()} == {"/image/auditing/si01", "/image/auditing/si02"}


@pytest.mark.parametrize("policy", ["hold", "pass"])
async def test_what_no_query_covers_is_held_or_passed_as_configured(
    inbox_place, tmp_path, ci, policy
):
    document = moderation_callback(image_verdict("st01", 0, "docs/a.pdf"), "ReviewDocument")
    picture = {**job(9, BUCKET, REGION), "Tag": "PicProcess"}
    async with Receiver(inbox_place, tmp_path, ci, verify_uncovered=policy) as receiver:
        ids = [await receiver.post(document), await receiver.post(callback_body(picture))]
        for event_id in ids:
            runs = await receiver.settled(event_id)
            assert runs == {VERIFY_RUN: "done", "recorder": "done" if policy == "pass" else "held"}
        assert receiver.count("passed" if policy == "pass" else "held") == 2
        if policy == "hold":
            assert receiver.handled() == []
            # Named, a held event is released: the operator vouches for it.
            assert await receiver.service.inbox.requeue(ids[:1], None, dead_only=False) == 1
            receiver.service.dispatcher.wake()
            assert (await receiver.settled(ids[0]))["recorder"] == "done"
        assert sorted(receiver.handled()) == sorted(ids if policy == "pass" else ids[:1])
    assert ci.requests == []


async def test_a_forged_event_replayed_by_name_runs_and_keeps_its_verdict(
    inbox_place, tmp_path, ci
):
    async with Receiver(inbox_place, tmp_path, ci) as receiver:
        forged = await receiver.post(callback_body(job(10, BUCKET, REGION)))
        assert (await receiver.settled(forged))["recorder"] == "forged"
        assert await receiver.service.inbox.requeue(None, None, dead_only=False) == 0
        assert await receiver.service.inbox.requeue([forged], None, dead_only=False) == 1
        receiver.service.dispatcher.wake()
        assert await receiver.settled(forged) == {VERIFY_RUN: "forged", "recorder": "done"}
        assert receiver.handled() == [forged]
    assert len(ci.requests) == 1  # not verified again


@pytest.mark.parametrize(
    ("section", "sources"),
    [("http", {"http", "cmq-push"}), ("tdmq", {"tdmq"})],
)
def test_each_source_verifies_when_its_section_says_so(ci, tmp_path, section, sources):
    credentials = {
        "secret_id": SECRET_ID,
        "secret_key": SECRET_KEY,
        "buckets": [{"name": BUCKET, "region": REGION, "tags": ["Transcode"]}],
    }
    config = Config(data_dir=tmp_path, ci=credentials, **{section: {"verify": "ci-api"}})
    assert config.verified_sources() == sources
    assert Config(data_dir=tmp_path, ci=credentials).verified_sources() == frozenset()
