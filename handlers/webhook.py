"""`webhook`: POST the normalized event as JSON to any URL, signed per Standard Webhooks.

Headers (https://www.standardwebhooks.com): `webhook-id` is stable per event (the
event id, so a receiver can drop repeats), `webhook-timestamp` is the attempt's Unix
time, `webhook-signature` holds `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`
once per configured secret, space-separated, so secrets can be rotated without a gap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from typing import Any

from pydantic import Field, SecretStr, field_validator

from handlers.http import HttpHandler, HttpOptions, check_status
from receiver.callback.event import Event

SECRET_PREFIX = "whsec_"
# RFC 9110: a field name is a token; a field value holds no control character but tab.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class WebhookOptions(HttpOptions):
    url: str = Field(pattern=r"^https?://")
    # One `whsec_<base64>` secret or several (rotation: the receiver accepts any of them).
    secret: SecretStr | list[SecretStr] = Field(default_factory=list)
    # Extra headers, e.g. Authorization: secrets, so check-config masks their values.
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    # The decoded callback document can be large; leave it out for a slimmer body.
    include_raw: bool = True

    @field_validator("secret")
    @classmethod
    def _secrets_are_base64(cls, value: SecretStr | list[SecretStr]) -> list[SecretStr]:
        secrets = value if isinstance(value, list) else [value]
        for secret in secrets:
            decode_secret(secret.get_secret_value())
        return secrets

    @field_validator("headers")
    @classmethod
    def _headers_can_be_sent(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # A value from a file or a Kubernetes secret often ends in a newline: HTTP cannot
        # carry it, and the client's error would quote the secret. Said here, not quoted.
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not a token HTTP allows")
            if _CONTROL.search(value.get_secret_value()):
                raise ValueError(
                    f"header {name}: its value holds a line break or another control"
                    " character (a trailing newline from a secret's file?)"
                )
        return headers

    @property
    def secrets(self) -> list[SecretStr]:
        return self.secret if isinstance(self.secret, list) else [self.secret]


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret (the prefix is optional)."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError(f"a secret must be {SECRET_PREFIX}<base64>") from None
    if not key:
        raise ValueError("a secret must not be empty")
    return key


def sign(keys: list[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def message_id(event: Event) -> str:
    """The event id, which is already the dedup key; hashed when it would not make a
    clean header value."""
    if event.id.isascii() and event.id.isprintable() and len(event.id) <= 255:
        return event.id
    return "evt_" + hashlib.sha256(event.id.encode()).hexdigest()


class WebhookHandler(HttpHandler):
    options: WebhookOptions

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.options = WebhookOptions.model_validate(options)
        self._keys = [decode_secret(s.get_secret_value()) for s in self.options.secrets]

    async def __call__(self, event: Event) -> None:
        body = event.to_json(include_raw=self.options.include_raw)
        webhook_id = message_id(event)
        timestamp = int(time.time())
        headers = {
            **{name: value.get_secret_value() for name, value in self.options.headers.items()},
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._keys:
            headers["webhook-signature"] = sign(self._keys, webhook_id, timestamp, body)
        check_status(await self.post(self.options.url, content=body, headers=headers))
