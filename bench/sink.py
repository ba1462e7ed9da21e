"""The benchmark's webhook receiver (and OTLP collector stand-in): answers 204 to any
POST, reading the whole body. `start()` runs it in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.processes import free_port, wait_for_port


def start() -> tuple[subprocess.Popen[bytes], str]:
    """uvicorn serving `app` on a free loopback port; the process and its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.sink:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    wait_for_port(port, process)
    return process, f"http://127.0.0.1:{port}"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
