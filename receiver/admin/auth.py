"""Authentication of the admin listener: a bearer token or HTTP Basic credentials, or,
on a loopback listener with none configured, none (the config refuses a non-loopback
host without any).

A listener with credentials answers /healthz, and /readyz without its details, to a
request that presents none: a Kubernetes probe cannot send a secret.

Credentials come in two scopes: `token` / `basic_auth` may do everything, `read_token` /
`read_basic_auth` only look. The scope a request was let in with is left in
`scope["state"]["access"]` ("write" or "read") for the routes that change something.

An open listener (loopback, no credentials) answers only requests addressed to a
loopback name: a web page that rebinds its own host name to 127.0.0.1 cannot read the
inspector through the browser of someone on this host.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

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
# Answered without credentials too: /readyz then without its details.
PROBES = frozenset({"/healthz", "/readyz"})

Access = Literal["read", "write"]


class AdminAuth:
    """ASGI middleware: every request presents the configured token or credentials."""

    def __init__(self, app: ASGIApp, *, config: AdminConfig) -> None:
        self.app = app
        self._tokens: dict[Access, list[bytes]] = {
            "write": secret_values([config.token] if config.token else []),
            "read": secret_values([config.read_token] if config.read_token else []),
        }
        self._basic: dict[Access, list[bytes]] = {
            "write": basic_pairs(config.basic_auth),
            "read": basic_pairs(config.read_basic_auth),
        }
        self._limiter = FailureLimiter(FAILURES_PER_MINUTE)
        has_basic = any(self._basic.values())
        self._challenge = b'Basic realm="ci-receiver admin"' if has_basic else b"Bearer"
        self._own_host = config.host.lower()

    @property
    def open(self) -> bool:
        return not (any(self._tokens.values()) or any(self._basic.values()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.open:
            if not self._addressed_to_loopback(scope):
                detail = "without credentials, the admin listener answers loopback names only"
                await _refuse(send, 403, "forbidden", [], detail)
                return
            scope.setdefault("state", {})["access"] = "write"
            await self.app(scope, receive, send)
            return
        if scope["path"] in PROBES and authorization(scope["headers"]) is None:
            # A kubelet's probe carries no credentials: it is told whether the process
            # lives, or is ready, and nothing more (the routes answer it as on the
            # public port).
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        wait = self._limiter.retry_after(address)
        if wait is not None:
            await _refuse(send, 429, "rate_limited", [(b"retry-after", str(wait).encode())])
            return
        access = self._access(scope)
        if access is None:
            self._limiter.failed(address)
            await _refuse(send, 401, "unauthorized", [(b"www-authenticate", self._challenge)])
            return
        scope.setdefault("state", {})["access"] = access
        await self.app(scope, receive, send)

    def _access(self, scope: Scope) -> Access | None:
        """The scope of the credentials presented, the wider one first; None: none fit."""
        presented = authorization(scope["headers"])
        if presented is None:
            return None
        scheme, credentials = presented
        if scheme == b"bearer":
            candidate, secrets = credentials, self._tokens
        elif scheme == b"basic":
            pair = basic_credentials(credentials)
            if pair is None:
                return None
            candidate, secrets = pair, self._basic
        else:
            return None
        for access in ("write", "read"):
            if secrets[access] and matches_any(candidate, secrets[access]):
                return access
        return None

    def _addressed_to_loopback(self, scope: Scope) -> bool:
        host = next((value for name, value in scope["headers"] if name == b"host"), None)
        if host is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = _host_name(host.decode("latin-1").lower())
        if name in ("localhost", self._own_host) or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


def _host_name(host: str) -> str:
    """The name of a Host header, without its port: `[::1]:8081` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _refuse(
    send: Send,
    status: int,
    reason: str,
    headers: list[tuple[bytes, bytes]],
    detail: str = "the admin listener needs credentials",
) -> None:
    body = orjson.dumps({"error": reason, "detail": detail})
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
