"""`pulsar`: publish each event's JSON to a Pulsar (or TDMQ for Pulsar) topic.

Other services subscribe to the topic instead of to CI. Each message carries the event
id, kind, state, tag, event name and job id as properties (filter or dedupe without
parsing), and the job id as its partition key, so one job's events stay in order on a
partitioned topic. Delivery is at-least-once: dedupe on the `event_id` property.

The client is made and shut down as the TDMQ consumer's is (`receiver.pulsar_client.connect`),
with the same connection options and the same workarounds for the client library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Literal

import pulsar
import pulsar.asyncio
from pydantic import Field

from handlers import Retry
from receiver import tracing
from receiver.callback.event import Event
from receiver.config import PULSAR_SERVICE_URL, PulsarConnection
from receiver.masking import mask_url
from receiver.pulsar_client.connect import close as close_client
from receiver.pulsar_client.connect import describe, make_client

COMPRESSION = {
    "none": pulsar.CompressionType.NONE,
    "lz4": pulsar.CompressionType.LZ4,
    "zlib": pulsar.CompressionType.ZLib,
    "zstd": pulsar.CompressionType.ZSTD,
    "snappy": pulsar.CompressionType.SNAPPY,
}


class PulsarOptions(PulsarConnection):
    """The connection as in `[tdmq]` (service_url required here), and where to publish."""

    service_url: str = Field(pattern=PULSAR_SERVICE_URL)
    # A full name, e.g. persistent://tenant/namespace/ci-events (TDMQ: pulsar-xxx/ns/topic).
    topic: str
    producer_name: str | None = None
    compression: Literal["none", "lz4", "zlib", "zstd", "snappy"] = "none"
    batching: bool = True
    # Seconds for one send.
    send_timeout: float = Field(20.0, gt=0)
    # Extra fixed properties on every message, e.g. {env = "prod"}.
    properties: dict[str, str] = Field(default_factory=dict)
    # The decoded callback document can be large; leave it out for slimmer messages.
    include_raw: bool = True


class PulsarHandler:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = PulsarOptions.model_validate(options)
        self._client: pulsar.asyncio.Client | None = None
        self._producer: pulsar.asyncio.Producer | None = None

    async def start(self) -> None:
        options = self.options
        self._client = make_client(options)
        try:
            self._producer = await self._client.create_producer(
                options.topic,
                producer_name=options.producer_name,
                compression_type=COMPRESSION[options.compression],
                batching_enabled=options.batching,
                send_timeout_millis=int(options.send_timeout * 1000),
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.close()
            raise RuntimeError(
                f"cannot publish to {options.topic} at {mask_url(options.service_url)}:"
                f" {describe(exc)}"
            ) from None

    async def close(self) -> None:
        client, producer = self._client, self._producer
        self._client = self._producer = None
        await close_client(client, producer)

    async def __call__(self, event: Event) -> None:
        if self._producer is None:
            raise RuntimeError("the pulsar handler is not started")
        properties = {
            **self.options.properties,
            **{
                name: value
                for name, value in (
                    ("event_id", event.id),
                    ("kind", event.kind),
                    ("state", event.state),
                    ("tag", event.tag),
                    ("event_name", event.event_name),
                    ("job_id", event.job_id),
                )
                if value is not None
            },
            # The attempt's trace (W3C fields, when tracing is on), for a consumer to
            # continue.
            **tracing.carrier(),
        }
        try:
            await self._producer.send(
                event.to_json(include_raw=self.options.include_raw),
                properties=properties,
                partition_key=event.subject,
                event_timestamp=int(event.received_at.timestamp() * 1000),
            )
        except pulsar.asyncio.PulsarException as exc:
            raise Retry(f"publish to {self.options.topic} failed: {exc}") from exc
