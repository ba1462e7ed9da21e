"""Run handlers on stored events: claim due runs, attempt them, record the outcome.

Each (event, handler) pair is its own run: a failing handler is retried on its own,
with exponential backoff and jitter, and dead-lettered after its last attempt, while
the other handlers of the event are not run again. Runs are leased, so a process that
dies mid-attempt leaves them to be picked up again once the lease expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import structlog
from prometheus_client import Counter, Gauge, Histogram

import handlers as handler_api
from handlers import Fail, Handler, Retry
from receiver.callback.event import Event
from receiver.config import HandlerConfig
from receiver.inbox import Claim, InboxUnavailable, Outcome, RunQueue
from receiver.inbox.writer import LOCK_TIMEOUT
from receiver.metrics import Metrics

logger = structlog.get_logger("ci_receiver.dispatch")

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover
    from async_timeout import timeout

# Extra lease time beyond the handler's timeout before another process may take a run:
# room for recording the outcome, even behind another process's write lock.
LEASE_GRACE_SECONDS = LOCK_TIMEOUT + 5.0
START_RETRY_MAX_SECONDS = 60.0
# Events just stored are kept in memory for their claims, up to this many. Few enough
# that the collector's full passes stay short: once dispatch falls behind, what is held
# lives long, and each full pass walks all of it (10,000 events: 60-120 ms pauses of the
# loop, the p99 of every callback; see the README's HTTP benchmark).
FRESH_EVENTS = 2_000
# Wake-ups from other processes (PostgreSQL NOTIFY: one per stored callback anywhere)
# within this many seconds make one claim, not one each; the process that stored an
# event claims it at once meanwhile, from memory.
REMOTE_WAKE_SECONDS = 0.05


@dataclass(slots=True)
class Slot:
    """A configured handler and what the dispatcher knows of it."""

    name: str
    handler: Handler
    config: HandlerConfig
    running: int = 0
    started: bool = False
    start_error: str | None = None
    start_failures: int = 0
    next_start_at: float = 0.0
    # Whether the inbox may hold due runs of this handler: claiming is skipped otherwise.
    maybe_due: bool = True
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    starting: asyncio.Task[None] | None = None
    # The slot of the same name a reload replaced, while its attempts finish: they count
    # toward this one's concurrency, which a handler may rely on (one at a time).
    predecessor: Slot | None = None

    @property
    def free(self) -> int:
        if not self.started:
            return 0
        before = self.predecessor.running if self.predecessor is not None else 0
        return self.config.concurrency - self.running - before


class _SlotMetrics:
    """A handler's metric series, looked up once rather than on every attempt."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.outcomes: dict[str, Counter] = {
            outcome: metrics.attempts.labels(name, outcome)
            for outcome in ("done", "retry", "dead", "released", "forged")
        }
        self.seconds: Histogram = metrics.handler_seconds.labels(name)
        self.running: Gauge = metrics.running.labels(name)
        self.up: Gauge = metrics.handler_up.labels(name)


class Forged(Exception):
    """Raised by the verification step (receiver/ci/verify.py): CI's API contradicts the
    event, whose runs were forged; its own run ends `forged`, with this reason."""


# Said when an attempt's outcome cannot be recorded (the inbox failing).
LOST_OUTCOME = "cannot record the attempt; the run is retried when its lease ends"
# The longest a handler may ask to wait before its next attempt (Retry(after=...)).
MAX_RETRY_AFTER_SECONDS = 7 * 24 * 3600.0


def _sane_delay(after: float | None) -> float | None:
    """A handler's own delay, if it is a usable number of seconds; else the backoff's."""
    if after is None or not isinstance(after, (int, float)) or not math.isfinite(after):
        return None
    return min(max(after, 0.0), MAX_RETRY_AFTER_SECONDS)


def _status(slot: Slot) -> str:
    if slot.started:
        return "started"
    if slot.start_error is None:
        return "starting"
    return f"not started: {slot.start_error}"


def _unmasked(text: str) -> str:
    return text


def _unchanged(current: dict[str, Slot], slots: list[Slot]) -> set[str]:
    """The names of `slots` configured as the running handlers of that name are."""
    return {s.name for s in slots if s.name in current and current[s.name].config == s.config}


async def _close(slot: Slot) -> None:
    if slot.started:
        try:
            await handler_api.close(slot.handler)
        except Exception:
            logger.exception("handler did not close cleanly", handler=slot.name)


def backoff(config: HandlerConfig, attempt: int) -> float:
    """Seconds before retry number `attempt` (1-based): doubling, capped, equal jitter."""
    ceiling = min(config.backoff_max, config.backoff_initial * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Dispatcher:
    def __init__(
        self,
        inbox: RunQueue,
        slots: list[Slot],
        metrics: Metrics,
        *,
        poll_interval: float = 1.0,
        drain_timeout: float = 10.0,
        mask: Callable[[str], str] = _unmasked,
    ) -> None:
        self._inbox = inbox
        # What takes secrets (passwords in URLs, tokens) out of a handler's start error
        # before it is logged or shown by /readyz.
        self._mask = mask
        self._slots = {slot.name: slot for slot in slots}
        self._all_metrics = metrics
        self._metrics = {slot.name: _SlotMetrics(metrics, slot.name) for slot in slots}
        # Handlers a reload brings, applied by the loop; those it took out, finishing
        # what they had begun.
        self._replacement: tuple[list[Slot], Callable[[str], str]] | None = None
        self._retiring: dict[asyncio.Task[None], Slot] = {}
        # Events just stored, and the handlers yet to claim them: what the claims of those
        # runs would otherwise read back from the inbox and decode.
        self._fresh: dict[str, Event] = {}
        self._unclaimed: dict[str, set[str]] = {}
        self._poll_interval = poll_interval
        self._drain_timeout = drain_timeout
        self._wake = asyncio.Event()
        self._remote_wake: asyncio.TimerHandle | None = None
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def handler_status(self) -> dict[str, str]:
        """Each handler's `started`, `starting` or `not started: <its error>`."""
        return {name: _status(slot) for name, slot in self._slots.items()}

    def handler_started(self) -> dict[str, bool]:
        return {name: slot.started for name, slot in self._slots.items()}

    def wake(self) -> None:
        """Work may be due for any handler (a requeue, a poll): look now."""
        for slot in self._slots.values():
            slot.maybe_due = True
        self._wake.set()

    def wake_soon(self) -> None:
        """Another process made work due (a stored callback, a replay): look within
        `REMOTE_WAKE_SECONDS`, once for all the wake-ups that arrive until then."""
        if self._remote_wake is None and not self._stopping:
            self._remote_wake = asyncio.get_running_loop().call_later(
                REMOTE_WAKE_SECONDS, self._woken_remotely
            )

    def _woken_remotely(self) -> None:
        self._remote_wake = None
        self.wake()

    def notify(self, stored: list[tuple[Event, list[str]]]) -> None:
        """These events were just stored with pending runs of these handlers."""
        due = False
        for event, names in stored:
            # Kept only for handlers that run now: one that cannot start must not pin
            # events in memory (its claims read them back when it runs).
            running = {name for name in names if name in self._slots and self._slots[name].started}
            if running:
                self._fresh[event.id] = event
                self._unclaimed[event.id] = running
            for name in names:
                if name in self._slots:
                    self._slots[name].maybe_due = due = True
        while len(self._fresh) > FRESH_EVENTS:
            oldest = next(iter(self._fresh))
            del self._fresh[oldest], self._unclaimed[oldest]
        # Events routed nowhere (or to no handler of this process) give the loop nothing
        # to do: woken, it would only ask the inbox again when the next run is due.
        if due:
            self._wake.set()

    async def start(self) -> None:
        """Start the dispatch loop; each handler starts in the background, so that one
        slow to connect holds back neither the others nor the receiver."""
        self._start_waiting_handlers()
        # Runs that other processes make due (their callbacks, a replay) wake this one too.
        self._inbox.watch(self.wake_soon)
        self._loop_task = asyncio.create_task(self._loop(), name="dispatcher")

    async def stop(self) -> None:
        """Stop claiming; give running attempts `drain_timeout` to end, then release them."""
        self._stopping = True
        if self._remote_wake is not None:
            self._remote_wake.cancel()
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        starting = [slot.starting for slot in self._slots.values() if slot.starting]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        # The attempts of handlers a reload is taking out drain with the others, within
        # the same `drain_timeout`.
        slots = [*self._slots.values(), *self._retiring.values()]
        tasks = {task for slot in slots for task in slot.tasks}
        if tasks:
            logger.info("draining handler attempts", running=len(tasks))
            await self._drain(tasks)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for slot in self._slots.values():
            await _close(slot)

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        """Give running attempts `drain_timeout` to end; cancel the rest, which hand
        their runs back uncounted (`_attempt`)."""
        _, unfinished = await asyncio.wait(tasks, timeout=self._drain_timeout)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    # --- a config reload ---------------------------------------------------------------

    def replace_handlers(self, slots: list[Slot], mask: Callable[[str], str]) -> list[str]:
        """Run these handlers from now on (a config reload). A handler whose config did
        not change keeps running as it is; one removed or changed stops claiming and
        finishes its running attempts (within `drain_timeout`) before it is closed, while
        a new or changed one starts as at start-up. The loop makes the change between two
        cycles, never while it claims. Returns what changes, for the log: `+name` added,
        `~name` changed, `-name` removed."""
        self._replacement = (slots, mask)
        self._wake.set()
        kept = _unchanged(self._slots, slots)
        changes = [f"+{s.name}" for s in slots if s.name not in self._slots]
        changes += [f"~{s.name}" for s in slots if s.name in self._slots and s.name not in kept]
        wanted = {slot.name for slot in slots}
        return changes + [f"-{name}" for name in self._slots if name not in wanted]

    def _apply_replacement(self) -> None:
        if self._replacement is None:
            return
        (slots, self._mask), self._replacement = self._replacement, None
        current = self._slots
        kept = _unchanged(current, slots)
        self._slots = {s.name: current[s.name] if s.name in kept else s for s in slots}
        for name in self._slots.keys() - kept:
            self._metrics[name] = _SlotMetrics(self._all_metrics, name)
            self._slots[name].predecessor = current.get(name)
        retired = [slot for name, slot in current.items() if name not in kept]
        for slot in retired:
            task = asyncio.create_task(self._retire(slot), name=f"retire {slot.name}")
            self._retiring[task] = slot
            task.add_done_callback(self._retiring.pop)
        gone = {slot.name for slot in retired} - self._slots.keys()
        for event_id in list(self._unclaimed):
            self._unclaimed[event_id] -= gone
            if not self._unclaimed[event_id]:
                del self._fresh[event_id], self._unclaimed[event_id]
        for slot in self._slots.values():
            slot.maybe_due = True

    async def _retire(self, slot: Slot) -> None:
        """A handler a reload took out: its running attempts end and record as usual;
        then it is closed. Its runs not yet claimed stay in the inbox."""
        if slot.starting is not None:
            slot.starting.cancel()
            await asyncio.gather(slot.starting, return_exceptions=True)
        if slot.tasks:
            await self._drain(set(slot.tasks))
        await _close(slot)
        successor = self._slots.get(slot.name)
        if successor is None:  # not replaced by a new one of the same name
            self._forget_series(slot.name)
        elif successor.predecessor is slot:
            successor.predecessor = None
        logger.info("handler stopped (config reloaded)", handler=slot.name)

    def _forget_series(self, name: str) -> None:
        """A removed handler's gauges go, rather than go on saying it is down. Under
        `serve --workers` (prometheus_client's multiprocess mode) a series cannot be
        removed: NaN there, which `handler_up == 0` and `min by` pass over."""
        metrics = self._metrics.pop(name)
        metrics.up.set(math.nan)
        for gauge in (self._all_metrics.running, self._all_metrics.handler_up):
            with contextlib.suppress(KeyError), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not implemented" in that mode
                gauge.remove(name)

    # --- the loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self._apply_replacement()
                self._start_waiting_handlers()
                await self._claim_and_spawn()
                if any(slot.maybe_due and slot.free > 0 for slot in self._slots.values()):
                    continue
                delay = await self._seconds_to_next_due()
            except InboxUnavailable:
                # The database away: the inbox logs that once as it goes and once as it
                # comes back, and counts the failures; the loop only tries again.
                delay = self._poll_interval
            except Exception:
                logger.exception("dispatch cycle failed; trying again shortly")
                delay = self._poll_interval
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            # Slept until a retry came due or the poll interval passed: look everywhere.
            for slot in self._slots.values():
                slot.maybe_due = True

    async def _claim_and_spawn(self) -> None:
        for slot in self._slots.values():
            if self._stopping or not slot.maybe_due or slot.free <= 0:
                continue
            free = slot.free
            lease = slot.config.timeout + LEASE_GRACE_SECONDS
            claims = await self._inbox.claim(slot.name, free, lease, known=self._fresh)
            # A full claim may have left more behind; a short one emptied what was due.
            slot.maybe_due = len(claims) == free
            for claim in claims:
                self._forget(claim.event.id, slot.name)
                slot.running += 1
                self._metrics[slot.name].running.inc()
                task = asyncio.create_task(self._attempt(slot, claim))
                slot.tasks.add(task)
                task.add_done_callback(slot.tasks.discard)

    def _forget(self, event_id: str, handler: str) -> None:
        waiting = self._unclaimed.get(event_id)
        if waiting is not None:
            waiting.discard(handler)
            if not waiting:
                del self._fresh[event_id], self._unclaimed[event_id]

    async def _seconds_to_next_due(self) -> float:
        ready = [name for name, slot in self._slots.items() if slot.free > 0]
        due = await self._inbox.next_due(ready)
        waits = [self._poll_interval]
        if due is not None:
            waits.append((due - datetime.now(timezone.utc)).total_seconds())
        waits += [
            slot.next_start_at - time.time()
            for slot in self._slots.values()
            if not slot.started and slot.starting is None
        ]
        return max(0.0, min(waits))

    # --- handler lifecycle -------------------------------------------------------------

    def _start_waiting_handlers(self) -> None:
        now = time.time()
        for slot in self._slots.values():
            if not slot.started and slot.starting is None and slot.next_start_at <= now:
                slot.starting = asyncio.create_task(self._start_handler(slot))

    async def _start_handler(self, slot: Slot) -> None:
        try:
            async with timeout(slot.config.timeout):
                await handler_api.start(slot.handler)
        except Exception as exc:
            slot.start_failures += 1
            delay = min(START_RETRY_MAX_SECONDS, 2 ** (slot.start_failures - 1))
            slot.next_start_at = time.time() + delay
            error = self._mask(
                f"no start within {slot.config.timeout:g}s"
                if isinstance(exc, asyncio.TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            slot.start_error = error
            logger.error(
                "handler cannot start; its events wait in the inbox",
                handler=slot.name,
                error=error,
                retry_in=delay,
            )
            self._metrics[slot.name].up.set(0)
        else:
            if slot.start_failures:
                logger.info("handler started", handler=slot.name, after=slot.start_failures)
            slot.started, slot.start_error = True, None
            slot.maybe_due = True
            self._metrics[slot.name].up.set(1)
        finally:
            slot.starting = None
            self._wake.set()

    # --- one attempt -------------------------------------------------------------------

    async def _attempt(self, slot: Slot, claim: Claim) -> None:
        started_at = datetime.now(timezone.utc)
        # This task runs in a copy of the dispatcher's context: what is bound here goes
        # with it, so there is nothing to unbind.
        structlog.contextvars.bind_contextvars(
            request_id=claim.request_id, event_id=claim.event.id, handler=slot.name
        )
        try:
            outcome, error, retry_at = await self._run(slot, claim)
        except asyncio.CancelledError:
            # Shutdown ran out of time: hand the run back without counting it.
            self._free(slot)
            await asyncio.shield(
                self._record(slot, claim, "released", started_at, "interrupted by shutdown", None)
            )
            raise
        except Exception as exc:  # a bug of ours: still count it and try later
            logger.exception("attempt failed outside the handler")
            outcome, error = "retry", f"internal error: {type(exc).__name__}: {exc}"
            delay = backoff(slot.config, claim.attempts + 1)
            retry_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        # The handler is done with the run: its place is free now, not once the outcome
        # is committed, so that the next claim goes in the same commit as this outcome
        # rather than the one after (the run stays leased until its outcome is in).
        self._free(slot)
        await self._record(slot, claim, outcome, started_at, error, retry_at)

    def _free(self, slot: Slot) -> None:
        slot.running -= 1
        self._metrics[slot.name].running.dec()
        # Its last claim was full (more may be waiting for a place), or it is a handler a
        # reload replaced (its successor may be waiting for the place).
        if slot.maybe_due or self._slots.get(slot.name) is not slot:
            self._wake.set()

    async def _run(self, slot: Slot, claim: Claim) -> tuple[Outcome, str | None, datetime | None]:
        config = slot.config
        attempt = claim.attempts + 1
        delay: float | None = None
        began = time.perf_counter()
        try:
            async with timeout(config.timeout):
                await slot.handler(claim.event)
        except Fail as exc:
            return "dead", f"Fail: {exc}", None
        except Forged as exc:
            return "forged", f"forged: {exc}", None
        except Retry as exc:
            error, delay = f"Retry: {exc}", _sane_delay(exc.after)
        except asyncio.TimeoutError:
            error = f"timed out after {config.timeout:g}s"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            return "done", None, None
        finally:
            self._metrics[slot.name].seconds.observe(time.perf_counter() - began)
        if attempt >= config.max_attempts:
            return "dead", error, None
        delay = backoff(config, attempt) if delay is None else delay
        return "retry", error, datetime.now(timezone.utc) + timedelta(seconds=delay)

    async def _record(
        self,
        slot: Slot,
        claim: Claim,
        outcome: Outcome,
        started_at: datetime,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        self._metrics[slot.name].outcomes[outcome].inc()
        attempt = claim.attempts + 1
        if outcome == "done":
            logger.debug("handled", attempt=attempt)
        elif outcome == "retry":
            logger.warning(
                "handler failed; will retry", attempt=attempt, error=error, retry_at=retry_at
            )
        elif outcome == "dead":
            logger.error("handler gave up; dead-lettered", attempt=attempt, error=error)
        try:
            recorded = await self._inbox.finish(
                claim, outcome, started_at=started_at, error=error, retry_at=retry_at
            )
        except InboxUnavailable as exc:  # the database away: no traceback to read
            logger.warning(LOST_OUTCOME, error=str(exc))
            return
        except Exception:
            logger.exception(LOST_OUTCOME)
            return
        if not recorded:
            logger.warning("the run's lease was lost to another process; its outcome is dropped")
