"""The CMQ data-API client against the loopback CMQ stand-in (tests/support/cmq_server.py), which
stands in for TDMQ for CMQ: signatures, receipt handles, visibility, error codes."""

from __future__ import annotations

import asyncio

import pytest

from receiver.config import CmqConfig, ConfigError, load_config
from receiver.sources.cmq import api
from receiver.sources.cmq.api import CmqApi, CmqRefused, CmqUnavailable
from tests.support.cmq_server import sign
from tests.support.cmq_stand_in import QUEUE, SECRET_ID, SECRET_KEY, CmqStandIn
from tests.support.processes import free_port

# The worked example of CMQ's signature page (签名方法): its request parameters, host and
# key, and the signature the page prints for them.
DOC_PARAMS = {
    "Action": "SendMessage",
    "Nonce": "2889712707386595659",
    "RequestClient": "SDK_Python_1.3",
    "SecretId": "AKIDPcYDclDJCn8D0Xypa4f3pKYUCVYLn3zT",
    "SignatureMethod": "HmacSHA1",
    "Timestamp": "1534154812",
    "clientRequestId": "1231231231",
    "delaySeconds": "0",
    "msgBody": "msg",
    "queueName": "test1",
}
DOC_HOST = "cmq-queue-gz.api.tencentyun.com"
DOC_KEY = "pPgfLipfEXZ7VcRzhAMIyPaU7UbQyFFx"
DOC_SIGNATURE = "C16WEtEXsD5v5tnaUMLAbZewXhI="


def test_the_client_and_the_stand_in_both_sign_the_documented_example():
    assert api.signature(DOC_KEY, "POST", DOC_HOST, DOC_PARAMS) == DOC_SIGNATURE
    assert sign(DOC_KEY, "POST", DOC_HOST, "/v2/index.php", DOC_PARAMS) == DOC_SIGNATURE
    sha256 = {**DOC_PARAMS, "SignatureMethod": "HmacSHA256"}
    assert api.signature(DOC_KEY, "POST", DOC_HOST, sha256) == sign(
        DOC_KEY, "POST", DOC_HOST, "/v2/index.php", sha256
    )


@pytest.fixture
def stand_in(tmp_path):
    server = CmqStandIn(tmp_path / "cmq", visibility_timeout=2).start()
    yield server
    server.close()


def config(stand_in: CmqStandIn, **keys) -> CmqConfig:
    settings = {
        "endpoint": stand_in.url,
        "secret_id": SECRET_ID,
        "secret_key": SECRET_KEY,
        "queues": [QUEUE],
        **keys,
    }
    return CmqConfig(**settings)


@pytest.fixture
async def client(stand_in):
    cmq = CmqApi(config(stand_in), connections=4)
    yield cmq
    await cmq.close()


@pytest.mark.parametrize("method", ["HmacSHA256", "HmacSHA1"])
async def test_receive_and_delete_signed_either_way(stand_in, method):
    client = CmqApi(config(stand_in, signature_method=method), connections=2)
    try:
        stand_in.send([b"<Response/>", b"{}"])
        batch = await client.receive(QUEUE, 16, 0)
        assert [m.body for m in batch] == ["<Response/>", "{}"]
        assert all(m.dequeue_count == 1 and m.enqueue_time for m in batch)
        assert await client.delete(QUEUE, [m.receipt_handle for m in batch]) == {}
        assert stand_in.stats()["queued"] == {QUEUE: 0}
        assert stand_in.stats()["requests"] == {
            "BatchSendMessage": 1,
            "BatchReceiveMessage": 1,
            "BatchDeleteMessage": 1,
        }
    finally:
        await client.close()


async def test_one_at_a_time_uses_receive_and_delete_message(stand_in, client):
    stand_in.send([b"one"])
    [message] = await client.receive(QUEUE, 1, 0)
    assert message.body == "one"
    assert await client.delete(QUEUE, [message.receipt_handle]) == {}
    assert set(stand_in.stats()["requests"]) == {
        "BatchSendMessage",
        "ReceiveMessage",
        "DeleteMessage",
    }


async def test_no_message_is_an_empty_batch_after_the_long_poll(stand_in, client):
    assert await client.receive(QUEUE, 16, 0) == []
    assert await client.receive(QUEUE, 1, 0) == []
    waiting = asyncio.create_task(client.receive(QUEUE, 16, 5))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # held by the long poll
    stand_in.send([b"late"])
    assert [m.body for m in await waiting] == ["late"]


async def test_a_message_comes_back_with_a_new_handle_and_only_the_latest_deletes(stand_in, client):
    stand_in.send([b"again"])
    [first] = await client.receive(QUEUE, 16, 0)
    assert await client.receive(QUEUE, 16, 0) == []  # hidden
    [second] = await client.receive(QUEUE, 16, 4)  # visible again after 2 s
    assert second.msg_id == first.msg_id
    assert second.receipt_handle != first.receipt_handle
    assert second.dequeue_count == 2

    refused = await client.delete(QUEUE, [first.receipt_handle])
    assert refused[first.receipt_handle].code == api.STALE_HANDLE
    assert await client.delete(QUEUE, [second.receipt_handle]) == {}


async def test_a_batch_delete_names_the_handles_it_refused(stand_in, client):
    stand_in.send([b"a", b"b"])
    batch = await client.receive(QUEUE, 16, 0)
    handles = [m.receipt_handle for m in batch]
    refused = await client.delete(QUEUE, [*handles, "not-a-handle"])
    assert list(refused) == ["not-a-handle"]
    assert refused["not-a-handle"].code == api.STALE_HANDLE
    assert stand_in.stats()["queued"] == {QUEUE: 0}


async def test_refusals_carry_the_code_and_say_whether_waiting_helps(stand_in):
    wrong_key = CmqApi(config(stand_in, secret_key="not-the-key"), connections=1)
    no_queue = CmqApi(config(stand_in), connections=1)
    try:
        with pytest.raises(CmqRefused) as refused:
            await wrong_key.receive(QUEUE, 16, 0)
        assert (refused.value.code, refused.value.fatal) == (4100, True)
        assert "authentication failed" in refused.value.message
        assert "secret_key" in refused.value.hint

        with pytest.raises(CmqRefused) as refused:
            await no_queue.receive("no-such-queue", 16, 0)
        assert (refused.value.code, refused.value.fatal) == (4440, True)

        stand_in.control(deny=["BatchReceiveMessage"])
        with pytest.raises(CmqRefused) as refused:
            await no_queue.receive(QUEUE, 16, 0)
        assert (refused.value.code, refused.value.fatal) == (4000, True)
        assert "cam" in refused.value.message
        stand_in.control(deny=[])

        # A code of the authentication family no list names: refused all the same.
        stand_in.control(refuse={"code": 4104, "message": "the key does not exist"})
        with pytest.raises(CmqRefused) as refused:
            await no_queue.receive(QUEUE, 16, 0)
        assert (refused.value.code, refused.value.fatal) == (4104, True)
        assert "secret_key" in refused.value.hint
        assert refused.value.request_id

        # CMQ failing: tried again, as a 5xx.
        stand_in.control(refuse={"code": 6000, "message": "(10050)server internal error"})
        with pytest.raises(CmqRefused) as refused:
            await no_queue.receive(QUEUE, 16, 0)
        assert (refused.value.code, refused.value.fatal, refused.value.hint) == (6000, False, "")
        stand_in.control(refuse=None)

        stand_in.control(throttle=1)
        with pytest.raises(CmqRefused) as refused:
            await no_queue.receive(QUEUE, 16, 0)
        assert (refused.value.code, refused.value.throttled, refused.value.fatal) == (
            4420,
            True,
            False,
        )

        stand_in.control(unavailable=1)
        with pytest.raises(CmqUnavailable, match="HTTP 503"):
            await no_queue.receive(QUEUE, 16, 0)
    finally:
        await wrong_key.close()
        await no_queue.close()


@pytest.mark.parametrize(
    ("code", "fatal", "said"),
    [
        (4000, True, "BatchDeleteMessage actions"),  # a parameter, or CAM (10461)
        (4100, True, "check cmq.secret_id"),  # the signature
        (4103, True, "may use this queue"),  # CAM: not authorized for the resource
        (4110, True, "check cmq.secret_id"),  # another CAM refusal
        (4200, True, "clock"),  # the request expired
        (4300, True, "arrears"),
        (4440, True, "check the queue name"),
        (4410, True, "the limit"),  # the queue holds as many messages as it may
        (4600, True, "CMQ's error codes"),  # a family with no hint of its own
        (5100, True, "CMQ's error codes"),
        (4420, False, ""),  # throttled
        (4480, False, ""),
        (6070, False, ""),
        (6000, False, ""),  # CMQ failing
        (6200, False, ""),  # "try again later"
        (4430, False, ""),  # a stale receipt handle: about one message
    ],
)
def test_codes_are_read_by_family(code, fatal, said):
    refused = CmqRefused("BatchReceiveMessage", code, "", "r", {})
    assert refused.fatal is fatal
    assert said in refused.hint if said else refused.hint == ""


async def test_an_endpoint_that_does_not_answer_is_unavailable():
    nobody = CmqConfig(
        endpoint=f"http://127.0.0.1:{free_port()}",
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        queues=[QUEUE],
    )
    client = CmqApi(nobody, connections=1)
    try:
        with pytest.raises(CmqUnavailable, match="ConnectError"):
            await client.receive(QUEUE, 16, 0)
    finally:
        await client.close()


def test_the_endpoint_comes_from_the_region_or_is_given():
    assert CmqConfig(region="gz").url == "https://cmq-gz.public.tencenttdmq.com"
    assert CmqConfig(region="bj", network="vpc").url == "http://bj.mqadapter.cmq.tencentyun.com"
    given = CmqConfig(region="gz", endpoint="https://cmq-gz.public.tencenttdmq.com:9443/")
    assert given.url == "https://cmq-gz.public.tencenttdmq.com:9443"


@pytest.mark.parametrize(
    ("section", "said"),
    [
        ('endpoint = "https://cmq-gz.public.tencenttdmq.com/v2/index.php"', "host and port only"),
        ('region = "ap-guangzhou"', "not a CMQ region code"),
        ('queues = ["1st"]', "'1st' is not a CMQ queue name"),
        ('queues = ["a", "a"]', "a queue is named twice"),
        ("batch = 17", "cmq.batch"),
        ("polling_wait = 31", "cmq.polling_wait"),
    ],
)
def test_a_cmq_setting_that_cannot_work_is_a_config_error(tmp_path, section, said):
    path = tmp_path / "c.toml"
    path.write_text(f"[cmq]\n{section}\n")
    with pytest.raises(ConfigError, match=said):
        load_config(path)


def test_the_cmq_keys_come_from_the_environment_too(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[cmq]\nregion = "gz"\nqueues = ["ci-callbacks"]\n')
    monkeypatch.setenv("CI_RECEIVER_CMQ__SECRET_ID", SECRET_ID)
    monkeypatch.setenv("CI_RECEIVER_CMQ__SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("CI_RECEIVER_CMQ__NETWORK", "vpc")
    cmq = load_config(path).cmq
    assert cmq.secret_key.get_secret_value() == SECRET_KEY
    assert cmq.missing_for_consumer() == []
    assert cmq.url == "http://gz.mqadapter.cmq.tencentyun.com"
    assert SECRET_KEY not in str(load_config(path).effective())
