"""Events for handler tests, made from the callback fixtures."""

from __future__ import annotations

import dataclasses

from receiver import parse_callback
from receiver.callback.event import Event
from tests.support.callbacks import load


def event(name: str = "smartcover.xml", index: int = 0) -> Event:
    return parse_callback(load(name))[index]


def at_state(base: Event, state: str) -> Event:
    """The same job at another state, with the id the normalizer would give it."""
    return dataclasses.replace(base, state=state, id=f"job:{base.job_id}:{state}")


def comparable(event: Event) -> dict:
    """The event without what depends on the channel it came by: the same callback over
    HTTP, CMQ or TDMQ compares equal."""
    data = event.to_dict()
    for channel_specific in ("received_at", "source", "source_meta"):
        del data[channel_specific]
    return data
