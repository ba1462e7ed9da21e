"""A loopback stand-in for the TDMQ for CMQ data API, which cannot be reached from here.

It stands in for the cloud endpoint (`https://cmq-<region>.public.tencenttdmq.com`) in
the tests and the benchmark. Written from Tencent's CMQ API 2.0 documentation, not from
ci-receiver's client:
- requests: `POST` (or `GET`) on `/v2/index.php`, parameters form-encoded, the common
  ones (`Action`, `SecretId`, `Timestamp`, `Nonce`, `SignatureMethod`, `Signature`,
  optional `Token`) next to the action's own;
- the signature (签名方法): every parameter but `Signature` sorted by name, an `_` in a
  name written as `.`, joined as `name=value` with `&` (values as sent, not URL-encoded),
  after method + Host + path + `?`; HMAC-SHA256 when `SignatureMethod` is `HmacSHA256`,
  else HMAC-SHA1, with the SecretKey; base64. A wrong one is refused with code 4100;
- actions: SendMessage, BatchSendMessage (to fill queues), ReceiveMessage,
  BatchReceiveMessage (`numOfMsg` 1-16, `pollingWaitSeconds` 0-30: long polling),
  DeleteMessage, BatchDeleteMessage (`receiptHandle.n`, n from 0 or 1, consecutive);
  JSON answers with `code`, `message`, `requestId` and the documented fields;
- semantics: a received message is hidden for the queue's visibility timeout and
  handed out again unless deleted; every receive gives it a new receipt handle and only
  the latest one deletes it, before its `nextVisibleTime` (else 4430); `dequeueCount`
  counts receives; "no message" is code 7000; an unknown queue is 4440.

Messages live in an SQLite file, so the server can be killed and started again over
the same queues, like the real (durable) service. For the tests, `/_stand-in/...`
(unsigned, not part of CMQ) answers the next requests with throttling (4420) or a
gateway's 503, refuses actions as a missing CAM permission (4000, module code 10461),
refuses every signed request with a code of the test's choosing until told otherwise
(4104, a key CMQ no longer knows; 6000, CMQ failing...), writes the next message body
as raw JSON text (a hostile answer), and reports counts (requests per action, messages
queued and hidden, the most hidden at once).

    python -m tests.support.cmq_server --port P --db F --key ID:KEY --queue NAME [...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

PATH = "/v2/index.php"
COMMON = ("Action", "SecretId", "Timestamp", "Nonce", "Signature")
MAX_BATCH = 16
MAX_POLLING_WAIT = 30


def sign(secret_key: str, method: str, host: str, path: str, params: Mapping[str, str]) -> str:
    """The signature of 签名方法, step by step: sort, join, prefix, HMAC, base64."""
    names = sorted(name for name in params if name != "Signature")
    request_string = "&".join(f"{name.replace('_', '.')}={params[name]}" for name in names)
    original = method.upper() + host + path + "?" + request_string
    algorithm = hashlib.sha256 if params.get("SignatureMethod") == "HmacSHA256" else hashlib.sha1
    digest = hmac.new(secret_key.encode(), original.encode(), algorithm).digest()
    return base64.b64encode(digest).decode()


class Refused(Exception):
    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class Queues:
    """The messages of every queue, in SQLite."""

    def __init__(self, path: str, names: list[str], visibility_timeout: float) -> None:
        self.names = set(names)
        self.visibility_timeout = visibility_timeout
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, queue TEXT,"
            " msg_id TEXT, body TEXT, enqueue_time INT, first_dequeue_time INT,"
            " dequeue_count INT, visible_at REAL, receipt_handle TEXT)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS visible ON messages (queue, visible_at)")
        self.peak_hidden: Counter[str] = Counter()

    def check(self, queue: str | None) -> str:
        if queue not in self.names:
            raise Refused(4440, "(10100)queue is not existed, or deleted")
        return queue

    def send(self, queue: str, body: str, delay: float = 0) -> str:
        msg_id = uuid.uuid4().hex
        now = time.time()
        self.db.execute(
            "INSERT INTO messages (queue, msg_id, body, enqueue_time, dequeue_count,"
            " visible_at) VALUES (?, ?, ?, ?, 0, ?)",
            (queue, msg_id, body, int(now), now + delay),
        )
        return msg_id

    def receive(self, queue: str, count: int) -> list[dict[str, Any]]:
        now = time.time()
        rows = self.db.execute(
            "SELECT id, msg_id, body, enqueue_time, first_dequeue_time, dequeue_count"
            " FROM messages WHERE queue = ? AND visible_at <= ? ORDER BY id LIMIT ?",
            (queue, now, count),
        ).fetchall()
        taken = []
        self.db.execute("BEGIN")
        for row_id, msg_id, body, enqueue_time, first, dequeues in rows:
            handle = uuid.uuid4().hex
            visible_at = now + self.visibility_timeout
            first = first or int(now)
            self.db.execute(
                "UPDATE messages SET receipt_handle = ?, visible_at = ?, dequeue_count = ?,"
                " first_dequeue_time = ? WHERE id = ?",
                (handle, visible_at, dequeues + 1, first, row_id),
            )
            taken.append(
                {
                    "msgBody": body,
                    "msgId": msg_id,
                    "receiptHandle": handle,
                    "enqueueTime": enqueue_time,
                    "firstDequeueTime": first,
                    "nextVisibleTime": int(visible_at),
                    "dequeueCount": dequeues + 1,
                }
            )
        self.db.execute("COMMIT")
        self.peak_hidden[queue] = max(self.peak_hidden[queue], self.counts(queue)[1])
        return taken

    def delete(self, queue: str, handle: str) -> None:
        deleted = self.db.execute(
            "DELETE FROM messages WHERE queue = ? AND receipt_handle = ? AND visible_at > ?",
            (queue, handle, time.time()),
        ).rowcount
        if not deleted:
            raise Refused(4430, "(10260)receipt handle is invalid")

    def counts(self, queue: str) -> tuple[int, int]:
        """(messages in the queue, of which hidden)."""
        count = "SELECT count(*) FROM messages WHERE queue = ? AND visible_at > ?"
        total = self.db.execute(count, (queue, float("-inf"))).fetchone()[0]
        hidden = self.db.execute(count, (queue, time.time())).fetchone()[0]
        return total, hidden


class StandIn:
    """The CMQ endpoint: signature, actions, and the test controls."""

    def __init__(self, keys: dict[str, str], queues: Queues) -> None:
        self.keys = keys
        self.queues = queues
        self.requests: Counter[str] = Counter()
        self.throttle = 0  # next requests answered "qps throttling"
        self.unavailable = 0  # next requests answered by a gateway's 503
        self.denied: set[str] = set()  # actions the key has no CAM permission for
        self.refusal: dict[str, Any] | None = None  # {code, message} for every request
        self.raw_body: str | None = None  # JSON text for the next received msgBody

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(PATH, self.endpoint, methods=["GET", "POST"]),
                Route("/_stand-in/stats", self.stats, methods=["GET"]),
                Route("/_stand-in/control", self.control, methods=["POST"]),
            ]
        )

    async def endpoint(self, request: Request) -> Response:
        if request.method == "POST":  # application/x-www-form-urlencoded
            params = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        else:
            params = dict(request.query_params)
        request_id = uuid.uuid4().hex
        if self.unavailable:
            self.unavailable -= 1
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=503)
        try:
            self.authenticate(request, params)
            action = params["Action"]
            self.requests[action] += 1
            if self.throttle:
                self.throttle -= 1
                raise Refused(4420, "(10250)qps throttling")
            if action in self.denied:
                raise Refused(4000, "(10461)no cam authentication")
            if self.refusal is not None:
                raise Refused(self.refusal["code"], self.refusal["message"])
            answer = await self.act(action, params)
        except Refused as refused:
            body = {"code": refused.code, "message": refused.message, **refused.extra}
            return JSONResponse({**body, "requestId": request_id})
        answer = {"code": 0, "message": "", "requestId": request_id, **answer}
        if self.raw_body is not None and (answer.get("msgInfoList") or "msgBody" in answer):
            return self.with_raw_body(answer)
        return JSONResponse(answer)

    def with_raw_body(self, answer: dict[str, Any]) -> Response:
        """The answer with the first message's msgBody written as the JSON text set by
        the test (a lone surrogate escape, null, a number...)."""
        first = answer["msgInfoList"][0] if "msgInfoList" in answer else answer
        first["msgBody"] = placeholder = uuid.uuid4().hex
        text = json.dumps(answer).replace(f'"{placeholder}"', self.raw_body, 1)
        self.raw_body = None
        # A lone surrogate of U+DC80-U+DCFF in it stands for a byte that is not UTF-8.
        return Response(text.encode("utf-8", "surrogateescape"), media_type="application/json")

    def authenticate(self, request: Request, params: dict[str, str]) -> None:
        for name in COMMON:
            if not params.get(name):
                raise Refused(4000, f"(10390)lacked of required parameter {name}")
        for name in ("Timestamp", "Nonce"):
            if not params[name].isdigit():
                raise Refused(4000, f"(10360)parameter {name} error type")
        secret_key = self.keys.get(params["SecretId"])
        if secret_key is None:
            raise Refused(4100, "(10270)secret id is not existed")
        host = request.headers.get("host", "")
        expected = sign(secret_key, request.method, host, request.url.path, params)
        if not hmac.compare_digest(expected, params["Signature"]):
            raise Refused(4100, "(10030)authentication failed")

    async def act(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        queues = self.queues
        queue = queues.check(params.get("queueName"))
        if action == "SendMessage":
            return {"msgId": queues.send(queue, params.get("msgBody", ""))}
        if action == "BatchSendMessage":
            bodies = indexed(params, "msgBody")
            return {"msgList": [{"msgId": queues.send(queue, body)} for body in bodies]}
        if action in ("ReceiveMessage", "BatchReceiveMessage"):
            count = 1
            if action == "BatchReceiveMessage":
                count = number(params, "numOfMsg", 1, MAX_BATCH, required=True)
            wait = number(params, "pollingWaitSeconds", 0, MAX_POLLING_WAIT)
            taken = await self.long_poll(queue, count, wait)
            if not taken:
                raise Refused(7000, "(10200)no message")
            return taken[0] if action == "ReceiveMessage" else {"msgInfoList": taken}
        if action == "DeleteMessage":
            queues.delete(queue, params.get("receiptHandle", ""))
            return {}
        if action == "BatchDeleteMessage":
            return self.batch_delete(queue, indexed(params, "receiptHandle"))
        raise Refused(4000, f"(10430)action name {action} is not existed")

    async def long_poll(self, queue: str, count: int, wait: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        while True:
            taken = self.queues.receive(queue, count)
            if taken or time.monotonic() >= deadline:
                return taken
            await asyncio.sleep(0.02)

    def batch_delete(self, queue: str, handles: list[str]) -> dict[str, Any]:
        errors = []
        for handle in handles:
            try:
                self.queues.delete(queue, handle)
            except Refused as refused:
                errors.append(
                    {"code": refused.code, "message": refused.message, "receiptHandle": handle}
                )
        if not errors:
            return {}
        code, message = 6010, "(10150)delete message partially failed"
        if len(errors) == len(handles):
            code, message = 6020, "(10290)batch delete message failed"
        raise Refused(code, message, errorList=errors)

    async def stats(self, request: Request) -> Response:
        counts = {name: self.queues.counts(name) for name in sorted(self.queues.names)}
        return JSONResponse(
            {
                "requests": dict(self.requests),
                "queued": {name: total for name, (total, _) in counts.items()},
                "hidden": {name: hidden for name, (_, hidden) in counts.items()},
                "peak_hidden": dict(self.queues.peak_hidden),
                # Troubles still to answer (set through /control).
                "throttle": self.throttle,
                "unavailable": self.unavailable,
            }
        )

    async def control(self, request: Request) -> Response:
        change = await request.json()
        self.throttle = change.get("throttle", self.throttle)
        self.unavailable = change.get("unavailable", self.unavailable)
        self.denied = set(change.get("deny", self.denied))
        self.refusal = change.get("refuse", self.refusal)
        self.raw_body = change.get("raw_body", self.raw_body)
        return JSONResponse({"ok": True})


def indexed(params: dict[str, str], name: str) -> list[str]:
    """`name.0`, `name.1`, ... (or from 1): consecutive, at most 16."""
    suffixes = [key.removeprefix(name + ".") for key in params if key.startswith(name + ".")]
    if not all(suffix.isdigit() for suffix in suffixes):
        raise Refused(4000, f"(10310)error: parameter {name} key format error")
    numbers = sorted(int(suffix) for suffix in suffixes)
    if not numbers:
        raise Refused(4000, f"(10390)lacked of required parameter {name}.n")
    if numbers[0] not in (0, 1) or numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise Refused(4000, f"(10380){name} parameter is not consequent")
    if len(numbers) > MAX_BATCH:
        raise Refused(4000, f"(10370){name} parameter batch size is out of range")
    return [params[f"{name}.{n}"] for n in numbers]


def number(params: dict[str, str], name: str, low: int, high: int, required: bool = False) -> int:
    text = params.get(name)
    if text is None:
        if required:
            raise Refused(4000, f"(10390)lacked of required parameter {name}")
        return 0  # the queue's default long polling wait: none here
    if not text.isdigit() or not low <= int(text) <= high:
        raise Refused(4000, f"(10350)parameter {name} value or length is out of range")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--key", action="append", required=True, help="SECRET_ID:SECRET_KEY")
    parser.add_argument("--queue", action="append", required=True)
    parser.add_argument("--visibility-timeout", type=float, default=30.0)
    args = parser.parse_args()
    keys = dict(key.split(":", 1) for key in args.key)
    stand_in = StandIn(keys, Queues(args.db, args.queue, args.visibility_timeout))
    uvicorn.run(stand_in.app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
