"""Events and bodies as the inbox keeps them: each callback's bytes once, compressed.

A receipt keeps the callback's body, compressed (`pack`). An event row keeps its
normalized fields as columns for filters and indexes, and its JSON (`data`) stays NULL
while the receipt keeps the body: the whole event, `raw` and `operation` included, is
rebuilt on read by decoding the body again with the receipt's headers, source,
metadata and arrival time, the same inputs through the same normalizer (`Documents`).
Only when retention is about to drop a body are its events' JSON written
(`materialize`, without the document, which goes with the body). Inboxes written
before keep their events' JSON, without the document; a body still kept gives them
their `raw` back.
"""

from __future__ import annotations

import dataclasses
import threading
import zlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
import zstandard

from receiver.callback.decode import Limits, PayloadError
from receiver.callback.event import Event, ObjectRef
from receiver.callback.matching import verdict
from receiver.callback.normalize import parse_callback

# A stored body passed the limits in force when it arrived; decoding it again must not
# refuse it for limits lowered since.
_STORED_BODY_LIMITS = Limits(
    max_bytes=1 << 40, max_depth=200, max_elements=1 << 40, max_events=1 << 40
)

# What a compressed body starts with: zstd (`pack`), or zlib as inboxes of SQLite schema
# 3-4 and PostgreSQL schema 2-3 wrote it (read still: their bodies stay as they were). A
# body that was accepted decoded as XML or JSON, which never begins with a NUL byte, so a
# body stored uncompressed (by an older inbox) cannot be mistaken for one compressed.
# Refused bodies are kept as they came.
PACKED = b"\x00s"
PACKED_ZLIB = b"\x00z"

# What a read selects to rebuild an event: `e` its row, `r` its receipt's (see `Documents`).
EVENT_COLUMNS = (
    "e.id, e.data, e.receipt_id, e.kind, e.event_name, e.job_id, e.tag, e.state, e.bucket,"
    " e.key, r.body, r.headers, r.source, r.source_meta, r.received_at"
)
EVENT_WIDTH = 15


def event_row(event: Event) -> tuple[Any, ...]:
    """An event's row as both inboxes store it: id, kind, event_name, job_id, tag,
    state, bucket, key, verdict. Its JSON is not stored: it is rebuilt from the
    receipt's body."""
    source = event.input
    return (
        event.id, event.kind, event.event_name, event.job_id, event.tag, event.state,
        source.bucket if source else None, source.key if source else None, verdict(event),
    )  # fmt: skip


# Kept in `state` while an inbox migrated from a schema without verdicts has moderation
# events to fill theirs in: {"after": seq, "through": seq}, the next batch after `after`.
VERDICTS_TO_FILL = "inbox:verdicts to fill"
VERDICTS_BATCH = 500


def verdicts(rows: Sequence[Sequence[Any]]) -> list[tuple[str | None, str]]:
    """(verdict, event id) of the moderation events of `EVENT_COLUMNS` rows: what an
    inbox of an older schema, which did not keep verdicts, fills its rows with."""
    documents = Documents()
    return [(verdict(documents.event(row)), row[0]) for row in rows]


def pack(body: bytes) -> bytes:
    """An accepted callback's body as the inbox keeps it. Callbacks are verbose XML or
    JSON: a third of their size compressed, and a receipt row then fits an SQLite page
    several times over where an uncompressed one of 2 KB took a page of its own. zstd
    level 1 on a context kept per thread: about as many bytes as zlib's level 1 in a
    fraction of its time, which allocated its state anew on every call (docs/operations.md,
    "Retention"). It runs for every callback, as the connectors write: the bodies of a
    batch one after another, where zstd's code and context stay in the CPU's caches
    (between a request's other work, each compression took several times as long). The
    frame says the body's size, which `unpack` needs."""
    return PACKED + _CODECS.compressor.compress(body)


def unpack(stored: bytes | None) -> bytes | None:
    """A receipt's body as it arrived, from what `pack` kept (or an older inbox did)."""
    if stored is None:
        return None
    if stored.startswith(PACKED):
        return _CODECS.decompressor.decompress(memoryview(stored)[len(PACKED) :])
    if stored.startswith(PACKED_ZLIB):
        return zlib.decompress(memoryview(stored)[len(PACKED_ZLIB) :])
    return stored


class _Codec(threading.local):
    """A zstd compressor and decompressor per thread: python-zstandard's objects may not
    be used by two threads at once, and bodies are unpacked on the event loop, in
    `asyncio.to_thread` helpers and on the SQLite inbox's writer and reader threads.
    Made once: a new context per call (what `zstandard.compress` and `decompress` do)
    costs more than the work itself."""

    def __init__(self) -> None:
        self.compressor = zstandard.ZstdCompressor(level=1)
        self.decompressor = zstandard.ZstdDecompressor()


_CODECS = _Codec()


def stored_body(body: bytes | None, outcome: str) -> bytes:
    """A receipt's body as it arrived: accepted ones are kept packed, a refused body as
    it came, whatever its first bytes; b"" once retention dropped it."""
    return (body if outcome == "rejected" else unpack(body)) or b""


def event_data(event: Event) -> bytes:
    """An event's JSON without its document (`raw`, `operation`): what its row keeps
    once the receipt's body is gone."""
    return orjson.dumps(dataclasses.replace(event, raw={}, operation=None))


def lean(data: bytes) -> bytes:
    """An event's JSON as an older inbox kept it (with the document), made lean."""
    fields = orjson.loads(data)
    fields["raw"], fields["operation"] = {}, None
    return orjson.dumps(fields)


class Documents:
    """Rebuilds events from rows of `EVENT_COLUMNS`, decoding each body once per read
    for the events that share it."""

    def __init__(self) -> None:
        self._decoded: dict[int, dict[str, Event]] = {}

    def event(self, row: Sequence[Any]) -> Event:
        event_id, data, receipt_id, *columns = row[:10]
        body, headers, source, meta, received_at = row[10:EVENT_WIDTH]
        decoded = self._decode(receipt_id, body, headers, source, meta, received_at)
        original = decoded.get(event_id)
        if data is None:
            # A normalizer that no longer yields this event from its body (a newer
            # version) still leaves what the row's columns say.
            if original is not None:
                return original
            # The body's first character says which it was (XML starts with markup).
            xml = (unpack(body) or b"").lstrip()[:1] == b"<"
            kept: Literal["xml", "json"] = "xml" if xml else "json"
            return _from_columns(event_id, columns, kept, source, meta, received_at)
        event = Event.from_json(data)
        if original is not None:  # an older inbox's event: its document from the body
            event.raw, event.operation = original.raw, original.operation
        return event

    def _decode(
        self,
        receipt_id: int,
        body: bytes | None,
        headers: bytes | str | Mapping[str, str],
        source: Any,
        meta: bytes | str | Mapping[str, Any],
        received_at: datetime | float,
    ) -> dict[str, Event]:
        if body is None:  # dropped by retention
            return {}
        found = self._decoded.get(receipt_id)
        if found is None:
            found = self._decoded[receipt_id] = decode(body, headers, source, meta, received_at)
        return found


def decode(
    body: bytes,
    headers: bytes | str | Mapping[str, str],
    source: Any,
    meta: bytes | str | Mapping[str, Any],
    received_at: datetime | float,
) -> dict[str, Event]:
    """The events of a stored body by id, as they were when it was stored."""
    try:
        events = parse_callback(
            unpack(body) or b"",
            _mapping(headers),
            source=source,
            source_meta=_mapping(meta),
            received_at=as_datetime(received_at),
            limits=_STORED_BODY_LIMITS,
        )
    except PayloadError:
        return {}
    found: dict[str, Event] = {}
    for event in events:
        found.setdefault(event.id, event)
        # PostgreSQL's text columns hold a NUL as U+FFFD (postgres.text): found by that too.
        found.setdefault(event.id.replace("\x00", "\ufffd"), event)
    return found


def materialize(rows: Sequence[Sequence[Any]]) -> list[tuple[bytes, str, int]]:
    """(data, event id, receipt id) for events of `EVENT_COLUMNS` rows whose receipts'
    bodies retention is about to drop: the JSON their rows keep from then on."""
    documents = Documents()
    return [(event_data(documents.event(row)), row[0], row[2]) for row in rows]


def _from_columns(
    event_id: str,
    columns: list[Any],
    format: Literal["xml", "json"],
    source: Any,
    meta: bytes | str | Mapping[str, Any],
    received_at: datetime | float,
) -> Event:
    kind, event_name, job_id, tag, state, bucket, key = columns
    return Event(
        id=event_id, kind=kind, event_name=event_name, job_id=job_id, tag=tag, state=state,
        code=None, message=None, queue_id=None,
        input=ObjectRef(bucket, None, key) if key is not None else None,
        outputs=[], user_data=None, job_level=None, template_id=None, template_name=None,
        workflow=None, tasks=[], moderation=None, created_at=None, started_at=None,
        finished_at=None, format=format, source=source, source_meta=dict(_mapping(meta)),
        received_at=as_datetime(received_at), operation=None, raw={},
    )  # fmt: skip


def _mapping(value: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    return orjson.loads(value) if isinstance(value, (bytes, str)) else value


def as_datetime(value: datetime | float) -> datetime:
    """A stored time: SQLite keeps seconds since the epoch, PostgreSQL a timestamptz."""
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(value, timezone.utc)
