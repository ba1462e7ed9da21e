"""Authentication of the admin listener: a bearer token or HTTP Basic credentials, or,
on a loopback listener with neither configured, none (the config refuses a non-loopback
host without one)."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.config import AdminConfig
from receiver.credentials import (
    FailureLimiter,
    authorization,
    basic_credentials,
    basic_pairs,
    matches_any,
    secret_values,
)

FAILURES_PER_MINUTE = 30


class AdminAuth:
    """ASGI middleware: every request presents the configured token or credentials."""

    def __init__(self, app: ASGIApp, *, config: AdminConfig) -> None:
        self.app = app
        self._tokens = secret_values([config.token] if config.token else [])
        self._basic = basic_pairs(config.basic_auth)
        self._limiter = FailureLimiter(FAILURES_PER_MINUTE)
        self._challenge = b'Basic realm="ci-receiver admin"' if self._basic else b"Bearer"

    @property
    def open(self) -> bool:
        return not (self._tokens or self._basic)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.open:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        wait = self._limiter.retry_after(address)
        if wait is not None:
            await _refuse(send, 429, "rate_limited", [(b"retry-after", str(wait).encode())])
        elif self._authorized(scope):
            await self.app(scope, receive, send)
        else:
            self._limiter.failed(address)
            await _refuse(send, 401, "unauthorized", [(b"www-authenticate", self._challenge)])

    def _authorized(self, scope: Scope) -> bool:
        presented = authorization(scope["headers"])
        if presented is None:
            return False
        scheme, credentials = presented
        if scheme == b"bearer" and self._tokens:
            return matches_any(credentials, self._tokens)
        if scheme == b"basic" and self._basic:
            pair = basic_credentials(credentials)
            return pair is not None and matches_any(pair, self._basic)
        return False


async def _refuse(send: Send, status: int, reason: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = orjson.dumps({"error": reason, "detail": "the admin listener needs credentials"})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
