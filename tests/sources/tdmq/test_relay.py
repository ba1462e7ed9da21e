"""Relay mode end to end: `serve` publishes callbacks to a topic, `consume` keeps and
handles them. Both are real processes; the broker is pulsar-lite."""

from __future__ import annotations

import httpx
import pytest

from receiver import parse_callback
from tests.support.callbacks import ALL, load
from tests.support.installations import Site, ci_receiver, content_version, wait_until
from tests.support.processes import Receiver, free_port

TOPIC = "persistent://public/default/ci-callbacks"


@pytest.mark.parametrize("workers", [1, 2])
def test_http_to_topic_to_consumer_to_handler(tmp_path, pulsar_broker, workers):
    # One config for the fleet: `serve` relays with it, `consume` stores with it.
    site = Site(
        tmp_path / "fleet",
        pulsar_broker.url,
        TOPIC,
        extra=f'[relay]\ntopic = "{TOPIC}"\nsend_timeout = 2\n[limits]\nmax_bytes = 100000',
    )
    relay_data = tmp_path / "relay-data"
    relay, consumer = Receiver(site.config, "serve"), Receiver(site.config, "consume")
    try:
        relay.start(
            env={"CI_RECEIVER_DATA_DIR": str(relay_data), "CI_RECEIVER_HTTP__WORKERS": str(workers)}
        )
        if workers > 1:  # `serve --workers` relays the same way
            relay.wait_for_log("all workers listening")
        consumer.start(wait_http=False).wait_for_log("tdmq consumer connected")
        # consume has no public port, but its admin listener tells how it is doing.
        consumer_ready = httpx.get(consumer.admin_url + "/readyz").json()
        assert consumer_ready["checks"]["tdmq"].startswith("connected")
        ready = httpx.get(relay.admin_url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["relay"] == f"publishing to {TOPIC}"

        expected: set[str] = set()
        request_ids: dict[str, str] = {}
        for name in ALL:
            response = relay.post(load(name), headers=content_version(name))
            assert response.status_code == 200, (name, response.text)
            ids = [e.id for e in parse_callback(load(name), content_version(name))]
            assert response.json()["ids"] == ids
            expected.update(ids)
            request_ids[response.headers["x-request-id"]] = name
        bad = relay.post(b"not a callback")
        assert (bad.status_code, bad.json()["error"]) == (400, "not_xml_or_json")
        too_large = relay.post(b"<" * 100_001)
        assert (too_large.status_code, too_large.json()["error"]) == (413, "too_large")

        wait_until(lambda: set(site.handled()) == expected, "every callback handled")
        assert set(site.handled().values()) == {1}
        wait_until(lambda: len(site.receipts()) == len(ALL) + 2, "the refused bodies kept")
        receipts = site.receipts()
        for receipt in receipts:
            # Stored as the HTTP callback it was (a CMQ topic's push as such), with the hop
            # through TDMQ noted.
            pushed = request_ids.get(receipt["request_id"]) == "cmq_envelope_transcode.json"
            assert receipt["source"] == ("cmq-push" if pushed else "http")
            assert receipt["source_meta"]["relay"]["topic"] == TOPIC
        by_request = {r["request_id"]: r for r in receipts}
        for request_id, name in request_ids.items():
            assert by_request[request_id]["body"] == load(name)
        rejected = [
            (r["error_reason"], r["size"], r["body"])
            for r in receipts
            if r["outcome"] == "rejected"
        ]
        assert sorted(rejected) == [
            ("not_xml_or_json", 14, b"not a callback"),
            ("too_large", 100_001, b""),  # refused from its Content-Length, never read
        ]
        events = site.events()
        assert events["job:j6842765cf84611ecb8546d80f2baf56f:Success"]["source"] == "http"
        assert {e["source"] for e in events.values()} == {"http", "cmq-push"}
        assert not relay_data.exists()  # the relay keeps nothing on its disk

        # Without the broker, nothing is answered 200: the sender will try again.
        pulsar_broker.stop()
        unstored = relay.post(load("transcode.xml"))
        assert (unstored.status_code, unstored.json()["error"]) == (503, "relay_unavailable")
        unkept = relay.post(b"not a callback either")  # a refusal it cannot pass on
        assert (unkept.status_code, unkept.json()["error"]) == (503, "relay_unavailable")
        assert httpx.get(relay.url + "/readyz").status_code == 503
        assert relay.terminate() == 0
        assert consumer.terminate() == 0
    finally:
        relay.stop()
        consumer.stop()
    # The log says which broker failed, and not that an inbox did.
    failures = [line for line in relay.log().splitlines() if "cannot relay the" in line]
    assert len(failures) == 2
    assert all(pulsar_broker.url in line and TOPIC in line for line in failures)
    assert "inbox" not in relay.log()


def test_commands_say_what_is_missing_or_unreachable(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n')
    consume = ci_receiver("consume", "--config", str(config))
    assert consume.returncode == 1
    assert "nothing to consume: set [cmq] region" in consume.stderr
    config.write_text(f'data_dir = "{tmp_path}"\n[tdmq]\nservice_url = "pulsar://127.0.0.1:6650"\n')
    consume = ci_receiver("consume", "--config", str(config))
    assert consume.returncode == 1
    assert "set tdmq.topics (or tdmq.topic_pattern) to consume from TDMQ" in consume.stderr

    nobody = f"pulsar://127.0.0.1:{free_port()}"
    config.write_text(
        f'[tdmq]\nservice_url = "{nobody}"\noperation_timeout = 1\n[relay]\ntopic = "{TOPIC}"\n'
    )
    serve = ci_receiver("serve", "--port", str(free_port()), "--config", str(config))
    assert serve.returncode == 1
    assert f"cannot publish to {TOPIC} at {nobody}" in serve.stderr
