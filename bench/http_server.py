"""What the bounds of `receiver.sources.http_server` cost per request.

    python -m bench.http_server [--requests 20000] [--connections 16] [--rounds 3]

The same minimal ASGI app (reads the body, answers 200) served by uvicorn with its own
httptools protocol (the baseline) and with `BoundedHttpProtocol`, each in its own
process, rounds interleaved. Clients keep their connections alive and post a 1 KiB
body. What is compared is the server process's CPU time per request (user + system,
from psutil), which the speed of the Python client does not change.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

from bench.http import cpu_seconds
from tests.support.processes import free_port, wait_for_port

BODY = b"<Response>" + b"x" * 1000 + b"</Response>"
REQUEST = (
    b"POST /callbacks HTTP/1.1\r\nHost: bench\r\nContent-Type: application/xml\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


async def app(scope, receive, send) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def serve(kind: str, port: int) -> None:
    import uvicorn

    from receiver.sources.http_server import BoundedConfig, Guard, Server, ServerLimits

    common = {"host": "127.0.0.1", "port": port}
    if kind == "bounded":
        config: uvicorn.Config = BoundedConfig(
            app, guard=Guard("bench", ServerLimits(), None), **common
        )
    else:
        config = uvicorn.Config(
            app,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            **common,
        )
    server = Server(config)
    import uvloop

    uvloop.run(server.serve())


async def drive(port: int, requests: int, connections: int) -> None:
    per_connection = requests // connections

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(per_connection):
            writer.write(REQUEST)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))


def measure(kind: str, requests: int, connections: int) -> float:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.http_server", "--serve", kind, "--port", str(port)]
    )
    try:
        wait_for_port(port, child)
        asyncio.run(drive(port, connections * 10, connections))  # warm up
        before = cpu_seconds(child.pid)
        asyncio.run(drive(port, requests, connections))
        return (cpu_seconds(child.pid) - before) / requests * 1e6
    finally:
        child.terminate()
        child.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=["plain", "bounded"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    best = {"plain": float("inf"), "bounded": float("inf")}
    for _ in range(args.rounds):
        for kind in best:
            best[kind] = min(best[kind], measure(kind, args.requests, args.connections))
    print(
        f"{args.requests} keep-alive requests over {args.connections} connections,"
        f" best of {args.rounds}: server CPU per request"
    )
    print(f"uvicorn httptools protocol   {best['plain']:7.1f} µs")
    print(f"BoundedHttpProtocol          {best['bounded']:7.1f} µs")
    print(
        f"difference                   {best['bounded'] - best['plain']:+7.1f} µs"
        f"  ({best['bounded'] / best['plain']:.2f}x)"
    )


if __name__ == "__main__":
    main()
