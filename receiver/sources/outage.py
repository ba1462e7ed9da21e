"""What a consumer says while the inbox cannot take its messages.

The inbox logs once that its database went away and once that it came back, naming it
(receiver/inbox/reach.py). A consumer meanwhile fails every message it takes, which it
leaves to come back (nacked, not deleted): it says so in one line as the first one
fails, and in one more as the first one is committed again, however many fail between;
never a traceback per message.

Meanwhile it takes messages more and more slowly (`pause`): each one taken is failed and
comes back, so taking the whole backlog again and again would only spin, and on CMQ
every taking counts toward the queue's own dead-letter policy (`maxReceiveCount`).
"""

from __future__ import annotations

import random
from typing import Any

# The pause before taking more messages while the inbox cannot take them: doubling from
# the first to the last, with jitter, until a message is committed again.
FIRST_PAUSE_SECONDS = 0.5
LAST_PAUSE_SECONDS = 30.0


class Outage:
    def __init__(self, logger: Any, failing: str, back: str) -> None:
        """`failing`: what becomes of the messages meanwhile; `back`: that they are
        committed again."""
        self._logger = logger
        self._failing = failing
        self._back = back
        self._failed = 0  # messages failed since the outage began; 0: none under way
        self._pause = FIRST_PAUSE_SECONDS

    def failed(self, error: BaseException) -> None:
        """A message not kept because the inbox cannot take it now (`IntakeUnavailable`)."""
        if not self._failed:
            self._logger.warning(self._failing, error=str(error))
        self._failed += 1

    def committed(self) -> None:
        """A message committed: an outage under way is over."""
        if self._failed:
            self._logger.info(self._back, failed_messages=self._failed)
            self._failed = 0
            self._pause = FIRST_PAUSE_SECONDS

    def pause(self) -> float:
        """Seconds to wait before taking more messages: 0 unless an outage is under way,
        then longer each time it is asked (with jitter), up to LAST_PAUSE_SECONDS."""
        if not self._failed:
            return 0.0
        pause = self._pause
        self._pause = min(pause * 2, LAST_PAUSE_SECONDS)
        return jitter(pause)


def jitter(delay: float) -> float:
    """Between half and all of `delay`: consumers that failed together spread out."""
    return random.uniform(delay / 2, delay)
