"""The `webhook` handler against a real HTTP server on loopback; signatures are checked
with the `standardwebhooks` package, an implementation independent of ours."""

from __future__ import annotations

import base64
import json
from email.utils import formatdate
from time import time

import pytest
from standardwebhooks import Webhook

import handlers
from handlers import Fail, HandlerConfigError, Retry
from handlers.webhook import WebhookHandler
from tests.support.handler_runs import run_handler
from tests.support.http_peers import HttpPeer, Reply
from tests.support.processes import free_port
from tests.support.sample_events import event

SECRET = "whsec_" + base64.b64encode(b"a 32-byte secret for the tests!!").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the secret being rotated out....").decode()


@pytest.fixture
def peer():
    with HttpPeer() as server:
        yield server


async def test_the_event_is_posted_signed_per_standard_webhooks(peer):
    smartcover = event("smartcover.xml")
    await run_handler(
        "webhook",
        {"url": peer.url + "/hooks/ci", "secret": SECRET, "headers": {"X-Team": "media"}},
        smartcover,
    )

    [request] = peer.requests
    assert request.path == "/hooks/ci"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-team"] == "media"
    assert request.headers["webhook-id"] == smartcover.id
    assert abs(int(request.headers["webhook-timestamp"]) - time()) < 300
    payload = Webhook(SECRET).verify(request.body, request.headers)
    assert payload == json.loads(smartcover.to_json())


async def test_a_signature_per_secret_while_rotating(peer):
    await run_handler(
        "webhook", {"url": peer.url, "secret": [SECRET, OLD_SECRET]}, event("transcode.xml")
    )

    [request] = peer.requests
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(signature.startswith("v1,") for signature in signatures)
    Webhook(SECRET).verify(request.body, request.headers)
    Webhook(OLD_SECRET).verify(request.body, request.headers)
    stranger = "whsec_" + base64.b64encode(b"not one of the configured secrets").decode()
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(stranger).verify(request.body, request.headers)


async def test_a_repeat_keeps_its_webhook_id_and_raw_can_be_left_out(peer):
    failed = event("smartcover_failed.xml")
    await run_handler(
        "webhook", {"url": peer.url, "secret": SECRET, "include_raw": False}, failed, failed
    )

    first, second = peer.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == failed.id
    payload = Webhook(SECRET).verify(second.body, second.headers)
    assert "raw" not in payload
    assert (payload["state"], payload["code"]) == ("Failed", failed.code)


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_server_errors_and_rate_limits_are_retried(peer, status):
    peer.replies = [Reply(status=status, body="busy")]
    with pytest.raises(Retry, match=f"answered {status}: busy") as raised:
        await run_handler("webhook", {"url": peer.url, "secret": SECRET}, event())
    assert raised.value.after is None


async def test_retry_after_is_honoured_in_seconds_and_as_a_date(peer):
    peer.replies = [
        Reply(status=429, headers={"Retry-After": "7"}),
        Reply(status=503, headers={"Retry-After": formatdate(time() + 120, usegmt=True)}),
    ]
    with pytest.raises(Retry) as seconds:
        await run_handler("webhook", {"url": peer.url}, event())
    with pytest.raises(Retry) as date:
        await run_handler("webhook", {"url": peer.url}, event())
    assert seconds.value.after == 7
    assert 100 < date.value.after <= 120
    # "Now", or a date the peer's clock thinks past: the back-off's step instead, or every
    # attempt would be spent within a second.
    peer.replies = [
        Reply(status=503, headers={"Retry-After": "0"}),
        Reply(status=503, headers={"Retry-After": formatdate(time() - 60, usegmt=True)}),
    ]
    for _ in range(2):
        with pytest.raises(Retry) as now:
            await run_handler("webhook", {"url": peer.url}, event())
        assert now.value.after is None


async def test_a_header_value_http_cannot_carry_is_refused_without_quoting_it(peer):
    secret = "Bearer s3cr3t-token"
    with pytest.raises(HandlerConfigError, match="header Authorization: its value holds") as bad:
        handlers.build("webhook", {"url": peer.url, "headers": {"Authorization": secret + "\n"}})
    assert "s3cr3t" not in str(bad.value)
    with pytest.raises(HandlerConfigError, match="header name 'Bad Name'"):
        handlers.build("webhook", {"url": peer.url, "headers": {"Bad Name": "x"}})


@pytest.mark.parametrize("status", [400, 401, 404, 410, 301])
async def test_other_answers_fail_at_once(peer, status):
    peer.replies = [Reply(status=status, body="no such hook", headers={"Location": "/x"})]
    with pytest.raises(Fail, match=f"answered {status}"):
        await run_handler("webhook", {"url": peer.url}, event())


async def test_500_then_200_is_delivered_on_the_second_attempt(peer):
    peer.replies = [Reply(status=500)]
    handler = WebhookHandler({"url": peer.url, "secret": SECRET})
    await handler.start()
    try:
        with pytest.raises(Retry):
            await handler(event())
        await handler(event())
    finally:
        await handler.close()
    first, second = peer.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    Webhook(SECRET).verify(second.body, second.headers)


async def test_a_peer_that_is_down_is_retried():
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    with pytest.raises(Retry, match=r"cannot reach http://127.0.0.1"):
        await run_handler("webhook", {"url": url}, event())


async def test_a_slow_peer_times_out_and_is_retried(peer):
    peer.replies = [Reply(delay=3)]
    with pytest.raises(Retry, match="timed out"):
        await run_handler("webhook", {"url": peer.url, "request_timeout": 0.3}, event())


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({}, "url: Field required"),
        ({"url": "hooks.example.com"}, "url: String should match pattern"),
        ({"url": "https://x", "secret": "whsec_***"}, "secret: a secret must be whsec_<base64>"),
        ({"url": "https://x", "retries": 3}, "retries: unknown option"),
    ],
)
def test_bad_options_name_the_key(options, says):
    with pytest.raises(handlers.HandlerConfigError, match="handler type 'webhook'") as raised:
        handlers.build("webhook", options)
    assert says in str(raised.value)


async def test_a_request_that_cannot_be_sent_fails_at_once_without_quoting_it(peer):
    # Past the config's checks (a handler of one's own on HttpHandler, say): no retries,
    # and the client's words, which quote the value, are not kept.
    handler = WebhookHandler({"url": peer.url})
    await handler.start()
    try:
        with pytest.raises(Fail, match="LocalProtocolError") as failed:
            await handler.post(peer.url, headers={"Authorization": "Bearer s3cr3t\n"})
    finally:
        await handler.close()
    assert "s3cr3t" not in str(failed.value)
    assert peer.requests == []
