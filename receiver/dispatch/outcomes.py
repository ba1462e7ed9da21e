"""What an attempt's result becomes: done; retried after a back-off (exponential, with
jitter, or the delay the handler asked for); dead-lettered after the last attempt or on
`Fail`; forged, when verification found the event contradicted. Each outcome is counted
and logged, and recorded in the inbox under the run's lease.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog

from handlers import BatchContext, Context, Fail, Retry
from receiver.config import HandlerConfig
from receiver.dispatch.deadline import timeout
from receiver.dispatch.slots import Slot, SlotMetrics
from receiver.inbox import Claim, InboxUnavailable, Outcome, RunQueue

logger = structlog.get_logger("ci_receiver.dispatch")
# What a handler logs through its context (`ctx.log`).
handler_logger: structlog.stdlib.BoundLogger = structlog.get_logger("ci_receiver.handler")

# Said when an attempt's outcome cannot be recorded (the inbox failing).
LOST_OUTCOME = "cannot record the attempt; the run is retried when its lease ends"
# The longest a handler may ask to wait before its next attempt (Retry(after=...)).
MAX_RETRY_AFTER_SECONDS = 7 * 24 * 3600.0
# Doublings of the back-off made at most: far past any cap, short of a float's overflow
# (the verification step retries without end: its 1025th attempt overflowed, and the
# attempt's task died holding its place).
MAX_DOUBLINGS = 1000


class Forged(Exception):
    """Raised by the verification step (receiver/ci/verify.py): CI's API contradicts the
    event, whose runs were forged; its own run ends `forged`, with this reason."""


@dataclass(frozen=True, slots=True)
class Result:
    """How an attempt ended, as the inbox records it."""

    outcome: Outcome
    error: str | None = None
    retry_at: datetime | None = None  # with `retry`: when the run is due again
    # What failed, as a trace shows it: the exception's class (`Retry`, `TimeoutError`).
    error_type: str | None = None


DONE = Result("done")
# A run handed back by a shutdown that ran out of time: not counted as an attempt.
INTERRUPTED = Result("released", "interrupted by shutdown")


def backoff(config: HandlerConfig, attempt: int) -> float:
    """Seconds before retry number `attempt` (1-based): doubling, capped, equal jitter."""
    doubled = config.backoff_initial * 2.0 ** min(attempt - 1, MAX_DOUBLINGS)
    ceiling = min(config.backoff_max, doubled)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _sane_delay(after: float | None) -> float | None:
    """A handler's own delay, if it is a usable number of seconds; else the backoff's."""
    if after is None or not isinstance(after, (int, float)) or not math.isfinite(after):
        return None
    return min(max(after, 0.0), MAX_RETRY_AFTER_SECONDS)


def _retry(
    config: HandlerConfig, attempt: int, error: str, delay: float | None, error_type: str
) -> Result:
    """A failed attempt: retried after `delay` (the back-off's when None), or dead-lettered
    when it was the last."""
    if attempt >= config.max_attempts:
        return Result("dead", error, error_type=error_type)
    delay = backoff(config, attempt) if delay is None else delay
    retry_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
    return Result("retry", error, retry_at, error_type)


def context(slot: Slot, claim: Claim, deadline: float, inspector_url: str | None) -> Context:
    """The attempt as its handler may see it."""
    number = claim.attempts + 1
    return Context(
        handler=slot.name,
        attempt=number,
        max_attempts=slot.config.max_attempts,
        deadline=deadline,
        log=handler_logger.bind(handler=slot.name, event_id=claim.event.id, attempt=number),
        inspector_url=inspector_url,
    )


async def attempt(
    slot: Slot, claim: Claim, metrics: SlotMetrics, inspector_url: str | None = None
) -> Result:
    """Run the slot's handler on the claimed event, within its timeout (`inspector_url`:
    what its context links to)."""
    config = slot.config
    began = time.perf_counter()
    try:
        async with timeout(config.timeout):
            # Made only for a handler that takes it.
            deadline = time.monotonic() + config.timeout
            ctx = context(slot, claim, deadline, inspector_url) if slot.takes_context else None
            await slot.call(claim.event, ctx)
    except (Exception, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and _stopping():
            raise
        return failed(config, claim, exc)
    finally:
        metrics.seconds.observe(time.perf_counter() - began)
    return DONE


async def attempt_batch(
    slot: Slot, claims: list[Claim], metrics: SlotMetrics, inspector_url: str | None = None
) -> list[Result]:
    """Run the slot's batch handler on the claimed events, within its timeout: each run's
    result, in the order of `claims`."""
    assert slot.batch is not None
    config = slot.config
    began = time.perf_counter()
    try:
        async with timeout(config.timeout):
            deadline = time.monotonic() + config.timeout
            ctx = BatchContext(
                handler=slot.name,
                deadline=deadline,
                log=handler_logger.bind(handler=slot.name, batch=len(claims)),
                runs={
                    claim.event.id: context(slot, claim, deadline, inspector_url)
                    for claim in claims
                },
                inspector_url=inspector_url,
            )
            not_done = await slot.batch([claim.event for claim in claims], ctx) or {}
    except (Exception, asyncio.CancelledError) as exc:
        if isinstance(exc, asyncio.CancelledError) and _stopping():
            raise
        # The whole batch failed: each run as it would alone, but all due again at the
        # same time, to be retried as one batch again.
        number = max(claim.attempts for claim in claims) + 1
        together = _sane_delay(exc.after) if isinstance(exc, Retry) else None
        together = backoff(config, number) if together is None else together
        return [failed(config, claim, exc, together) for claim in claims]
    finally:
        metrics.seconds.observe(time.perf_counter() - began)
    return [
        DONE if (why := not_done.get(claim.event.id)) is None else failed(config, claim, why)
        for claim in claims
    ]


def _stopping() -> bool:
    """Whether a CancelledError out of a handler is the attempt being stopped (shutdown
    out of time: its task cancelled), rather than the handler's own failure: one it
    raised, or a future it shared with a task that was cancelled."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def failed(
    config: HandlerConfig, claim: Claim, exc: BaseException, delay: float | None = None
) -> Result:
    """What a handler's exception makes of the run's attempt; retried after `delay`
    seconds if given, else as `Retry(after=)` asks, else after the back-off's."""
    error_type = type(exc).__qualname__
    if isinstance(exc, Fail):
        return Result("dead", f"Fail: {exc}", error_type=error_type)
    if isinstance(exc, Forged):
        return Result("forged", f"forged: {exc}", error_type=error_type)
    if isinstance(exc, Retry):
        error, delay = f"Retry: {exc}", _sane_delay(exc.after) if delay is None else delay
    elif isinstance(exc, asyncio.TimeoutError):
        error = f"timed out after {config.timeout:g}s"
    else:
        error = f"{type(exc).__name__}: {exc}{_raised_at(exc)}"
    return _retry(config, claim.attempts + 1, error, delay, error_type)


def _raised_at(exc: BaseException) -> str:
    """Where an exception no handler meant to raise came from (its innermost frame): a
    bug's line, in the log, `events show` and the inspector alike."""
    last = exc.__traceback__
    if last is None:
        return ""
    while last.tb_next is not None:  # (not traceback.extract_tb: it reads every frame's line)
        last = last.tb_next
    code = last.tb_frame.f_code
    where = "/".join(Path(code.co_filename).parts[-2:])
    return f" (raised at {where}:{last.tb_lineno} in {code.co_name})"


def internal_error(config: HandlerConfig, claim: Claim, exc: Exception) -> Result:
    """A bug of ours around the handler: still counted, and tried again later."""
    delay = backoff(config, claim.attempts + 1)
    retry_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
    error = f"internal error: {type(exc).__name__}: {exc}"
    return Result("retry", error, retry_at, "internal_error")


async def record(
    inbox: RunQueue, claim: Claim, result: Result, started_at: datetime, metrics: SlotMetrics
) -> None:
    """Count and log the outcome, and record it in the inbox if the lease still holds."""
    metrics.outcomes[result.outcome].inc()
    number = claim.attempts + 1
    if result.outcome == "done":
        logger.debug("handled", attempt=number)
        metrics.failing.say_succeeded(logger, "handler succeeds again")
    elif result.outcome == "retry":
        metrics.failing.say_failed(
            logger, "warning", "handler failed; will retry", result.error or "",
            attempt=number, error=result.error, retry_at=result.retry_at,
        )  # fmt: skip
    elif result.outcome == "dead":
        logger.error("handler gave up; dead-lettered", attempt=number, error=result.error)
    try:
        recorded = await inbox.finish(
            claim,
            result.outcome,
            started_at=started_at,
            error=result.error,
            retry_at=result.retry_at,
        )
    except InboxUnavailable as exc:  # the database away: no traceback to read
        logger.warning(LOST_OUTCOME, error=str(exc))
        return
    except Exception:
        logger.exception(LOST_OUTCOME)
        return
    if not recorded:
        logger.warning("the run's lease was lost to another process; its outcome is dropped")
