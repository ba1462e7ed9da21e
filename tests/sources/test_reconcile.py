"""The reconciler in-process: a real SQLite inbox and ingest path, the official SDK, and
the loopback stand-in for CI (tests/support/ci_api_server.py), which checks every signature."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from structlog.testing import capture_logs

from receiver import parse_callback
from receiver.callback.decode import Limits
from receiver.ci.api import CiApi
from receiver.config import CiConfig
from receiver.inbox import Receipt
from receiver.inbox.sqlite import SqliteInbox
from receiver.ingest.ingest import Ingestor
from receiver.ingest.routing import Router
from receiver.metrics import Metrics
from receiver.sources.reconcile import RETENTION_MARGIN, Reconciler, Watch, watches
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

OTHER = "archive-1250000000"


@pytest.fixture
async def inbox(tmp_path):
    inbox = SqliteInbox(tmp_path / "inbox.db", rejected_body_bytes=1024)
    await inbox.open()
    yield inbox
    await inbox.close()


class Setup:
    def __init__(
        self, ci: CiApiServer, inbox: SqliteInbox, backoff: float = 0.01,
        events_kept: float = 0.0, **ci_options: object,
    ) -> None:  # fmt: skip
        options = {
            "secret_id": SECRET_ID,
            "secret_key": SECRET_KEY,
            "endpoint": ci.url,
            "window": "1h",
            "buckets": [{"name": BUCKET, "region": REGION, "tags": ["Transcode"]}],
            **ci_options,
        }
        self.config = CiConfig(**options)
        self.metrics = Metrics()
        self.inbox = inbox
        self.stored_ids: list[str] = []
        self.ingestor = Ingestor(inbox, Router(None, ["h"]), self.metrics, Limits(), handoff=self)
        api = CiApi(
            self.config, self.metrics.registry, backoff_initial=backoff, backoff_max=backoff
        )
        self.reconciler = Reconciler(
            self.config, api, inbox, self.ingestor, self.metrics.registry,
            events_kept=events_kept,
        )  # fmt: skip

    # The ingestor's handoff: what it stored, no runs started.
    def reserve(self, runs: list) -> dict:
        return {}

    def stored(self, request_id: str, runs: list, leases: dict) -> None:
        self.stored_ids.extend(event.id for event, _ in runs)

    def abandoned(self, leases: dict) -> None:
        pass

    async def callback(self, detail: dict) -> None:
        receipt = Receipt(callback_body(detail), "http", datetime.now(timezone.utc), "r")
        await self.ingestor.ingest(receipt)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0


async def test_one_pass_recovers_exactly_the_jobs_whose_callback_was_lost(ci, inbox):
    setup = Setup(ci, inbox)
    jobs = [job(n, BUCKET, REGION, state="Failed" if n == 4 else "Success") for n in range(10)]
    ci.add_jobs(BUCKET, *jobs, job(10, BUCKET, REGION, state="Running"))
    lost = {2, 4, 7}
    for n, detail in enumerate(jobs):
        if n not in lost:
            await setup.callback(detail)

    report = await setup.reconciler.reconcile()

    expected = {f"job:j{n:032x}:{'Failed' if n == 4 else 'Success'}" for n in lost}
    assert {found.event.id for found in report.recovered} == expected
    assert report.checked == 10  # the running job is not asked for
    assert len(setup.stored_ids) == 10  # each job stored once, 7 by callback and 3 here
    receipts = await inbox.receipts(limit=20)
    assert sorted(e for r in receipts if r.source == "reconcile" for e in r.event_ids) == sorted(
        expected
    )
    stored = await inbox.event(f"job:j{2:032x}:Success")
    assert stored.event.source == "reconcile"
    assert [o.key for o in stored.event.outputs] == ["output/video-2.mp4"]
    assert setup.metric("ci_receiver_reconcile_checked_total") == 10
    assert setup.metric("ci_receiver_reconcile_recovered_total", kind="job") == 3

    # The next pass finds nothing new, and a callback arriving late is a duplicate.
    again = await setup.reconciler.reconcile()
    assert (again.found, again.checked) == ([], 10)
    await setup.callback(jobs[2])
    assert len(setup.stored_ids) == 10


async def test_a_job_whose_id_a_forgery_took_is_recovered_over_it(ci, inbox):
    setup = Setup(ci, inbox)
    genuine = job(1, BUCKET, REGION, state="Success")
    ci.add_jobs(BUCKET, genuine)
    forgery = {**genuine, "Input": {**genuine["Input"], "Object": "not/the/input.mp4"}}
    body = callback_body(forgery)
    receipt = Receipt(body, "http", datetime.now(timezone.utc), "r")
    events = parse_callback(body)
    (event_id,) = (await inbox.store(receipt, [(e, ["h"]) for e in events], verify=True)).new
    # Verification found it forged (see tests/ci/test_verify.py for the step itself).
    await inbox.settle(event_id, genuine=False)

    report = await setup.reconciler.reconcile()

    assert [found.event.id for found in report.recovered] == [event_id]
    stored = await inbox.event(event_id)
    assert stored.event.source == "reconcile"
    assert stored.event.input.key == genuine["Input"]["Object"]
    assert [(r.handler, r.status) for r in stored.runs] == [("h", "pending")]


async def test_watches_cover_each_tag_queue_and_workflow(ci, inbox):
    config = CiConfig(
        secret_id=SECRET_ID, secret_key=SECRET_KEY,
        buckets=[
            {"name": BUCKET, "region": REGION, "tags": ["Transcode", "Snapshot"],
             "queue_ids": ["p1", "p2"], "workflows": ["w1"]},
            {"name": OTHER, "region": "ap-beijing", "workflows": ["w2"]},
        ],
    )  # fmt: skip
    assert watches(config) == [
        Watch(BUCKET, "Transcode", "p1"),
        Watch(BUCKET, "Transcode", "p2"),
        Watch(BUCKET, "Snapshot", "p1"),
        Watch(BUCKET, "Snapshot", "p2"),
        Watch(BUCKET, workflow_id="w1"),
        Watch(OTHER, workflow_id="w2"),
    ]
    assert watches(config, OTHER) == [Watch(OTHER, workflow_id="w2")]
    assert len({w.cursor_key for w in watches(config)}) == 6


async def test_a_lost_workflow_callback_is_recovered_with_its_tasks(ci, inbox):
    setup = Setup(ci, inbox, buckets=[{"name": BUCKET, "region": REGION, "workflows": ["w1"]}])
    ci.executions[BUCKET] = [
        execution(1, BUCKET, REGION, "w1"),
        execution(2, BUCKET, REGION, "w1", state="Running"),
        execution(3, BUCKET, REGION, "w-other"),
    ]
    report = await setup.reconciler.reconcile()
    assert [f.event.id for f in report.recovered] == [f"workflow:i{1:032x}:WorkflowFinish:Success"]
    stored = await inbox.event(f"workflow:i{1:032x}:WorkflowFinish:Success")
    assert [task.job_id for task in stored.event.tasks] == [f"j{1001:032x}"]
    # Only the missing execution was fetched whole.
    assert [s.path for s in ci.served("/workflowexecution/")] == [f"/workflowexecution/i{1:032x}"]


async def test_a_receiver_down_longer_than_the_window_catches_up_from_its_cursor(ci, inbox):
    setup = Setup(ci, inbox)  # a one-hour window
    two_days_ago = datetime.now(timezone.utc) - timedelta(days=2)
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION, created=two_days_ago))
    cursor = Watch(BUCKET, "Transcode").cursor_key

    # Without a cursor (a new inbox) a pass looks one window back: the job is older.
    assert (await setup.reconciler.reconcile()).found == []
    # The last pass before the outage ended three days ago: the pass reaches back to it.
    await inbox.set_state(cursor, (two_days_ago - timedelta(days=1)).isoformat())
    report = await setup.reconciler.reconcile()
    assert [f.event.job_id for f in report.recovered] == [f"j{1:032x}"]
    assert datetime.fromisoformat(await inbox.get_state(cursor)) > two_days_ago + timedelta(days=2)


async def test_since_and_dry_run_move_no_cursor_and_dry_run_stores_nothing(ci, inbox):
    setup = Setup(ci, inbox)
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION), job(2, BUCKET, REGION))
    cursor = Watch(BUCKET, "Transcode").cursor_key

    dry = await setup.reconciler.reconcile(dry_run=True)
    assert sorted(f.event.job_id for f in dry.found) == [f"j{1:032x}", f"j{2:032x}"]
    assert not dry.recovered
    assert await inbox.receipts() == []
    assert await inbox.get_state(cursor) is None

    # The jobs were made 10 minutes ago (to the second): a window reaching 11 back holds
    # them however long the pass above took.
    report = await setup.reconciler.reconcile(since=timedelta(minutes=11))
    assert len(report.recovered) == 2
    assert await inbox.get_state(cursor) is None


async def test_api_errors_are_retried_and_a_failing_watch_keeps_its_cursor(ci, inbox):
    setup = Setup(
        ci, inbox, max_attempts=3,
        buckets=[{"name": BUCKET, "region": REGION, "tags": ["Transcode", "Snapshot"]}],
    )  # fmt: skip
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION), job(2, BUCKET, REGION, tag="Snapshot"))

    # Throttled twice, then answered: the pass goes through.
    ci.fail_next(Failure(429, "TooManyRequests"), Failure(503, "SlowDown"))
    report = await setup.reconciler.reconcile()
    assert [f.event.tag for f in report.recovered] == ["Transcode", "Snapshot"]
    assert setup.metric("ci_receiver_ci_api_errors_total", reason="throttled") == 2

    # CI failing past the attempts: that watch fails, the others go on.
    transcode, snapshot = Watch(BUCKET, "Transcode"), Watch(BUCKET, "Snapshot")
    before = await inbox.get_state(transcode.cursor_key)
    ci.fail_next(*[Failure(500, "InternalError")] * 3)
    report = await setup.reconciler.reconcile()
    assert list(report.failed) == [transcode]
    assert "500 InternalError" in report.failed[transcode]
    assert await inbox.get_state(transcode.cursor_key) == before
    assert await inbox.get_state(snapshot.cursor_key) > before


async def test_ci_out_of_reach_is_said_once_and_once_more_when_it_answers(ci, inbox):
    tags = ["Transcode", "Snapshot", "SmartCover"]
    setup = Setup(
        ci, inbox, max_attempts=3, buckets=[{"name": BUCKET, "region": REGION, "tags": tags}]
    )
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION))
    with capture_logs() as logs:
        for _ in range(2):  # two passes, every request refused: 3 watches x 3 attempts
            ci.fail_next(*[Failure(503, "ServiceUnavailable")] * 9)
            report = await setup.reconciler.reconcile()
            assert len(report.failed) == 3
        report = await setup.reconciler.reconcile()
    assert not report.failed
    said = [(line["event"], line["log_level"]) for line in logs if line["log_level"] != "debug"]
    assert said == [
        ("CI API request failed; trying again", "warning"),
        ("cannot list from CI's job API", "error"),
        ("CI's job API answers again", "info"),
        ("recovered an event whose callback never came", "info"),
    ]
    (back,) = [line for line in logs if line["event"] == "CI's job API answers again"]
    assert back["failed_since"] == 12  # the retried ones: 2 passes x 3 watches x 2
    assert setup.metric("ci_receiver_ci_api_errors_total", reason="server") == 18


async def test_stop_ends_a_pass_at_once(ci, inbox):
    # CI throttling, and a long backoff: the pass is waiting on it when stopped.
    setup = Setup(ci, inbox, backoff=30, interval=3600)
    ci.fail_next(*[Failure(503, "SlowDown")] * 50)
    running = asyncio.create_task(setup.reconciler.run())
    while not ci.requests:
        await asyncio.sleep(0.01)
    setup.reconciler.stop()
    await asyncio.wait_for(running, 5)


async def test_jobs_a_workflow_started_are_left_to_its_watch_unless_asked_for(ci, inbox):
    # CI sends their TaskFinish only if the workflow's notify asks for it: recovering
    # them would make up callbacks that were never meant to come.
    by_workflow = job(1, BUCKET, REGION)
    by_workflow["Workflow"] = {
        "Name": "Transcode_1", "RunId": f"i{1:032x}", "WorkflowId": "w1", "WorkflowName": "w",
    }  # fmt: skip
    ci.add_jobs(BUCKET, by_workflow, job(2, BUCKET, REGION))

    report = await Setup(ci, inbox).reconciler.reconcile()
    assert [f.event.job_id for f in report.recovered] == [f"j{2:032x}"]
    assert report.checked == 1

    bucket = {"name": BUCKET, "region": REGION, "tags": ["Transcode"], "workflow_jobs": True}
    report = await Setup(ci, inbox, buckets=[bucket]).reconciler.reconcile()
    assert [f.event.job_id for f in report.recovered] == [f"j{1:032x}"]


async def test_a_job_that_just_ended_waits_for_a_later_pass(ci, inbox):
    """Its callback may still be on its way: a pass leaves it (settle, 2 minutes by
    default); a later one recovers it only if the callback never came."""
    setup = Setup(ci, inbox)
    now = datetime.now(timezone.utc)
    a_second_ago = now - timedelta(seconds=1)
    late, lost = (
        job(1, BUCKET, REGION, ended=a_second_ago),
        job(2, BUCKET, REGION, ended=a_second_ago),
    )
    ci.add_jobs(BUCKET, late, lost, job(3, BUCKET, REGION))  # 3 ended ten minutes ago

    report = await setup.reconciler.reconcile(now=now)
    assert [f.event.job_id for f in report.recovered] == [f"j{3:032x}"]
    assert sorted(f.event.job_id for f in report.settling) == [f"j{1:032x}", f"j{2:032x}"]
    assert not any(f.recovered for f in report.settling)
    assert len(setup.stored_ids) == 1

    await setup.callback(late)  # comes in, a little late
    # Still within settle: nothing more.
    assert (await setup.reconciler.reconcile(now=now + timedelta(seconds=60))).found == []
    report = await setup.reconciler.reconcile(now=now + timedelta(minutes=3))
    assert [f.event.job_id for f in report.recovered] == [f"j{2:032x}"]
    assert report.settling == []
    assert setup.metric("ci_receiver_reconcile_recovered_total", kind="job") == 2
    # `settle` given for one pass: 0 takes a job that has just ended.
    ci.add_jobs(BUCKET, job(4, BUCKET, REGION, ended=now))
    report = await setup.reconciler.reconcile(now=now, settle=timedelta(0))
    assert [f.event.job_id for f in report.recovered] == [f"j{4:032x}"]


async def test_a_job_left_to_settle_is_listed_by_the_next_pass_whatever_its_age(ci, inbox):
    """Listings go by creation time: the cursor stops where the next pass's window still
    reaches back to a job left to settle, even one created before that window."""
    setup = Setup(ci, inbox)  # a one-hour window
    now = datetime.now(timezone.utc)
    cursor = Watch(BUCKET, "Transcode").cursor_key
    await inbox.set_state(cursor, (now - timedelta(minutes=5)).isoformat())  # the last pass
    long_running = job(1, BUCKET, REGION, created=now - timedelta(minutes=62), ended=now)
    ci.add_jobs(BUCKET, long_running)

    report = await setup.reconciler.reconcile(now=now)
    assert [f.event.job_id for f in report.settling] == [f"j{1:032x}"]
    assert datetime.fromisoformat(await inbox.get_state(cursor)) < now

    later = now + timedelta(minutes=20)
    report = await setup.reconciler.reconcile(now=later)
    assert [f.event.job_id for f in report.recovered] == [f"j{1:032x}"]
    # Nothing left to settle: the cursor is the end of the pass again.
    assert datetime.fromisoformat(await inbox.get_state(cursor)) == later


async def test_a_pass_looks_back_no_further_than_retention_keeps_events(ci, inbox):
    """Events handled and pruned by retention look missing: a pass (here one asked to look
    back 60 days, as after a long stop) leaves the jobs created before retention's reach."""
    setup = Setup(ci, inbox, events_kept=12 * 3600)
    now = datetime.now(timezone.utc)
    pruned = job(
        1, BUCKET, REGION, created=now - timedelta(hours=13), ended=now - timedelta(hours=13)
    )
    lost = job(
        2, BUCKET, REGION, created=now - timedelta(hours=11), ended=now - timedelta(hours=11)
    )
    ci.add_jobs(BUCKET, pruned, lost)

    with capture_logs() as logs:
        report = await setup.reconciler.reconcile(since=timedelta(days=60), now=now)

    assert [f.event.job_id for f in report.recovered] == [f"j{2:032x}"]
    assert report.checked == 1
    (said,) = [line for line in logs if line["event"].startswith("reconcile looks back only")]
    assert datetime.fromisoformat(said["since"]) == now - timedelta(hours=12) + RETENTION_MARGIN


async def test_a_workflow_execution_that_just_ended_waits_too(ci, inbox):
    setup = Setup(ci, inbox, buckets=[{"name": BUCKET, "region": REGION, "workflows": ["w1"]}])
    now = datetime.now(timezone.utc)
    ci.executions[BUCKET] = [execution(1, BUCKET, REGION, "w1", ended=now)]
    # The list gives no end time: the execution is fetched whole to know it.
    report = await setup.reconciler.reconcile(now=now)
    assert [f.event.job_id for f in report.settling] == [f"i{1:032x}"]
    assert report.recovered == []
    report = await setup.reconciler.reconcile(now=now + timedelta(minutes=3))
    assert [f.event.job_id for f in report.recovered] == [f"i{1:032x}"]


async def test_a_job_ci_lists_that_cannot_be_read_holds_up_nothing(ci, inbox):
    setup = Setup(ci, inbox)
    unreadable = job(99, BUCKET, REGION)
    unreadable["JobId"] = {"Nested": "j99"}  # an element where CI writes text: refused
    ci.add_jobs(BUCKET, job(1, BUCKET, REGION), unreadable, job(2, BUCKET, REGION))

    report = await setup.reconciler.reconcile()

    assert {found.event.id for found in report.recovered} == {
        f"job:j{n:032x}:Success" for n in (1, 2)
    }
    again = await setup.reconciler.reconcile()  # the cursor moved on; nothing new
    assert again.found == []
