"""`ci-receiver consume` and `run` on TDMQ for CMQ queues, as real processes, against the
loopback CMQ stand-in (tests/support/cmq_server.py), which stands in for the cloud endpoint.

Messages are put on the queue with CMQ's own SendMessage actions, as CI would; what the
consumer did is read from its inbox, a `jsonl` handler's file and the stand-in's counts.
"""

from __future__ import annotations

import os

import httpx
import orjson
import pytest

from receiver import parse_callback
from receiver.callback.event import Event
from tests.support.callbacks import ALL, load
from tests.support.cmq_stand_in import QUEUE, SECRET_KEY, CmqSite, CmqStandIn
from tests.support.installations import ci_receiver, publish, query, variant, wait_until
from tests.support.processes import HOOKS, REPO, Receiver
from tests.support.sample_events import comparable


@pytest.fixture
def stand_in(tmp_path):
    server = CmqStandIn(tmp_path / "cmq", visibility_timeout=2).start()
    yield server
    server.close()


@pytest.fixture
def processes(receivers):
    def start(site: CmqSite, command: str = "consume", env: dict | None = None) -> Receiver:
        return receivers(site.config, command, env, ready="cmq queue receiving")

    return start


def stalling(tmp_path, stage: str) -> dict[str, str]:
    return {
        "PYTHONPATH": f"{REPO}{os.pathsep}{HOOKS}",
        "CI_RECEIVER_TEST_STALL": stage,
        "CI_RECEIVER_TEST_STALL_SOURCE": "cmq",
        "CI_RECEIVER_TEST_STALL_MARK": str(tmp_path / "stalled"),
        "CI_RECEIVER_TEST_RELEASE": str(tmp_path / "release"),
    }


def test_every_fixture_through_a_queue_is_decoded_as_over_http_handled_and_deleted(
    tmp_path, stand_in, processes
):
    # The key from the environment, as a deployment passes it.
    site = CmqSite(tmp_path, stand_in, secret_key="${CMQ_SECRET_KEY}")
    processes(site, env={"CMQ_SECRET_KEY": SECRET_KEY})
    by_id: dict[str, list[dict]] = {}
    for name in ALL:
        for event in parse_callback(load(name)):
            by_id.setdefault(event.id, []).append(comparable(event))
    stand_in.send(load(name) for name in ALL)

    wait_until(lambda: set(site.handled()) == set(by_id), "every event handled")
    assert set(site.handled().values()) == {1}
    wait_until(lambda: stand_in.stats()["queued"] == {QUEUE: 0}, "every message deleted")
    receipts = site.receipts()
    assert len(receipts) == len(ALL)
    assert {r["outcome"] for r in receipts} == {"accepted", "duplicate"}
    bodies = {load(name) for name in ALL}
    assert {r["body"] for r in receipts} == bodies
    for event_id, data in site.events().items():
        event = Event.from_dict(data)
        assert comparable(event) in by_id[event_id], event_id
        assert event.source == "cmq"
        assert event.source_meta["queue"] == QUEUE
        assert event.source_meta["msg_id"]
        assert event.source_meta["enqueue_time"]
        assert event.source_meta["dequeue_count"] == 1


@pytest.mark.parametrize("stage", ["before", "after"])
def test_killed_before_the_delete_the_message_comes_back_and_is_handled_once(
    tmp_path, stand_in, processes, stage
):
    """kill -9 while a message is received but not committed (before), or committed but
    not deleted (after): it comes back after the visibility timeout, and is handled once."""
    site = CmqSite(tmp_path, stand_in)
    process = processes(site, env=stalling(tmp_path, stage))
    stand_in.send([load("smartcover.xml")])
    wait_until((tmp_path / "stalled").exists, "the message reached the stall")
    event_id = parse_callback(load("smartcover.xml"))[0].id
    if stage == "before":
        assert site.events() == {}
    else:
        assert list(site.events()) == [event_id]
        wait_until(lambda: query(site.inbox, "SELECT status FROM runs") == [("done",)], "done")
    assert stand_in.stats()["queued"] == {QUEUE: 1}  # not deleted
    process.kill()

    processes(site)
    expected = ["accepted"] if stage == "before" else ["accepted", "duplicate"]
    wait_until(lambda: len(site.receipts()) == len(expected), "the message taken again")
    assert [r["outcome"] for r in site.receipts()] == expected
    wait_until(lambda: site.handled(), "handled after the restart")
    assert site.handled() == {event_id: 1}
    wait_until(lambda: stand_in.stats()["queued"] == {QUEUE: 0}, "deleted at last")
    # The same message, received again with a new receipt handle.
    metas = [r["source_meta"] for r in site.receipts()]
    assert len({meta["msg_id"] for meta in metas}) == 1
    assert metas[-1]["dequeue_count"] == 2


def test_an_endpoint_restart_mid_stream_loses_nothing(tmp_path, stand_in, processes):
    """The endpoint goes away while the consumer holds received messages not yet
    committed (so their deletes fail), and comes back: everything is handled, once."""
    site = CmqSite(tmp_path, stand_in, batch=8, concurrency=2)
    process = processes(site, env=stalling(tmp_path, "hold"))
    body = load("smartcover.json")
    stand_in.send(variant(body, n) for n in range(200))
    wait_until((tmp_path / "stalled").exists, "messages in hand")
    stand_in.kill()
    (tmp_path / "release").touch()  # commit what is in hand: the deletes cannot go
    wait_until(lambda: "cmq queue unavailable" in process.log(), "the endpoint gone noticed")
    stand_in.start()
    stand_in.send(variant(body, n) for n in range(200, 400))

    wait_until(lambda: len(site.handled()) == 400, "all 400 handled", timeout=120)
    assert set(site.handled().values()) == {1}
    assert len(site.events()) == 400
    wait_until(lambda: stand_in.stats()["queued"] == {QUEUE: 0}, "all deleted")
    outcomes = [r["outcome"] for r in site.receipts()]
    assert outcomes.count("accepted") == 400
    assert "duplicate" in outcomes  # the ones whose delete was lost came back


@pytest.mark.parametrize(
    ("secret_key", "refuse", "answer"),
    [
        ("not-the-key", None, "code 4100: (10030)authentication failed"),
        # A code of the authentication family the consumer has no word for: the key
        # signs right, but CMQ no longer knows it.
        (SECRET_KEY, {"code": 4104, "message": "key gone"}, "code 4104: key gone"),
    ],
)
def test_a_wrong_key_stops_consume_at_start_with_cmq_s_answer(
    tmp_path, stand_in, secret_key, refuse, answer
):
    stand_in.control(refuse=refuse)
    site = CmqSite(tmp_path, stand_in, secret_key=secret_key)
    consume = ci_receiver("consume", "--config", str(site.config))
    assert consume.returncode == 1
    failure = next(
        orjson.loads(line)
        for line in consume.stdout.splitlines()
        if line.startswith("{") and "component failed" in line
    )
    assert failure["component"] == "cmq"
    assert f"cannot receive from CMQ queue '{QUEUE}' at {stand_in.url}" in failure["error"]
    assert answer in failure["error"]
    assert "(request " in failure["error"]
    assert "check cmq.secret_id and cmq.secret_key" in failure["error"]
    assert secret_key not in consume.stdout + consume.stderr


def test_check_config_masks_the_cmq_key_and_consume_says_what_is_missing(tmp_path, stand_in):
    site = CmqSite(tmp_path, stand_in, token="temporary-token")
    checked = ci_receiver("check-config", "--config", str(site.config))
    assert checked.returncode == 0, checked.stderr
    cmq = orjson.loads(checked.stdout)["cmq"]
    assert cmq["secret_id"] == cmq["secret_key"] == cmq["token"] == "**********"
    assert cmq["queues"] == [QUEUE]
    assert SECRET_KEY not in checked.stdout
    assert "temporary-token" not in checked.stdout

    config = tmp_path / "partial.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n[cmq]\nregion = "gz"\nqueues = ["{QUEUE}"]\n')
    consume = ci_receiver("consume", "--config", str(config))
    assert consume.returncode == 1
    assert "set cmq.secret_id and cmq.secret_key to consume from CMQ" in consume.stderr


def test_sigterm_stops_at_once_and_leaves_what_is_in_hand_to_come_back(
    tmp_path, stand_in, processes
):
    site = CmqSite(tmp_path, stand_in, polling_wait=30)
    idle = processes(site)
    assert idle.terminate(timeout=10) == 0  # in its 30 s long poll: stopped at once

    busy = processes(site, env=stalling(tmp_path, "hold"))  # never released
    stand_in.send([load("smartcover.xml"), load("transcode.xml")])
    wait_until((tmp_path / "stalled").exists, "messages in hand")
    assert busy.terminate(timeout=20) == 0  # in-flight commits get their time, then go
    assert site.events() == {}
    assert stand_in.stats()["queued"] == {QUEUE: 2}  # not deleted: they come back

    processes(site)
    wait_until(lambda: len(site.handled()) == 2, "handled after the restart")
    wait_until(lambda: stand_in.stats()["queued"] == {QUEUE: 0}, "deleted")


def test_the_same_callback_over_http_pulsar_and_cmq_is_stored_and_handled_once(
    tmp_path, stand_in, pulsar_broker, processes
):
    topic = "persistent://public/default/ci-callbacks"
    tdmq = f'[tdmq]\nservice_url = "{pulsar_broker.url}"\ntopics = ["{topic}"]\n'
    site = CmqSite(tmp_path, stand_in, extra=tdmq)
    everything = processes(site, command="run")
    everything.wait_for_log("tdmq consumer connected")
    ready = httpx.get(everything.admin_url + "/readyz").json()
    assert ready["ready"]
    assert ready["checks"]["cmq"] == f"{QUEUE}: receiving"
    assert ready["checks"]["tdmq"].startswith("connected")

    body = load("transcode.xml")
    answer = everything.post(body).json()
    assert answer["accepted"] == 1
    publish(pulsar_broker.url, topic, [body])
    stand_in.send([body])

    wait_until(lambda: len(site.receipts()) == 3, "the TDMQ and CMQ copies taken")
    assert sorted((r["source"], r["outcome"]) for r in site.receipts()) == [
        ("cmq", "duplicate"),
        ("http", "accepted"),
        ("tdmq", "duplicate"),
    ]
    wait_until(lambda: site.handled(), "handled")
    assert site.handled() == {answer["ids"][0]: 1}
    assert list(site.events()) == answer["ids"]
    wait_until(lambda: stand_in.stats()["queued"] == {QUEUE: 0}, "deleted")

    metrics = httpx.get(everything.admin_url + "/metrics").text
    assert 'ci_receiver_cmq_messages_total{outcome="committed"} 1.0' in metrics
    assert 'ci_receiver_cmq_messages_total{outcome="deleted"} 1.0' in metrics
    assert "ci_receiver_cmq_receive_seconds_count" in metrics

    stand_in.kill()
    wait_until(lambda: not httpx.get(everything.admin_url + "/readyz").json()["ready"], "unready")
    assert "unavailable" in httpx.get(everything.admin_url + "/readyz").json()["checks"]["cmq"]
