"""Who may post callbacks: path tokens, HTTP Basic credentials, an address allow-list,
and a limit on failed attempts per address.

Every check reads only the request head, so a refused sender never gets its body read.
The client address is `scope["client"]`: the peer, or, when the peer is one of
`http.trusted_proxies`, what they put in X-Forwarded-For (uvicorn's proxy-headers
middleware does that walk; see `HttpServer`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import structlog
from starlette.types import Scope

from receiver.config import HttpConfig
from receiver.credentials import (
    WINDOW_SECONDS,
    FailureLimiter,
    authorization,
    basic_credentials,
    basic_pairs,
    ip_address,
    matches_any,
    secret_values,
)

logger = structlog.get_logger("ci_receiver.sources.http")


@dataclass(slots=True)
class Refusal:
    status: int
    reason: str  # unauthorized, forbidden, rate_limited
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


class SenderAuth:
    def __init__(self, http: HttpConfig) -> None:
        self._tokens = secret_values(http.tokens)
        self._basic = basic_pairs(http.basic_auth)
        self._allow = http.allow_from
        self._limiter = FailureLimiter(http.auth_failures_per_minute)
        self.required = http.authenticated

    def check(self, scope: Scope, token: str | None) -> Refusal | None:
        """None when the request may go on; else why not (the caller answers with it)."""
        if not self.required:
            return None
        address = client_address(scope)
        wait = self._limiter.retry_after(address)
        if wait is not None:
            return Refusal(
                429,
                "rate_limited",
                "too many failed authentications from this address",
                {"retry-after": str(wait)},
            )
        if self._allow and not _allowed(address, self._allow):
            return self._failed(address, Refusal(403, "forbidden", "this address may not post"))
        if (self._tokens or self._basic) and not self._credentials_ok(scope, token):
            headers = {"www-authenticate": 'Basic realm="ci-receiver"'} if self._basic else {}
            detail = (
                "POST to /callbacks/<token> with a configured token"
                if not self._basic
                else "send configured credentials (Basic, or /callbacks/<token>)"
                if self._tokens
                else "send configured Basic credentials"
            )
            return self._failed(address, Refusal(401, "unauthorized", detail, headers))
        return None

    def _credentials_ok(self, scope: Scope, token: str | None) -> bool:
        if token is not None and self._tokens and matches_any(token.encode(), self._tokens):
            return True
        if not self._basic:
            return False
        presented = authorization(scope["headers"])
        if presented is None or presented[0] != b"basic":
            return False
        pair = basic_credentials(presented[1])
        return pair is not None and matches_any(pair, self._basic)

    def _failed(self, address: str, refusal: Refusal) -> Refusal:
        if self._limiter.failed(address):
            logger.warning(
                "sender refused, and limited from now on",
                client=address,
                reason=refusal.reason,
                retry_after=WINDOW_SECONDS,
            )
        else:
            logger.info("sender refused", client=address, reason=refusal.reason)
        return refusal


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else ""


def _allowed(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    ip = ip_address(address)
    # Not an address (a proxy that wrote something else in X-Forwarded-For): refused.
    return ip is not None and any(ip in network for network in networks)


_HOW_TO_AUTHENTICATE = (
    "Set http.tokens (a long random path token: CI_RECEIVER_HTTP__TOKENS), http.basic_auth,"
    " or http.allow_from (the addresses that may post)."
)


def open_to_anyone_warning(http: HttpConfig) -> str | None:
    """What `serve` says at start when nothing keeps strangers from posting."""
    if http.authenticated:
        return None
    return (
        "WARNING: no sender authentication is configured: anyone who can reach this port can"
        f" post callbacks. {_HOW_TO_AUTHENTICATE}"
    )


def open_to_anyone_refusal(http: HttpConfig) -> str | None:
    """Why `serve` and `run` do not start, when `require_auth` is on and nothing keeps
    strangers from posting; None when they may."""
    if http.authenticated or not http.require_auth:
        return None
    return (
        "refusing to serve without sender authentication (http.require_auth is on)."
        f" {_HOW_TO_AUTHENTICATE} Or, to take callbacks from anyone who reaches the port,"
        " set http.require_auth = false (CI_RECEIVER_HTTP__REQUIRE_AUTH=false)."
    )
