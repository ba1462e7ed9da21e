"""Read fields of a decoded callback the same way whether it came as XML or JSON.

XML gives `None` for an empty element and a scalar for an element that appears once;
JSON leaves empty elements out, writes numbers as strings (or, in moderation
callbacks, as numbers) and makes a list only of what is repeated. These helpers
flatten those differences. CI writes a field as a string or, in JSON, a number; one
written as anything else (true/false, a list: an XML element repeated, an object: an
element with attributes or children) is read by the kind of field it is:

- an identifying field (`identifying`: JobId, State, Tag, EventName, RunId, and a
  Simple verdict's trace_id and event, its JobId and EventName) is refused,
  `PayloadError("bad_id")` naming it: a callback must not be stored without its id or
  state;
- a field that only informs (`reference`: TemplateId, QueueId, WorkflowId;
  `informative`: Code, Message, TemplateName; `job_level`; `timestamp`; `user_data`)
  reads as missing (a UserData as its JSON text) and its name goes into a list of
  warnings, which the caller counts: reading stays pure, and the raw document keeps
  what was sent.

Any other field that does not make sense reads as missing, silently.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from receiver.callback.decode import PayloadError
from receiver.callback.event import ObjectRef

# CI writes its times in Beijing time; a time without an offset is read as that.
CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")


def text(value: Any) -> str | None:
    """A scalar as a string; `None` for empty, missing or non-scalar values."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _scalar(value: Any) -> bool:
    """Whether a present value is written as CI writes a field: a string or a finite
    number (JSON; `text` reads it as its decimal text)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int))


# An id field (JobId, RunId, trace_id, QueueId, Tag, State, EventName...): CI's are
# printable ASCII words of up to ~40 characters (`j6842765cf84611ecb8546d80f2baf56f`,
# `SmartCover`). These name events, rows, files and log lines, so anything else (a NUL,
# a line break, a JobId of 900 KB) is refused rather than carried along.
MAX_ID_LENGTH = 128
_ID = re.compile(rf"[!-~]{{1,{MAX_ID_LENGTH}}}")  # printable ASCII, no blank
_NOT_ID_CHARACTER = re.compile(r"[^!-~]")


def identifying(value: Any, name: str) -> str | None:
    """A field that identifies the callback's job, workflow run or verdict (JobId, State,
    Tag, EventName, RunId; trace_id, event): an id (`_id`), `None` when missing or empty.
    One of the wrong type (true/false, a list, an object, NaN) is refused,
    `PayloadError("bad_id")` naming it, as one that is no id: stored, it would be a
    callback without id or state."""
    if type(value) is str:  # as CI writes it, and first: this runs for every field read
        return _id(value or None, name)
    if value is None:
        return None
    if not _scalar(value):
        raise PayloadError(
            "bad_id", f"{name} is not an id: it is {_kind(value)}, not a string or a number"
        )
    return _id(text(value), name)


def reference(value: Any, name: str, warnings: list[str]) -> str | None:
    """An id that only informs (TemplateId, QueueId, WorkflowId): an id (`_id`), `None`
    when missing or empty. One of the wrong type reads as missing and its name goes into
    `warnings`: the callback is stored, and a callback refused would be lost."""
    if type(value) is str:
        return _id(value or None, name)
    if value is not None and not _scalar(value):
        warnings.append(name)
        return None
    return _id(text(value), name)


def _id(found: str | None, name: str) -> str | None:
    """`found` if it is an id: printable ASCII without blanks, at most MAX_ID_LENGTH
    characters. Else `PayloadError("bad_id")` naming the field."""
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


def _kind(value: Any) -> str:
    """What a decoded value is, in words that fit both XML and JSON."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, float):
        return f"a number ({value!r})"
    if isinstance(value, list):
        return f"a list of {len(value)} (an element repeated)"
    if isinstance(value, dict):
        return "an object (an element with attributes or children)"
    return type(value).__name__


def informative(value: Any, name: str, warnings: list[str]) -> str | None:
    """A text field that only informs (Code, Message, TemplateName): as `text` reads it.
    One of the wrong type reads as missing and its name goes into `warnings`."""
    if type(value) is str:
        return value or None
    if value is not None and not _scalar(value):
        warnings.append(name)
        return None
    return text(value)


def job_level(value: Any, warnings: list[str]) -> int | None:
    """`Operation.JobLevel` as an int (`integer`), `None` when missing or empty. One that
    is no integer reads as missing and `JobLevel` goes into `warnings`."""
    level = integer(value)
    if level is None and value not in (None, ""):
        warnings.append("JobLevel")
    return level


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


def timestamp(value: Any, name: str, warnings: list[str]) -> datetime | None:
    """Parse CI's times: `2022-06-30T15:29:42+0800`, `2022-08-09 14:54:17+0800`.

    `-` (a job that has not started), empty and missing give `None`. So does any other
    value, which is no time: then `name` goes into `warnings` (the raw document keeps
    the value as sent; the event's time field stays a datetime or null).
    """
    if value is None or value in ("", "-"):
        return None
    parsed = _time(value) if isinstance(value, str) and len(value) >= 10 else None
    if parsed is None:
        warnings.append(name)
    return parsed


def _time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=CHINA_STANDARD_TIME)


def user_data(value: Any, warnings: list[str]) -> str | None:
    """`Operation.UserData`: the string a job was submitted with, `None` if empty. CI
    sends a string; anything else (an object, a list, a number) is kept as its JSON
    text rather than dropped, and `UserData` goes into `warnings`."""
    if value is None or isinstance(value, str):
        return value or None
    warnings.append("UserData")
    return orjson.dumps(value).decode()


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
