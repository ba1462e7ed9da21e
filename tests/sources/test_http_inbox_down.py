"""When the inbox cannot take a callback, the sender is told to send it again (503),
also for a body that would be refused: it must be kept before it is refused."""

from __future__ import annotations

import asyncio

import httpx
import uvicorn

from receiver.config import Config
from receiver.runtime.service import Service
from receiver.sources.http import create_app
from tests.support.callbacks import load
from tests.support.processes import free_port


async def test_a_refusal_that_cannot_be_kept_is_a_503(tmp_path):
    service = Service(Config(data_dir=tmp_path, limits={"max_bytes": 2000}))
    await service.start()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), port=port, lifespan="off", log_config=None)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.post("/callbacks", content=b"nope")).status_code == 400
            await service.inbox.close()  # from here on, nothing can be kept
            for body in (b"nope", b"<" + b"x" * 3000, load("transcode.xml")):
                answer = await client.post("/callbacks", content=body)
                assert answer.status_code == 503, body[:10]
                assert answer.json()["error"] == "inbox_unavailable"
    finally:
        server.should_exit = True
        await serving
        await service.dispatcher.stop()
