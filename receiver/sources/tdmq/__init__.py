"""TDMQ for Pulsar: the consumer behind `ci-receiver consume` / `run`, and relay mode.

- `consumer`: CI callbacks from Pulsar topics into the inbox, acked once committed;
- `relay`: `serve` publishing each callback to a topic instead of keeping it;
- `messages`: a callback as a Pulsar message and back (properties carry the headers).

The Pulsar client itself, shared with the `pulsar` handler, is `receiver.pulsar_client`.
"""

from receiver.pulsar_client.connect import TdmqError
from receiver.sources.tdmq.consumer import TdmqConsumer
from receiver.sources.tdmq.relay import Relay, RelayService

__all__ = ["Relay", "RelayService", "TdmqConsumer", "TdmqError"]
