"""A filter of `events list`, `replay` and `/api/events` finds exactly the stored events a
route with the same key and value sends to its handlers: for every value CI sends, in
its own spelling and in other cases, on both inboxes."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from itertools import count

import pytest

from receiver.callback import vocabulary
from receiver.callback.event import Event, Moderation, ObjectRef
from receiver.config import RouteConfig, RouteMatch
from receiver.inbox import EventFilter, Receipt
from receiver.ingest.routing import Router
from receiver.testing import sample

HEADERS = {"content-type": "application/json"}
ids = count()


def receipt(received: datetime) -> Receipt:
    """The HTTP callback the test's events arrived in: its body is not looked at."""
    return Receipt(b"{}", "http", received, "r", HEADERS, {})


def varied(event: Event, **fields: object) -> Event:
    return dataclasses.replace(event, id=f"event-{next(ids)}", **fields)


def every_value() -> list[Event]:
    """An event for each value CI sends in each matched field, and some it does not fill."""
    job, workflow = sample("transcode"), sample("workflow")
    moderation = sample("moderation-detail")
    events = [varied(job, tag=tag) for tag in vocabulary.TAGS]
    events += [varied(job, state=state) for state in vocabulary.STATES]
    events += [varied(workflow, event_name=name, tag=None) for name in vocabulary.EVENT_NAMES]
    events += [varied(workflow, state=state) for state in vocabulary.STATES]
    assert moderation.moderation is not None
    for result in (*vocabulary.VERDICTS, None):
        verdict = dataclasses.replace(moderation.moderation, result=result)
        events.append(varied(moderation, moderation=verdict))
    events.append(varied(moderation, moderation=None))
    events += [
        varied(job, input=ObjectRef("media-1250000000", "ap-chongqing", "videos/a.mp4")),
        varied(job, input=ObjectRef("Media-1250000000", "ap-chongqing", "videos/b.MP4")),
        varied(job, input=ObjectRef("media-1250000000", "ap-chongqing", "audio/c.mp3")),
        varied(job, input=ObjectRef("media-1250000000", "ap-chongqing", "videos/[a].mp4")),
        varied(job, input=None, tag=None, event_name=None),
    ]
    return events


def spellings(value: str) -> list[str]:
    return sorted({value, value.lower(), value.upper()})


CASES = [
    *(("kind", value) for kind in vocabulary.KINDS for value in spellings(kind)),
    *(("state", value) for state in vocabulary.STATES for value in spellings(state)),
    *(("verdict", v) for verdict in vocabulary.VERDICTS.values() for v in spellings(verdict)),
    *(("event_name", v) for name in vocabulary.EVENT_NAMES for v in spellings(name)),
    *(("tag", v) for tag in (*vocabulary.TAGS, *vocabulary.EVENT_NAMES) for v in spellings(tag)),
    ("tag", "NotATagCiSends"),
    ("bucket", "media-1250000000"),
    ("bucket", "MEDIA-1250000000"),
    ("key", "videos/*.mp4"),
    ("key", "videos/*"),
    ("key", "*.MP4"),
    ("key", "videos/[ab].mp4"),  # brackets are themselves, in routes as in filters
    ("key", "videos/?.mp4"),
    ("key", "videos/[a].mp4"),
]
# The values of CASES that no event of `every_value` has.
NEVER_STORED = {"NotATagCiSends", "MEDIA-1250000000", "videos/[ab].mp4"}


async def test_each_filter_finds_what_the_route_of_its_key_and_value_sends(inbox):
    events = every_value()
    received = datetime.now(timezone.utc)
    for event in events:
        await inbox.store(receipt(received), [(event, [])])
    for name, value in CASES:
        router = Router([RouteConfig(match=RouteMatch(**{name: value}), handlers=["h"])], ["h"])
        routed = {event.id for event in events if router.handlers_for(event)}
        found = await inbox.events(EventFilter(**{name: value}), limit=len(events) + 1)
        assert {summary.id for summary in found} == routed, (name, value)
        # Every value CI sends is in some stored event: no case agrees by finding nothing.
        assert bool(routed) != (value in NEVER_STORED), (name, value)


@pytest.mark.parametrize("name", ["kind", "state", "verdict"])
async def test_a_value_ci_never_sends_is_refused_by_filter_and_route_alike(inbox, name):
    with pytest.raises(ValueError, match="'done' can never match: CI sends"):
        RouteMatch(**{name: "done"})
    with pytest.raises(ValueError, match="'done' can never match: CI sends"):
        await inbox.events(EventFilter(**{name: "done"}), limit=1)


async def test_verdicts_are_stored_and_counted(inbox):
    received = datetime.now(timezone.utc)
    base = sample("moderation-detail")
    assert base.moderation is not None
    for result in (1, 1, 2, 0, None):
        moderation: Moderation = dataclasses.replace(base.moderation, result=result)
        event = varied(base, moderation=moderation)
        await inbox.store(receipt(received), [(event, [])])
    await inbox.store(receipt(received), [(varied(sample("transcode")), [])])
    listed = await inbox.events(EventFilter(kind="moderation"), limit=10)
    assert sorted(str(summary.verdict) for summary in listed) == [
        "None", "normal", "suspected", "violation", "violation",
    ]  # fmt: skip
    since = received.replace(microsecond=0)
    counts = await inbox.counts(since)
    assert counts.verdicts == {"violation": 2, "suspected": 1, "normal": 1}
    traffic = await inbox.traffic(since)
    assert traffic.verdicts == counts.verdicts
