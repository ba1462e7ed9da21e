"""The chat robot handlers against robots on loopback that answer in each vendor's
documented shapes and check DingTalk's and Feishu's signatures themselves
(tests/peers.py): a wrong signature gets the vendor's own error body with HTTP 200."""

from __future__ import annotations

import dataclasses
import html
import logging
import re
from urllib.parse import quote

import pytest

import handlers
from handlers import Fail, Retry
from receiver.model import Event
from tests.peers import (
    HttpPeer,
    Reply,
    dingtalk_robot,
    feishu_bot,
    slack_webhook,
    wecom_robot,
)
from tests.processes import free_port
from tests.sample_events import event

KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"
TOKEN = "c0ffee-dingtalk-access-token"
SECRET = "SEC0123456789abcdef"
FEISHU_HOOK = "0a1b2c3d-feishu-hook"
SLACK_HOOK = "T000/B000/slack-hook-secret"


async def send(type_name: str, options: dict, *events) -> None:
    handler = handlers.build(type_name, options)
    await handlers.start(handler)
    try:
        for one in events:
            await handler(one)
    finally:
        await handlers.close(handler)


# --- WeCom ------------------------------------------------------------------------------


@pytest.fixture
def wecom():
    with HttpPeer(wecom_robot(KEY)) as peer:
        peer.hook = f"{peer.url}/cgi-bin/webhook/send?key={KEY}"
        yield peer


async def test_wecom_gets_a_markdown_message(wecom):
    smartcover = event("smartcover.xml")
    await send("wecom", {"url": wecom.hook}, smartcover)

    [request] = wecom.requests
    body = request.json()
    assert body["msgtype"] == "markdown"
    content = body["markdown"]["content"]
    assert content.startswith("SmartCover Success\n")
    assert f"**Job**: {smartcover.job_id}" in content
    assert "**State**: Success" in content
    assert f"**Input**: {smartcover.input.key} &#40;{smartcover.input.bucket}&#41;" in content
    assert smartcover.outputs[0].key in content
    assert "**Error**" not in content


async def test_wecom_text_tells_what_failed(wecom):
    failed = event("smartcover_failed.xml")
    await send("wecom", {"url": wecom.hook, "msgtype": "text"}, failed)

    body = wecom.requests[0].json()
    content = body["text"]["content"]
    assert "SmartCover Failed" in content
    assert f"Error: {failed.code}: {failed.message}" in content
    assert "**" not in content


async def test_wecom_content_is_cut_to_the_documented_size(wecom):
    huge = dataclasses.replace(event("smartcover_failed.xml"), message="下载失败" * 2000)
    await send("wecom", {"url": wecom.hook, "msgtype": "text"}, huge)

    content = wecom.requests[0].json()["text"]["content"]
    assert len(content.encode()) <= 2048
    assert content.endswith("...")


async def test_wecom_errcode_with_http_200_fails_on_a_bad_key(wecom):
    with pytest.raises(Fail, match=r"errcode.*93000.*invalid webhook url"):
        await send("wecom", {"url": wecom.hook.replace(KEY, "not-the-key")}, event())


async def test_wecom_rate_limit_is_retried(wecom):
    wecom.replies = [Reply(body={"errcode": 45009, "errmsg": "api freq out of limit"})]
    with pytest.raises(Retry, match="45009"):
        await send("wecom", {"url": wecom.hook}, event())


# --- DingTalk ---------------------------------------------------------------------------


@pytest.fixture
def dingtalk():
    with HttpPeer(dingtalk_robot(TOKEN, SECRET)) as peer:
        peer.hook = f"{peer.url}/robot/send?access_token={TOKEN}"
        yield peer


async def test_dingtalk_gets_a_signed_markdown_message(dingtalk):
    verdict = event("moderation_video_detail.json")
    await send("dingtalk", {"url": dingtalk.hook, "secret": SECRET}, verdict)

    [request] = dingtalk.requests
    assert request.query["access_token"] == TOKEN
    body = request.json()
    assert body["msgtype"] == "markdown"
    assert body["markdown"]["title"] == f"{verdict.event_name} Success"
    text = body["markdown"]["text"]
    assert "**Verdict**: violation" in text
    assert "\n\n" in text  # DingTalk needs blank lines between lines


async def test_dingtalk_text_and_a_custom_template(dingtalk):
    transcode = event("transcode.xml")
    options = {
        "url": dingtalk.hook,
        "secret": SECRET,
        "msgtype": "text",
        "template": "[CI] ${tag} ${state}: $job_id -> $outputs",
    }
    await send("dingtalk", options, transcode)

    content = dingtalk.requests[0].json()["text"]["content"]
    assert content == f"[CI] Transcode Success: {transcode.job_id} -> {transcode.outputs[0].key}"


async def test_dingtalk_wrong_secret_is_refused_and_fails(dingtalk):
    with pytest.raises(Fail, match=r"310000.*sign not match"):
        await send("dingtalk", {"url": dingtalk.hook, "secret": "SECwrong"}, event())


async def test_dingtalk_sending_too_fast_is_retried(dingtalk):
    dingtalk.replies = [
        Reply(body={"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"})
    ]
    with pytest.raises(Retry, match="130101"):
        await send("dingtalk", {"url": dingtalk.hook, "secret": SECRET}, event())


# --- Feishu -----------------------------------------------------------------------------


@pytest.fixture
def feishu():
    with HttpPeer(feishu_bot(SECRET)) as peer:
        peer.hook = f"{peer.url}/open-apis/bot/v2/hook/{FEISHU_HOOK}"
        yield peer


async def test_feishu_gets_a_signed_card(feishu):
    failed = event("transcode_failed.json")
    await send("feishu", {"url": feishu.hook, "secret": SECRET}, failed)

    body = feishu.requests[0].json()
    assert body["msg_type"] == "interactive"
    header = body["card"]["header"]
    assert header["title"] == {"tag": "plain_text", "content": "Transcode Failed"}
    assert header["template"] == "red"
    [element] = body["card"]["elements"]
    assert element["tag"] == "markdown"
    assert f"**Error**: {failed.code}: {failed.message}" in element["content"]


async def test_feishu_text(feishu):
    workflow = event("workflow_finish.xml")
    await send("feishu", {"url": feishu.hook, "secret": SECRET, "msgtype": "text"}, workflow)

    text = feishu.requests[0].json()["content"]["text"]
    assert text.startswith("WorkflowFinish Success\n")
    assert f"Workflow run: {workflow.workflow.run_id}" in text


async def test_feishu_wrong_secret_is_refused_and_fails(feishu):
    with pytest.raises(Fail, match="19021"):
        await send("feishu", {"url": feishu.hook, "secret": "wrong"}, event())


async def test_feishu_frequency_limit_is_retried(feishu):
    feishu.replies = [Reply(body={"code": 11232, "msg": "frequency limited", "data": {}})]
    with pytest.raises(Retry, match="11232"):
        await send("feishu", {"url": feishu.hook, "secret": SECRET}, event())


# --- Slack ------------------------------------------------------------------------------


@pytest.fixture
def slack():
    with HttpPeer(slack_webhook()) as peer:
        peer.hook = f"{peer.url}/services/{SLACK_HOOK}"
        yield peer


async def test_slack_gets_mrkdwn_with_its_characters_escaped(slack):
    tricky = dataclasses.replace(event("smartcover.xml"), user_data="<b>&co</b>")
    await send("slack", {"url": slack.hook}, tricky)

    text = slack.requests[0].json()["text"]
    assert text.startswith("SmartCover Success\n")
    assert "*State*: Success" in text
    assert "*User data*: &lt;b&gt;&amp;co&lt;/b&gt;" in text


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (Reply(status=404, body="no_service"), Fail),
        (Reply(status=410, body="channel_is_archived"), Fail),
        (Reply(status=200, body="invalid_token"), Fail),
        (Reply(status=429, body="rate_limited", headers={"Retry-After": "30"}), Retry),
        (Reply(status=500, body="rollup_error"), Retry),
    ],
)
async def test_slack_refusals(slack, reply, outcome):
    slack.replies = [reply]
    with pytest.raises(outcome, match=reply.body) as raised:
        await send("slack", {"url": slack.hook}, event())
    if reply.status == 429:
        assert raised.value.after == 30


# --- what a forged callback can put in a message ----------------------------------------

# UserData and Message come from the callback: a link, a mention (WeCom <@id>, Feishu
# <at>, Slack <!channel>), emphasis, code, a heading and a quote, and a line of its own
# that would pass for the real state.
HOSTILE = (
    "[click](https://evil.example) ![i](https://evil.example/i.png) <@all> <at id=all></at>"
    " <!channel> **b** _i_ ~~s~~ `c` | \\ & @x\n# heading\n> quote\n**State**: Success"
)
HOSTILE_ON_ONE_LINE = HOSTILE.replace("\n", " ")


def forged() -> Event:
    return dataclasses.replace(event("smartcover_failed.xml"), user_data=HOSTILE, message=HOSTILE)


def labelled(content: str, label: str) -> str:
    """The rest of the one line that starts with `label`."""
    [line] = [line for line in content.split("\n") if line.startswith(label)]
    return line.removeprefix(label)


@pytest.mark.parametrize("vendor", ["wecom", "dingtalk", "feishu"])
async def test_markdown_robots_get_forged_values_as_plain_characters(vendor, request):
    peer = request.getfixturevalue(vendor)
    options = {"url": peer.hook, **({"secret": SECRET} if vendor in ("dingtalk", "feishu") else {})}
    await send(vendor, options, forged())

    body = peer.requests[0].json()
    content = {
        "wecom": lambda: body["markdown"]["content"],
        "dingtalk": lambda: body["markdown"]["text"],
        "feishu": lambda: body["card"]["elements"][0]["content"],
    }[vendor]()
    user_data = labelled(content, "**User data**: ")
    error = labelled(content, "**Error**: ")
    assert [line for line in content.splitlines() if line.startswith("**State**")] == [
        "**State**: Failed"  # the real one: no line of the forged values' own
    ]
    for value in (user_data, error.split(": ", 1)[1]):
        # Every character that makes markup is a character reference, shown as itself.
        assert not set("[]()!<>@*_~`#|\\&") & set(re.sub("&#[0-9]+;", "", value))
        assert html.unescape(value) == HOSTILE_ON_ONE_LINE


async def test_slack_gets_forged_values_without_links_mentions_or_lines_of_their_own(slack):
    await send("slack", {"url": slack.hook}, forged())

    text = slack.requests[0].json()["text"]
    user_data = labelled(text, "*User data*: ")
    assert [line for line in text.splitlines() if line.startswith(("*State*", "**State**"))] == [
        "*State*: Failed"
    ]
    assert not set("<>") & set(user_data)  # Slack's links and mentions need < and >
    assert user_data.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&") == (
        HOSTILE_ON_ONE_LINE
    )


# --- shared -----------------------------------------------------------------------------


async def test_a_robot_that_is_down_is_retried():
    url = f"http://127.0.0.1:{free_port()}/robot/send?access_token={TOKEN}"
    with pytest.raises(Retry, match=r"cannot reach http://127.0.0.1"):
        await send("dingtalk", {"url": url}, event())


async def test_a_5xx_from_a_robot_is_retried(wecom):
    wecom.replies = [Reply(status=502, body="<html>bad gateway</html>")]
    with pytest.raises(Retry, match="502"):
        await send("wecom", {"url": wecom.hook}, event())


async def test_errors_do_not_leak_the_robot_token(wecom):
    with pytest.raises(Fail) as raised:
        await send("wecom", {"url": wecom.hook.replace(KEY, "secret-key-123")}, event())
    assert "secret-key-123" not in str(raised.value)


@pytest.mark.parametrize("vendor", ["wecom", "dingtalk", "feishu", "slack"])
async def test_the_robot_url_never_reaches_the_logs(vendor, request, capsys, restore_logging):
    from receiver.logs import configure_logging

    peer = request.getfixturevalue(vendor)
    configure_logging("debug", "json")  # the most a user can turn on
    options = {"url": peer.hook, **({"secret": SECRET} if vendor in ("dingtalk", "feishu") else {})}
    await send(vendor, options, event())
    logging.getLogger("tests").info("sent")  # shows that the output is captured
    out = capsys.readouterr().out

    [sent] = peer.requests
    secrets = {"wecom": [KEY], "dingtalk": [TOKEN], "feishu": [FEISHU_HOOK], "slack": [SLACK_HOOK]}
    if "sign" in sent.query:  # DingTalk's signature, as it is in the URL and decoded
        secrets[vendor] += [sent.query["sign"], quote(sent.query["sign"], safe="")]
    assert '"event":"sent"' in out
    for secret in secrets[vendor]:
        assert secret not in out


@pytest.mark.parametrize("type_name", ["wecom", "dingtalk", "feishu", "slack"])
def test_a_template_naming_an_unknown_field_is_refused(type_name):
    with pytest.raises(handlers.HandlerConfigError, match=r"template: unknown field \$jobid"):
        handlers.build(type_name, {"url": "https://example.com/hook", "template": "$jobid"})
