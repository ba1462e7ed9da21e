"""The dispatch loop: claim due runs, hand each to its handler, record the outcome.

Each (event, handler) pair is its own run: a failing handler is retried on its own,
with exponential backoff and jitter, and dead-lettered after its last attempt, while
the other handlers of the event are not run again. Runs are leased, so a process that
dies mid-attempt leaves them to be picked up again once the lease expires.

A run stored by this process is started at once if its handler has a free place (and
neither takes batches nor has a rate limit): the place is held while the callback is
stored (`reserve`), the run is stored leased to this process, and once committed its
attempt starts (`stored`), with no claim. For the other runs the loop claims for each
handler as many as it has free places (a batch handler: a batch's worth, gathered for
its `batch_wait`; a rate limited one keeps those it has turns for, receiver/rates.py),
then sleeps until woken: by an event just stored here, by a wake-up from another process
(`wake_soon`), by an attempt ending or a handler starting, or at the latest when the
next retry comes due, a batch has gathered long enough or `poll_interval` passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol

import structlog

from receiver import rates, tracing
from receiver.callback.event import Event
from receiver.config import DispatchConfig
from receiver.dispatch import outcomes
from receiver.dispatch.fresh import FreshEvents
from receiver.dispatch.slots import HandlerSlots, Slot, SlotMetrics, unmasked
from receiver.ids import new_id
from receiver.inbox import Claim, InboxUnavailable, KeptState, Lease, Leases, RunQueue
from receiver.metrics import Metrics

logger = structlog.get_logger("ci_receiver.dispatch")

# Seconds a run stays leased beyond its handler's timeout: `[dispatch] lease_grace`.
LEASE_GRACE_SECONDS: float = DispatchConfig.model_fields["lease_grace"].default
# Wake-ups from other processes (PostgreSQL NOTIFY: one per stored callback anywhere)
# within this many seconds make one claim, not one each; the process that stored an
# event claims it at once meanwhile, from memory.
REMOTE_WAKE_SECONDS = 0.05
# How long a store given up on by its caller may still take to commit (a group commit
# under way): the runs it may have stored leased here are handed back after that.
STORE_END_SECONDS = 1.0
# The inbox is asked when its next run comes due at most this often: under load the loop
# sleeps between every batch of claims, and each asking costs a statement that reads every
# pending run of the handlers (those leased included). In between, its last answer stands,
# and the retries this process records itself bring it forward.
DUE_CHECK_SECONDS = 0.1
# The kept state holding a rate limited handler's recent starts (receiver/rates.py).
RATE_KEY = "rate:"


class DispatchInbox(RunQueue, KeptState, Protocol):
    """What the dispatcher needs of the inbox: its runs, and a kept value (rate limits)."""


class Dispatcher:
    def __init__(
        self,
        inbox: DispatchInbox,
        slots: list[Slot],
        metrics: Metrics,
        *,
        poll_interval: float = 1.0,
        drain_timeout: float = 10.0,
        lease_grace: float = LEASE_GRACE_SECONDS,
        mask: Callable[[str], str] = unmasked,
        inspector_url: str | None = None,
    ) -> None:
        self._inbox = inbox
        # Where handlers' contexts point people (`Context.inspector_url`): the [admin]
        # section is read at start only.
        self._inspector_url = inspector_url
        self._wake = asyncio.Event()
        self._handlers = HandlerSlots(
            slots,
            metrics,
            drain_timeout=drain_timeout,
            wake=self._wake.set,
            mask=mask,
        )
        self._fresh = FreshEvents()
        self._drain_timeout = drain_timeout
        self._poll_interval = poll_interval
        self._lease_grace = lease_grace
        self._remote_wake: asyncio.TimerHandle | None = None
        # When the next run comes due (monotonic; None: none known); when the inbox was
        # last asked (`DUE_CHECK_SECONDS`) and which handlers had started then; the
        # earliest retry this process recorded since.
        self._due: float | None = None
        self._due_checked_at = -math.inf
        self._asked: set[str] = set()
        self._own_due: float | None = None
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        # Places held for runs being stored (`reserve`), by lease token: the slot of each
        # (event id, handler). `stop` waits for them to be taken or given back.
        self._reserved: dict[str, dict[tuple[str, str], Slot]] = {}
        self._none_reserved = asyncio.Event()
        self._none_reserved.set()
        # Hand-backs of runs leased here that will not be started here (`_release`).
        self._releasing: set[asyncio.Task[None]] = set()
        # Set once the handlers are closed: nothing may start any more.
        self._closed = False
        # What attempts run in (set by `start`): the dispatcher's own context, not that
        # of the request whose callback was stored (`stored`), whatever it had bound.
        self._context = contextvars.Context()

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def handler_status(self) -> dict[str, str]:
        """Each handler's `started`, `starting` or `not started: <its error>`."""
        return {slot.name: slot.status for slot in self._handlers}

    def handler_started(self) -> dict[str, bool]:
        return {slot.name: slot.started for slot in self._handlers}

    # --- wake-ups ----------------------------------------------------------------------

    def wake(self) -> None:
        """Work may be due for any handler (a requeue, a poll): look now."""
        for slot in self._handlers:
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

    # --- runs stored here ---------------------------------------------------------------

    def reserve(self, runs: list[tuple[Event, list[str]]]) -> Leases:
        """Leases for the runs of a callback about to be stored that a free place can start
        at once, the place held meanwhile; `stored` takes or gives back every one."""
        if self._stopping:
            return {}
        token = new_id()
        places: dict[tuple[str, str], Slot] = {}
        leases: dict[tuple[str, str], Lease] = {}
        for event, names in runs:
            for name in names:
                slot = self._handlers.get(name)
                key = (event.id, name)
                # A batch handler's runs are claimed, to be gathered into batches; a rate
                # limited one's too, each claim taking its turns first.
                if slot is None or slot.free <= 0 or slot.batch or slot.limits or key in places:
                    continue
                slot.running += 1
                places[key] = slot
                leases[key] = Lease(token, slot.config.timeout + self._lease_grace)
        if places:
            self._reserved[token] = places
            self._none_reserved.clear()
        return leases

    def stored(self, request_id: str, runs: list[tuple[Event, list[str]]], leases: Leases) -> None:
        """A callback was stored, with these new events' pending runs (none: it was not):
        the runs leased to this process start now, their places taken; the others are
        claimed as usual; the places of runs not stored are given back."""
        if not leases:
            self.notify(runs)
            return
        token = next(iter(leases.values())).token
        places = self._reserved.pop(token, {})
        unleased: list[tuple[Event, list[str]]] = []
        # Stored leased here, but not to be started by this process: handed back, those
        # runs only (others under the same lease are starting).
        unstarted: dict[tuple[str, str], Slot] = {}
        handed_back: list[Claim] = []
        for event, names in runs:
            rest, starting = [], []
            for name in names:
                slot = places.pop((event.id, name), None)
                if slot is None:
                    rest.append(name)
                elif self._handlers.get(name) is slot and not self._closed:
                    starting.append(slot)
                else:  # a reload replaced its handler meanwhile (or the handlers closed)
                    unstarted[(event.id, name)] = slot
                    handed_back.append(Claim(event, name, 0, token, request_id))
            # Each attempt has an event of its own: the event itself goes to the last one,
            # unless other handlers' claims here will read it (`FreshEvents.take`).
            kept = any((s := self._handlers.get(name)) and s.started for name in rest)
            for i, slot in enumerate(starting):
                own = event if i == len(starting) - 1 and not kept else event.copy()
                self._spawn(slot, Claim(own, slot.name, 0, token, request_id))
            if rest:
                unleased.append((event, rest))
        for slot in places.values():  # runs not stored
            self._give_back(slot)
        if unstarted:
            self._reserved[token] = unstarted
            self._hand_back(token, after=0.0, runs=handed_back)
        elif not self._reserved:
            self._none_reserved.set()
        if unleased:
            self.notify(unleased)

    def abandoned(self, leases: Leases) -> None:
        """A callback's store was given up on (its caller cancelled), whether or not it
        commits: the runs it may store leased here are handed back once it must have
        ended, their places meanwhile held."""
        if leases:
            self._hand_back(next(iter(leases.values())).token, after=STORE_END_SECONDS)

    def _hand_back(self, token: str, after: float, runs: list[Claim] | None = None) -> None:
        task = self._context.run(asyncio.create_task, self._release(token, after, runs))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, token: str, after: float, runs: list[Claim] | None) -> None:
        """Hand back, in `after` seconds, the runs leased under `token` that this process
        will not start: `runs`, or every one (a store given up on started none).
        Claimable at once (here or elsewhere), rather than once their lease ends. Their
        places are held until then (`stop` waits for them)."""
        try:
            await asyncio.sleep(after)
            if runs is None:
                released = await self._inbox.release(token)
            else:
                released = await self._inbox.release_claims(runs)
            if released:
                self.wake()
        except Exception as exc:  # the database away: they wait for their lease to end
            logger.warning("cannot hand back runs leased here", error=str(exc))
        finally:
            for slot in self._reserved.pop(token, {}).values():
                self._give_back(slot)
            if not self._reserved:
                self._none_reserved.set()

    def notify(self, stored: list[tuple[Event, list[str]]]) -> None:
        """These events were just stored with pending runs of these handlers."""
        due = False
        fresh: list[tuple[Event, set[str]]] = []
        for event, names in stored:
            slots = [slot for name in names if (slot := self._handlers.get(name)) is not None]
            # Kept only for handlers that run now: one that cannot start must not pin
            # events in memory (its claims read them back when it runs).
            fresh.append((event, {slot.name for slot in slots if slot.started}))
            for slot in slots:
                slot.maybe_due = due = True
        self._fresh.keep(fresh)
        # Events routed nowhere (or to no handler of this process) give the loop nothing
        # to do: woken, it would only ask the inbox again when the next run is due.
        if due:
            self._wake.set()

    # --- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the dispatch loop; each handler starts in the background."""
        self._context = contextvars.copy_context()
        self._handlers.start_waiting()
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
        # Batches being gathered are not waited for: they start now, and drain below.
        self._start_batches(waited=False)
        # Callbacks being stored with runs leased here: their attempts start (and drain
        # below) once the store ends, either way.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._none_reserved.wait(), self._drain_timeout)
        await self._handlers.stop()
        self._closed = True

    def replace_handlers(self, slots: list[Slot], mask: Callable[[str], str]) -> list[str]:
        """Run these handlers from now on (a config reload). A handler whose config did
        not change keeps running as it is; one removed or changed stops claiming and
        finishes its running attempts (within `drain_timeout`) before it is closed, while
        a new or changed one starts as at start-up. The loop makes the change between two
        cycles, never while it claims. Returns what changes, for the log: `+name` added,
        `~name` changed, `-name` removed."""
        changes = self._handlers.replace(slots, mask)
        self._wake.set()
        return changes

    # --- the loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            # Batches that have gathered long enough start, whatever the claims below do.
            self._start_batches(waited=True)
            try:
                # A handler a reload takes out or changes: its batch starts first.
                if retiring := self._handlers.retiring():
                    self._start_batches(waited=False, only=retiring)
                if gone := self._handlers.apply_replacement():
                    self._fresh.forget_handlers(gone)
                self._handlers.start_waiting()
                await self._claim_and_spawn()
                self._start_batches(waited=True)
                if any(slot.maybe_due and slot.can_claim for slot in self._handlers):
                    continue
                delay = await self._seconds_to_next_due()
            except InboxUnavailable:
                # The database away: the inbox logs that once as it goes and once as it
                # comes back, and counts the failures; the loop only tries again.
                delay = self._poll_interval
            except Exception:
                logger.exception("dispatch cycle failed; trying again shortly")
                delay = self._poll_interval
            # Or until a batch being gathered has waited its `batch_wait`.
            delay = min([delay, *self._seconds_to_batches()])
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                    continue
            # Slept until a retry came due or the poll interval passed: look everywhere.
            for slot in self._handlers:
                slot.maybe_due = True

    async def _claim_and_spawn(self) -> None:
        for slot in self._handlers:
            if self._stopping or not slot.maybe_due or not slot.can_claim:
                continue
            if slot.batch is not None:
                await self._claim_batch(slot)
                continue
            free = slot.free
            # The same on SQLite and PostgreSQL: the handler's own time, then room to
            # record the outcome before another process may take the run.
            lease = slot.config.timeout + self._lease_grace
            # The places are taken while the claim is made: callbacks stored meanwhile
            # (`reserve`) must not take them too.
            slot.running += free
            claims: list[Claim] = []
            try:
                known = self._fresh.for_handler(slot.name)
                claims = await self._inbox.claim(slot.name, free, lease, known=known)
            finally:
                slot.running -= free - len(claims)  # the loop itself: no wake-up needed
            # A full claim may have left more behind; a short one emptied what was due.
            slot.maybe_due = len(claims) == free
            if slot.limits and claims:
                claims = await self._within_rate(slot, claims)
            for claim in claims:
                self._fresh.claimed(claim.event.id, slot.name)
                self._spawn(slot, claim)

    async def _claim_batch(self, slot: Slot) -> None:
        """Gather due runs into the slot's batch, which holds one of its places from its
        first claim; a full one starts at once, and another is gathered while places are
        free and runs due."""
        # The batch's gathering, then the handler's own time, then room to record.
        lease = slot.batch_wait + slot.config.timeout + self._lease_grace
        while slot.maybe_due and not self._stopping:
            first = slot.filling_since is None
            if first:
                if slot.free <= 0:
                    return
                slot.running += 1  # the place of the batch about to be gathered
                slot.filling_since = time.monotonic()
            want = slot.batch_size - len(slot.filling)
            claims: list[Claim] = []
            try:
                known = self._fresh.for_handler(slot.name)
                claims = await self._inbox.claim(slot.name, want, lease, known=known)
                slot.maybe_due = len(claims) == want
            finally:
                self._gather(slot, claims)
            if len(slot.filling) < slot.batch_size:
                return
            self._start_batch(slot)

    def _gather(self, slot: Slot, claims: list[Claim]) -> None:
        """Add runs to the batch being gathered; no batch, its place given back, if it
        holds none."""
        for claim in claims:
            self._fresh.claimed(claim.event.id, slot.name)
        # A run whose lease ended while it was gathered (a long outage) may be claimed
        # again, here: the newer claim holds it.
        held = {claim.event.id: claim for claim in slot.filling}
        held.update((claim.event.id, claim) for claim in claims)
        slot.filling = list(held.values())
        if not slot.filling:
            slot.filling_since = None
            slot.running -= 1

    async def _within_rate(self, slot: Slot, claims: list[Claim]) -> list[Claim]:
        """Those of the claims the handler's rate lets start now; the others are handed
        back unattempted (their places freed) and the handler waits for its next turn.
        Turns are taken for runs claimed, never for runs that may be due: a process
        polling an idle handler holds no turn from the others."""
        granted = 0
        try:
            granted = (await self._take_turns(slot, len(claims))).granted
        finally:
            if surplus := claims[granted:]:
                slot.running -= len(surplus)
                slot.maybe_due = True
                await self._hand_back_claims(surplus)
        return claims[:granted]

    async def _batch_turn(self, slot: Slot, claims: list[Claim]) -> bool:
        """A rate limited batch's turn, taken as it starts (a batch is one attempt); with
        none, its runs are handed back unattempted and its place freed."""
        granted = 0
        try:
            granted = (await self._take_turns(slot, 1)).granted
        except Exception as exc:  # the database away: tried again after a poll
            logger.warning("cannot take a rate limit's turn", handler=slot.name, error=str(exc))
            slot.held_until = time.monotonic() + self._poll_interval
        if not granted:
            self._free(slot, len(claims))
            slot.maybe_due = True
            await self._hand_back_claims(claims)
        return bool(granted)

    async def _take_turns(self, slot: Slot, want: int) -> rates.Turns:
        """Up to `want` turns of a rate limited handler; out of them, it waits (no claim)
        until the next frees."""
        limits = slot.limits
        turns = await self._inbox.update_state(
            RATE_KEY + slot.name, lambda log, now: rates.take(log, now, want, limits)
        )
        if turns.granted < want:
            slot.held_until = time.monotonic() + turns.wait
            if not slot.holding:
                logger.info(
                    "handler at its rate limit; its runs wait in the inbox",
                    handler=slot.name,
                    rate=", ".join(map(str, limits)),
                    next_turn_in=round(turns.wait, 3),
                )
            slot.holding = True
        else:
            slot.holding = False
        return turns

    async def _hand_back_claims(self, claims: list[Claim]) -> None:
        try:
            await self._inbox.release_claims(claims)
        except Exception as exc:  # the database away: they wait for their lease to end
            logger.warning("cannot hand back runs held for a rate limit", error=str(exc))

    def _seconds_to_batches(self) -> list[float]:
        """For each batch being gathered: how long until it has waited `batch_wait`."""
        now = time.monotonic()
        return [
            max(0.0, slot.filling_since + slot.batch_wait - now)
            for slot in self._handlers
            if slot.filling_since is not None
        ]

    def _start_batches(self, *, waited: bool, only: set[str] | None = None) -> None:
        """Start the batches being gathered that have waited their `batch_wait`, or
        (`waited=False`: shutdown, a reload) all (of the handlers named `only`)."""
        now = time.monotonic()
        for slot in self._handlers:
            since = slot.filling_since
            if since is None or (only is not None and slot.name not in only):
                continue
            if not waited or now - since >= slot.batch_wait:
                self._start_batch(slot)

    def _start_batch(self, slot: Slot) -> None:
        claims, slot.filling, slot.filling_since = slot.filling, [], None
        self._handlers.metrics[slot.name].running.inc(len(claims))
        task = self._context.run(asyncio.create_task, self._attempt_batch(slot, claims))
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)

    def _spawn(self, slot: Slot, claim: Claim) -> None:
        """Start the attempt of a run claimed or leased, its place already taken."""
        self._handlers.metrics[slot.name].running.inc()
        # A task runs in a copy of the context it is made in.
        task = self._context.run(asyncio.create_task, self._attempt(slot, claim))
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)

    async def _seconds_to_next_due(self) -> float:
        now = time.monotonic()
        # A due time passed has been claimed since (or is held by another process): what
        # comes after it only the inbox knows.
        passed = self._due is not None and self._due <= now
        started = {slot.name for slot in self._handlers if slot.started}
        # A handler started since the inbox was asked: its runs were left out. (One that
        # was full then is left out too, its own retries aside, until the next asking.)
        if passed or now - self._due_checked_at >= DUE_CHECK_SECONDS or started - self._asked:
            self._due_checked_at, self._asked = now, started
            self._own_due = None
            ready = [slot.name for slot in self._handlers if slot.can_claim]
            due = await self._inbox.next_due(ready)
            self._due = self._own_due  # retries recorded while the inbox was asked
            if due is not None:
                answer = now + (due - datetime.now(timezone.utc)).total_seconds()
                self._due = answer if self._due is None else min(answer, self._due)
        waits = [self._poll_interval, *self._handlers.seconds_to_next_start()]
        waits += [
            slot.held_until - now
            for slot in self._handlers
            if slot.maybe_due and slot.held_until > now and slot.limits
        ]
        if self._due is not None:
            waits.append(self._due - now)
        return max(0.0, min(waits))

    def _due_by(self, retry_at: datetime) -> None:
        """A run of this process is due again at `retry_at`: wake for it then at the
        latest, whenever the inbox was last asked."""
        due = time.monotonic() + (retry_at - datetime.now(timezone.utc)).total_seconds()
        if self._own_due is None or due < self._own_due:
            self._own_due = due
        if self._due is None or due < self._due:
            self._due = due
            self._wake.set()  # the loop may be asleep until later

    # --- one attempt -------------------------------------------------------------------

    async def _attempt(self, slot: Slot, claim: Claim) -> None:
        started_at = datetime.now(timezone.utc)
        metrics = self._handlers.metrics[slot.name]
        # This task runs in a copy of the dispatcher's context: what is bound here goes
        # with it, so there is nothing to unbind.
        structlog.contextvars.bind_contextvars(
            request_id=claim.request_id, event_id=claim.event.id, handler=slot.name
        )
        span = tracing.attempting(slot.name, claim.event, claim.attempts + 1)
        try:
            result = await outcomes.attempt(slot, claim, metrics, self._inspector_url)
        except asyncio.CancelledError:
            await self._interrupted(slot, [claim], span, started_at, metrics)
            raise
        except Exception as exc:  # a bug of ours: still count it and try later
            logger.exception("attempt failed outside the handler")
            result = outcomes.internal_error(slot.config, claim, exc)
        # The handler is done with the run: its place is free now, not once the outcome
        # is committed, so that the next claim goes in the same commit as this outcome
        # rather than the one after (the run stays leased until its outcome is in).
        self._free(slot)
        span.outcome(result.outcome, result.error_type, result.error)
        try:  # the outcome's line and its record in the inbox are the attempt's too
            await outcomes.record(self._inbox, claim, result, started_at, metrics)
        finally:
            span.end()
        if result.retry_at is not None:
            self._due_by(result.retry_at)

    async def _attempt_batch(self, slot: Slot, claims: list[Claim]) -> None:
        if slot.limits and not await self._batch_turn(slot, claims):
            return
        started_at = datetime.now(timezone.utc)
        metrics = self._handlers.metrics[slot.name]
        structlog.contextvars.bind_contextvars(handler=slot.name, batch=len(claims))
        span = tracing.attempting_batch(slot.name, [claim.event for claim in claims])
        try:
            results = await outcomes.attempt_batch(slot, claims, metrics, self._inspector_url)
        except asyncio.CancelledError:
            await self._interrupted(slot, claims, span, started_at, metrics)
            raise
        except Exception as exc:  # a bug of ours: still count it and try later
            logger.exception("batch attempt failed outside the handler")
            results = [outcomes.internal_error(slot.config, claim, exc) for claim in claims]
        self._free(slot, len(claims))
        failed = [result for result in results if result.outcome != "done"]
        span.set("ci_receiver.runs.failed", len(failed))
        if failed:
            first = failed[0]
            span.outcome(first.outcome, first.error_type, first.error)
        else:
            span.outcome("done", None, None)
        try:
            # Recorded together: on PostgreSQL one group-committed statement.
            await asyncio.gather(
                *(
                    self._record_in_batch(claim, result, started_at, metrics)
                    for claim, result in zip(claims, results, strict=True)
                )
            )
        finally:
            span.end()

    async def _interrupted(
        self,
        slot: Slot,
        claims: list[Claim],
        span: tracing.SpanScope,
        started_at: datetime,
        metrics: SlotMetrics,
    ) -> None:
        """Shutdown ran out of time for an attempt: its runs handed back without counting
        them, however the cancellation goes on."""
        self._free(slot, len(claims))
        span.outcome("released", "interrupted", outcomes.INTERRUPTED.error)
        span.end()
        interrupted = asyncio.gather(
            *(
                outcomes.record(self._inbox, claim, outcomes.INTERRUPTED, started_at, metrics)
                for claim in claims
            )
        )
        await asyncio.shield(interrupted)

    async def _record_in_batch(
        self, claim: Claim, result: outcomes.Result, started_at: datetime, metrics: SlotMetrics
    ) -> None:
        """An outcome of a batch's run, logged with its own event and request."""
        with structlog.contextvars.bound_contextvars(
            request_id=claim.request_id, event_id=claim.event.id
        ):
            await outcomes.record(self._inbox, claim, result, started_at, metrics)
        if result.retry_at is not None:
            self._due_by(result.retry_at)

    def _free(self, slot: Slot, runs: int = 1) -> None:
        self._handlers.metrics[slot.name].running.dec(runs)
        self._give_back(slot)

    def _give_back(self, slot: Slot) -> None:
        slot.running -= 1
        # Its last claim was full (more may be waiting for a place), or it is a handler a
        # reload replaced (its successor may be waiting for the place).
        if slot.maybe_due or self._handlers.get(slot.name) is not slot:
            self._wake.set()
