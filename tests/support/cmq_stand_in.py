"""For the CMQ tests and benchmark: the loopback CMQ stand-in as a process, a publisher
that signs as CMQ documents (with the stand-in's own signer, not ci-receiver's), and a
ci-receiver installation reading from it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from tests.support.cmq_server import PATH, sign
from tests.support.installations import Installation
from tests.support.processes import REPO, free_port, wait_for_port

SECRET_ID = "AKIDstandin0123456789abcdefghijklmnop"
SECRET_KEY = "stand-in-secret-key-0123456789ab"
QUEUE = "ci-callbacks"


class CmqStandIn:
    """`python -m tests.support.cmq_server` on a free port, over an SQLite file that outlives the
    process: `kill()` and `start()` again keep the queues."""

    def __init__(
        self, folder: Path, queues: Iterable[str] = (QUEUE,), visibility_timeout: float = 30
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.queues = list(queues)
        self.visibility_timeout = visibility_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._http = httpx.Client(timeout=30)

    def start(self) -> CmqStandIn:
        command = [
            sys.executable,
            "-m",
            "tests.support.cmq_server",
            "--port",
            str(self.port),
            "--db",
            str(self.folder / "cmq.db"),
            "--key",
            f"{SECRET_ID}:{SECRET_KEY}",
            "--visibility-timeout",
            str(self.visibility_timeout),
        ]
        for queue in self.queues:
            command += ["--queue", queue]
        log = open(self.folder / "cmq-server.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for_port(self.port, self.process)
        return self

    def kill(self) -> None:
        """Gone at once, as a crashed or restarted endpoint: no answer to what is in flight."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.kill()
        self._http.close()

    # --- CMQ's own actions, signed as documented ---------------------------------------

    def call(self, action: str, params: dict[str, str], key: str = SECRET_KEY) -> dict[str, Any]:
        form = {
            **params,
            "Action": action,
            "SecretId": SECRET_ID,
            "Timestamp": str(int(time.time())),
            "Nonce": str(random.randint(1, 2**31)),
            "SignatureMethod": "HmacSHA256",
        }
        form["Signature"] = sign(key, "POST", f"127.0.0.1:{self.port}", PATH, form)
        return self._http.post(self.url + PATH, data=form).json()

    def send(self, bodies: Iterable[bytes | str], queue: str = QUEUE) -> int:
        """Put each body on the queue (BatchSendMessage, 16 at a time); returns how many."""
        batch: list[str] = []
        count = 0
        for body in bodies:
            batch.append(body.decode() if isinstance(body, bytes) else body)
            if len(batch) == 16:
                count += self._send(batch, queue)
                batch = []
        return count + (self._send(batch, queue) if batch else 0)

    def _send(self, bodies: list[str], queue: str) -> int:
        params = {"queueName": queue}
        params.update({f"msgBody.{n}": body for n, body in enumerate(bodies)})
        answer = self.call("BatchSendMessage", params)
        assert answer["code"] == 0, answer
        return len(answer["msgList"])

    # --- the stand-in's test controls --------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return self._http.get(self.url + "/_stand-in/stats").json()

    def control(self, **change: Any) -> None:
        """throttle=N / unavailable=N: the next N requests; deny=[actions];
        refuse={"code": C, "message": M}: every request until refuse=None."""
        # ASCII JSON: a lone surrogate (a raw_body standing for a byte that is not UTF-8)
        # travels as its escape.
        body = json.dumps(change).encode()
        self._http.post(
            self.url + "/_stand-in/control",
            content=body,
            headers={"content-type": "application/json"},
        ).raise_for_status()


def cmq_section(stand_in: CmqStandIn, **keys: Any) -> str:
    """`[cmq]` reading the stand-in's queues; `keys` add or replace settings."""
    settings: dict[str, Any] = {
        "endpoint": stand_in.url,
        "secret_id": SECRET_ID,
        "secret_key": SECRET_KEY,
        "queues": stand_in.queues,
        "polling_wait": 1,
        **keys,
    }
    lines = ["[cmq]"]
    for name, value in settings.items():
        if isinstance(value, str):
            lines.append(f'{name} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{name} = [{', '.join(repr(v) for v in value)}]".replace("'", '"'))
        else:
            lines.append(f"{name} = {value}")
    return "\n".join(lines) + "\n"


class CmqSite(Installation):
    """An installation consuming from the stand-in's queues; `extra` is TOML for other
    sections (with their headers)."""

    def __init__(self, folder: Path, stand_in: CmqStandIn, extra: str = "", **cmq: Any) -> None:
        super().__init__(folder)
        self.config.write_text(
            f'data_dir = "{folder / "data"}"\n'
            '[log]\nformat = "json"\n'
            "[dispatch]\npoll_interval = 0.2\n"
            f'[handlers.jobs]\ntype = "jsonl"\npath = "{self.jsonl}"\ninclude_raw = false\n'
            + cmq_section(stand_in, **cmq)
            + extra
        )
