"""`serve` and `consume` on a PostgreSQL inbox that goes away and comes back, as real
processes: nothing is answered 200, acked or deleted from its queue that was not
committed, `/readyz` says why, and service resumes by itself. A receiver started while
the database is away listens at once and waits for it; the commands say in one line that
it is away; the log says so once as it goes and once as it comes back, each consumer
once that its messages come back meanwhile, and never with a traceback.

The outage is a loopback TCP proxy between the processes and the machine's server
(tests/support/tcp_proxy.py), cut and restored by the test: the server keeps serving the other
tests meanwhile.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import orjson
import pytest
from sqlalchemy import make_url

from tests.support.ci_api_server import CiApiServer, job
from tests.support.cli import cli
from tests.support.cmq_stand_in import QUEUE, CmqStandIn, cmq_section
from tests.support.installations import TOKEN, publish, wait_until
from tests.support.processes import REPO, Receiver, log_lines, metric
from tests.support.shared_inbox import SharedInbox
from tests.support.tcp_proxy import ThreadedProxy

TOPIC = "persistent://public/default/ci-callbacks"


def callback(job: str) -> bytes:
    detail = {"JobId": job, "State": "Success", "Tag": "Transcode", "Code": "Success"}
    return orjson.dumps({"EventName": "TaskFinish", "JobsDetail": detail})


def event_id(job: str) -> str:
    return f"job:{job}:Success"


def write_config(
    tmp_path,
    inbox: SharedInbox,
    proxy_port: int,
    broker_url: str | None = None,
    extra: str = "",
):
    """`extra`: more sections (with their headers)."""
    path = tmp_path / "ci-receiver.toml"
    tdmq = f"""
[tdmq]
service_url = "{broker_url}"
token = "{TOKEN}"
topics = ["{TOPIC}"]
nack_delay = 0.5
"""
    path.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[log]
format = "json"
[http]
access_log = false
[admin]
inspector = true
[dispatch]
poll_interval = 0.2
{tdmq if broker_url else ""}
[handlers.recorder]
type = "tests.support.handler_doubles:Recorder"
path = "{tmp_path / "recorded.jsonl"}"
timeout = 2
{inbox.toml(proxy_port)}
{extra}
"""
    )
    return path


def handled(inbox: SharedInbox) -> dict[str, int]:
    """Done runs by event, as the inbox records them."""
    rows = inbox.query("SELECT event_id, attempts FROM runs WHERE status = 'done'")
    return dict(rows)


def where(inbox: SharedInbox, proxy_port: int) -> str:
    """The database as the receiver names it, through the proxy."""
    return f"127.0.0.1:{proxy_port}/{make_url(inbox.url).database}"


def said(receiver: Receiver, event: str) -> list[dict]:
    """The log lines of `receiver` (every process of it) whose event starts so."""
    return [line for line in log_lines(receiver) if line["event"].startswith(event)]


def tracebacks(receiver: Receiver) -> list[str]:
    """Whatever in `receiver`'s output carries a traceback: log lines with an exception,
    or one printed outside the log."""
    lines = [line["event"] for line in log_lines(receiver) if "exception" in line]
    return lines + (["(printed)"] if "Traceback" in receiver.log() else [])


UNREACHABLE = "PostgreSQL inbox unreachable"
REACHABLE = "PostgreSQL inbox reachable again"
FAILED_ATTEMPTS = "ci_receiver_inbox_unreachable_total"
TDMQ_NACKED = 'ci_receiver_tdmq_messages_total{outcome="nacked"}'
CMQ_FAILED = 'ci_receiver_cmq_messages_total{outcome="failed"}'
TDMQ_AWAY = "inbox unavailable: messages are nacked and delivered again"
TDMQ_BACK = "inbox available again: messages are committed and acked"
CMQ_AWAY = "inbox unavailable: messages stay on their queue and come back"
CMQ_BACK = "inbox available again: messages are committed and deleted"


def test_an_outage_answers_503_nacks_is_unready_and_resumes_by_itself(
    tmp_path, pulsar_broker, shared_inbox
):
    with ThreadedProxy(shared_inbox.port) as proxy:
        config = write_config(tmp_path, shared_inbox, proxy.port, pulsar_broker.url)
        serve = Receiver(config, "serve")
        consume = Receiver(config, "consume")
        try:
            serve.start()
            consume.start(wait_http=False)
            consume.wait_for_log("tdmq consumer connected")
            assert serve.post(callback("jbefore")).status_code == 200
            publish(pulsar_broker.url, TOPIC, [callback("jbefore-tdmq")])
            wait_until(lambda: len(handled(shared_inbox)) == 2, "both handled before the cut")

            proxy.cut()
            during = [serve.post(callback(f"jduring{n}")) for n in range(5)]
            assert [r.status_code for r in during] == [503] * 5
            assert {r.json()["error"] for r in during} == {"inbox_unavailable"}
            ready = wait_until(
                lambda: (r := httpx.get(serve.url + "/readyz")).status_code == 503 and r,
                "unready while the database is away",
            )
            assert ready.json() == {"ready": False}
            assert ready.headers["retry-after"]
            # The admin listener says why; its API and the inspector, why and since when.
            details = httpx.get(serve.admin_url + "/readyz").json()
            away = f"PostgreSQL at {where(shared_inbox, proxy.port)} unreachable since "
            assert details["checks"]["inbox"].startswith(away)
            api = httpx.get(serve.admin_url + "/api/events")
            assert api.status_code == 503
            assert api.headers["retry-after"]
            assert api.json()["error"] == "inbox_unavailable"
            assert api.json()["detail"].startswith(away)
            assert api.json()["since"]
            page = httpx.get(serve.admin_url + "/inspector/events")
            assert page.status_code == 503
            assert "The inbox is unreachable" in page.text
            assert "Since " in page.text
            publish(pulsar_broker.url, TOPIC, [callback("jduring-tdmq")])
            # Not acked: the broker delivers it again, and again, while the database is away.
            wait_until(lambda: metric(consume, TDMQ_NACKED) >= 3, "the message nacked 3 times")
            assert serve.post(callback("jduring0")).status_code == 503

            proxy.restore()
            wait_until(
                lambda: httpx.get(serve.url + "/readyz").status_code == 200,
                "ready again once the database is back",
            )
            # The senders told 503 send again; the message left unacked comes again.
            again = [serve.post(callback(f"jduring{n}")) for n in range(5)]
            assert [r.json()["accepted"] for r in again] == [1] * 5
            expected = {event_id(job) for job in ("jbefore", "jbefore-tdmq", "jduring-tdmq")}
            expected |= {event_id(f"jduring{n}") for n in range(5)}
            wait_until(lambda: set(handled(shared_inbox)) == expected, "everything handled")
            # Nothing stored twice, nothing answered or acked without its commit.
            stored = shared_inbox.query("SELECT id FROM events")
            assert sorted(row[0] for row in stored) == sorted(expected)
            assert set(handled(shared_inbox).values()) == {1}
            # Said once as it went and once as it came back, though the dispatcher failed
            # five times a second meanwhile, and no traceback.
            wait_until(lambda: said(serve, REACHABLE), "the return logged")
            assert len(said(serve, UNREACHABLE)) == len(said(serve, REACHABLE)) == 1
            down = said(serve, UNREACHABLE)[0]
            assert f"{down['host']}:{down['port']}/{down['database']}" == where(
                shared_inbox, proxy.port
            )
            assert [line for line in log_lines(serve) if "exception" in line] == []
            assert metric(serve, FAILED_ATTEMPTS) > 5
            # The consumer said once that its message comes back, once that it is taken.
            wait_until(lambda: said(consume, TDMQ_BACK), "the consumer's return logged")
            assert len(said(consume, TDMQ_AWAY)) == len(said(consume, TDMQ_BACK)) == 1
            assert tracebacks(consume) == []
            assert serve.terminate() == 0
            assert consume.terminate() == 0
        finally:
            serve.stop()
            consume.stop()


BUCKET, REGION = "media-1250000000", "ap-guangzhou"
CI_SECRET_ID, CI_SECRET_KEY = "AKIDoutagetest", "the-secret-key"


def consume_config(
    tmp_path, inbox: SharedInbox, proxy_port: int, broker_url: str, cmq: CmqStandIn, ci: str
):
    """`consume` from TDMQ and CMQ, reconciling with CI and pruning refused callbacks,
    all every half second."""
    extra = (
        cmq_section(cmq)
        + f"""
[retention]
interval = "0.5s"
refused = "1s"
[ci]
secret_id = "{CI_SECRET_ID}"
secret_key = "{CI_SECRET_KEY}"
endpoint = "{ci}"
interval = "0.5s"
settle = "0s"
[[ci.buckets]]
name = "{BUCKET}"
region = "{REGION}"
tags = ["Transcode"]
"""
    )
    return write_config(tmp_path, inbox, proxy_port, broker_url, extra)


def readiness(receiver: Receiver) -> httpx.Response | None:
    """The admin listener's /readyz; None while nothing listens there yet."""
    try:
        return httpx.get(receiver.admin_url + "/readyz")
    except httpx.TransportError:
        return None


def test_consume_says_in_one_line_what_the_database_away_does_and_takes_everything_back(
    tmp_path, pulsar_broker, shared_inbox
):
    cmq = CmqStandIn(tmp_path / "cmq", visibility_timeout=1).start()
    ci = CiApiServer({CI_SECRET_ID: CI_SECRET_KEY}).start()
    debug = {"CI_RECEIVER_LOG__LEVEL": "debug"}  # the passes that failed show too
    with ThreadedProxy(shared_inbox.port) as proxy:
        proxy.cut()  # away at start
        config = consume_config(tmp_path, shared_inbox, proxy.port, pulsar_broker.url, cmq, ci.url)
        consume = Receiver(config, "consume")
        try:
            consume.start(env=debug, wait_http=False)
            # Its consumers wait for the inbox, and readiness says so.
            waiting = wait_until(lambda: readiness(consume), "the admin listener listening")
            assert waiting.status_code == 503
            checks = waiting.json()["checks"]
            assert checks["inbox"].startswith(f"PostgreSQL at {where(shared_inbox, proxy.port)}")
            assert checks["tdmq"] == checks["cmq"] == "not started: waiting for the inbox"
            proxy.restore()
            consume.wait_for_log("tdmq consumer connected")
            wait_until(lambda: readiness(consume).status_code == 200, "ready")
            publish(pulsar_broker.url, TOPIC, [callback("jtdmq0")])
            cmq.send([callback("jcmq0")])
            wait_until(lambda: len(handled(shared_inbox)) == 2, "both handled before the cut")

            proxy.cut()
            publish(pulsar_broker.url, TOPIC, [callback("jtdmq1")])
            cmq.send([callback("jcmq1"), "not a callback"])
            ci.add_jobs(BUCKET, job(1, BUCKET, REGION))  # its callback lost
            # Each message tried again and again, each pass again and again; the log says
            # once what becomes of the messages, and no traceback.
            wait_until(lambda: metric(consume, TDMQ_NACKED) >= 3, "nacked 3 times")
            wait_until(lambda: metric(consume, CMQ_FAILED) >= 4, "both not kept twice")
            for passes in ("retention pass failed", "reconcile pass failed"):
                wait_until(lambda p=passes: len(said(consume, p)) >= 2, f"{passes} twice")
            assert len(said(consume, TDMQ_AWAY)) == len(said(consume, CMQ_AWAY)) == 1
            assert tracebacks(consume) == []
            assert cmq.stats()["queued"] == {QUEUE: 2}  # not deleted: they come back

            proxy.restore()
            lost = f"job:j{1:032x}:Success"
            expected = {event_id(f"j{source}{n}") for source in ("tdmq", "cmq") for n in (0, 1)}
            wait_until(lambda: set(handled(shared_inbox)) == {*expected, lost}, "all handled")
            wait_until(lambda: cmq.stats()["queued"] == {QUEUE: 0}, "every CMQ message deleted")
            # The refused body was kept once back, then pruned: retention works again.
            wait_until(lambda: said(consume, "pruned the inbox"), "a retention pass pruned it")
            # Stored once each, handled once each; the reconciler found the lost one.
            stored = shared_inbox.query("SELECT id FROM events")
            assert sorted(row[0] for row in stored) == sorted({*expected, lost})
            assert set(handled(shared_inbox).values()) == {1}
            assert len(said(consume, "recovered an event whose callback never came")) == 1
            # Said once as it went and once as it came back, by the inbox (at start too)
            # and by each consumer.
            wait_until(lambda: said(consume, CMQ_BACK) and said(consume, TDMQ_BACK), "said")
            assert len(said(consume, UNREACHABLE)) == len(said(consume, REACHABLE)) == 2
            assert len(said(consume, TDMQ_BACK)) == len(said(consume, CMQ_BACK)) == 1
            assert tracebacks(consume) == []
            assert consume.terminate() == 0
        finally:
            consume.stop()
            cmq.close()
            ci.stop()


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one-process", "workers"])
def test_started_while_the_database_is_away_it_listens_and_waits_for_it(
    tmp_path, shared_inbox, args
):
    processes = 2 if args else 1
    with ThreadedProxy(shared_inbox.port) as proxy:
        proxy.cut()  # the database is away before the receiver starts
        serve = Receiver(write_config(tmp_path, shared_inbox, proxy.port), args=args)
        try:
            serve.start()  # it listens at once
            wait_until(lambda: len(said(serve, UNREACHABLE)) == processes, "the outage logged")
            # Alive (a liveness probe leaves it be), not ready, and callbacks to come again.
            assert httpx.get(serve.url + "/healthz").status_code == 200
            assert httpx.get(serve.admin_url + "/healthz").status_code == 200
            ready = httpx.get(serve.url + "/readyz")
            assert ready.status_code == 503
            assert ready.headers["retry-after"]
            inbox = httpx.get(serve.admin_url + "/readyz").json()["checks"]["inbox"]
            assert inbox.startswith(f"PostgreSQL at {where(shared_inbox, proxy.port)} unreachable")
            refused = serve.post(callback("jearly"))
            assert refused.status_code == 503
            assert refused.headers["retry-after"]
            assert refused.json()["error"] == "inbox_unavailable"
            # Tried again and again meanwhile, said once by each process: where and why.
            wait_until(lambda: metric(serve, FAILED_ATTEMPTS) >= 3, "attempts made")
            assert len(said(serve, UNREACHABLE)) == processes
            for line in said(serve, UNREACHABLE):
                assert f"{line['host']}:{line['port']}/{line['database']}" == where(
                    shared_inbox, proxy.port
                )
                assert "refused" in line["error"]
            assert not said(serve, "all workers listening")  # a worker is ready only now

            proxy.restore()
            if args:
                serve.wait_for_log("all workers listening")
            wait_until(lambda: httpx.get(serve.url + "/readyz").status_code == 200, "ready")
            assert serve.post(callback("jearly")).status_code == 200
            wait_until(lambda: event_id("jearly") in handled(shared_inbox), "handled")
            wait_until(lambda: len(said(serve, REACHABLE)) == processes, "the return logged")
            assert [line for line in log_lines(serve) if "exception" in line] == []
            assert serve.terminate() == 0
        finally:
            serve.stop()


@pytest.mark.parametrize("args", [(), ("--workers", "2")], ids=["one-process", "workers"])
def test_sigterm_while_waiting_for_the_database_stops_cleanly(tmp_path, shared_inbox, args):
    with ThreadedProxy(shared_inbox.port) as proxy:
        proxy.cut()
        serve = Receiver(write_config(tmp_path, shared_inbox, proxy.port), args=args)
        try:
            serve.start()
            wait_until(lambda: said(serve, UNREACHABLE), "waiting for the database")
            assert serve.terminate() == 0
        finally:
            serve.stop()


# Every command that reads or writes the inbox.
COMMANDS = [
    ("events", "list"),
    ("events", "show", "job:j1:Success"),
    ("events", "tail"),
    ("events", "rejected"),
    ("events", "rejected", "--body", "1"),
    ("stats",),
    ("replay", "--dead"),
    ("replay", "--receipt", "1"),
    ("prune",),
    ("prune", "--dry-run"),
]


def test_the_commands_say_in_one_line_that_the_database_is_away(tmp_path, shared_inbox):
    with ThreadedProxy(shared_inbox.port) as proxy:
        proxy.cut()
        write_config(tmp_path, shared_inbox, proxy.port)
        away = f"Error: inbox: PostgreSQL at {where(shared_inbox, proxy.port)} unreachable: "
        for command in COMMANDS:
            result = cli(tmp_path, *command, ok=False)
            lines = result.stderr.decode().splitlines()
            assert (result.returncode, len(lines)) == (1, 1), (command, lines)
            assert lines[0].startswith(away), command
            assert result.stdout == b""


def test_events_tail_ends_with_one_line_when_the_database_goes_away(tmp_path, shared_inbox):
    with ThreadedProxy(shared_inbox.port) as proxy:
        config = write_config(tmp_path, shared_inbox, proxy.port)
        serve = Receiver(config).start()
        tail = None
        try:
            assert serve.post(callback("jtail")).status_code == 200
            tail = subprocess.Popen(
                [sys.executable, "-m", "receiver.cli", "events", "tail", "--interval", "0.2"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={"PYTHONPATH": str(REPO), "CI_RECEIVER_CONFIG": str(config)},
            )
            assert tail.stdout is not None
            assert event_id("jtail") in tail.stdout.readline().decode()  # following
            proxy.cut()
            _, error = tail.communicate(timeout=30)
            lines = error.decode().splitlines()
            assert (tail.returncode, len(lines)) == (1, 1), lines
            away = f"Error: inbox: PostgreSQL at {where(shared_inbox, proxy.port)} unreachable"
            assert lines[0].startswith(away)
        finally:
            serve.stop()
            if tail is not None and tail.poll() is None:
                tail.kill()
