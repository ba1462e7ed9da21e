"""A handler driven directly, as the dispatcher drives it: for the tests of each handler
against its real peer."""

from __future__ import annotations

from typing import Any

import handlers
from receiver.callback.event import Event


async def run_handler(type_name: str, options: dict[str, Any], *events: Event) -> None:
    """Build the handler as a config names it, start it, hand it the events one by one,
    and close it, also when one of them fails."""
    handler = handlers.build(type_name, options)
    await handlers.start(handler)
    try:
        for one in events:
            await handler(one)
    finally:
        await handlers.close(handler)
