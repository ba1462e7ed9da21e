"""The `timeout` context manager a handler's start and attempts run under: asyncio's from
Python 3.11, async_timeout's (the same interface) on 3.10."""

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # pragma: no cover
    from async_timeout import timeout

__all__ = ["timeout"]
