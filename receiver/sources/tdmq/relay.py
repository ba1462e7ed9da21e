"""Relay mode: `serve` publishes each callback to a TDMQ topic instead of keeping it.

The HTTP receivers then hold no state, so any number of them can sit behind a load
balancer, while `consume` processes on a Shared subscription store and handle the
callbacks. A callback is answered 200 only once the broker has confirmed (persisted)
it, and 503 when it cannot be, so that the sender tries again.

Bodies are still decoded first: bad input gets its 400 here, as without the relay. The
refused body is published too, flagged with the reason (`ci-receiver-rejected`): the
consumer records it as rejected in the inbox without decoding it again, so it shows in
`ci-receiver events rejected` like any other, and no relay keeps anything on its disk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pulsar
import pulsar.asyncio
import structlog

from receiver.callback.decode import PayloadError
from receiver.callback.event import Event
from receiver.config import Config
from receiver.inbox import Receipt, Stored
from receiver.ingest.ingest import IntakeUnavailable, RejectionNotKept, parse_or_refuse
from receiver.masking import mask_url
from receiver.metrics import Metrics
from receiver.pulsar_client.connect import TdmqError, close, describe, make_client
from receiver.sources.tdmq.messages import relay_properties

logger = structlog.get_logger("ci_receiver.relay")

# The 503's reason when the broker does not confirm a callback: not the inbox's.
UNAVAILABLE = "relay_unavailable"


class Relay:
    """The HTTP app's intake in relay mode: validate, publish, answer once confirmed."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        if not (config.relay.topic and config.tdmq.service_url):
            raise ValueError("relay mode needs relay.topic and tdmq.service_url")
        self.topic = config.relay.topic
        # The broker as the log and errors name it.
        self._broker = mask_url(config.tdmq.service_url)
        self._config = config
        self._metrics = metrics
        self._limits = config.limits.to_limits()
        self._client: pulsar.asyncio.Client | None = None
        self._producer: pulsar.asyncio.Producer | None = None

    @property
    def connected(self) -> bool:
        return self._producer is not None and self._producer.is_connected()

    async def start(self) -> None:
        self._client = make_client(self._config.tdmq)
        try:
            self._producer = await self._client.create_producer(
                self.topic,
                # One message per callback: redelivery, dead-lettering and Key_Shared
                # routing then work per callback, not per batch of unrelated ones.
                batching_enabled=False,
                send_timeout_millis=round(self._config.relay.send_timeout * 1000),
            )
        except pulsar.asyncio.PulsarException as exc:
            await close(self._client)
            raise TdmqError(
                f"cannot publish to {self.topic} at {self._broker}: {describe(exc)}"
            ) from None

    async def close(self) -> None:
        await close(self._client, self._producer)
        self._client = self._producer = None

    async def ingest(self, receipt: Receipt, *, keep_refused: bool = True) -> Stored:
        began = time.perf_counter()
        parsed = await parse_or_refuse(receipt, self._limits, self, keep_refused=keep_refused)
        events = parsed.events
        try:
            await self._publish(receipt.body, relay_properties(receipt), _message_key(events[0]))
        except Exception as exc:
            logger.error("cannot relay the callback", **self._where(), error=describe(exc))
            raise IntakeUnavailable(describe(exc), reason=UNAVAILABLE) from exc
        self._metrics.callbacks.labels(receipt.source, "relayed").inc()
        self._metrics.ingest_seconds.labels(receipt.source).observe(time.perf_counter() - began)
        ids = [event.id for event in events]
        # Nothing is stored here (receipt 0): whether an event is new is for the consumer
        # to find out, so every one counts as accepted.
        return Stored(receipt_id=0, ids=ids, new=ids, duplicates=[])

    async def reject(
        self, receipt: Receipt, error: PayloadError, *, size: int | None = None
    ) -> None:
        self._metrics.callbacks.labels(receipt.source, "rejected").inc()
        full_size = size if size is not None else len(receipt.body)
        logger.warning(
            "callback rejected", reason=error.reason, detail=error.message, size=full_size
        )
        kept = receipt.body[: self._config.inbox.rejected_body_bytes]
        try:
            await self._publish(kept, relay_properties(receipt, error, full_size), None)
        except Exception as exc:
            logger.error(
                "cannot relay the rejected callback",
                **self._where(),
                error=describe(exc),
                head=receipt.body[:200],
            )
            raise RejectionNotKept(describe(exc), reason=UNAVAILABLE) from exc

    def _where(self) -> dict[str, str]:
        """The broker and topic a failure is about, for the log."""
        return {"broker": self._broker, "topic": self.topic}

    async def _publish(self, body: bytes, properties: dict[str, str], key: str | None) -> None:
        if self._producer is None:
            raise RuntimeError("the relay is not started")
        send = self._producer.send(body, properties, partition_key=key)
        # The producer gives up after send_timeout by itself; this only guards against a
        # confirmation that never comes.
        await asyncio.wait_for(send, self._config.relay.send_timeout + 5)


def _message_key(event: Event) -> str:
    """One job's (or workflow instance's) callbacks share a key, so that a Key_Shared
    subscription hands them to the same consumer."""
    return event.subject


class RelayService:
    """What `serve` runs in relay mode: no inbox, no dispatcher, just the relay."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.ingestor = Relay(config, self.metrics)
        self.draining = False

    async def start(self, waiting: Callable[[], None] | None = None) -> None:
        """Connects at once, or fails: nothing to wait for (`waiting` unused)."""
        await self.ingestor.start()

    async def stop(self) -> None:
        self.draining = True
        await self.ingestor.close()

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        connected = self.ingestor.connected
        checks = {
            "relay": (
                connected,
                f"publishing to {self.ingestor.topic}" if connected else "disconnected",
            ),
            "draining": (not self.draining, "draining" if self.draining else "no"),
        }
        details = {name: detail for name, (_, detail) in checks.items()}
        return all(ok for ok, _ in checks.values()), details
