"""The dedup key of an event: what makes two deliveries "the same callback"."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def dedup_id(kind: str, subject: str | None, *qualifiers: str | None, entry: Any) -> str:
    """`kind:subject:qualifier...`, e.g. `job:j6842765cf84611ecb8546d80f2baf56f:Success`.

    The subject is what CI names the work by (JobId, RunId, trace_id); the qualifiers
    are what changes when CI reports on it again (State, verdict). Without a subject the
    key falls back to a digest of the entry, so that exact redeliveries still collapse.
    """
    if subject is None:
        digest = hashlib.sha256(orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)).hexdigest()
        subject = f"~{digest[:32]}"
    return ":".join([kind, subject, *(q or "-" for q in qualifiers)])
