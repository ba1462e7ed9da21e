"""Read fields of a decoded callback the same way whether it came as XML or JSON.

XML gives `None` for an empty element and a scalar for an element that appears once;
JSON leaves empty elements out, writes numbers as strings (or, in moderation
callbacks, as numbers) and makes a list only of what is repeated. These helpers
flatten those differences and never raise on a value of the wrong type: a field
that does not make sense reads as missing, and the raw document keeps what was sent.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

from receiver.model import ObjectRef
from receiver.payload import PayloadError

# CI writes its times in Beijing time; a time without an offset is read as that.
CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")


def text(value: Any) -> str | None:
    """A scalar as a string; `None` for empty, missing or non-scalar values."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


# An id field (JobId, RunId, trace_id, QueueId, Tag, State, EventName...): CI's are
# printable ASCII words of up to ~40 characters (`j6842765cf84611ecb8546d80f2baf56f`,
# `SmartCover`). These name events, rows, files and log lines, so anything else (a NUL,
# a line break, a JobId of 900 KB) is refused rather than carried along.
MAX_ID_LENGTH = 128
_ID = re.compile(rf"[!-~]{{1,{MAX_ID_LENGTH}}}")  # printable ASCII, no blank
_NOT_ID_CHARACTER = re.compile(r"[^!-~]")


def identifier(value: Any, name: str) -> str | None:
    """An id field read as `text()` reads it; `PayloadError("bad_id")` naming the field
    when it is longer than MAX_ID_LENGTH or holds anything but printable ASCII."""
    found = text(value)
    if found is None or _ID.fullmatch(found):
        return found
    if len(found) > MAX_ID_LENGTH:
        problem = f"{len(found)} characters long (at most {MAX_ID_LENGTH})"
    else:
        bad = _NOT_ID_CHARACTER.search(found)
        assert bad is not None
        problem = (
            f"it holds {bad.group()!r} at position {bad.start()} (only printable ASCII"
            " without blanks)"
        )
    raise PayloadError("bad_id", f"{name} is not an id: {problem}")


def integer(value: Any) -> int | None:
    """An int from an int or a string of digits (JSON callbacks quote their numbers)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= 20:
        try:
            return int(value)
        except ValueError:
            return None
    return None


def mapping(value: Any) -> dict[str, Any]:
    """A container as a dict; anything else as an empty one."""
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    """A repeated element as a list: a single value becomes a one-item list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def mappings(value: Any) -> list[dict[str, Any]]:
    """A repeated container as a list of dicts, leaving out anything that is not one."""
    return [v for v in items(value) if isinstance(v, dict)]


def timestamp(value: Any) -> datetime | None:
    """Parse CI's times: `2022-06-30T15:29:42+0800`, `2022-08-09 14:54:17+0800`.

    `-` (a job that has not started), empty and unreadable values give `None`.
    """
    if not isinstance(value, str) or len(value) < 10:
        return None
    if sys.version_info < (3, 11) and value[-5:-4] in ("+", "-") and value[-4:].isdigit():
        value = f"{value[:-2]}:{value[-2:]}"  # 3.10's fromisoformat wants +08:00
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=CHINA_STANDARD_TIME)


def object_ref(bucket: Any, region: Any, key: Any) -> ObjectRef | None:
    """An `ObjectRef`, or `None` when there is no key."""
    key = text(key)
    if key is None:
        return None
    return ObjectRef(bucket=text(bucket), region=text(region), key=key)


def object_ref_from_url(url: Any, default_bucket: Any = None) -> ObjectRef | None:
    """Read bucket, region and key off a COS URL (`https://b-1250000000.cos.ap-x.myqcloud.com/k`)."""
    url = text(url)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = parts.hostname or ""
    key = unquote(parts.path.lstrip("/"))
    labels = host.split(".")
    if len(labels) >= 4 and labels[1] in ("cos", "ci") and host.endswith(".myqcloud.com") and key:
        return ObjectRef(bucket=labels[0], region=labels[2], key=key)
    if key and default_bucket is not None:
        return ObjectRef(bucket=text(default_bucket), region=None, key=key)
    return None


def entry_document(
    document: dict[str, Any], entry: dict[str, Any], entries: list[dict[str, Any]]
) -> dict[str, Any]:
    """The document an event keeps as `raw`: the whole callback, except that of one with
    several JobsDetail entries each event keeps only its own entry (a hundred-job callback
    must not be stored a hundred times)."""
    if len(entries) == 1:
        return document
    return {**document, "JobsDetail": entry}
