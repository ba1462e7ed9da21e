"""The chat robot handlers against robots on loopback that answer in each vendor's
documented shapes and check DingTalk's and Feishu's signatures themselves
(tests/support/http_peers.py): a wrong signature gets the vendor's own error body with HTTP 200."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
from markdown_it import MarkdownIt

import handlers
from handlers import BatchContext, Fail, Retry
from handlers.chat import ROBOT_MAX_BYTES
from receiver.callback.event import Event
from receiver.dispatch.outcomes import handler_logger
from tests.support.handler_runs import run_handler
from tests.support.http_peers import (
    HttpPeer,
    Reply,
    dingtalk_robot,
    feishu_bot,
    slack_webhook,
    wecom_robot,
)
from tests.support.processes import free_port
from tests.support.sample_events import event

KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"
TOKEN = "c0ffee-dingtalk-access-token"
SECRET = "SEC0123456789abcdef"
FEISHU_HOOK = "0a1b2c3d-feishu-hook"
SLACK_HOOK = "T000/B000/slack-hook-secret"


# --- WeCom ------------------------------------------------------------------------------


@pytest.fixture
def wecom():
    with HttpPeer(wecom_robot(KEY)) as peer:
        peer.hook = f"{peer.url}/cgi-bin/webhook/send?key={KEY}"
        yield peer


async def test_wecom_gets_a_markdown_message(wecom):
    smartcover = event("smartcover.xml")
    await run_handler("wecom", {"url": wecom.hook}, smartcover)

    [request] = wecom.requests
    body = request.json()
    assert body["msgtype"] == "markdown"
    content = body["markdown"]["content"]
    assert content.startswith("SmartCover Success\n")
    assert f"**Job**: {smartcover.job_id}" in content
    assert "**State**: Success" in content
    assert f"**Input**: {smartcover.input.key} ({smartcover.input.bucket})" in content
    assert smartcover.outputs[0].key in content
    assert "**Error**" not in content


async def test_wecom_text_tells_what_failed(wecom):
    failed = event("smartcover_failed.xml")
    await run_handler("wecom", {"url": wecom.hook, "msgtype": "text"}, failed)

    body = wecom.requests[0].json()
    content = body["text"]["content"]
    assert "SmartCover Failed" in content
    assert f"Error: {failed.code}: {failed.message}" in content
    assert "**" not in content


async def test_wecom_content_is_cut_to_the_documented_size(wecom):
    huge = dataclasses.replace(event("smartcover_failed.xml"), message="下载失败" * 2000)
    await run_handler("wecom", {"url": wecom.hook, "msgtype": "text"}, huge)

    content = wecom.requests[0].json()["text"]["content"]
    assert len(content.encode()) <= 2048
    assert content.endswith("...")


async def test_wecom_errcode_with_http_200_fails_on_a_bad_key(wecom):
    with pytest.raises(Fail, match=r"errcode.*93000.*invalid webhook url"):
        await run_handler("wecom", {"url": wecom.hook.replace(KEY, "not-the-key")}, event())


async def test_wecom_rate_limit_is_retried(wecom):
    wecom.replies = [Reply(body={"errcode": 45009, "errmsg": "api freq out of limit"})]
    with pytest.raises(Retry, match="45009"):
        await run_handler("wecom", {"url": wecom.hook}, event())


# --- DingTalk ---------------------------------------------------------------------------


@pytest.fixture
def dingtalk():
    with HttpPeer(dingtalk_robot(TOKEN, SECRET)) as peer:
        peer.hook = f"{peer.url}/robot/send?access_token={TOKEN}"
        yield peer


async def test_dingtalk_gets_a_signed_markdown_message(dingtalk):
    verdict = event("moderation_video_detail.json")
    await run_handler("dingtalk", {"url": dingtalk.hook, "secret": SECRET}, verdict)

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
    await run_handler("dingtalk", options, transcode)

    content = dingtalk.requests[0].json()["text"]["content"]
    assert content == f"[CI] Transcode Success: {transcode.job_id} -> {transcode.outputs[0].key}"


async def test_dingtalk_wrong_secret_is_refused_and_fails(dingtalk):
    with pytest.raises(Fail, match=r"310000.*sign not match"):
        await run_handler("dingtalk", {"url": dingtalk.hook, "secret": "SECwrong"}, event())


async def test_dingtalk_sending_too_fast_is_retried(dingtalk):
    dingtalk.replies = [
        Reply(body={"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"})
    ]
    with pytest.raises(Retry, match="130101"):
        await run_handler("dingtalk", {"url": dingtalk.hook, "secret": SECRET}, event())


# --- Feishu -----------------------------------------------------------------------------


@pytest.fixture
def feishu():
    with HttpPeer(feishu_bot(SECRET)) as peer:
        peer.hook = f"{peer.url}/open-apis/bot/v2/hook/{FEISHU_HOOK}"
        yield peer


@pytest.mark.parametrize("msgtype", ["markdown", "text"])
async def test_feishu_takes_an_event_of_any_size_its_message_cut(feishu, msgtype):
    # A forged callback's Message can be hundreds of KB: Feishu would refuse the body
    # for good (over 20 KB), and with it every event of a digest it is in.
    huge = dataclasses.replace(event("smartcover_failed.xml"), message="下载失败" * 30000)
    options = {"url": feishu.hook, "secret": SECRET, "msgtype": msgtype}
    await run_handler("feishu", options, huge)
    body = feishu.requests[0].json()
    content = (
        body["card"]["elements"][0]["content"] if msgtype == "markdown" else body["content"]["text"]
    )
    assert content.endswith("...")
    assert len(content.encode()) <= ROBOT_MAX_BYTES


async def test_dingtalk_message_is_cut_too(dingtalk):
    huge = dataclasses.replace(event("smartcover_failed.xml"), message="x" * 100_000)
    await run_handler("dingtalk", {"url": dingtalk.hook, "secret": SECRET}, huge)
    text = dingtalk.requests[0].json()["markdown"]["text"]
    assert text.endswith("...")
    assert len(text.encode()) <= ROBOT_MAX_BYTES


async def test_feishu_gets_a_signed_card(feishu):
    failed = event("transcode_failed.json")
    await run_handler("feishu", {"url": feishu.hook, "secret": SECRET}, failed)

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
    await run_handler("feishu", {"url": feishu.hook, "secret": SECRET, "msgtype": "text"}, workflow)

    text = feishu.requests[0].json()["content"]["text"]
    assert text.startswith("WorkflowFinish Success\n")
    assert f"Workflow run: {workflow.workflow.run_id}" in text


async def test_feishu_wrong_secret_is_refused_and_fails(feishu):
    with pytest.raises(Fail, match="19021"):
        await run_handler("feishu", {"url": feishu.hook, "secret": "wrong"}, event())


async def test_feishu_frequency_limit_is_retried(feishu):
    feishu.replies = [Reply(body={"code": 11232, "msg": "frequency limited", "data": {}})]
    with pytest.raises(Retry, match="11232"):
        await run_handler("feishu", {"url": feishu.hook, "secret": SECRET}, event())


# --- Slack ------------------------------------------------------------------------------


@pytest.fixture
def slack():
    with HttpPeer(slack_webhook()) as peer:
        peer.hook = f"{peer.url}/services/{SLACK_HOOK}"
        yield peer


async def test_slack_gets_mrkdwn_with_its_characters_escaped(slack):
    tricky = dataclasses.replace(event("smartcover.xml"), user_data="<b>&co</b>")
    await run_handler("slack", {"url": slack.hook}, tricky)

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
        await run_handler("slack", {"url": slack.hook}, event())
    if reply.status == 429:
        assert raised.value.after == 30


# --- what a forged callback can put in a message ----------------------------------------

# Tag, UserData, Message and the input key come from the callback. They carry a link, an
# image, a link reference, mentions (WeCom <@id>, Feishu <at>, Slack <!channel> and
# <@U..>, DingTalk's @), tags, emphasis, code, a heading and a quote, an entity meant to
# become a tag after escaping, and a line of its own that would pass for the real state.
HOSTILE_TAG = "# [Pay here](https://evil.example/pay)"
HOSTILE_USER_DATA = (
    '<@U024BE7LH> <!channel> @all <at id=all></at> <font color="warning">red</font>'
    " <https://evil.example|docs> <https://evil.example>"
)
HOSTILE_MESSAGE = (
    "[click](https://evil.example) ![i](https://evil.example/i.png) [ref]: https://evil.example"
    " **b** ~~s~~ `c` &#60;at id=all&#62;\n**State**: Success"
)
ORDINARY_KEY = "uploads/2022-06-30/video_id (test-123) a+b=c.mp4"


def forged() -> Event:
    failed = event("smartcover_failed.xml")
    return dataclasses.replace(
        failed,
        tag=HOSTILE_TAG,
        user_data=HOSTILE_USER_DATA,
        message=HOSTILE_MESSAGE,
        input=dataclasses.replace(failed.input, key=ORDINARY_KEY),
    )


# Each robot in each of its message types, and where the message is in what it gets.
ROBOTS = {
    "wecom-markdown": ("wecom", {}, lambda body: body["markdown"]["content"]),
    "wecom-text": ("wecom", {"msgtype": "text"}, lambda body: body["text"]["content"]),
    "dingtalk-markdown": ("dingtalk", {"secret": SECRET}, lambda body: body["markdown"]["text"]),
    "dingtalk-text": (
        "dingtalk",
        {"secret": SECRET, "msgtype": "text"},
        lambda body: body["text"]["content"],
    ),
    "feishu-markdown": (
        "feishu",
        {"secret": SECRET},
        lambda body: body["card"]["elements"][0]["content"],
    ),
    "feishu-text": (
        "feishu",
        {"secret": SECRET, "msgtype": "text"},
        lambda body: body["content"]["text"],
    ),
    "slack": ("slack", {}, lambda body: body["text"]),
}
GOLDEN = Path(__file__).parent / "golden" / "chat"
CASES = {"smartcover": lambda: event("smartcover.xml"), "forged": forged}


async def sent_to(robot: str, case: str, request) -> dict:
    vendor, options, _ = ROBOTS[robot]
    peer = request.getfixturevalue(vendor)
    await run_handler(vendor, {"url": peer.hook, **options}, CASES[case]())
    [sent] = peer.requests
    body = sent.json()
    for signed in ("timestamp", "sign"):  # Feishu's signature: new on every request
        body.pop(signed, None)
    return body


def golden_text(body: dict) -> str:
    """The body as a golden file shows it: JSON, readable, the zero-width spaces the
    markup puts in written as \\u200b (JSON's own escape for it, so it loads back)."""
    text = json.dumps(body, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    return text.replace("\u200b", "\\u200b")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("robot", ROBOTS)
async def test_each_robot_gets_the_message_in_its_golden_file(robot, case, request):
    """tests/handlers/golden/chat/ holds what each robot is sent: the readable sample of each
    dialect. `UPDATE_GOLDEN=1 pytest tests/handlers/test_chat.py` rewrites them."""
    body = golden_text(await sent_to(robot, case, request))
    path = GOLDEN / f"{robot}-{case}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    assert body == path.read_text()


def commonmark(text: str) -> list:
    """The inline tokens a CommonMark renderer (with HTML and strikethrough) makes."""
    md = MarkdownIt("commonmark", {"html": True}).enable("strikethrough")
    return md.parse(text)


def kinds(tokens: list) -> set[str]:
    found = {token.type for token in tokens}
    for token in tokens:
        found |= {child.type for child in token.children or ()}
    return found


@pytest.mark.parametrize("robot", ["wecom-markdown", "dingtalk-markdown", "feishu-markdown"])
async def test_forged_markup_makes_no_link_mention_tag_or_block(robot, request):
    content = ROBOTS[robot][2](await sent_to(robot, "forged", request))
    tokens = commonmark(content)
    made = kinds(tokens)
    assert not made & {"link_open", "image", "html_inline", "html_block", "autolink"}
    assert not made & {"heading_open", "blockquote_open", "bullet_list_open", "hr"}
    bold = [
        token.children[i + 1].content
        for token in tokens
        if token.type == "inline"
        for i, child in enumerate(token.children or ())
        if child.type == "strong_open"
    ]
    assert set(bold) <= {"Job", "State", "Error", "Input", "User data", "Finished"}
    # the real state only: no line of the forged values' own
    assert [line for line in content.split("\n") if line.startswith("**State")] == [
        "**State**: Failed"
    ]
    # What is shown is what was sent (the zero-width spaces and references aside).
    shown = content.replace("\u200b", "")
    if robot == "feishu-markdown":
        shown = html.unescape(shown)
    for value in (HOSTILE_USER_DATA, HOSTILE_MESSAGE.replace("\n", " "), ORDINARY_KEY):
        assert value in shown
    if robot == "feishu-markdown":  # references: nothing at all is markup
        assert not made & {"em_open", "s_open", "code_inline"}


async def test_feishu_text_mentions_nobody(request):
    text = ROBOTS["feishu-text"][2](await sent_to("feishu-text", "forged", request))
    assert "<at" not in text
    assert HOSTILE_USER_DATA in text.replace("\u200b", "")


async def test_slack_gets_forged_values_without_links_mentions_or_lines_of_their_own(request):
    text = ROBOTS["slack"][2](await sent_to("slack", "forged", request))
    user_data = labelled(text, "*User data*: ")
    assert [line for line in text.splitlines() if line.startswith(("*State", "**State"))] == [
        "*State*: Failed"
    ]
    assert not set("<>") & set(user_data)  # Slack's links and mentions need < and >
    assert html.unescape(user_data) == HOSTILE_USER_DATA


def labelled(content: str, label: str) -> str:
    """The rest of the one line that starts with `label`."""
    [line] = [line for line in content.split("\n") if line.startswith(label)]
    return line.removeprefix(label)


async def test_a_robots_times_in_its_time_zone(wecom):
    await run_handler(
        "wecom", {"url": wecom.hook, "timezone": "Asia/Shanghai"}, event("smartcover.xml")
    )
    content = wecom.requests[0].json()["markdown"]["content"]
    assert "**Finished**: 2022-06-30 15:29:48 CST" in content


def test_an_unknown_time_zone_is_refused():
    with pytest.raises(handlers.HandlerConfigError, match="timezone: unknown time zone"):
        handlers.build("slack", {"url": "https://example.com/hook", "timezone": "Nowhere/Land"})


# --- shared -----------------------------------------------------------------------------


async def test_a_robot_that_is_down_is_retried():
    url = f"http://127.0.0.1:{free_port()}/robot/send?access_token={TOKEN}"
    with pytest.raises(Retry, match=r"cannot reach http://127.0.0.1"):
        await run_handler("dingtalk", {"url": url}, event())


async def test_a_5xx_from_a_robot_is_retried(wecom):
    wecom.replies = [Reply(status=502, body="<html>bad gateway</html>")]
    with pytest.raises(Retry, match="502"):
        await run_handler("wecom", {"url": wecom.hook}, event())


async def test_errors_do_not_leak_the_robot_token(wecom):
    with pytest.raises(Fail) as raised:
        await run_handler("wecom", {"url": wecom.hook.replace(KEY, "secret-key-123")}, event())
    assert "secret-key-123" not in str(raised.value)


@pytest.mark.parametrize("vendor", ["wecom", "dingtalk", "feishu", "slack"])
async def test_the_robot_url_never_reaches_the_logs(vendor, request, capsys, restore_logging):
    from receiver.logs import configure_logging

    peer = request.getfixturevalue(vendor)
    configure_logging("debug", "json")  # the most a user can turn on
    options = {"url": peer.hook, **({"secret": SECRET} if vendor in ("dingtalk", "feishu") else {})}
    await run_handler(vendor, options, event())
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


# --- digests ----------------------------------------------------------------------------

INSPECTOR = "https://ci.example.com/inspector"
WINDOW_START = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


def digest_events() -> list[Event]:
    """A minute's worth: a forged failure first, eight failed transcodes, three snapshots."""
    transcode = event("transcode_failed.json")
    snapshot = event("snapshot.xml")
    made = [forged()]
    made += [
        dataclasses.replace(transcode, id=f"job:jt{i}:Failed", job_id=f"jt{i}") for i in range(8)
    ]
    made += [
        dataclasses.replace(snapshot, id=f"job:js{i}:Success", job_id=f"js{i}") for i in range(3)
    ]
    return [
        dataclasses.replace(one, received_at=WINDOW_START + timedelta(seconds=i))
        for i, one in enumerate(made)
    ]


async def digest_sent_to(robot: str, request, inspector: str | None = INSPECTOR) -> dict:
    vendor, options, _ = ROBOTS[robot]
    peer = request.getfixturevalue(vendor)
    handler = handlers.build(vendor, {"url": peer.hook, "digest": "1m", **options})
    ctx = BatchContext(
        handler="robot", deadline=0.0, log=handler_logger, runs={}, inspector_url=inspector
    )
    await handlers.start(handler)
    try:
        assert await handler.handle_batch(digest_events(), ctx) is None
    finally:
        await handlers.close(handler)
    [sent] = peer.requests
    body = sent.json()
    for signed in ("timestamp", "sign"):
        body.pop(signed, None)
    return body


@pytest.mark.parametrize("robot", ROBOTS)
async def test_each_robot_gets_the_digest_in_its_golden_file(robot, request):
    body = golden_text(await digest_sent_to(robot, request))
    path = GOLDEN / f"{robot}-digest.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(body)
    assert body == path.read_text()


@pytest.mark.parametrize("robot", ["wecom-markdown", "dingtalk-markdown", "feishu-markdown"])
async def test_a_digest_links_only_to_the_inspector(robot, request):
    content = ROBOTS[robot][2](await digest_sent_to(robot, request))
    tokens = commonmark(content)
    links = [
        child.attrs["href"]
        for token in tokens
        for child in token.children or ()
        if child.type == "link_open"
    ]
    expected = (
        f"{INSPECTOR}/events?handler=robot&since=2026-12-01T10%3A00%3A00%2B00%3A00"
        "&until=2026-12-01T10%3A00%3A11.000001%2B00%3A00"
    )
    assert links == [expected]
    assert not kinds(tokens) & {"image", "html_inline", "html_block", "autolink", "heading_open"}
    assert content.count("**State**: Failed") == 5  # the first five listed
    assert content.rstrip().endswith("and 7 more")


async def test_a_digest_counts_by_state_and_tag_and_needs_no_inspector(request):
    body = await digest_sent_to("dingtalk-markdown", request, inspector=None)
    title = body["markdown"]["title"]
    assert title.startswith("9 failed: Transcode 8, ")
    assert title.endswith("; 3 success: Snapshot 3")
    assert "inspector" not in body["markdown"]["text"]


async def test_a_digest_of_one_event_is_its_usual_message(wecom):
    handler = handlers.build("wecom", {"url": wecom.hook, "digest": "1m"})
    ctx = BatchContext(handler="robot", deadline=0.0, log=handler_logger, runs={})
    await handlers.start(handler)
    try:
        await handler.handle_batch([event("smartcover.xml")], ctx)
    finally:
        await handlers.close(handler)
    await run_handler("wecom", {"url": wecom.hook}, event("smartcover.xml"))
    first, second = wecom.requests
    assert first.json() == second.json()


def test_a_digest_window_that_cannot_be_read_is_refused():
    with pytest.raises(handlers.HandlerConfigError, match=r"digest: .*a window like '30s'"):
        handlers.build("wecom", {"url": "https://example.com/hook", "digest": "soon"})


def test_only_a_robot_with_a_digest_takes_batches():
    plain = handlers.build("wecom", {"url": "https://example.com/hook"})
    digesting = handlers.build("wecom", {"url": "https://example.com/hook", "digest": "2m"})
    assert handlers.batch_call(plain) is None
    assert handlers.batch_call(digesting) is not None
    assert digesting.batching == handlers.Batching(size=1000, wait=120.0)


async def test_a_digest_through_the_dispatcher_is_one_message_and_retried_as_one(wecom, inbox):
    """12 events routed to a robot with `digest = "1s"`, stored at once: one message for
    all; refused once for the rate (45009), the digest is sent again whole, and each
    event is recorded done with two attempts."""
    from receiver.config import HandlerConfig
    from receiver.dispatch.loop import Dispatcher
    from receiver.dispatch.slots import Slot
    from receiver.metrics import Metrics
    from tests.dispatch.test_batches import all_settled, store_jobs
    from tests.dispatch.test_loop import statuses, until

    wecom.replies = [Reply(body={"errcode": 45009, "errmsg": "api freq out of limit"})]
    robot = handlers.build("wecom", {"url": wecom.hook, "digest": "1s"})
    config = HandlerConfig(type="wecom", backoff_initial=0.2, backoff_max=0.2)
    d = Dispatcher(inbox, [Slot("robot", robot, config)], Metrics(), poll_interval=0.05)
    ids = await store_jobs(inbox, 12, handler="robot")
    await d.start()
    await until(lambda: all_settled(inbox, ids))
    await d.stop()
    refused, sent = (request.json()["markdown"]["content"] for request in wecom.requests)
    assert refused == sent
    assert sent.startswith("**12 success: Transcode 12**")
    assert sent.rstrip().endswith("and 7 more")
    for event_id in ids:
        assert await statuses(inbox, event_id) == {"robot": ("done", 2)}
