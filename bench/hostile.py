"""What hostile bodies cost the other senders of one `ci-receiver serve`.

    python -m bench.hostile [--seconds 10]

One honest sender posts small JSON callbacks back to back and records each latency:
alone (the baseline), then while 1 and then 4 hostile senders post bodies of 1 MiB that
take the most CPU to refuse (a flat list of XML elements up to the element limit),
rounds in the same run. Bodies over 64 KiB are parsed off the event loop, one at a time,
so the cost to others should not grow with the number of hostile senders.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from tests.support.callbacks import load
from tests.support.processes import REPO, free_port, wait_for_port

MiB = 1024 * 1024
HONEST = load("smartcover.json")
HONEST_JOB = b"j6842765cf84611ecb8546d80f2baf56f"
WIDE_XML = b"<Response>" + b"<a/>" * ((MiB - 30) // 4) + b"</Response>"


async def honest(url: str, seconds: float) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            body = HONEST.replace(HONEST_JOB, b"j" + uuid.uuid4().hex.encode())
            began = time.perf_counter()
            answer = await client.post(url, content=body)
            latencies.append(time.perf_counter() - began)
            assert answer.status_code == 200, answer.text
    return latencies


async def hostile(url: str, stop: asyncio.Event) -> int:
    sent = 0
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            answer = await client.post(url, content=WIDE_XML)
            assert answer.status_code == 400, answer.text
            sent += 1
    return sent


async def round_with(url: str, attackers: int, seconds: float) -> tuple[list[float], int]:
    stop = asyncio.Event()
    attacks = [asyncio.create_task(hostile(url, stop)) for _ in range(attackers)]
    await asyncio.sleep(0.5 if attackers else 0)
    latencies = await honest(url, seconds)
    stop.set()
    return latencies, sum(await asyncio.gather(*attacks))


def line(name: str, latencies: list[float], refused: int, baseline: float) -> str:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    return (
        f"{name:<22} {len(ordered):7d} {p50:8.1f} {p99:8.1f} {ordered[-1] * 1000:8.1f}"
        f" {refused:8d}  {p99 / baseline if baseline else 1:5.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ci-receiver-hostile-") as folder:
        port = free_port()
        config = Path(folder) / "ci-receiver.toml"
        config.write_text(
            f'data_dir = "{folder}/data"\n[admin]\nenabled = false\n[log]\nlevel = "warning"\n'
            "[inbox]\nrejected_bytes_per_hour = 0\n"
        )
        command = ["serve", "--config", str(config), "--port", str(port)]
        child = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            wait_for_port(port, child)
            url = f"http://127.0.0.1:{port}/callbacks"
            print(f"honest sender: {len(HONEST)}-byte JSON; hostile: {len(WIDE_XML)}-byte XML")
            print("round                  honest   p50 ms   p99 ms   max ms  refused  p99 vs alone")
            baseline = 0.0
            for attackers in (0, 1, 4):
                latencies, refused = asyncio.run(round_with(url, attackers, args.seconds))
                if not attackers:
                    baseline = sorted(latencies)[int(len(latencies) * 0.99)] * 1000
                name = f"with {attackers} hostile" if attackers else "alone"
                print(line(name, latencies, refused, baseline), flush=True)
        finally:
            child.terminate()
            child.wait(30)


if __name__ == "__main__":
    main()
