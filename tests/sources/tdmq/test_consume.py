"""`ci-receiver consume` and `run` against the pulsar-lite broker, as real processes.

Messages are published with the official client, as a bridge to TDMQ would; what the
consumer did is read from its inbox and from a `jsonl` handler's file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import orjson
import pulsar
import pytest

from receiver import parse_callback
from receiver.callback.event import Event
from tests.support.callbacks import ALL, load
from tests.support.installations import (
    Site,
    ci_receiver,
    content_version,
    publish,
    query,
    variant,
    wait_until,
)
from tests.support.processes import HOOKS, REPO, Receiver, free_port
from tests.support.sample_events import comparable

TOPIC = "persistent://public/default/ci-callbacks"


@pytest.fixture
def processes(receivers):
    def start(site: Site, command: str = "consume", env: dict | None = None) -> Receiver:
        return receivers(site.config, command, env, ready="tdmq consumer connected")

    return start


def test_every_fixture_is_consumed_decoded_as_over_http_and_handled(
    tmp_path, pulsar_broker, processes
):
    site = Site(tmp_path, pulsar_broker.url, TOPIC)
    processes(site)
    by_id: dict[str, list[dict]] = {}
    for name in ALL:
        for event in parse_callback(load(name), content_version(name)):
            by_id.setdefault(event.id, []).append(comparable(event))
    messages = [(load(name), {**content_version(name), "trace-id": name}) for name in ALL]
    publish(pulsar_broker.url, TOPIC, messages)

    wait_until(lambda: set(site.handled()) == set(by_id), "every event handled")

    assert set(site.handled().values()) == {1}  # each event handled once
    receipts = site.receipts()
    assert len(receipts) == len(ALL)
    assert {r["outcome"] for r in receipts} == {"accepted", "duplicate"}
    for event_id, data in site.events().items():
        event = Event.from_dict(data)
        # Decoded and normalized exactly as over HTTP (two fixtures may be the same job).
        assert comparable(event) in by_id[event_id], event_id
        assert event.source == "tdmq"
        meta = event.source_meta
        assert meta["topic"] == TOPIC
        assert meta["message_id"]
        assert meta["publish_time"]
        assert meta["redelivery_count"] == 0
        fixture = meta["properties"]["trace-id"]  # the message's own properties, kept
        assert event_id in {e.id for e in parse_callback(load(fixture), content_version(fixture))}
    moderation = [r for r in receipts if "X-Ci-Content-Version" in r["source_meta"]["properties"]]
    assert moderation
    assert all("x-ci-content-version" in r["headers"] for r in moderation)


def test_undecodable_message_is_kept_dead_lettered_and_acked(tmp_path, pulsar_broker, processes):
    dead_letters = TOPIC + "-DLQ"
    site = Site(tmp_path, pulsar_broker.url, TOPIC, tdmq=f'dead_letter_topic = "{dead_letters}"')
    process = processes(site)
    publish(pulsar_broker.url, TOPIC, [b"<Response><JobsDetail>", load("smartcover.xml")])
    wait_until(lambda: len(site.receipts()) == 2, "both messages taken")

    rejected = [r for r in site.receipts() if r["outcome"] == "rejected"]
    assert [(r["source"], r["error_reason"], r["body"]) for r in rejected] == [
        ("tdmq", "malformed_xml", b"<Response><JobsDetail>")
    ]
    listed = ci_receiver("events", "rejected", "--config", str(site.config)).stdout
    assert "tdmq" in listed
    assert "malformed_xml" in listed
    number = str(rejected[0]["id"])
    body = ci_receiver("events", "rejected", "--body", number, "--config", str(site.config)).stdout
    assert body == "<Response><JobsDetail>"

    client = pulsar.Client(pulsar_broker.url)
    try:
        reader = client.subscribe(
            dead_letters, "inspect", initial_position=pulsar.InitialPosition.Earliest
        )
        message = reader.receive(timeout_millis=30_000)
        assert message.data() == b"<Response><JobsDetail>"
        assert message.properties()["ci-receiver-rejected"] == "malformed_xml"
        assert message.properties()["ci-receiver-topic"] == TOPIC
    finally:
        client.close()

    # Acked: after a restart, the bad message does not come back; the next one does.
    assert process.terminate() == 0
    processes(site)
    publish(pulsar_broker.url, TOPIC, [load("transcode.xml")])
    transcode = parse_callback(load("transcode.xml"))[0].id
    wait_until(lambda: transcode in site.events(), "the next message taken")
    assert [r["outcome"] for r in site.receipts()].count("rejected") == 1


@pytest.mark.parametrize("stage", ["before", "after"])
def test_killed_before_the_ack_the_message_comes_again_and_is_handled_once(
    tmp_path, pulsar_broker, processes, stage
):
    """kill -9 while a message is received but not committed (before), or committed but
    not acked (after): the restarted consumer gets it again, and it is handled once."""
    site = Site(tmp_path, pulsar_broker.url, TOPIC)
    mark = tmp_path / "stalled"
    stalling = {
        "PYTHONPATH": f"{REPO}{os.pathsep}{HOOKS}",
        "CI_RECEIVER_TEST_STALL": stage,
        "CI_RECEIVER_TEST_STALL_MARK": str(mark),
    }
    process = processes(site, env=stalling)
    publish(pulsar_broker.url, TOPIC, [load("smartcover.xml")])
    wait_until(mark.exists, "the message reached the stall")
    event_id = parse_callback(load("smartcover.xml"))[0].id
    if stage == "before":
        assert site.events() == {}
    else:
        assert list(site.events()) == [event_id]
        # Handled and recorded as done: only the ack is missing.
        wait_until(lambda: query(site.inbox, "SELECT status FROM runs") == [("done",)], "done")
    process.kill()

    processes(site)
    expected = ["accepted"] if stage == "before" else ["accepted", "duplicate"]
    wait_until(lambda: len(site.receipts()) == len(expected), "the message taken again")
    assert [r["outcome"] for r in site.receipts()] == expected
    wait_until(lambda: site.handled(), "handled after the restart")
    assert site.handled() == {event_id: 1}
    # The same message, delivered again.
    assert len({r["source_meta"]["message_id"] for r in site.receipts()}) == 1


def test_two_consumers_on_a_shared_subscription_split_the_work(tmp_path, pulsar_broker, processes):
    # Separate inboxes, so that the inbox's dedup cannot hide a message delivered twice.
    small_queue = "receiver_queue_size = 5\nconcurrency = 4"
    sites = [Site(tmp_path / name, pulsar_broker.url, TOPIC, tdmq=small_queue) for name in "ab"]
    for number, site in enumerate(sites):
        hooks = {"PYTHONPATH": f"{REPO}{os.pathsep}{HOOKS}"}
        processes(site, env={**hooks, "CI_RECEIVER_TEST_SKIP_CONSUMER_IDS": str(number)})
    body = load("smartcover.xml")
    total = publish(pulsar_broker.url, TOPIC, (variant(body, n) for n in range(200)))

    wait_until(lambda: sum(len(site.handled()) for site in sites) == total, "every message handled")
    first, second = (site.handled() for site in sites)
    assert first
    assert second
    assert not set(first) & set(second)  # nothing twice
    assert set(first.values()) | set(second.values()) == {1}


def test_broker_restart_mid_stream_loses_nothing(tmp_path, pulsar_broker, processes):
    """The broker goes away while the consumer holds messages received but not yet
    committed, and comes back: everything is handled, once."""
    site = Site(tmp_path, pulsar_broker.url, TOPIC)
    held, release = tmp_path / "held", tmp_path / "release"
    process = processes(
        site,
        env={
            "PYTHONPATH": f"{REPO}{os.pathsep}{HOOKS}",
            "CI_RECEIVER_TEST_STALL": "hold",
            "CI_RECEIVER_TEST_STALL_MARK": str(held),
            "CI_RECEIVER_TEST_RELEASE": str(release),
        },
    )
    body = load("smartcover.json")
    publish(pulsar_broker.url, TOPIC, (variant(body, n) for n in range(300)))
    wait_until(held.exists, "messages in flight")
    pulsar_broker.stop()
    wait_until(lambda: "tdmq consumer disconnected" in process.log(), "the drop noticed")
    release.touch()  # commit what is in flight while the broker is away: acks cannot go
    pulsar_broker.start()
    publish(pulsar_broker.url, TOPIC, (variant(body, n) for n in range(300, 600)))

    wait_until(lambda: len(site.handled()) == 600, "all 600 handled", timeout=120)
    assert set(site.handled().values()) == {1}
    assert len(site.events()) == 600


def test_sigterm_stops_promptly_even_while_the_broker_is_away(tmp_path, pulsar_broker, processes):
    site = Site(tmp_path, pulsar_broker.url, TOPIC)
    idle = processes(site)
    assert idle.terminate(timeout=10) == 0  # blocked in receive, nothing to take

    reconnecting = processes(site)
    pulsar_broker.stop()
    wait_until(lambda: "tdmq consumer disconnected" in reconnecting.log(), "the drop noticed")
    assert reconnecting.terminate(timeout=10) == 0


def test_same_callback_over_http_and_tdmq_is_stored_and_handled_once(
    tmp_path, pulsar_broker, processes
):
    site = Site(tmp_path, pulsar_broker.url, TOPIC)
    both = processes(site, command="run")
    ready = httpx.get(both.admin_url + "/readyz").json()
    assert ready["ready"]
    assert ready["checks"]["tdmq"].startswith("connected")

    body = load("transcode.xml")
    answer = both.post(body).json()
    assert answer["accepted"] == 1
    publish(pulsar_broker.url, TOPIC, [body])

    wait_until(lambda: len(site.receipts()) == 2, "the TDMQ copy taken")
    assert [(r["source"], r["outcome"]) for r in site.receipts()] == [
        ("http", "accepted"),
        ("tdmq", "duplicate"),
    ]
    wait_until(lambda: site.handled(), "handled")
    assert site.handled() == {answer["ids"][0]: 1}
    assert list(site.events()) == answer["ids"]

    pulsar_broker.stop()
    wait_until(lambda: not httpx.get(both.url + "/readyz").json()["ready"], "unready")


def test_the_client_library_log_is_part_of_the_json_log(tmp_path, pulsar_broker):
    """The Pulsar C++ library logs on its own threads; its lines reach stdout as JSON
    lines of the logger `pulsar`, not as its own plain text."""
    site = Site(tmp_path, pulsar_broker.url, TOPIC, tdmq='client_log_level = "info"')
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "consume", "--config", str(site.config)],
            stdout=out,
            stderr=err,
            cwd=tmp_path,
            env={**os.environ, "CI_RECEIVER_ADMIN__PORT": str(free_port())},
        )
    try:
        wait_until(lambda: "tdmq consumer connected" in stdout.read_text(), "connected")
        publish(pulsar_broker.url, TOPIC, [load("smartcover.xml")])
        wait_until(lambda: site.handled(), "the callback handled")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [orjson.loads(line) for line in stdout.read_text().splitlines()]  # JSON, all
    library = [line for line in lines if line["logger"] == "pulsar"]
    assert any("Connected to broker" in line["event"] for line in library)
    assert all(line["level"] in ("info", "warning", "error") for line in library)
    assert all(":" in line["source"] for line in library)  # its file and line: Consumer:123
    assert "Connected to broker" not in stderr.read_text()
