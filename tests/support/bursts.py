"""Many senders at one moment, each posting one callback over a connection of its own
and reading the answer, as CI's senders do when a batch of jobs ends together. Used by
tests/sources/test_http_burst.py and `python -m bench.burst`."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass

from tests.support.callbacks import ci_json_from_xml, load

SNAPSHOT = load("snapshot.xml")
SNAPSHOT_JOB = b"j4e431ba0f86711ecb8546d80f2baf56f"
BODIES = {
    "xml": (SNAPSHOT, b"application/xml"),
    "json": (ci_json_from_xml(SNAPSHOT), b"application/json"),
}
# Longer than any bound of the server: an answer that never comes is counted as such.
ANSWER_TIMEOUT = 60.0


@dataclass
class Answer:
    status: str  # "200", "503", ...; "closed": the connection ended with no answer
    seconds: float  # from the start of the burst
    headers: bytes = b""
    job_id: str = ""


def request(port: int, body: str, job_id: str) -> bytes:
    content, content_type = BODIES[body]
    unique = content.replace(SNAPSHOT_JOB, job_id.encode())
    return (
        b"POST /callbacks HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: %s\r\n"
        b"content-length: %d\r\nuser-agent: burst\r\n\r\n%s"
        % (port, content_type, len(unique), unique)
    )


async def burst(port: int, senders: int, body: str = "xml") -> list[Answer]:
    """`senders` connections opened at once, each posting a Snapshot callback with a
    JobId of its own; their answers."""
    job_ids = ["j" + uuid.uuid4().hex for _ in range(senders)]
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(_send(port, request(port, body, job_id), job_id, go))
        for job_id in job_ids
    ]
    await asyncio.sleep(0.2)  # every sender waiting for `go`
    go.set()
    return list(await asyncio.gather(*tasks))


async def _send(port: int, payload: bytes, job_id: str, go: asyncio.Event) -> Answer:
    await go.wait()
    began = time.monotonic()
    try:
        status, headers = await asyncio.wait_for(_exchange(port, payload), ANSWER_TIMEOUT)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        status, headers = "closed", b""
    except TimeoutError:
        status, headers = "timeout", b""
    return Answer(status, time.monotonic() - began, headers, job_id)


async def _exchange(port: int, payload: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        line = await reader.readline()
        if not line.startswith(b"HTTP/1.1 "):
            return "closed", b""
        headers = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", headers, re.IGNORECASE)
        await reader.readexactly(int(length[1]) if length else 0)
        return line.split()[1].decode(), headers
    finally:
        writer.close()
