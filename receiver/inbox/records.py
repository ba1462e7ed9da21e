"""Events as the inbox keeps them: the normalized fields without the decoded document.

The document (`raw`, and `operation` inside it) is what makes an event large, and the
receipt already holds the bytes it came from. So an event row keeps everything else,
and `restore` decodes the receipt's body again when an event is read whole: the same
bytes through the same normalizer give the same document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import orjson

from receiver.events import parse_callback
from receiver.model import Event
from receiver.payload import Limits, PayloadError

# A stored body passed the limits in force when it arrived; decoding it again must not
# refuse it for limits lowered since.
_STORED_BODY_LIMITS = Limits(
    max_bytes=1 << 40, max_depth=200, max_elements=1 << 40, max_events=1 << 40
)


def event_data(event: Event) -> bytes:
    """The event's row data: its JSON without `raw` and `operation`."""
    return orjson.dumps(dataclasses.replace(event, raw={}, operation=None))


def lean(data: bytes) -> bytes:
    """An event's JSON as an older inbox kept it (with the document), made lean."""
    fields = orjson.loads(data)
    fields["raw"], fields["operation"] = {}, None
    return orjson.dumps(fields)


class Documents:
    """Decodes receipts' bodies once each, for the events of a read that share them."""

    def __init__(self) -> None:
        self._decoded: dict[int, dict[str, Event]] = {}

    def restore(
        self,
        event: Event,
        receipt_id: int,
        body: bytes | None,
        headers: bytes | str | Mapping[str, str] | None,
    ) -> Event:
        """Give an event read from its row its `raw` and `operation` back. A body that
        retention dropped, or that no longer yields this event (a newer normalizer),
        leaves them empty."""
        if body is None:
            return event
        decoded = self._decoded.get(receipt_id)
        if decoded is None:
            decoded = self._decoded[receipt_id] = _decode(body, headers)
        original = decoded.get(event.id)
        if original is not None:
            event.raw, event.operation = original.raw, original.operation
        return event


def _decode(body: bytes, headers: bytes | str | Mapping[str, str] | None) -> dict[str, Event]:
    if isinstance(headers, (bytes, str)):
        headers = orjson.loads(headers)
    try:
        events = parse_callback(body, headers, limits=_STORED_BODY_LIMITS)
    except PayloadError:
        return {}
    found: dict[str, Event] = {}
    for event in events:
        found.setdefault(event.id, event)
    return found
