"""A TCP proxy on loopback that a test can cut and restore: a database (or broker) that
goes away and comes back, without stopping the machine's own server, which other tests
use at the same time.

In-process: `async with TcpProxy(upstream_port) as proxy: ... await proxy.cut() ...
await proxy.restore()`. Cutting closes every connection and stops listening, as a server
that went down would look from outside. Stalling (`stall`, then `flow`) is a network
that stops carrying packets: connections stay open and new ones are taken, but no byte
goes either way until it flows again, when what was held goes on. For a test that
drives child processes and waits on them (blocking), `ThreadedProxy` runs the same
proxy on an event loop of its own thread: `with ThreadedProxy(port) as proxy: ...
proxy.cut() ... proxy.restore()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any

from tests.support.processes import free_port


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def __aenter__(self) -> TcpProxy:
        await self.restore()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.cut()

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        self._flowing.set()  # connections taken while stalled end, cut like the others
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._flowing.wait()
        except asyncio.CancelledError:  # the loop closing while stalled: nothing to report
            writer.transport.abort()
            return
        finally:
            self._writers.discard(writer)
        if writer.transport.is_closing():  # cut while stalled
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for end in (writer, up_writer):
                end.transport.abort()
                self._writers.discard(end)
            self._pipes.difference_update(pipes)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                await self._flowing.wait()  # stalled: held, as a cut network holds it
                writer.write(data)
                await writer.drain()


class ThreadedProxy:
    """A `TcpProxy` served from a thread of its own, driven by blocking calls."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._proxy = TcpProxy(upstream_port, upstream_host)

    @property
    def port(self) -> int:
        return self._proxy.port

    def __enter__(self) -> ThreadedProxy:
        self.restore()
        return self

    def __exit__(self, *_: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> None:
        self._call(self._proxy.cut())

    def restore(self) -> None:
        self._call(self._proxy.restore())

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(30)
