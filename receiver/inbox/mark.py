"""Whether an inbox is ci-receiver's: the same question on SQLite and PostgreSQL, each
schema module reading and writing its `meta` table in its own SQL.

An inbox carries the mark, a row in `meta` written at every start. Unmarked, the tables
of every version and a schema version in `meta` are an inbox an earlier version made, to
be marked now; anything else of the inbox's names is a user's (receiver/ownership.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from receiver.ownership import Claim, claim

# The row in `meta` that says the tables are a ci-receiver inbox.
MARK = ("created_by", "ci-receiver")
# The rows of `meta` that tell whose the tables are.
KEYS = (MARK[0], "schema_version")


def claim_inbox(
    what: str, option: str, *, found: Set[str], meta: Mapping[str, str], every_version: Set[str]
) -> Claim:
    """Whether the tables `found` are ci-receiver's inbox (or there are none), given the
    rows of `KEYS` in their `meta` (none when it is not a table of keys and values) and the
    tables every version had; `NotOurs`, naming `option`, when they are not."""
    return claim(
        what,
        option,
        exists=bool(found),
        marked=meta.get(MARK[0]) == MARK[1],
        shaped=found >= every_version and meta.get("schema_version", "").isdigit(),
    )
