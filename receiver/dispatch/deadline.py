"""The `timeout` context manager a handler's start and attempts run under."""

from asyncio import timeout

__all__ = ["timeout"]
