"""Checking a presented secret (a path token, Basic credentials, a bearer token) against
the configured ones, in constant time and without ever echoing it."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from pydantic import SecretStr

# Addresses whose failures are remembered at once; the oldest is forgotten first.
MAX_TRACKED_ADDRESSES = 10_000
WINDOW_SECONDS = 60.0


def matches_any(candidate: bytes, secrets: list[bytes]) -> bool:
    # Compared against every secret, so the time taken does not tell which one is close.
    return any([hmac.compare_digest(candidate, secret) for secret in secrets])


def basic_pairs(users: Mapping[str, SecretStr]) -> list[bytes]:
    """`user:password` as Basic credentials carry them."""
    return [f"{name}:{password.get_secret_value()}".encode() for name, password in users.items()]


def secret_values(secrets: Iterable[SecretStr]) -> list[bytes]:
    return [secret.get_secret_value().encode() for secret in secrets]


def authorization(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes] | None:
    """The scheme (lower case) and credentials of an ASGI request's Authorization header."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            return scheme.lower(), credentials.strip()
    return None


def basic_credentials(encoded: bytes) -> bytes | None:
    """The `user:password` of Basic credentials, or None when they are not base64."""
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None


class FailureLimiter:
    """Counts failed authentications per address (IPv6: per /64, what one host usually
    holds) in one-minute windows; past the limit the address is refused until its window
    ends, whatever it sends."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def retry_after(self, address: str) -> int | None:
        """Seconds until the address may try again, or None if it may now."""
        if not self._windows:  # nobody failed lately: the usual case, kept cheap
            return None
        found = self._windows.get(_limited_key(address))
        if found is None:
            return None
        started, failures = found
        left = WINDOW_SECONDS - (time.monotonic() - started)
        if left <= 0 or failures < self.per_minute:
            return None
        return math.ceil(left)

    def failed(self, address: str) -> bool:
        """Count a failure; True when it is the one that reaches the limit."""
        if not self.per_minute:
            return False
        key = _limited_key(address)
        now = time.monotonic()
        started, failures = self._windows.pop(key, (now, 0))
        if now - started >= WINDOW_SECONDS:
            started, failures = now, 0
        self._windows[key] = (started, failures + 1)
        if len(self._windows) > MAX_TRACKED_ADDRESSES:
            self._windows.popitem(last=False)
        return failures + 1 == self.per_minute


def _limited_key(address: str) -> str:
    ip = ip_address(address)
    if ip is None:
        return address
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def ip_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, IPv4 peers of a dual-stack listener (::ffff:a.b.c.d) as IPv4; None
    for what is not an address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
