"""The CMQ consumer: CI callbacks from TDMQ for CMQ queues into the inbox, each message
deleted once its callback is committed.

CMQ hides a received message for the queue's visibility timeout and hands it out again
unless it is deleted with the receipt handle of its latest receive. So:
- a message is deleted only after `Intake.ingest` returned (committed, or a duplicate)
  or the refusal of its body was kept (`PayloadError`): it never loops. A refusal the
  hour's budget for refused bodies has no room for (`RefusedOverBudget`) leaves the
  message to come back, kept once the budget has refilled: the queue holds its only copy;
- when the inbox fails (recording a refusal included) it is not deleted: it comes back
  after the visibility timeout, and the inbox recognizes it if it was committed after all.
  While the inbox cannot take messages at all (its database away) that is said once,
  and once more when they are committed again (receiver/sources/outage.py);
- a process killed anywhere before the delete leaves the message to come back the same
  way.

Each queue has `concurrency` pollers. A poller takes one batch (up to `batch` messages),
ingests its messages at once, deletes the kept ones in one request, and only then takes
the next: at most `batch x concurrency` messages per queue are in hand, however long the
backlog. Throttling, CMQ's own failures (6xxx), 5xx and network errors are retried with
jittered backoff, logged once per change of the queue's state; any other refusal (a key,
queue, permission or account: waiting will not mend it) before the queue ever answered
stops the consumer with CMQ's code, message and request id and what to check. Once the
queue has answered, such a refusal (a key disabled while running) is logged as an error
and retried once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog
from prometheus_client import Counter, Histogram

from receiver import tracing
from receiver.callback.decode import PayloadError
from receiver.config import CmqConfig
from receiver.inbox import Receipt
from receiver.ingest.ingest import Intake, IntakeUnavailable, RefusedOverBudget
from receiver.metrics import Metrics
from receiver.sources.cmq.api import STALE_HANDLE, CmqApi, CmqRefused, CmqUnavailable, Message
from receiver.sources.outage import Outage, jitter

logger = structlog.get_logger("ci_receiver.sources.cmq")

# How long batches being ingested get to finish on shutdown. A message that does not
# is not deleted and comes back after the visibility timeout: cutting it short loses
# nothing.
DRAIN_SECONDS = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# A refusal waiting will not mend, once the queue has worked: retried slowly, in case
# the key or the permission is being fixed.
REFUSED_RETRY = 60.0
DELETE_BACKOFF_MAX = 2.0
DELETE_RETRY_SECONDS = 60.0


class CmqError(RuntimeError):
    """CMQ refused the key, queue, permission or account before the queue ever answered."""


@dataclass(slots=True)
class QueueState:
    """What the pollers of one queue last saw; a change is logged once."""

    ready: bool = False
    detail: str = "starting"
    answered: bool = False  # the queue answered a receive once: refusals are no longer fatal
    delete_error: str | None = None  # a delete refusal waiting will not mend


class CmqConsumer:
    name = "cmq"

    def __init__(self, config: CmqConfig, intake: Intake, metrics: Metrics) -> None:
        self._config = config
        self._intake = intake
        outcomes = Counter(
            "ci_receiver_cmq_messages",
            "CMQ messages by outcome: committed or rejected (kept), failed (not kept, comes"
            " back), deleted, delete_failed (comes back, then a duplicate).",
            ["outcome"],
            registry=metrics.registry,
        )
        self._outcomes = {
            name: outcomes.labels(name)
            for name in ("committed", "rejected", "failed", "deleted", "delete_failed")
        }
        self._receive_seconds = Histogram(
            "ci_receiver_cmq_receive_seconds",
            "Duration of CMQ receive requests that brought messages.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=metrics.registry,
        )
        self._outage = Outage(
            logger,
            "inbox unavailable: messages stay on their queue and come back until it is back",
            "inbox available again: messages are committed and deleted",
        )
        self._states = {queue: QueueState() for queue in config.queues}
        self._stopping = asyncio.Event()
        self._receiving: set[asyncio.Task[list[Message]]] = set()
        self._api: CmqApi | None = None

    @property
    def where(self) -> str:
        return f"{', '.join(self._config.queues)} at {self._config.url}"

    async def check(self) -> tuple[bool, str]:
        """Readiness: every queue answered its last receive (throttled counts as ready)."""
        ready = all(state.ready for state in self._states.values())
        return ready, "; ".join(f"{queue}: {s.detail}" for queue, s in self._states.items())

    async def run(self) -> None:
        if self._stopping.is_set():
            return
        pollers_per_queue = self._config.concurrency
        pollers = len(self._config.queues) * pollers_per_queue
        # A connection per poller; its deletes go on the same one between receives.
        self._api = CmqApi(self._config, connections=pollers)
        tasks = [
            asyncio.create_task(self._poll(queue), name=f"cmq-{queue}-{n}")
            for queue in self._config.queues
            for n in range(pollers_per_queue)
        ]
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
            failure = next((t.exception() for t in done if t is not stopping), None)
            self.stop()
            _, unfinished = await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
            if unfinished:
                logger.info("cmq batches not finished; they will come back", count=len(unfinished))
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if failure is not None:
                raise failure
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await self._api.close()

    def stop(self) -> None:
        """Stop receiving at once; batches being ingested finish, the rest come back."""
        self._stopping.set()
        for receiving in self._receiving:
            # A receive cut short may have taken messages: hidden for the visibility
            # timeout, then handed out again.
            receiving.cancel()

    # --- one poller --------------------------------------------------------------------

    async def _poll(self, queue: str) -> None:
        config = self._config
        delay = BACKOFF_FIRST
        while not self._stopping.is_set():
            # Until the queue has answered once, without long polling: a refused key or
            # queue, or readiness, is then known at once.
            wait = config.polling_wait if self._states[queue].answered else 0
            began = time.perf_counter()
            try:
                messages = await self._receive(queue, config.batch, wait)
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            except CmqRefused as refused:
                pause = self._refused(queue, refused, delay)
            except CmqUnavailable as exc:
                pause = self._unavailable(queue, str(exc), delay)
            else:
                self._answered(queue)
                delay = BACKOFF_FIRST
                if messages:
                    self._receive_seconds.observe(time.perf_counter() - began)
                    await self._take(queue, messages)
                    # The inbox away: what was taken comes back after its visibility
                    # timeout; more is taken only after a pause (receiver/sources/outage.py).
                    if pause := self._outage.pause():
                        await self._sleep(pause)
                continue
            delay = min(delay * 2, BACKOFF_MAX)
            await self._sleep(pause)

    async def _receive(self, queue: str, count: int, wait: int) -> list[Message]:
        assert self._api is not None
        receiving = asyncio.create_task(self._api.receive(queue, count, wait))
        self._receiving.add(receiving)
        try:
            return await receiving
        finally:
            self._receiving.discard(receiving)

    # --- queue states, logged when they change -----------------------------------------

    def _answered(self, queue: str) -> None:
        state = self._states[queue]
        state.answered = True
        if state.detail != "receiving":
            logger.info("cmq queue receiving", queue=queue, endpoint=self._config.url)
        state.ready, state.detail = True, "receiving"

    def _refused(self, queue: str, refused: CmqRefused, delay: float) -> float:
        """Log a refusal (once per change); return how long to wait. Raises CmqError for
        a refusal waiting will not mend before the queue ever answered."""
        state = self._states[queue]
        if refused.fatal and not state.answered:
            raise CmqError(
                f"cannot receive from CMQ queue {queue!r} at {self._config.url}:"
                f" code {refused.code}: {refused.message} (request {refused.request_id});"
                f" {refused.hint}"
            )
        answer = f"code {refused.code}: {refused.message}"
        if refused.throttled:
            self._change(queue, True, "throttled", answer, "info")
            return jitter(delay)
        if refused.fatal:
            self._change(queue, False, "refused", answer, "error", hint=refused.hint)
            return REFUSED_RETRY
        self._change(queue, False, "failing", answer, "warning")
        return jitter(delay)

    def _unavailable(self, queue: str, error: str, delay: float) -> float:
        self._change(queue, False, "unavailable", error, "warning")
        return jitter(delay)

    def _change(
        self, queue: str, ready: bool, kind: str, error: str, level: str, **extra: Any
    ) -> None:
        """Record the queue's state; log it when it is not what it was."""
        state = self._states[queue]
        detail = f"{kind}: {error}; retrying"
        if state.detail != detail:
            getattr(logger, level)(f"cmq queue {kind}; retrying", queue=queue, error=error, **extra)
        state.ready, state.detail = ready, detail

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- one batch ---------------------------------------------------------------------

    async def _take(self, queue: str, messages: list[Message]) -> None:
        kept = await asyncio.gather(*(self._keep(queue, message) for message in messages))
        done = [m for m, ok in zip(messages, kept, strict=True) if ok and m.receipt_handle]
        if done:
            await self._delete(queue, done)

    async def _keep(self, queue: str, message: Message) -> bool:
        """Commit the message's callback, or keep the refusal of its body: True when it
        may be deleted. Nothing escapes: a failure leaves the message to come back."""
        receipt = _receipt(queue, message)
        structlog.contextvars.bind_contextvars(request_id=receipt.request_id)
        with tracing.consuming("tencent_cmq", queue, message.msg_id, current=True) as span:
            receipt.source_meta.update(span.carrier())
            kept = await self._keep_receipt(queue, message, receipt)
            if not kept:
                span.fail("not_kept", "it will come back")
            return kept

    async def _keep_receipt(self, queue: str, message: Message, receipt: Receipt) -> bool:
        try:
            if message.body is None:
                # The same message is unreadable every time: kept, not looped over.
                refused = PayloadError("bad_message", "the CMQ message has no msgBody string")
                await self._intake.reject(receipt, refused)
                self._outcomes["rejected"].inc()
                return True
            await self._intake.ingest(receipt)
        except RefusedOverBudget:  # to come back: counted once it is kept
            self._outcomes["failed"].inc()
            return False
        except PayloadError:  # kept as rejected by the ingestor
            self._outcomes["rejected"].inc()
            return True
        except IntakeUnavailable as exc:  # said once for the whole outage
            self._outage.failed(exc)
            self._outcomes["failed"].inc()
            return False
        except Exception:
            logger.exception(
                "cannot commit the message; it will come back",
                queue=queue,
                msg_id=message.msg_id,
                dequeue_count=message.dequeue_count,
            )
            self._outcomes["failed"].inc()
            return False
        self._outage.committed()
        self._outcomes["committed"].inc()
        return True

    async def _delete(self, queue: str, messages: list[Message]) -> None:
        """Delete committed messages while their receipt handles last (until their next
        visible time); one that stays comes back and is then a duplicate."""
        assert self._api is not None
        handles = [m.receipt_handle for m in messages if m.receipt_handle]
        # Retried while the handles last (CMQ's next visible time), up to a minute.
        times = [m.next_visible_time for m in messages if m.next_visible_time]
        deadline = min([*times, time.time() + DELETE_RETRY_SECONDS])
        delay = BACKOFF_FIRST
        refused: Mapping[str, Exception]
        while True:
            try:
                refused = await self._api.delete(queue, handles)
            except (CmqRefused, CmqUnavailable) as exc:
                fatal = isinstance(exc, CmqRefused) and exc.fatal
                if not fatal and time.time() + delay < deadline:
                    await asyncio.sleep(jitter(delay))
                    delay = min(delay * 2, DELETE_BACKOFF_MAX)
                    continue
                refused = dict.fromkeys(handles, exc)
            break
        self._delete_refused(queue, refused)
        self._outcomes["deleted"].inc(len(handles) - len(refused))
        self._outcomes["delete_failed"].inc(len(refused))

    def _delete_refused(self, queue: str, refused: Mapping[str, Exception]) -> None:
        """Log why messages stay; a refusal waiting will not mend (a missing delete
        permission) as an error, once per change."""
        state = self._states[queue]
        fatal = next((e for e in refused.values() if isinstance(e, CmqRefused) and e.fatal), None)
        error = None if fatal is None else f"code {fatal.code}: {fatal.message}"
        if error != state.delete_error:
            if fatal is not None:
                logger.error(
                    "cmq delete refused; committed messages come back as duplicates",
                    queue=queue,
                    error=error,
                    hint=fatal.hint,
                )
            state.delete_error = error
        for handle, why in refused.items():
            stale = isinstance(why, CmqRefused) and why.code == STALE_HANDLE
            logger.info(
                "cmq message not deleted; it comes back as a duplicate",
                queue=queue,
                reason="receipt handle expired" if stale else str(why),
                receipt_handle=handle,
            )


def _receipt(queue: str, message: Message) -> Receipt:
    return Receipt(
        body=_body_bytes(message.body or ""),
        source="cmq",
        received_at=datetime.now(timezone.utc),
        request_id=message.msg_id or message.receipt_handle or "",
        source_meta={
            "queue": queue,
            "msg_id": message.msg_id,
            "enqueue_time": _from_seconds(message.enqueue_time),
            "dequeue_count": message.dequeue_count,
        },
    )


def _body_bytes(body: str) -> bytes:
    """A message body as bytes: bytes CMQ sent that were not UTF-8 as they came, a lone
    surrogate escaped in its JSON as the bytes that encode it; the decoder refuses
    either, as it refuses any body that is not UTF-8."""
    try:
        return body.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return body.encode("utf-8", "surrogatepass")


def _from_seconds(seconds: int | None) -> str | None:
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None
