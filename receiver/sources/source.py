"""What every source is to the runner (`receiver.runtime.runner`): a name, a `run` that
lasts until `stop` is called, and a `stop` that returns at once."""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """A source of callbacks, run by the runner until the process stops: the public HTTP
    server and the admin listener (`receiver.sources.http_source`), the CMQ and TDMQ
    consumers, the reconciler. A worker's link to its supervisor
    (`receiver.runtime.worker`) is run the same way: it ends the worker when it ends.

    `run` ending (or failing) before `stop` is called stops the process, exit code 1:
    a source runs for as long as the process does."""

    @property
    def name(self) -> str:
        """What the log calls it (its task's name)."""
        ...

    async def run(self) -> None: ...

    def stop(self) -> None:
        """Ask `run` to end, finishing what it has under way; returns at once."""
        ...
