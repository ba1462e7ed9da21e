"""The durable inbox: every callback, its events, and each handler's progress on them.

Its users see it by role (`roles.py`): ingest stores, the dispatcher works through the
run queue, the commands and the admin API read, retention keeps it small. Its rules are
written once (`manager.py`) over two connectors with the same semantics (one contract
test suite runs over both): SQLite, the embedded default on one host, and PostgreSQL,
shared by any number of receivers and consumers. `factory.open_inbox` gives the one a
config names.

Each callback's bytes are stored once, compressed, with its receipt. An event row keeps
the normalized fields it is filtered by and a reference to its receipt; the whole event,
`raw` and `operation` included, is rebuilt by decoding the receipt's body again when it
is read (see `records.py`).
"""

from receiver.inbox.roles import (
    Inbox,
    KeptState,
    Reading,
    ReadOnlyInbox,
    RunQueue,
    Storing,
    Upkeep,
)
from receiver.inbox.types import (
    RUN_STATUSES,
    VERIFY_RUN,
    Attempt,
    Backlog,
    Claim,
    Counts,
    Cutoffs,
    EventDetail,
    EventFilter,
    EventSummary,
    InboxUnavailable,
    Lease,
    Leases,
    Outcome,
    Pruned,
    Receipt,
    ReceiptOutcome,
    ReceiptSummary,
    RejectedReceipt,
    RunState,
    RunStatus,
    SchemaError,
    Stored,
    ToStore,
    Traffic,
)

__all__ = [
    "RUN_STATUSES",
    "VERIFY_RUN",
    "Attempt",
    "Backlog",
    "Claim",
    "Counts",
    "Cutoffs",
    "EventDetail",
    "EventFilter",
    "EventSummary",
    "Inbox",
    "InboxUnavailable",
    "KeptState",
    "Lease",
    "Leases",
    "Outcome",
    "Pruned",
    "ReadOnlyInbox",
    "Reading",
    "Receipt",
    "ReceiptOutcome",
    "ReceiptSummary",
    "RejectedReceipt",
    "RunQueue",
    "RunState",
    "RunStatus",
    "SchemaError",
    "Stored",
    "Storing",
    "ToStore",
    "Traffic",
    "Upkeep",
]
