"""A callback as a Pulsar message and back: message properties carry what HTTP headers do.

The relay (`serve` with `[relay] topic`) publishes the raw body with the request's
headers of interest under their own names (`x-ci-content-version`, `x-cmq-message-id`,
...) and the `ci-receiver-*` properties below. The consumer turns such a message back
into the HTTP callback it was (`source: http`, with `source_meta.relay` telling the hop
through TDMQ), so it decodes and deduplicates exactly as if `serve` had stored it.

Any other message is a callback published by someone's own bridge: `source: tdmq`, its
properties kept in `source_meta`, and a property named like a header of interest read
as that header.

A message `read` cannot make sense of (a relay property that is not what the relay
writes, an event time past the year 9999) raises `ValueError`; `unreadable` turns it
into a refused delivery, so that it is kept as rejected like an undecodable body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import _pulsar

from receiver.callback.decode import PayloadError
from receiver.inbox import Receipt
from receiver.sources.http import HEADERS_OF_INTEREST
from receiver.tracing.fields import FIELDS

PREFIX = "ci-receiver-"
SOURCE = PREFIX + "source"  # "http": published by the relay
REQUEST_ID = PREFIX + "request-id"
RECEIVED_AT = PREFIX + "received-at"
REJECTED = PREFIX + "rejected"  # the reason, when the relay refused the body
REJECTED_DETAIL = PREFIX + "rejected-detail"
SIZE = PREFIX + "size"  # the full size of a refused body that was not read whole

# The body is carried whole, so its length tells nothing a header needs to.
_NOT_RELAYED = {"content-length"}


@dataclass(slots=True)
class Delivery:
    """What a message brings: the receipt to ingest, or one the relay already refused."""

    receipt: Receipt
    refused: PayloadError | None = None
    size: int | None = None


def relay_properties(
    receipt: Receipt, refused: PayloadError | None = None, size: int | None = None
) -> dict[str, str]:
    properties = {k: v for k, v in receipt.headers.items() if k not in _NOT_RELAYED}
    properties[SOURCE] = receipt.source
    properties[REQUEST_ID] = receipt.request_id
    properties[RECEIVED_AT] = receipt.received_at.isoformat()
    # The request's trace (W3C fields, when tracing was on), for the consumer to continue.
    for name in FIELDS:
        value = receipt.source_meta.get(name)
        if isinstance(value, str):
            properties[name] = value
    if refused is not None:
        properties[REJECTED] = refused.reason
        properties[REJECTED_DETAIL] = refused.message
        properties[SIZE] = str(size if size is not None else len(receipt.body))
    return properties


def read(message: _pulsar.Message) -> Delivery:
    properties: dict[str, str] = message.properties()
    headers = {
        name.lower(): value
        for name, value in properties.items()
        if name.lower() in HEADERS_OF_INTEREST and name.lower() not in _NOT_RELAYED
    }
    where = {
        "topic": message.topic_name(),
        "message_id": str(message.message_id()),
        "publish_time": _from_millis(message.publish_timestamp()),
        "redelivery_count": message.redelivery_count(),
    }
    if properties.get(SOURCE) == "http":
        request_id = properties.get(REQUEST_ID) or where["message_id"]
        receipt = Receipt(
            body=message.data(),
            source="http",
            received_at=_parse_time(properties.get(RECEIVED_AT)),
            request_id=request_id,
            headers=headers,
            source_meta={"request_id": request_id, "relay": where},
        )
        reason = properties.get(REJECTED)
        if reason is None:
            return Delivery(receipt)
        size = properties.get(SIZE)
        # Not isdigit(): it takes "²" and other digits int() refuses.
        if size is not None and not re.fullmatch(r"[0-9]+", size):
            raise ValueError(f"{SIZE} is not a number: {size[:40]!r}")
        return Delivery(
            receipt,
            PayloadError(reason, properties.get(REJECTED_DETAIL, "")),
            None if size is None else int(size),
        )
    meta: dict[str, Any] = dict(where)
    if message.event_timestamp():
        meta["event_time"] = _from_millis(message.event_timestamp())
    if message.partition_key():
        meta["key"] = message.partition_key()
    own = {k: v for k, v in properties.items() if not k.startswith(PREFIX)}
    if own:
        meta["properties"] = own
    return Delivery(
        Receipt(
            body=message.data(),
            source="tdmq",
            received_at=datetime.now(timezone.utc),
            request_id=where["message_id"],
            headers=headers,
            source_meta=meta,
        )
    )


def properties_if_text(message: _pulsar.Message) -> dict[str, str] | None:
    """The message's properties; None when one is not UTF-8 text (another client may set
    bytes), which the Python client cannot read at all."""
    try:
        properties: dict[str, str] = message.properties()
    except UnicodeDecodeError:
        return None
    return properties


def unreadable(message: _pulsar.Message, error: Exception) -> Delivery:
    """A message `read` refused, as a bridge message refused with the reason
    `bad_message`: kept with its body and every property, so that it is seen, and acked
    rather than delivered again and again."""
    message_id = str(message.message_id())
    receipt = Receipt(
        body=message.data(),
        source="tdmq",
        received_at=datetime.now(timezone.utc),
        request_id=message_id,
        source_meta={
            "topic": message.topic_name(),
            "message_id": message_id,
            "properties": properties_if_text(message),
        },
    )
    return Delivery(receipt, PayloadError("bad_message", f"the message cannot be read: {error}"))


def _from_millis(millis: int) -> str:
    try:
        return datetime.fromtimestamp(millis / 1000, timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"a time out of range: {millis} ms") from None


def _parse_time(text: str | None) -> datetime:
    """The relay's `received-at`; now when there is none."""
    if text is None:
        return datetime.now(timezone.utc)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{RECEIVED_AT} is not an ISO 8601 time: {text[:40]!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
