"""A port taken between the bind and the listen. Two processes started at once with one
config both bind it (SO_REUSEADDR lets sockets share an address until one of them
listens); the server that comes to listen second says the port is taken, under asyncio's
event loop and under uvloop's, whose create_server would otherwise make a server with no
socket and go on as if it served."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from receiver.sources.http_server import BoundedConfig, Guard, Server, ServerLimits
from receiver.sources.listen import CannotListen, bind, listen

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("loop", LOOPS)
def test_a_port_another_process_listens_on_after_the_bind_is_said_to_be_taken(loop):
    ours = bind("public", "127.0.0.1", 0)
    port = ours.getsockname()[1]
    theirs = listen("public", "127.0.0.1", port)  # bound after ours, listening first
    server = Server(BoundedConfig(hello, guard=Guard("public", ServerLimits(), None)))

    async def main() -> None:
        with pytest.raises(CannotListen) as refused:
            await asyncio.wait_for(server.serve([ours]), 10)
        assert str(refused.value) == (
            f"the public HTTP server cannot listen on 127.0.0.1:{port}: [Errno 98] Address"
            " already in use; set another [http] port (CI_RECEIVER_HTTP__PORT) or host"
            " (CI_RECEIVER_HTTP__HOST)"
        )

    try:
        LOOPS[loop](main())
    finally:
        ours.close()
        theirs.close()
