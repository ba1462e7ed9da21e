"""What a consumer says while the inbox cannot take its messages.

The inbox logs once that its database went away and once that it came back, naming it
(receiver/inbox/reach.py). A consumer meanwhile fails every message it takes, which it
leaves to come back (nacked, not deleted): it says so in one line as the first one
fails, and in one more as the first one is committed again, however many fail between;
never a traceback per message.
"""

from __future__ import annotations

from typing import Any


class Outage:
    def __init__(self, logger: Any, failing: str, back: str) -> None:
        """`failing`: what becomes of the messages meanwhile; `back`: that they are
        committed again."""
        self._logger = logger
        self._failing = failing
        self._back = back
        self._failed = 0  # messages failed since the outage began; 0: none under way

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
