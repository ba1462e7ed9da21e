"""The Pulsar client and subscription, made from `[tdmq]` (or a `pulsar` handler's
options); which failures are worth a retry."""

from __future__ import annotations

import asyncio
from typing import Any

import pulsar
import pulsar.asyncio
import pulsar.exceptions
import structlog

from receiver.config import PulsarConnection, TdmqConfig
from receiver.pulsar_client.library_log import client_logger

logger = structlog.get_logger("ci_receiver.sources.tdmq")

SUBSCRIPTION_TYPES = {
    "shared": pulsar.ConsumerType.Shared,
    "key_shared": pulsar.ConsumerType.KeyShared,
    "failover": pulsar.ConsumerType.Failover,
    "exclusive": pulsar.ConsumerType.Exclusive,
}
INITIAL_POSITIONS = {
    "earliest": pulsar.InitialPosition.Earliest,
    "latest": pulsar.InitialPosition.Latest,
}

BATCH_WAIT_MS = 100
BATCH_BYTES = 8 * 1024 * 1024

# Failures that waiting will not mend: a wrong token, name or setting. Anything else
# (broker down, lookup timeout, ...) is retried.
FATAL = {
    pulsar.Result.AuthenticationError,
    pulsar.Result.AuthorizationError,
    pulsar.Result.ErrorGettingAuthenticationData,
    pulsar.Result.InvalidConfiguration,
    pulsar.Result.InvalidTopicName,
    pulsar.Result.InvalidUrl,
    pulsar.Result.TopicNotFound,
    pulsar.Result.SubscriptionNotFound,
    pulsar.Result.NotAllowedError,
}


# What the client raises: its asyncio API has an exception class of its own.
PULSAR_ERRORS = (pulsar.asyncio.PulsarException, pulsar.exceptions.PulsarException)


class TdmqError(RuntimeError):
    """TDMQ cannot work as configured: a wrong token, topic or subscription name."""


def client_options(settings: PulsarConnection) -> dict[str, Any]:
    options: dict[str, Any] = {
        "operation_timeout_seconds": max(1, round(settings.operation_timeout)),
        "tls_allow_insecure_connection": settings.tls_allow_insecure_connection,
        "tls_validate_hostname": settings.tls_validate_hostname,
        # The C++ library's own log, into the structured log (see client_log).
        "logger": client_logger(settings.client_log_level),
    }
    if settings.token is not None:
        options["authentication"] = pulsar.AuthenticationToken(settings.token.get_secret_value())
    if settings.tls_trust_certs_file is not None:
        options["tls_trust_certs_file_path"] = str(settings.tls_trust_certs_file)
    return options


def make_client(settings: PulsarConnection) -> pulsar.asyncio.Client:
    """The client to make everywhere; end it with `close()` below."""
    if not settings.service_url:
        raise ValueError("tdmq.service_url is not set")
    return pulsar.asyncio.Client(settings.service_url, **client_options(settings))


def subscribe_options(config: TdmqConfig) -> dict[str, Any]:
    topics = config.topics[0] if len(config.topics) == 1 else list(config.topics)
    return {
        "topic": config.topic_pattern or topics,
        "is_pattern_topic": config.topic_pattern is not None,
        "subscription_name": config.subscription,
        "consumer_type": SUBSCRIPTION_TYPES[config.subscription_type],
        "initial_position": INITIAL_POSITIONS[config.initial_position],
        "receiver_queue_size": config.receiver_queue_size,
        # Bound the prefetch of a multi-topic or partitioned subscription the same way.
        "max_total_receiver_queue_size_across_partitions": config.receiver_queue_size,
        "negative_ack_redelivery_delay_ms": round(config.nack_delay * 1000),
        # What the consumer's receiving thread takes at once, waiting no longer than
        # BATCH_WAIT_MS for it, so that it notices a stop promptly. Half of what may be
        # ingested at once: one batch is decoded while the other's commit syncs.
        "batch_receive_policy": pulsar.ConsumerBatchReceivePolicy(
            max(1, config.concurrency // 2), BATCH_BYTES, BATCH_WAIT_MS
        ),
        # Acks and nacks per message even when the publisher batched messages together,
        # so that one nack does not bring a whole batch back.
        "batch_index_ack_enabled": True,
    }


def is_fatal(error: BaseException) -> bool:
    return isinstance(error, pulsar.asyncio.PulsarException) and error.error() in FATAL


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def close(
    client: pulsar.asyncio.Client | None,
    *parts: pulsar.asyncio.Consumer | pulsar.asyncio.Producer | None,
    timeout: float = 5.0,
) -> None:
    """Close consumers and producers together within `timeout` (a broker that is down
    never answers; what a consumer left unacked comes back anyway), then shut the
    client down.

    Not `client.close()`: its C++ side finishes on a detached thread that still holds the
    Python callback, and releasing it while the interpreter exits aborts the process
    ("terminate called without an active exception", apache/pulsar-client-python#256).
    `shutdown()` joins the client's threads before it returns: on a thread of its own,
    so that the event loop (serving HTTP in `run`) is not held up meanwhile."""
    closing = [part for part in parts if part is not None]
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(part.close() for part in closing), return_exceptions=True), timeout
        )
    except TimeoutError:
        logger.info("tdmq close incomplete", error=f"no answer within {timeout:g}s")
    else:
        for part, outcome in zip(closing, outcomes, strict=True):
            if isinstance(outcome, Exception):
                logger.info(
                    "tdmq close incomplete", part=type(part).__name__, error=describe(outcome)
                )
    if client is not None:
        await asyncio.to_thread(client.shutdown)
