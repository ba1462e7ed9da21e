"""`serve` and `consume` on a PostgreSQL inbox that goes away and comes back, as real
processes: nothing is answered 200 or acked that was not committed, `/readyz` says why,
and service resumes by itself.

The outage is a loopback TCP proxy between the processes and the machine's server
(tests/tcp_proxy.py), cut and restored by the test: the server keeps serving the other
tests meanwhile.
"""

from __future__ import annotations

import httpx
import orjson

from tests.processes import Receiver
from tests.shared_inbox import SharedInbox
from tests.tcp_proxy import ThreadedProxy
from tests.tdmq_support import TOKEN, publish, wait_until

TOPIC = "persistent://public/default/ci-callbacks"


def callback(job: str) -> bytes:
    detail = {"JobId": job, "State": "Success", "Tag": "Transcode", "Code": "Success"}
    return orjson.dumps({"EventName": "TaskFinish", "JobsDetail": detail})


def event_id(job: str) -> str:
    return f"job:{job}:Success"


def write_config(tmp_path, inbox: SharedInbox, proxy_port: int, broker_url: str):
    path = tmp_path / "ci-receiver.toml"
    path.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[log]
format = "json"
[http]
access_log = false
[dispatch]
poll_interval = 0.2
[tdmq]
service_url = "{broker_url}"
token = "{TOKEN}"
topics = ["{TOPIC}"]
nack_delay = 0.5
[handlers.recorder]
type = "tests.handlers_for_tests:Recorder"
path = "{tmp_path / "recorded.jsonl"}"
timeout = 2
{inbox.toml(proxy_port)}
"""
    )
    return path


def handled(inbox: SharedInbox) -> dict[str, int]:
    """Done runs by event, as the inbox records them."""
    rows = inbox.query("SELECT event_id, attempts FROM runs WHERE status = 'done'")
    return dict(rows)


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
            # The admin listener says why.
            details = httpx.get(serve.admin_url + "/readyz").json()
            assert details["checks"]["inbox"].startswith("PostgreSQL: ")
            publish(pulsar_broker.url, TOPIC, [callback("jduring-tdmq")])
            # Not acked: the broker delivers it again, and again, while the database is away.
            nacked = "cannot commit the message; it will be delivered again"
            wait_until(lambda: consume.log().count(nacked) >= 3, "the message nacked 3 times")
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
            assert serve.terminate() == 0
            assert consume.terminate() == 0
        finally:
            serve.stop()
            consume.stop()
