"""Real peers on loopback for the notification handlers: an HTTP server that records what
it gets and answers as told, and robots answering in each vendor's documented shapes,
checking signatures with implementations written here, apart from the handlers'."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering: a slow peer

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, dict):
            return json.dumps(self.body).encode(), "application/json"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return self.body, "application/octet-stream"


Responder = Callable[[Request], Reply]


class HttpPeer:
    """A threaded HTTP server on 127.0.0.1. `replies` are used first, in order, then
    `respond` decides. Every request is kept in `requests`."""

    def __init__(self, respond: Responder | None = None) -> None:
        self.respond: Responder = respond or (lambda request: Reply())
        self.replies: list[Reply] = []
        self.requests: list[Request] = []
        self._changed = threading.Condition()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                parts = urlsplit(self.path)
                request = Request(
                    method="POST",
                    path=parts.path,
                    query={k: v[0] for k, v in parse_qs(parts.query).items()},
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length),
                )
                with peer._changed:
                    reply = peer.replies.pop(0) if peer.replies else None
                reply = reply or peer.respond(request)
                if reply.delay:
                    time.sleep(reply.delay)
                with peer._changed:
                    peer.requests.append(request)
                    peer._changed.notify_all()
                body, content_type = reply.encoded()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting: what a slow-peer test wants

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> HttpPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float = 30) -> list[Request]:
        """Block until `count` requests came in; fail after `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
            return list(self.requests)


# --- robots, per their vendors' documentation ------------------------------------------


def wecom_robot(key: str) -> Responder:
    """企业微信: POST /cgi-bin/webhook/send?key=KEY, `{"msgtype": t, t: {"content": ...}}`."""

    def respond(request: Request) -> Reply:
        if request.path != "/cgi-bin/webhook/send" or request.query.get("key") != key:
            return Reply(body={"errcode": 93000, "errmsg": "invalid webhook url"})
        body = request.json()
        kind = body.get("msgtype")
        limit = {"text": 2048, "markdown": 4096}.get(kind)
        content = (body.get(kind) or {}).get("content") if limit else None
        if not isinstance(content, str) or not content:
            return Reply(body={"errcode": 40008, "errmsg": "invalid message type"})
        if len(content.encode()) > limit:
            return Reply(body={"errcode": 40058, "errmsg": "content exceed max length"})
        return Reply(body={"errcode": 0, "errmsg": "ok"})

    return respond


def dingtalk_expected_sign(secret: str, timestamp: str) -> str:
    to_sign = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(secret.encode(), to_sign, hashlib.sha256).digest()).decode()


def dingtalk_robot(token: str, secret: str | None) -> Responder:
    """钉钉: POST /robot/send?access_token=T[&timestamp=ms&sign=base64]."""

    def respond(request: Request) -> Reply:
        if request.path != "/robot/send" or request.query.get("access_token") != token:
            return Reply(body={"errcode": 300001, "errmsg": "token is not exist"})
        if secret is not None:
            timestamp = request.query.get("timestamp", "")
            fresh = timestamp.isdigit() and abs(time.time() * 1000 - int(timestamp)) < 3600_000
            expected = dingtalk_expected_sign(secret, timestamp)
            if not fresh or request.query.get("sign") != expected:
                return Reply(body={"errcode": 310000, "errmsg": "sign not match"})
        body = request.json()
        kind = body.get("msgtype")
        if kind == "text":
            ok = isinstance(body["text"].get("content"), str)
        elif kind == "markdown":
            ok = all(isinstance(body["markdown"].get(k), str) for k in ("title", "text"))
        else:
            ok = False
        if not ok:
            return Reply(body={"errcode": 40035, "errmsg": "缺少参数 json"})
        return Reply(body={"errcode": 0, "errmsg": "ok"})

    return respond


def feishu_expected_sign(secret: str, timestamp: str) -> str:
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def feishu_bot(secret: str | None) -> Responder:
    """飞书: POST /open-apis/bot/v2/hook/ID with `timestamp` (s) and `sign` in the body."""

    def respond(request: Request) -> Reply:
        if len(request.body) > 20 * 1024:  # Feishu: "请求体大小不能超过20k"
            return Reply(body={"code": 9499, "msg": "Bad Request", "data": {}})
        body = request.json()
        if secret is not None:
            timestamp = str(body.get("timestamp", ""))
            fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 3600
            if not fresh or body.get("sign") != feishu_expected_sign(secret, timestamp):
                return Reply(
                    body={
                        "code": 19021,
                        "msg": "sign match fail or timestamp is not within one hour "
                        "from current time",
                        "data": {},
                    }
                )
        kind = body.get("msg_type")
        if kind == "text":
            ok = isinstance(body.get("content", {}).get("text"), str)
        elif kind == "interactive":
            ok = isinstance(body.get("card", {}).get("elements"), list)
        else:
            ok = False
        if not ok:
            return Reply(body={"code": 9499, "msg": "Bad Request", "data": {}})
        return Reply(body={"code": 0, "msg": "success", "data": {}})

    return respond


def slack_webhook() -> Responder:
    """Slack incoming webhook: `ok` as text/plain, or an error status with a reason."""

    def respond(request: Request) -> Reply:
        body = request.json()
        if not isinstance(body.get("text"), str) or not body["text"]:
            return Reply(status=400, body="invalid_payload")
        return Reply(body="ok")

    return respond
