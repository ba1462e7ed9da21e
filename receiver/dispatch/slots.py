"""Handler slots: each configured handler with what dispatch knows of it (its places in
use, whether it has started, why not), and the set of them the dispatch loop runs.

A handler starts in the background, so that one slow to connect holds back neither the
others nor the receiver; one that cannot start is tried again with a growing back-off,
its error (secrets masked) shown by /readyz, while its runs wait in the inbox. A config
reload swaps handlers between two cycles of the loop, never while it claims: a handler
whose config did not change keeps running as it is; one removed or changed finishes its
running attempts before it is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
from prometheus_client import Counter, Gauge, Histogram

import handlers as handler_api
from handlers import AnyHandler, BatchCall, Call
from receiver import rates
from receiver.config import HandlerConfig
from receiver.dispatch.deadline import timeout
from receiver.failing import Failing
from receiver.inbox import Claim
from receiver.metrics import Metrics
from receiver.rates import RateLimit

logger = structlog.get_logger("ci_receiver.dispatch")

# The longest wait before a handler that cannot start is tried again.
START_RETRY_MAX_SECONDS = 60.0


@dataclass(slots=True)
class Slot:
    """A configured handler and what the dispatcher knows of it."""

    name: str
    handler: AnyHandler
    config: HandlerConfig
    # How the dispatcher calls it, and whether it takes a `Context` (read once, here);
    # a batch handler's `handle_batch`.
    call: Call = field(init=False)
    takes_context: bool = field(init=False)
    batch: BatchCall | None = field(init=False)
    batch_size: int = field(init=False)
    batch_wait: float = field(init=False)
    # A batch handler's batch being gathered (it holds one of the places), and since when
    # (monotonic).
    filling: list[Claim] = field(default_factory=list)
    filling_since: float | None = None
    # Its rate limits (`rate`, else its type's `default_rate`), and until when (monotonic)
    # it is out of turns.
    limits: list[RateLimit] = field(init=False)
    held_until: float = 0.0
    holding: bool = False  # out of turns at the last asking (logged once)
    running: int = 0
    started: bool = False
    start_error: str | None = None
    start_failures: int = 0
    # A start failing alike at every retry (a wrong password) is said once.
    start_failing: Failing = field(default_factory=Failing)
    next_start_at: float = 0.0
    # Whether the inbox may hold due runs of this handler: claiming is skipped otherwise.
    maybe_due: bool = True
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    starting: asyncio.Task[None] | None = None
    # The slot of the same name a reload replaced (or took out), while its attempts
    # finish, and so on back through every generation still finishing: their attempts
    # count toward this one's concurrency, which a handler may rely on (one at a time).
    predecessor: Slot | None = None

    def __post_init__(self) -> None:
        self.call = handler_api.calling(self.handler)
        self.takes_context = handler_api.takes_context(self.handler)
        self.batch = handler_api.batch_call(self.handler)
        # The config's keys where given, else the handler's own defaults, else the config's.
        own, given = handler_api.batching(self.handler), self.config.model_fields_set
        self.batch_size = (
            own.size if own.size and "batch_size" not in given else self.config.batch_size
        )
        self.batch_wait = (
            own.wait
            if own.wait is not None and "batch_wait" not in given
            else self.config.batch_wait
        )
        self.limits = rates.limits(self.config.rate, getattr(self.handler, "default_rate", ()))

    @property
    def free(self) -> int:
        if not self.started:
            return 0
        before, older = 0, self.predecessor
        while older is not None:
            before += older.running
            older = older.predecessor
        return self.config.concurrency - self.running - before

    @property
    def can_claim(self) -> bool:
        """Whether a claim could start a run now: a free place, or room in the batch
        being gathered."""
        if self.filling_since is not None:
            return True
        return self.free > 0 and (not self.limits or time.monotonic() >= self.held_until)

    @property
    def status(self) -> str:
        """`started`, `starting` or `not started: <its error>`."""
        if self.started:
            return "started"
        if self.start_error is None:
            return "starting"
        return f"not started: {self.start_error}"


class SlotMetrics:
    """A handler's metric series, looked up once rather than on every attempt, and what
    its log has said of its failures (a peer down fails every event's attempt alike)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.outcomes: dict[str, Counter] = {
            outcome: metrics.attempts.labels(name, outcome)
            for outcome in ("done", "retry", "dead", "released", "forged")
        }
        self.seconds: Histogram = metrics.handler_seconds.labels(name)
        self.running: Gauge = metrics.running.labels(name)
        self.up: Gauge = metrics.handler_up.labels(name)
        self.failing = Failing()


def unmasked(text: str) -> str:
    """The mask of a dispatcher whose handlers hold no secrets (tests)."""
    return text


def _unchanged(current: dict[str, Slot], slots: list[Slot]) -> set[str]:
    """The names of `slots` configured as the running handlers of that name are."""
    return {s.name for s in slots if s.name in current and current[s.name].config == s.config}


async def drain(tasks: set[asyncio.Task[None]], seconds: float) -> None:
    """Give running attempts `seconds` to end; cancel the rest, which hand their runs back
    uncounted."""
    _, unfinished = await asyncio.wait(tasks, timeout=seconds)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)


async def _close(slot: Slot) -> None:
    if slot.started:
        try:
            await handler_api.close(slot.handler)
        except Exception:
            logger.exception("handler did not close cleanly", handler=slot.name)


class HandlerSlots:
    """The handlers the dispatcher runs, by name, with their metric series."""

    def __init__(
        self,
        slots: list[Slot],
        metrics: Metrics,
        *,
        drain_timeout: float,
        wake: Callable[[], None],
        mask: Callable[[str], str],
    ) -> None:
        self.by_name = {slot.name: slot for slot in slots}
        self.metrics = {slot.name: SlotMetrics(metrics, slot.name) for slot in slots}
        self._all_metrics = metrics
        self._drain_timeout = drain_timeout
        # Called when a start ends, either way: the loop has something new to look at.
        self._wake = wake
        # What takes secrets (passwords in URLs, tokens) out of a handler's start error
        # before it is logged or shown by /readyz.
        self._mask = mask
        # Handlers a reload brings, applied by the loop; those it took out, finishing
        # what they had begun.
        self._replacement: tuple[list[Slot], Callable[[str], str]] | None = None
        self._retiring: dict[asyncio.Task[None], Slot] = {}

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.by_name.values())

    def get(self, name: str) -> Slot | None:
        return self.by_name.get(name)

    # --- start-up ----------------------------------------------------------------------

    def start_waiting(self) -> None:
        """Start, in the background, each handler not started whose back-off has passed."""
        now = time.time()
        for slot in self:
            if not slot.started and slot.starting is None and slot.next_start_at <= now:
                slot.starting = asyncio.create_task(self._start(slot))

    def seconds_to_next_start(self) -> list[float]:
        """For each handler waiting out its start's back-off: how long it still waits."""
        now = time.time()
        return [
            slot.next_start_at - now for slot in self if not slot.started and slot.starting is None
        ]

    async def _start(self, slot: Slot) -> None:
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
            slot.start_failing.say_failed(
                logger, "error", "handler cannot start; its events wait in the inbox", error,
                handler=slot.name, error=error, retry_in=delay,
            )  # fmt: skip
            self.metrics[slot.name].up.set(0)
        else:
            if slot.start_failures:
                logger.info("handler started", handler=slot.name, after=slot.start_failures)
            slot.started, slot.start_error = True, None
            slot.maybe_due = True
            self.metrics[slot.name].up.set(1)
        finally:
            slot.starting = None
            self._wake()

    # --- a config reload ---------------------------------------------------------------

    def replace(self, slots: list[Slot], mask: Callable[[str], str]) -> list[str]:
        """Run these handlers once `apply_replacement` is called. Returns what changes,
        for the log: `+name` added, `~name` changed, `-name` removed."""
        self._replacement = (slots, mask)
        kept = _unchanged(self.by_name, slots)
        changes = [f"+{s.name}" for s in slots if s.name not in self.by_name]
        changes += [f"~{s.name}" for s in slots if s.name in self.by_name and s.name not in kept]
        wanted = {slot.name for slot in slots}
        return changes + [f"-{name}" for name in self.by_name if name not in wanted]

    def retiring(self) -> set[str]:
        """The names of the running handlers a reload waiting to be applied takes out or
        changes (none when no reload waits)."""
        if self._replacement is None:
            return set()
        return set(self.by_name) - _unchanged(self.by_name, self._replacement[0])

    def apply_replacement(self) -> set[str]:
        """Make the change `replace` asked for, if any: the handlers new or changed take
        their places, those removed or changed retire. Returns the names no handler runs
        any more."""
        if self._replacement is None:
            return set()
        (slots, self._mask), self._replacement = self._replacement, None
        current = self.by_name
        kept = _unchanged(current, slots)
        self.by_name = {s.name: current[s.name] if s.name in kept else s for s in slots}
        for name in self.by_name.keys() - kept:
            self.metrics[name] = SlotMetrics(self._all_metrics, name)
            # The generation it replaces, or, for a name taken out and added again, the
            # last one still finishing.
            self.by_name[name].predecessor = current.get(name) or self._finishing(name)
        retired = [slot for name, slot in current.items() if name not in kept]
        for slot in retired:
            task = asyncio.create_task(self._retire(slot), name=f"retire {slot.name}")
            self._retiring[task] = slot
            task.add_done_callback(self._retiring.pop)
        for slot in self:
            slot.maybe_due = True
        return {slot.name for slot in retired} - self.by_name.keys()

    async def _retire(self, slot: Slot) -> None:
        """A handler a reload took out: its running attempts end and record as usual
        (within `drain_timeout`); then it is closed. Its runs not yet claimed stay in the
        inbox."""
        if slot.starting is not None:
            slot.starting.cancel()
            await asyncio.gather(slot.starting, return_exceptions=True)
        if slot.tasks:
            await drain(set(slot.tasks), self._drain_timeout)
        await _close(slot)
        # Out of the line of generations: a newer one no longer waits for its places.
        for newer in [*self, *self._retiring.values()]:
            if newer.predecessor is slot:
                newer.predecessor = slot.predecessor
        # The name's series go with its last generation: attempts of another still
        # finishing record into them.
        if self.by_name.get(slot.name) is None and self._finishing(slot.name, but=slot) is None:
            self._forget_series(slot.name)
        logger.info("handler stopped (config reloaded)", handler=slot.name)

    def _finishing(self, name: str, but: Slot | None = None) -> Slot | None:
        """The latest slot of this name a reload took out whose attempts still finish
        (other than `but`)."""
        found = None
        for slot in self._retiring.values():
            if slot.name == name and slot is not but:
                found = slot
        return found

    def _forget_series(self, name: str) -> None:
        """A removed handler's gauges go, rather than go on saying it is down. Under
        `serve --workers` (prometheus_client's multiprocess mode) a series cannot be
        removed: NaN there, which `handler_up == 0` and `min by` pass over."""
        metrics = self.metrics.pop(name)
        metrics.up.set(math.nan)
        for gauge in (self._all_metrics.running, self._all_metrics.handler_up):
            with contextlib.suppress(KeyError), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not implemented" in that mode
                gauge.remove(name)

    # --- shutdown ----------------------------------------------------------------------

    async def stop(self) -> None:
        """Once nothing claims any more: cancel the starts under way, give the running
        attempts (those of retiring handlers too) `drain_timeout` to end, close all."""
        starting = [slot.starting for slot in self if slot.starting]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        slots = [*self, *self._retiring.values()]
        tasks = {task for slot in slots for task in slot.tasks}
        if tasks:
            logger.info("draining handler attempts", running=len(tasks))
            await drain(tasks, self._drain_timeout)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for slot in self:
            await _close(slot)
