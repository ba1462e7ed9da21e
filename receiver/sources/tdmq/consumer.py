"""The TDMQ consumer: CI callbacks from Pulsar topics into the inbox, acked once committed.

Every message goes through the same ingest path as an HTTP callback (`messages.read`
turns it into a receipt) and is acked only after the inbox commit is durable:
- the inbox fails (recording a refusal included): negative ack, the message comes
  back after `nack_delay`. While the inbox cannot take messages at all (its database
  away) that is said once, and once more when they are committed again
  (receiver/sources/outage.py);
- the body cannot be decoded, or the message itself cannot be read (a garbled relay
  property): it is kept as rejected; it is also published to `dead_letter_topic` when
  one is set, then acked, so it never loops. Without a dead-letter topic, one past the
  budget for refused bodies is nacked, to be kept once the budget has refilled;
- the ack itself is lost (broker restart): the message comes again and the inbox
  recognizes it as a duplicate.

Threading: one thread of its own takes messages from the client in batches
(`batch_receive`, which returns at least every 100 ms, so that stopping is prompt:
a plain blocking `receive()` would not see SIGTERM until a message came) and hands each
batch to the event loop as one task, which ingests the batch in one group commit, then
acks and nacks each message straight through the client (which sends acks grouped).
Taking one message at a time from the event loop (`pulsar.asyncio`'s `receive()`)
costs a thread hand-over per message, which made draining a backlog about half as fast;
a task, a commit future and an awaited ack (one more hand-over back from the client's
thread) per message cost about as much again (docs/benchmarks.md, "Draining a TDMQ backlog"). The
hand-off is bounded: at most `concurrency` messages are being ingested (in batches of
half as many; one more batch waits for a free slot) and `receiver_queue_size` wait in
the client, so memory stays flat however long the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import _pulsar
import pulsar
import pulsar.asyncio
import structlog
from prometheus_client import Counter
from structlog.contextvars import bind_contextvars

from receiver import tracing
from receiver.callback.decode import PayloadError
from receiver.config import TdmqConfig
from receiver.inbox import Receipt, Stored
from receiver.ingest.ingest import Intake, IntakeUnavailable, RefusedOverBudget
from receiver.masking import mask_url
from receiver.metrics import Metrics
from receiver.pulsar_client.connect import (
    BATCH_WAIT_MS,
    PULSAR_ERRORS,
    TdmqError,
    close,
    describe,
    is_fatal,
    make_client,
    subscribe_options,
)
from receiver.sources.outage import Outage
from receiver.sources.tdmq import messages

logger = structlog.get_logger("ci_receiver.sources.tdmq")

# How long messages being ingested get to finish on shutdown. One that does not is
# redelivered (it was not acked), so cutting it short loses nothing.
DRAIN_SECONDS = 5.0
# How often the connection is looked at, to log when it drops or comes back.
WATCH_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
# How long the broker gets to answer closing the consumer and the dead-letter producer
# (together). A live broker answers in milliseconds; the client's own shutdown may then
# wait a few seconds more for a connection that does not close.
CLOSE_SECONDS = 2.0


class BatchIntake(Intake, Protocol):
    """An intake that also takes a batch of callbacks at once (`Ingestor`)."""

    async def ingest_many(self, receipts: list[Receipt]) -> list[Stored | BaseException]: ...


class TdmqConsumer:
    name = "tdmq"

    def __init__(self, config: TdmqConfig, intake: BatchIntake, metrics: Metrics) -> None:
        self._config = config
        self._intake = intake
        outcomes = Counter(
            "ci_receiver_tdmq_messages",
            "TDMQ messages by outcome: acked, nacked (delivered again later), dead_lettered.",
            ["outcome"],
            registry=metrics.registry,
        )
        self._acked = outcomes.labels("acked")
        self._nacked = outcomes.labels("nacked")
        self._dead_lettered = outcomes.labels("dead_lettered")
        self._outage = Outage(
            logger,
            "inbox unavailable: messages are nacked and delivered again until it is back",
            "inbox available again: messages are committed and acked",
        )
        # Taken by the receiving thread for each message it hands over, given back when
        # the message is acked or nacked: the bound on messages being ingested.
        self._slots = threading.Semaphore(config.concurrency)
        # Each batch being ingested, and how many messages it holds.
        self._working: dict[asyncio.Task[None], int] = {}
        self._client: pulsar.asyncio.Client | None = None
        self._consumer: pulsar.asyncio.Consumer | None = None
        self._dead_letters: pulsar.asyncio.Producer | None = None
        self._subscribing: asyncio.Task[pulsar.asyncio.Consumer] | None = None
        self._stopping = threading.Event()

    @property
    def where(self) -> str:
        topics = self._config.topic_pattern or ", ".join(self._config.topics)
        return f"{topics} as {self._config.subscription} ({self._config.subscription_type})"

    @property
    def connected(self) -> bool:
        if self._consumer is None:
            return False
        # pulsar.asyncio.Consumer does not expose is_connected() (its Producer and the
        # blocking Consumer do); the C++ consumer under it does.
        return bool(self._consumer._consumer.is_connected())

    async def check(self) -> tuple[bool, str]:
        """Readiness: the subscription exists and its connection is up."""
        if self._consumer is None:
            return False, f"subscribing to {self.where}"
        if not self.connected:
            return False, "disconnected (reconnecting)"
        return True, f"connected to {self.where}"

    async def run(self) -> None:
        if self._stopping.is_set():
            return
        self._client = make_client(self._config)
        watching: asyncio.Task[None] | None = None
        try:
            self._subscribing = asyncio.create_task(self._subscribe(), name="tdmq-subscribe")
            try:
                consumer = await self._subscribing
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                raise
            logger.info("tdmq consumer connected", subscription=self.where)
            watching = asyncio.create_task(self._watch_connection(), name="tdmq-watch")
            loop = asyncio.get_running_loop()
            thread = ThreadPoolExecutor(1, thread_name_prefix="tdmq-receive")
            try:
                await loop.run_in_executor(thread, self._receive, consumer, loop)
            finally:
                self._stopping.set()  # also when run() itself is cancelled
                # The receiving thread sees the stop within BATCH_WAIT_MS; wait for it
                # (off the event loop), so the consumer is not closed under its
                # batch_receive().
                await asyncio.to_thread(thread.shutdown)
            await self._drain()
        finally:
            if watching is not None:
                watching.cancel()
            await self._close()

    def stop(self) -> None:
        """Stop taking messages; those being ingested finish, the others come back."""
        self._stopping.set()
        if self._subscribing is not None:
            self._subscribing.cancel()

    # --- receiving ---------------------------------------------------------------------

    def _receive(self, consumer: pulsar.asyncio.Consumer, loop: asyncio.AbstractEventLoop) -> None:
        """The receiving thread: batches from the client to the event loop until stopped."""
        # pulsar.asyncio.Consumer has no batch_receive(); the C++ consumer under it has.
        client_side = consumer._consumer
        while not self._stopping.is_set():
            # The inbox away: what was taken comes back nacked; more is taken only after
            # a pause (receiver/sources/outage.py).
            if (pause := self._outage.pause()) and self._stopping.wait(pause):
                return
            try:
                batch = client_side.batch_receive()
            except Exception as exc:  # pulsar.exceptions.*, e.g. while reconnecting
                logger.warning("tdmq receive failed; trying again", error=describe(exc))
                self._stopping.wait(1.0)
                continue
            if self._stopping.is_set():
                return  # not acked: the broker delivers them again
            for _ in batch:
                while not self._slots.acquire(timeout=BATCH_WAIT_MS / 1000):
                    if self._stopping.is_set():
                        return  # not acked: the broker delivers them again
            if batch:
                loop.call_soon_threadsafe(self._start, consumer, batch)

    def _start(self, consumer: pulsar.asyncio.Consumer, batch: list[_pulsar.Message]) -> None:
        task = asyncio.create_task(self._handle(consumer, batch))
        self._working[task] = len(batch)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._slots.release(self._working.pop(task))

    async def _subscribe(self) -> pulsar.asyncio.Consumer:
        """Subscribe, waiting for the broker as long as it takes; a wrong token or name is
        an error at once."""
        assert self._client is not None
        delay = 1.0
        while True:
            try:
                if self._config.dead_letter_topic and self._dead_letters is None:
                    self._dead_letters = await self._client.create_producer(
                        self._config.dead_letter_topic,
                        batching_enabled=False,
                        send_timeout_millis=round(self._config.operation_timeout * 1000),
                    )
                self._consumer = await self._client.subscribe(**subscribe_options(self._config))
            except pulsar.asyncio.PulsarException as exc:
                if is_fatal(exc):
                    raise TdmqError(f"cannot subscribe to {self.where}: {describe(exc)}") from None
                logger.warning(
                    "cannot subscribe yet; trying again",
                    error=describe(exc),
                    retry_in=delay,
                    url=mask_url(self._config.service_url or ""),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            else:
                return self._consumer

    # --- a batch of messages -------------------------------------------------------------

    async def _handle(
        self, consumer: pulsar.asyncio.Consumer, batch: list[_pulsar.Message]
    ) -> None:
        """Ack each message once it is kept, nack it on any failure to keep it. Nothing
        escapes: a message neither acked nor nacked would wait for a reconnect to come
        back. The callbacks to ingest are committed together (one group commit, no task
        or future hand-over per message); acks go straight to the client, which sends
        them grouped, so no answer has to come back through the event loop."""
        client_side = consumer._consumer
        deliveries = [_read(message) for message in batch]
        with contextlib.ExitStack() as ending:  # each span ends, whatever happens
            spans = [
                ending.enter_context(self._span(message, delivery)) if tracing.active()
                else tracing.OFF
                for message, delivery in zip(batch, deliveries, strict=True)
            ]  # fmt: skip
            await self._settle(client_side, batch, deliveries, spans)

    def _span(self, message: _pulsar.Message, delivery: messages.Delivery) -> tracing.SpanScope:
        """A consumer span of the message, continuing the trace its properties name (the
        relay's, the Pulsar handler's), and kept with its callback."""
        span = tracing.consuming(
            "pulsar",
            message.topic_name(),
            str(message.message_id()),
            messages.properties_if_text(message) or {},
            group=self._config.subscription,
        )
        delivery.receipt.source_meta.update(span.carrier())
        return span

    async def _settle(
        self,
        client_side: _pulsar.Consumer,
        batch: list[_pulsar.Message],
        deliveries: list[messages.Delivery],
        spans: list[tracing.SpanScope],
    ) -> None:
        """Keep the batch's callbacks, then ack or nack each message (`spans`: each
        message's, told of one not kept)."""
        ingesting = [i for i, delivery in enumerate(deliveries) if delivery.refused is None]
        try:
            outcomes = await self._intake.ingest_many([deliveries[i].receipt for i in ingesting])
        except Exception as exc:
            outcomes = [exc] * len(ingesting)
        outcome_of = dict(zip(ingesting, outcomes, strict=True))
        acked = 0
        for index, (message, delivery) in enumerate(zip(batch, deliveries, strict=True)):
            # For this message's lines, the ack's and the nack's included.
            bind_contextvars(request_id=delivery.receipt.request_id)
            outcome = outcome_of.get(index, delivery.refused)
            try:
                kept = await self._keep(message, delivery, outcome)
            except IntakeUnavailable as exc:  # said once for the whole outage
                self._outage.failed(exc)
                kept = False
            except Exception:
                logger.exception(
                    "cannot commit the message; it will be delivered again",
                    message_id=str(message.message_id()),
                    redelivery_count=message.redelivery_count(),
                )
                kept = False
            if not kept:
                spans[index].fail("nack", "not kept; it will be delivered again")
                self._nack(client_side, message)
                continue
            if isinstance(outcome, Stored):
                self._outage.committed()
            try:
                client_side.acknowledge_async(message, _ack_sent)
            except PULSAR_ERRORS as exc:
                # Committed already: when the message comes again it is a duplicate.
                logger.info("ack not sent; the message will come again", error=describe(exc))
            acked += 1
        self._acked.inc(acked)

    async def _keep(
        self, message: _pulsar.Message, delivery: messages.Delivery, outcome: object
    ) -> bool:
        """Whether the message is done with, given how its ingest went (`outcome`: its
        `Stored`, the `PayloadError` its body was refused with, or what the inbox raised,
        raised again here). A refused one is recorded as rejected if the relay refused it
        or it could not be read, and dead-lettered; False when the dead-letter topic did
        not take it, or, without one, when the budget for refused bodies had no room for
        it (`RefusedOverBudget`): delivered again, it is kept once the budget has refilled,
        rather than acknowledged as the only copy is lost."""
        if isinstance(outcome, RefusedOverBudget):
            return False
        if isinstance(outcome, PayloadError):
            if delivery.refused is not None:  # refused by the relay, or unreadable
                try:
                    await self._intake.reject(delivery.receipt, outcome, size=delivery.size)
                except RefusedOverBudget:
                    return False
            return await self._dead_letter(message, outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return True

    async def _dead_letter(self, message: _pulsar.Message, refused: PayloadError) -> bool:
        if self._dead_letters is None:
            return True
        properties = {
            **(messages.properties_if_text(message) or {}),
            messages.REJECTED: refused.reason,
            messages.REJECTED_DETAIL: refused.message,
            messages.PREFIX + "topic": message.topic_name(),
            messages.PREFIX + "message-id": str(message.message_id()),
        }
        try:
            await self._dead_letters.send(message.data(), properties)
        except PULSAR_ERRORS as exc:
            logger.warning("cannot publish to the dead-letter topic", error=describe(exc))
            return False
        self._dead_lettered.inc()
        return True

    def _nack(self, client_side: _pulsar.Consumer, message: _pulsar.Message) -> None:
        self._nacked.inc()
        # The client only notes it (redelivered after nack_delay): nothing to wait for.
        with contextlib.suppress(*PULSAR_ERRORS):  # still unacked: it comes back anyway
            client_side.negative_acknowledge(message)

    # --- connection and shutdown -------------------------------------------------------

    async def _watch_connection(self) -> None:
        """Log when the connection drops or comes back: `consume` has no /readyz to ask."""
        was = True
        while True:
            now = self.connected
            if now and not was:
                logger.info("tdmq consumer connected", subscription=self.where)
            elif was and not now:
                logger.warning("tdmq consumer disconnected; reconnecting", subscription=self.where)
            was = now
            await asyncio.sleep(WATCH_SECONDS)

    async def _drain(self) -> None:
        if not self._working:
            return
        logger.info("finishing messages being ingested", count=sum(self._working.values()))
        _, unfinished = await asyncio.wait(set(self._working), timeout=DRAIN_SECONDS)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _close(self) -> None:
        # The consumer first, so that the broker hands its unacked messages to the
        # other consumers at once.
        await close(self._client, self._consumer, self._dead_letters, timeout=CLOSE_SECONDS)


def _read(message: _pulsar.Message) -> messages.Delivery:
    try:
        return messages.read(message)
    except Exception as exc:  # the same message fails the same way: never to loop
        return messages.unreadable(message, exc)


def _ack_sent(result: _pulsar.Result) -> None:
    """Called on a client thread once an ack is sent (or not)."""
    if result != _pulsar.Result.Ok:
        # Committed already: when the message comes again it is a duplicate.
        logger.info("ack not sent; the message will come again", error=str(result))
