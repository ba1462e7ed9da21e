"""Test-only, for tests/sources/tdmq/test_consume.py and tests/sources/cmq/test_consume.py:
imported at start-up by a ci-receiver process whose PYTHONPATH includes this folder.

CI_RECEIVER_TEST_STALL=before (or after): every TDMQ message (CMQ with
CI_RECEIVER_TEST_STALL_SOURCE=cmq), or batch of them, stops for good right before (or
right after) its inbox commit, once the file CI_RECEIVER_TEST_STALL_MARK is touched:
the test then kills the process at that exact point. With `hold`, messages wait before
their commit until the file CI_RECEIVER_TEST_RELEASE exists.

CI_RECEIVER_TEST_SKIP_CONSUMER_IDS=N: the process opens and closes N readers before it
subscribes. pulsar-lite 0.2 refuses a second consumer on a subscription when it has the
same client-side consumer id as the first ("Consumer 0 already exists"), though these
ids are per connection in Pulsar; two processes on one Shared subscription would both
use id 0.
"""

import asyncio
import os
from pathlib import Path

STAGE = os.environ.get("CI_RECEIVER_TEST_STALL")
SOURCE = os.environ.get("CI_RECEIVER_TEST_STALL_SOURCE", "tdmq")
SKIP_IDS = int(os.environ.get("CI_RECEIVER_TEST_SKIP_CONSUMER_IDS", "0"))

if STAGE in ("before", "after", "hold"):
    from receiver.ingest.ingest import Ingestor

    commit = Ingestor.ingest
    mark = Path(os.environ["CI_RECEIVER_TEST_STALL_MARK"])
    release = Path(os.environ.get("CI_RECEIVER_TEST_RELEASE", "/nonexistent"))

    async def stall() -> None:
        mark.touch()
        while not release.exists():
            await asyncio.sleep(0.05)

    async def ingest_with_stall(self, receipt):
        if receipt.source == SOURCE and STAGE in ("before", "hold"):
            await stall()
        stored = await commit(self, receipt)
        if receipt.source == SOURCE and STAGE == "after":
            await stall()
        return stored

    Ingestor.ingest = ingest_with_stall
    commit_many = Ingestor.ingest_many

    async def ingest_many_with_stall(self, receipts):
        # The TDMQ consumer commits a batch of messages at once: the same stalls.
        ours = any(receipt.source == SOURCE for receipt in receipts)
        if ours and STAGE in ("before", "hold"):
            await stall()
        outcomes = await commit_many(self, receipts)
        if ours and STAGE == "after":
            await stall()
        return outcomes

    Ingestor.ingest_many = ingest_many_with_stall

if SKIP_IDS:
    import pulsar

    from receiver.sources.tdmq.consumer import TdmqConsumer

    subscribe = TdmqConsumer._subscribe

    async def subscribe_with_other_ids(self):
        for _ in range(SKIP_IDS):
            reader = await self._client.create_reader(
                "persistent://public/default/test-consumer-ids", pulsar.MessageId.earliest
            )
            await reader.close()
        return await subscribe(self)

    TdmqConsumer._subscribe = subscribe_with_other_ids
