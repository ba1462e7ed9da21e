"""Saying a dependency's failures once: a peer down fails every call alike, and a line
per call would bury the one that matters. The first failure is news, the same failure
again is not (it goes at debug, still counted where it is counted), a different one is
news again, and the first success ends it, which is news too."""

from __future__ import annotations

from typing import Any

# What the line of a failure that is news says of the ones after it.
REPEATS = "the same failure again is logged at debug until a call succeeds"


class Failing:
    __slots__ = ("error", "failed")

    def __init__(self) -> None:
        self.error: str | None = None  # the failure said last, while failing
        self.failed = 0  # calls failed since the failing began

    def news(self, error: str) -> bool:
        """A call failed with `error`: whether to say so (not said just before)."""
        self.failed += 1
        if error == self.error:
            return False
        self.error = error
        return True

    def over(self) -> int | None:
        """A call succeeded: how many had failed since the failing began, if it had."""
        if self.error is None:
            return None
        failed, self.error, self.failed = self.failed, None, 0
        return failed

    def say_failed(self, logger: Any, level: str, event: str, kind: str, **fields: Any) -> None:
        """A call failed, `kind` telling its failure (what makes it news or a repeat):
        logged at `level` when news, at debug when the same again."""
        if self.news(kind):
            getattr(logger, level)(event, **fields, repeats=REPEATS)
        else:
            logger.debug(event, **fields)

    def say_succeeded(self, logger: Any, event: str) -> None:
        """A call succeeded: said at info, with how many failed meanwhile, if it ends a
        failing."""
        failed = self.over()
        if failed is not None:
            logger.info(event, failed_since=failed)
