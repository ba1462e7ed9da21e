"""ci-receiver changes only what it created.

Where it would create a table (the `sql` handler's tables, the inbox's), something of
that name may already be there: a user's own table, or a file that is not an inbox.
It is used only when it carries ci-receiver's mark (a mark kept beside it, which would
outlive it, counts only while it still has ci-receiver's key), or, unmarked, has the exact
shape an earlier version made (which then gets the mark: adopted). Anything else is left
as it is, and the start is refused with the object's name and the option that points
ci-receiver elsewhere. How the mark is kept is each store's own (see its module); the
rule is this one.
"""

from __future__ import annotations

from typing import Literal

# new: nothing there, to be created and marked; ours: marked; adopted: an earlier
# version's, to be marked now.
Claim = Literal["new", "ours", "adopted"]


class NotOurs(RuntimeError):
    """Something ci-receiver did not create is where it would write."""


def claim(what: str, option: str, *, exists: bool, marked: bool, shaped: bool) -> Claim:
    """Whether ci-receiver may use `what`; raises `NotOurs`, naming `option`, when not."""
    if not exists:
        return "new"
    if marked:
        return "ours"
    if shaped:
        return "adopted"
    raise NotOurs(
        f"{what} was not created by ci-receiver, so it is left as it is;"
        f" set {option} to use another"
    )
