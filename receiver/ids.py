"""Unique ids without a system call each: a random prefix per process and a counter.

Request ids and lease tokens are made on every callback and every claim; `uuid4()`
reads the system's randomness each time, which costs a system call and lets other
threads take the GIL.
"""

from __future__ import annotations

import itertools
import secrets

_PREFIX = secrets.token_hex(6)
_COUNTER = itertools.count(1)


def new_id() -> str:
    """A 12-hex-digit process prefix and a hex counter, e.g. `3f9a1c07b2e4-1a`."""
    return f"{_PREFIX}-{next(_COUNTER):x}"


def process_of(made: str) -> str:
    """The prefix of the process that made an id of `new_id` (a lease's holder)."""
    return made.partition("-")[0]
