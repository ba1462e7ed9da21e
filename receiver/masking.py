"""Secrets out of messages written from errors (a handler's start error on `/readyz` and
in the log, the Pulsar library's lines, a broker's address): the user info and query of
URLs, and the values of the options that hold secrets."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

MASK = "***"
# Option names whose values are secrets (check-config prints them masked).
SECRET_NAME = re.compile(r"secret|token|password|passwd|api_?key|credential", re.IGNORECASE)
# scheme://[user[:password]@]host...[?query]: the user info and the query go (a robot's
# key or token usually travels in the query, a database password in the user info).
# Punctuation ending a query is the sentence's, not the URL's.
_URL = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/?#@]*@)?"
    r"(?P<rest>[^\s?#]*)(?P<query>\?[^\s#'\"]*[^\s#'\":;,.)])?"
)
# Shorter values would mask ordinary words in a message.
_SHORTEST_SECRET = 4


class Masker:
    """Replaces the given secret values, then URLs' user info and query, with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # The longest first, so that a secret containing another is masked whole.
        self._secrets = sorted(
            {s for s in secrets if len(s) >= _SHORTEST_SECRET}, key=len, reverse=True
        )

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return _URL.sub(_mask_url, text)


def _mask_url(match: re.Match[str]) -> str:
    return mask_url(match[0])


def mask_credentials(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them) with every URL's credentials
    masked: the userinfo (a password, or a lone user name, which is often a token) and
    the value of every query parameter."""
    if isinstance(value, dict):
        return {k: mask_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_credentials(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def mask_url(url: str) -> str:
    """A URL with its password (or lone user name) and query values masked; keeps what
    tells where it points."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        return "**********"  # not readable as a URL: nothing of it can be shown safely
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if has_password else f"{MASK}@{host}"
    query = "&".join(
        f"{name}={MASK}" if separator else name
        for name, separator, _ in (pair.partition("=") for pair in parts.query.split("&"))
        if name or separator
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secrets_in(value: Any, name: str = "") -> Iterator[str]:
    """Every string in `value` held by a `SecretStr`, or under an option whose name says
    it is a secret (`password`, `token`, ...), however deep."""
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, str):
        if SECRET_NAME.search(name):
            yield value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from secrets_in(getattr(value, field), field)
        for key, extra in (value.model_extra or {}).items():
            yield from secrets_in(extra, key)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            # A secret table (headers = {...} under a secret name) keeps its values secret.
            yield from secrets_in(item, name if SECRET_NAME.search(name) else str(key))
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from secrets_in(item, name)


def origin(url: str) -> str:
    """A URL's scheme, host and port alone: what may be shown of a peer's URL in an error
    or a span (a robot's key or token travels in the path or the query, a password in the
    user info)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a port: nothing more of it is shown
        port = ""
    return f"{parts.scheme}://{host}{port}"
