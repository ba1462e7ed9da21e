"""TDMQ for CMQ queues, where CI itself delivers callbacks (`CallBackType=TDMQ`).

- `consumer`: callbacks from the queues into the inbox, deleted once committed;
- `api`: the signed CMQ data API (receive, delete) over one pooled HTTP client.
"""

from receiver.sources.cmq.consumer import CmqConsumer, CmqError

__all__ = ["CmqConsumer", "CmqError"]
