"""The TLS listener (receiver/sources/tls_accept.py) in this process, under asyncio's own
event loop and under uvloop (which `serve` runs on): clients that send their hello and
their request the moment they are connected are all served, and a server shut down with
handshakes in progress closes them and leaves no task behind.

Under uvloop a transport reads right after `connection_made`, whatever it asked: a hello
read there, before the TLS layer took the connection, would be lost and the client never
answered."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from receiver.sources.http_server import BoundedConfig, Guard, Server, ServerLimits
from receiver.sources.listen import listen
from receiver.sources.tls import TlsCertificate, TlsFiles
from tests.support.certificates import Certificates

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


async def hello(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


def tls_server(certificates: Certificates, **limits: Any) -> Server:
    certificate = TlsCertificate("public", TlsFiles("http", certificates.cert, certificates.key))
    guard = Guard("public", ServerLimits(**limits), None)
    return Server(BoundedConfig(hello, guard=guard, tls=certificate))


async def serving(server: Server, sock: socket.socket) -> asyncio.Task[None]:
    task = asyncio.create_task(server.serve([sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return task


@pytest.mark.parametrize("loop", LOOPS)
def test_clients_sending_at_once_are_all_served(certificates, loop):
    server = tls_server(certificates)
    sock = listen("public", "127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def one() -> bytes:
        # The hello goes out as soon as the connection is made, the request right after
        # the handshake: nothing waits for the server to be ready to read.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=certificates.client(), server_hostname="127.0.0.1"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer

    async def main() -> None:
        running = await serving(server, sock)
        assert type(asyncio.get_running_loop()).__module__.startswith(loop)
        answers = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(50))), 20)
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert answer.endswith(b"hello")
        server.should_exit = True
        await running

    LOOPS[loop](main())


@pytest.mark.parametrize("loop", LOOPS)
def test_shutdown_closes_the_handshakes_in_progress(certificates, loop):
    server = tls_server(certificates, header_timeout=30)
    sock = listen("public", "127.0.0.1", 0)
    port = sock.getsockname()[1]

    async def main() -> None:
        running = await serving(server, sock)
        loop = asyncio.get_running_loop()
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for client in silent:
            client.setblocking(False)
        while len(server.config.guard.handshakes) < 3:
            await asyncio.sleep(0.01)
        tasks_before = len(asyncio.all_tasks())
        server.should_exit = True
        await asyncio.wait_for(running, 5)  # not header_timeout: nothing waits for them
        for client in silent:
            assert await asyncio.wait_for(loop.sock_recv(client, 100), 5) == b""
            client.close()
        assert len(server.config.guard.handshakes) == 0
        # Their handshakes' tasks are over, not left pending (the server's own is done).
        assert len(asyncio.all_tasks()) == tasks_before - 4

    LOOPS[loop](main())
