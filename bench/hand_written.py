"""The callback receiver a team would write by hand, plainly, for bench/peer.py to put
ci-receiver next to: decode, one INSERT ... ON CONFLICT DO NOTHING per callback, 200.

    HAND_WRITTEN_DATABASE=postgresql://...  HAND_WRITTEN_SCHEMA=callbacks \\
    uvicorn bench.hand_written:app --loop uvloop --http httptools --no-access-log

HAND_WRITTEN_DATABASE is a postgresql:// URL (an asyncpg pool of 16) or a SQLite file
(WAL, synchronous=FULL, a commit per callback in a thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import asyncpg
import orjson
import xmltodict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

DATABASE = os.environ["HAND_WRITTEN_DATABASE"]
SCHEMA = os.environ.get("HAND_WRITTEN_SCHEMA", "public")
POSTGRES = DATABASE.startswith(("postgresql://", "postgres://"))


def job_id(document: dict[str, Any], body: bytes) -> str:
    # XML: <Response><JobsDetail><JobId>; JSON: {"JobsDetail": [{"JobId": ...}]}.
    detail = document.get("Response", document).get("JobsDetail")
    if isinstance(detail, list) and detail:
        detail = detail[0]
    if isinstance(detail, dict) and isinstance(job := detail.get("JobId"), str):
        return job
    return hashlib.sha256(body).hexdigest()


class Postgres:
    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(DATABASE, min_size=16, max_size=16)
        await self.pool.execute(f"""CREATE SCHEMA IF NOT EXISTS {SCHEMA};
            CREATE TABLE IF NOT EXISTS {SCHEMA}.callbacks (
                id text PRIMARY KEY, document jsonb NOT NULL, received_at timestamptz NOT NULL)""")

    async def store(self, key: str, document: str, received_at: datetime) -> None:
        await self.pool.execute(
            f"INSERT INTO {SCHEMA}.callbacks VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
            key, document, received_at,
        )  # fmt: skip

    async def close(self) -> None:
        await self.pool.close()


class Sqlite:
    async def open(self) -> None:
        self.connection = sqlite3.connect(DATABASE, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")
        self.connection.execute("""CREATE TABLE IF NOT EXISTS callbacks (
            id text PRIMARY KEY, document text NOT NULL, received_at text NOT NULL)""")
        self.lock = asyncio.Lock()

    def _insert(self, key: str, document: str, received_at: datetime) -> None:
        self.connection.execute(
            "INSERT INTO callbacks VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (key, document, received_at.isoformat()),
        )
        self.connection.commit()

    async def store(self, key: str, document: str, received_at: datetime) -> None:
        async with self.lock:
            await asyncio.to_thread(self._insert, key, document, received_at)

    async def close(self) -> None:
        self.connection.close()


database = Postgres() if POSTGRES else Sqlite()


async def callbacks(request: Request) -> PlainTextResponse:
    body = await request.body()
    try:
        if "xml" in request.headers.get("content-type", ""):
            document = xmltodict.parse(body)
        else:
            document = orjson.loads(body)
    except Exception:
        document = None
    if not isinstance(document, dict):
        return PlainTextResponse("bad body", status_code=400)
    received_at = datetime.now(timezone.utc)
    await database.store(job_id(document, body), orjson.dumps(document).decode(), received_at)
    return PlainTextResponse("ok")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await database.open()
    yield
    await database.close()


app = Starlette(routes=[Route("/callbacks", callbacks, methods=["POST"])], lifespan=lifespan)
