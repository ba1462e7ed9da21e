"""Events for handler tests, made from the callback fixtures."""

from __future__ import annotations

import dataclasses

from receiver import parse_callback
from receiver.model import Event
from tests.callbacks import load


def event(name: str = "smartcover.xml", index: int = 0) -> Event:
    return parse_callback(load(name))[index]


def at_state(base: Event, state: str) -> Event:
    """The same job at another state, with the id the normalizer would give it."""
    return dataclasses.replace(base, state=state, id=f"job:{base.job_id}:{state}")
