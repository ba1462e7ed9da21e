"""The TDMQ for CMQ data API (CMQ API 2.0, the "HTTP data flow"): receive and delete
messages on a queue, over one pooled HTTP client.

Every request is a form-encoded POST to `<endpoint>/v2/index.php` carrying the action's
parameters and the common ones (`Action`, `SecretId`, `Timestamp`, `Nonce`,
`SignatureMethod`, `Token` for a temporary key), signed as documented (tencentcloud.com
document/api/406/5906): the parameters sorted by name and joined as `name=value` with
`&` (values not encoded), after `POST` + host + path + `?`; HMAC-SHA256 (or SHA1) of that
with the SecretKey, in base64. The answer is JSON with `code` (0: success), `message`
and `requestId`.

Failures come out as one of two exceptions:
- `CmqRefused`: CMQ answered with a code. `fatal` when waiting will not mend it (a wrong
  key, a missing queue or permission: every code but throttling and CMQ's own failures),
  with a hint of what to check;
- `CmqUnavailable`: no answer that can be read (network, 5xx, a gateway's page).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from receiver.config import CmqConfig

PATH = "/v2/index.php"
REQUEST_CLIENT = "ci-receiver"

NO_MESSAGE = 7000
# CMQ's codes come in families, told apart by thousands and hundreds (CMQ's error-code
# table: cloud.tencent.com/document/product/406/5903, the same under TDMQ for CMQ at
# /document/product/1496/70948; 4101-4110 are Tencent Cloud API 2.0's common CAM codes,
# cloud.tencent.com/doc/api/309/7025). So a code no table lists is still placed.
# Waiting mends these: QPS throttling (4420, 4480) and too many messages in flight (6070).
THROTTLED = frozenset({4420, 4480, 6070})
# CMQ's own failures (internal errors, "try again later"): retried as a 5xx is.
SERVER_FAMILY = 6
# Of a receipt handle that is no longer the message's latest (expired, or received again).
STALE_HANDLE = 4430
# Every other code is a refusal waiting will not mend: what is wrong is the key, the
# request, the queue or the account. What to check, by family (code // 100):
HINTS = {
    40: "CMQ refused the request: if the message names CAM or a permission, the key's"
    " user needs the tdmq ReceiveMessage, BatchReceiveMessage, DeleteMessage and"
    " BatchDeleteMessage actions on this queue (see the CAM policy in docs/sources.md)",
    41: "check cmq.secret_id and cmq.secret_key (the key must exist and be enabled, and a"
    " temporary key needs cmq.token), that this machine's clock is right, and that the"
    " key's user may use this queue (see the CAM policy in docs/sources.md)",
    42: "the request expired: check this machine's clock",
    43: "the account is in arrears or barred: CMQ serves it again once that is settled",
    44: "check the queue name (CallBackMqConfig.MqName) and that it exists in the region"
    " of the endpoint (CMQ's message names the resource or the limit)",
}
OTHER_HINT = "see CMQ's error codes: https://cloud.tencent.com/document/product/1496/70948"


class CmqRefused(Exception):
    """CMQ answered a request with an error code."""

    def __init__(
        self, action: str, code: int, message: str, request_id: str, answer: dict[str, Any]
    ) -> None:
        self.action = action
        self.code = code
        self.message = message
        self.request_id = request_id
        self.answer = answer
        super().__init__(f"{action}: CMQ answered code {code}: {message} (request {request_id})")

    @property
    def throttled(self) -> bool:
        return self.code in THROTTLED

    @property
    def fatal(self) -> bool:
        """Waiting will not mend it: anything but throttling, CMQ's own failures and a
        stale receipt handle (which is about one message, not the key or the queue)."""
        return not (
            self.throttled or self.code // 1000 == SERVER_FAMILY or self.code == STALE_HANDLE
        )

    @property
    def hint(self) -> str:
        return HINTS.get(self.code // 100, OTHER_HINT) if self.fatal else ""


class CmqUnavailable(Exception):
    """No readable answer: the endpoint cannot be reached, or answered something else."""


@dataclass(slots=True)
class Message:
    """One received message, its fields as CMQ gave them (None when absent or not of the
    documented type: what any publisher put on the queue is read here)."""

    receipt_handle: str | None
    msg_id: str | None
    body: str | None
    enqueue_time: int | None
    next_visible_time: int | None
    dequeue_count: int | None

    @classmethod
    def from_answer(cls, data: Mapping[str, Any]) -> Message:
        return cls(
            receipt_handle=_typed(data.get("receiptHandle"), str),
            msg_id=_typed(data.get("msgId"), str),
            body=_typed(data.get("msgBody"), str),
            enqueue_time=_typed(data.get("enqueueTime"), int),
            next_visible_time=_typed(data.get("nextVisibleTime"), int),
            dequeue_count=_typed(data.get("dequeueCount"), int),
        )


def _typed(value: Any, kind: type) -> Any:
    # bool is an int in Python; no CMQ field is a boolean.
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def signature(secret_key: str, method: str, host: str, params: Mapping[str, str]) -> str:
    """The documented request signature over `params` (all but `Signature`)."""
    # (The page writes an `_` in a name as `.`; no parameter sent here has one.)
    query = "&".join(f"{name}={params[name]}" for name in sorted(params))
    digest = hashlib.sha256 if params.get("SignatureMethod") == "HmacSHA256" else hashlib.sha1
    mac = hmac.new(secret_key.encode(), f"{method}{host}{PATH}?{query}".encode(), digest)
    return base64.b64encode(mac.digest()).decode()


class CmqApi:
    """The four data actions the consumer needs, on one connection pool."""

    def __init__(self, config: CmqConfig, *, connections: int) -> None:
        if config.url is None or config.secret_id is None or config.secret_key is None:
            raise ValueError("cmq: the endpoint and the key are needed")
        self._url = config.url + PATH
        # What the signature covers: the host as it is sent, with any port.
        self._host = urlsplit(config.url).netloc
        self._secret_id = config.secret_id.get_secret_value()
        self._secret_key = config.secret_key.get_secret_value()
        self._token = config.token.get_secret_value() if config.token else None
        self._signature_method = config.signature_method
        self._timeout = config.request_timeout
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"User-Agent": REQUEST_CLIENT},
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def receive(self, queue: str, count: int, wait: int) -> list[Message]:
        """Up to `count` messages (ReceiveMessage for one, BatchReceiveMessage for more),
        waiting up to `wait` seconds for the first; [] when there is none."""
        params = {"queueName": queue, "pollingWaitSeconds": str(wait)}
        action = "ReceiveMessage"
        if count > 1:
            action = "BatchReceiveMessage"
            params["numOfMsg"] = str(count)
        try:
            answer = await self._call(action, params, wait=wait)
        except CmqRefused as refused:
            if refused.code == NO_MESSAGE:  # documented as not an error: none came
                return []
            raise
        if action == "ReceiveMessage":
            return [Message.from_answer(answer)]
        entries = answer.get("msgInfoList")
        if not isinstance(entries, list):
            raise CmqUnavailable(f"{action}: the answer has no msgInfoList")
        return [Message.from_answer(entry) for entry in entries if isinstance(entry, dict)]

    async def delete(self, queue: str, handles: Sequence[str]) -> dict[str, CmqRefused]:
        """Delete messages by their latest receipt handles (DeleteMessage for one,
        BatchDeleteMessage for more); returns the handles CMQ refused, with why."""
        if not handles:
            return {}
        if len(handles) == 1:
            try:
                await self._call("DeleteMessage", {"queueName": queue, "receiptHandle": handles[0]})
            except CmqRefused as refused:
                if refused.fatal or refused.throttled:
                    raise
                return {handles[0]: refused}
            return {}
        params = {"queueName": queue}
        params.update({f"receiptHandle.{n}": handle for n, handle in enumerate(handles)})
        try:
            await self._call("BatchDeleteMessage", params)
        except CmqRefused as refused:
            if refused.fatal or refused.throttled:
                raise
            return self._refused_handles(refused, handles)
        return {}

    # --- one request -------------------------------------------------------------------

    async def _call(self, action: str, params: dict[str, str], wait: int = 0) -> dict[str, Any]:
        form = self._signed(action, params)
        try:
            response = await self._http.post(
                self._url,
                data=form,
                timeout=httpx.Timeout(self._timeout, read=wait + self._timeout),
            )
        except httpx.HTTPError as exc:
            raise CmqUnavailable(f"{action}: {type(exc).__name__}: {exc}") from None
        status = f"HTTP {response.status_code}"
        try:
            # Not orjson: a message body may hold a lone surrogate escape, which orjson
            # refuses for the whole answer; it is refused later, for that message only.
            # So are bytes that are not UTF-8 (kept as they came: surrogateescape).
            parsed = json.loads(response.content.decode("utf-8", "surrogateescape"))
        except ValueError:
            raise CmqUnavailable(f"{action}: {status}, not a CMQ answer (no JSON)") from None
        answer: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        code = answer.get("code")
        if not isinstance(code, int) or isinstance(code, bool):
            raise CmqUnavailable(f"{action}: {status}, not a CMQ answer (no code)")
        if code == 0 and response.status_code != 200:
            raise CmqUnavailable(f"{action}: {status}")
        # CMQ answers its codes with 200; a code on another status is read all the same.
        if code != 0:
            raise CmqRefused(
                action,
                code,
                str(answer.get("message", ""))[:500],
                str(answer.get("requestId", ""))[:100],
                answer,
            )
        return answer

    def _signed(self, action: str, params: dict[str, str]) -> dict[str, str]:
        form = {
            **params,
            "Action": action,
            "SecretId": self._secret_id,
            "Timestamp": str(int(time.time())),
            "Nonce": str(random.randint(1, 2**31 - 1)),
            "SignatureMethod": self._signature_method,
            "RequestClient": REQUEST_CLIENT,
        }
        if self._token is not None:
            form["Token"] = self._token
        form["Signature"] = signature(self._secret_key, "POST", self._host, form)
        return form

    @staticmethod
    def _refused_handles(refused: CmqRefused, handles: Sequence[str]) -> dict[str, CmqRefused]:
        """A batch delete answered with an error: the handles its errorList names (a
        partial failure), each with its own code; without a list, all of them."""
        errors = refused.answer.get("errorList")
        if not isinstance(errors, list):
            return dict.fromkeys(handles, refused)
        named: dict[str, CmqRefused] = {}
        for error in errors:
            if not isinstance(error, dict) or error.get("receiptHandle") not in handles:
                continue
            code = error.get("code")
            named[error["receiptHandle"]] = CmqRefused(
                refused.action,
                code if isinstance(code, int) else refused.code,
                str(error.get("message", ""))[:500],
                refused.request_id,
                error,
            )
        return named or dict.fromkeys(handles, refused)
