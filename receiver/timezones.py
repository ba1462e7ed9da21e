"""Times shown to people: in a configured time zone (`log.timezone`, a handler's
`timezone`), UTC by default. Stored and machine-read times stay UTC / ISO 8601."""

from __future__ import annotations

from datetime import datetime, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def parse_timezone(name: str) -> tzinfo:
    """An IANA zone (`Asia/Shanghai`) or `UTC`; a ValueError naming the problem otherwise."""
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as Asia/Shanghai, or UTC"
        ) from None


def check_timezone(name: str) -> str:
    """A pydantic validator: the name is a zone `parse_timezone` knows."""
    parse_timezone(name)
    return name


def shown(value: datetime | None, zone: tzinfo = timezone.utc) -> str:
    """`2026-11-22 15:29:48 CST`: for people, in `zone`; "" for no time."""
    if value is None:
        return ""
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")
