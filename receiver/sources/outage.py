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

from receiver.failing import Failing

# The pause before taking more messages while the inbox cannot take them: doubling from
# the first to the last, with jitter, until a message is committed again.
FIRST_PAUSE_SECONDS = 0.5
LAST_PAUSE_SECONDS = 30.0
OUTAGE = "the inbox cannot take messages"


class Outage:
    def __init__(self, logger: Any, failing: str, back: str) -> None:
        """`failing`: what becomes of the messages meanwhile; `back`: that they are
        committed again."""
        self._logger = logger
        self._said_failing = failing
        self._back = back
        # Every message fails alike while the inbox is away, whatever its error's words.
        self._failing = Failing()
        self._pause = FIRST_PAUSE_SECONDS

    def failed(self, error: BaseException) -> None:
        """A message not kept because the inbox cannot take it now (`IntakeUnavailable`)."""
        if self._failing.news(OUTAGE):
            self._logger.warning(self._said_failing, error=str(error))

    def committed(self) -> None:
        """A message committed: an outage under way is over."""
        failed = self._failing.over()
        if failed is not None:
            self._logger.info(self._back, failed_messages=failed)
            self._pause = FIRST_PAUSE_SECONDS

    def pause(self) -> float:
        """Seconds to wait before taking more messages: 0 unless an outage is under way,
        then longer each time it is asked (with jitter), up to LAST_PAUSE_SECONDS."""
        if self._failing.error is None:
            return 0.0
        pause = self._pause
        self._pause = min(pause * 2, LAST_PAUSE_SECONDS)
        return jitter(pause)


def jitter(delay: float) -> float:
    """Between half and all of `delay`: consumers that failed together spread out."""
    return random.uniform(delay / 2, delay)
