"""Chat robots: `wecom` (企业微信), `dingtalk` (钉钉), `feishu` (飞书) and `slack`.

Each posts one readable message per event (see `handlers.message`) to the robot's
webhook URL, or with `digest = "1m"` one message per minute's events (`handlers.digest`),
no faster than the vendor's documented rate (`default_rate`). WeCom, DingTalk and
Feishu answer HTTP 200 even when they refuse a message, with an error code in the body:
a rate limit or a busy server is retried, anything else (bad token, missing keyword, bad
signature) fails at once, since retrying cannot fix it. Slack answers `ok`, or an error
status with a reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import SecretStr, field_validator

from handlers import BatchContext, BatchResult, Fail, Retry, digest
from handlers.digest import DigestOptions
from handlers.http import HttpHandler, HttpOptions, check_status, excerpt, retry_after
from handlers.markup import (
    CHAT_TEXT,
    DINGTALK_MARKDOWN,
    FEISHU_MARKDOWN,
    FEISHU_TEXT,
    SLACK,
    TEXT,
    WECOM_MARKDOWN,
    Markup,
)
from handlers.message import DEFAULT_TEMPLATE, check_template, render
from receiver.callback.event import Event
from receiver.timezones import check_timezone, parse_timezone

# WeCom's documented content limits, in UTF-8 bytes.
WECOM_MAX_BYTES = {"text": 2048, "markdown": 4096}
# Feishu refuses a request body over 20 KB (code 9499), and DingTalk a message too long,
# for good: one event's long Message or UserData (anybody's, in a forged callback) would
# sink the digest it is in. The content is cut to this, which stays under the limit
# however the JSON writes it (as \uXXXX escapes: 6 bytes a character of 3).
ROBOT_MAX_BYTES = 8000
# Error codes that mean "not now" rather than "never": -1 is a busy server on all three.
WECOM_RETRYABLE = {-1, 45009}  # 45009: over the 20 messages per minute
DINGTALK_RETRYABLE = {-1, 130101, 410100, 90030}  # sending too fast / over the limit
FEISHU_RETRYABLE = {-1, 11232}  # 11232: frequency limited


class ChatOptions(HttpOptions, DigestOptions):
    # The robot's webhook URL: a secret, since it carries the robot's token or key.
    url: SecretStr
    template: str = DEFAULT_TEMPLATE
    # The zone of the times in the message: an IANA name (Asia/Shanghai) or UTC.
    timezone: str = "UTC"

    _check_template = field_validator("template")(check_template)
    _check_timezone = field_validator("timezone")(check_timezone)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


@dataclass(frozen=True, slots=True)
class Message:
    """What a robot sends, in whichever markup it writes: a short title (a notification's
    preview, a card's header), the text, and whether it reports a failure."""

    title: Callable[[Markup], str]
    text: Callable[[Markup], str]
    failed: bool


class ChatHandler(HttpHandler):
    options: ChatOptions
    vendor = "chat robot"
    # The vendor's documented limit, the `rate` unless the config says otherwise.
    default_rate: tuple[str, ...] = ()

    def __init__(self, options: ChatOptions) -> None:
        super().__init__()
        self.options = options
        self._zone = parse_timezone(options.timezone)
        # With a digest, events come in batches: the window's.
        self.batching = options.batching()

    async def __call__(self, event: Event) -> None:
        title = getattr(self.options, "title", "$title")
        await self.send(
            Message(
                title=lambda markup: self.message(event, markup, title),
                text=lambda markup: self.message(event, markup),
                failed=event.state not in (None, "Success"),
            )
        )

    async def handle_batch(self, events: Sequence[Event], ctx: BatchContext) -> BatchResult:
        """A digest of the events; one event alone, its usual message."""
        if len(events) == 1:
            await self(events[0])
            return None
        link = digest.events_link(ctx.inspector_url, ctx.handler, events)
        lines = self.options.digest_lines
        await self.send(
            Message(
                title=lambda markup: markup.escape(digest.title(events)),
                text=lambda markup: digest.body(
                    events, markup, lambda event: self.message(event, markup), lines, link
                ),
                failed=digest.failed(events),
            )
        )
        return None

    async def send(self, message: Message) -> None:
        raise NotImplementedError

    def message(self, event: Event, markup: Markup, template: str | None = None) -> str:
        return render(template or self.options.template, event, markup, self._zone)


def check_answer(
    response: httpx.Response, vendor: str, code_keys: tuple[str, ...], retryable: set[int]
) -> None:
    """Success is a 2xx answer whose error code is 0."""
    if response.status_code == 429 or response.status_code >= 500:
        check_status(response)
    try:
        body = response.json()
    except ValueError:
        body = None
    codes = [body[key] for key in code_keys if key in body] if isinstance(body, dict) else []
    if not codes:
        check_status(response)
        raise Fail(f"{vendor} answered without an error code: {excerpt(response)}")
    code = codes[0]
    if code == 0 and response.is_success:
        return
    summary = f"{vendor} refused the message: {excerpt(response)}"
    if code in retryable:
        raise Retry(summary, after=retry_after(response))
    raise Fail(summary)


def truncate_utf8(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def robot_title(message: Message) -> str:
    """A DingTalk or Feishu message's title, cut to fit (`ROBOT_MAX_BYTES`)."""
    return truncate_utf8(message.title(TEXT), ROBOT_MAX_BYTES // 8)


def robot_text(message: Message, markup: Markup) -> str:
    """A DingTalk or Feishu message's text in `markup`, cut to fit (`ROBOT_MAX_BYTES`)."""
    return truncate_utf8(message.text(markup), ROBOT_MAX_BYTES)


# --- WeCom ------------------------------------------------------------------------------


class WeComOptions(ChatOptions):
    msgtype: Literal["markdown", "text"] = "markdown"


class WeComHandler(ChatHandler):
    """企业微信 group robot: `https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...`."""

    vendor = "wecom robot"
    # 20 messages a minute per robot, else errcode 45009.
    default_rate = ("20/min",)
    options: WeComOptions

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(WeComOptions.model_validate(options))

    async def send(self, message: Message) -> None:
        kind = self.options.msgtype
        content = message.text(WECOM_MARKDOWN if kind == "markdown" else CHAT_TEXT)
        content = truncate_utf8(content, WECOM_MAX_BYTES[kind])
        payload = {"msgtype": kind, kind: {"content": content}}
        response = await self.post(self.options.url.get_secret_value(), json=payload)
        check_answer(response, self.vendor, ("errcode",), WECOM_RETRYABLE)


# --- DingTalk ---------------------------------------------------------------------------


class DingTalkOptions(ChatOptions):
    msgtype: Literal["markdown", "text"] = "markdown"
    # The robot's 加签 secret (`SEC...`); without it the robot must use keywords or IPs.
    secret: SecretStr | None = None
    # The markdown message's title: what the notification preview shows.
    title: str = "$title"

    _check_title = field_validator("title")(check_template)


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """base64(HMAC-SHA256(key=secret, "{timestamp}\\n{secret}")), timestamp in ms."""
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


class DingTalkHandler(ChatHandler):
    """钉钉 custom robot: `https://oapi.dingtalk.com/robot/send?access_token=...`."""

    vendor = "dingtalk robot"
    # 20 messages a minute per robot; past it the robot is throttled for 10 minutes.
    default_rate = ("20/min",)
    options: DingTalkOptions

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(DingTalkOptions.model_validate(options))

    async def send(self, message: Message) -> None:
        options = self.options
        if options.msgtype == "markdown":
            payload: dict[str, Any] = {
                "msgtype": "markdown",
                "markdown": {
                    "title": robot_title(message),
                    "text": robot_text(message, DINGTALK_MARKDOWN),
                },
            }
        else:
            payload = {"msgtype": "text", "text": {"content": robot_text(message, CHAT_TEXT)}}
        url = httpx.URL(options.url.get_secret_value())
        if options.secret is not None:
            timestamp = int(time.time() * 1000)
            # Added to the query the URL already has (access_token).
            url = url.copy_merge_params(
                {
                    "timestamp": str(timestamp),
                    "sign": dingtalk_sign(options.secret.get_secret_value(), timestamp),
                }
            )
        response = await self.post(url, json=payload)
        check_answer(response, self.vendor, ("errcode",), DINGTALK_RETRYABLE)


# --- Feishu -----------------------------------------------------------------------------


class FeishuOptions(ChatOptions):
    # `markdown` sends an interactive card with a coloured header and a markdown body.
    msgtype: Literal["markdown", "text"] = "markdown"
    # The robot's 签名校验 secret.
    secret: SecretStr | None = None
    # The card's header (markdown only).
    title: str = "$title"

    _check_title = field_validator("title")(check_template)


def feishu_sign(secret: str, timestamp: int) -> str:
    """base64(HMAC-SHA256(key="{timestamp}\\n{secret}", empty message)), timestamp in s."""
    digest = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256)
    return base64.b64encode(digest.digest()).decode()


class FeishuHandler(ChatHandler):
    """飞书 custom bot: `https://open.feishu.cn/open-apis/bot/v2/hook/...`."""

    vendor = "feishu bot"
    # 100 a minute and 5 a second per bot, else code 11232.
    default_rate = ("100/min", "5/s")
    options: FeishuOptions

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(FeishuOptions.model_validate(options))

    async def send(self, message: Message) -> None:
        options = self.options
        payload: dict[str, Any]
        if options.msgtype == "markdown":
            payload = {
                "msg_type": "interactive",
                "card": {
                    "header": {
                        "title": {
                            "tag": "plain_text",
                            "content": robot_title(message),
                        },
                        "template": "red" if message.failed else "green",
                    },
                    "elements": [
                        {"tag": "markdown", "content": robot_text(message, FEISHU_MARKDOWN)}
                    ],
                },
            }
        else:
            payload = {"msg_type": "text", "content": {"text": robot_text(message, FEISHU_TEXT)}}
        if options.secret is not None:
            timestamp = int(time.time())
            payload["timestamp"] = str(timestamp)
            payload["sign"] = feishu_sign(options.secret.get_secret_value(), timestamp)
        response = await self.post(options.url.get_secret_value(), json=payload)
        # Older endpoints answer `StatusCode` rather than `code`.
        check_answer(response, self.vendor, ("code", "StatusCode"), FEISHU_RETRYABLE)


# --- Slack ------------------------------------------------------------------------------


class SlackHandler(ChatHandler):
    """Slack incoming webhook: `https://hooks.slack.com/services/...`, text in mrkdwn."""

    vendor = "slack webhook"
    # One message a second per incoming webhook (short bursts tolerated).
    default_rate = ("1/s",)

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(ChatOptions.model_validate(options))

    async def send(self, message: Message) -> None:
        payload = {"text": message.text(SLACK)}
        response = await self.post(self.options.url.get_secret_value(), json=payload)
        check_status(response)
        # Slack answers a bare `ok`; anything else is a refusal it explains in the body.
        if response.text.strip() != "ok":
            raise Fail(f"{self.vendor} answered {response.status_code}: {excerpt(response)}")
