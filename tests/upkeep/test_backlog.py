"""Backlog gauges, on each inbox backend, and as a running receiver serves them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx
from prometheus_client import CollectorRegistry

from receiver import parse_callback
from receiver.inbox import Receipt
from receiver.upkeep.backlog import BacklogMonitor
from tests.support.callbacks import job, load
from tests.support.processes import Receiver
from tests.support.waiting import wait_until


async def store(inbox, body: bytes, handlers: list[str]) -> None:
    receipt = Receipt(body, "http", datetime.now(timezone.utc), "r")
    stored = await inbox.store(receipt, [(e, handlers) for e in parse_callback(body)])
    assert stored.new


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_gauges_show_pending_dead_the_oldest_wait_and_the_size(inbox):
    registry = CollectorRegistry()
    monitor = BacklogMonitor(inbox, ["a", "b", "idle"], registry)
    for number in range(3):
        await store(inbox, job(f"j{number:032x}"), ["a"])
    await store(inbox, job(f"j{10:032x}"), ["b"])
    (claim,) = await inbox.claim("b", 1, 30)
    await inbox.finish(claim, "dead", started_at=datetime.now(timezone.utc), error="x")

    await monitor.update()

    assert value(registry, "ci_receiver_pending_runs", handler="a") == 3
    assert value(registry, "ci_receiver_dead_letters", handler="b") == 1
    assert value(registry, "ci_receiver_pending_runs", handler="b") == 0
    assert value(registry, "ci_receiver_pending_runs", handler="idle") == 0
    assert value(registry, "ci_receiver_oldest_due_seconds", handler="a") >= 0
    assert value(registry, "ci_receiver_oldest_due_seconds", handler="b") == 0
    assert value(registry, "ci_receiver_inbox_bytes") > 0

    # A retry due in the future is pending but not yet waiting.
    for claim in await inbox.claim("a", 3, 30):
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        await inbox.finish(claim, "retry", started_at=later, retry_at=later)
    await monitor.update()
    assert value(registry, "ci_receiver_pending_runs", handler="a") == 3
    assert value(registry, "ci_receiver_oldest_due_seconds", handler="a") == 0

    # Handled since: back to zero, for a handler no longer configured too.
    await inbox.requeue(None, ["gone"], dead_only=False)
    await monitor.update()
    assert value(registry, "ci_receiver_pending_runs", handler="gone") == 4
    for claim in await inbox.claim("gone", 10, 30):
        await inbox.finish(claim, "done", started_at=datetime.now(timezone.utc))
    await monitor.update()
    assert value(registry, "ci_receiver_pending_runs", handler="gone") == 0


def test_a_running_receiver_serves_the_gauges(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        "[handlers.broken]\n"
        'type = "tests.support.handler_doubles:Recorder"\n'
        f'path = "{tmp_path / "broken.jsonl"}"\n'
        "fail_first = 99\n"
        "max_attempts = 1\n"
    )
    receiver = Receiver(config).start()
    try:
        assert receiver.post(load("transcode.xml")).status_code == 200

        def dead_letter_shown() -> bool:
            metrics = httpx.get(receiver.admin_url + "/metrics").text
            return 'ci_receiver_dead_letters{handler="broken"} 1.0' in metrics

        wait_until(dead_letter_shown, timeout=40, what="the dead letter in /metrics")
        metrics = httpx.get(receiver.admin_url + "/metrics").text
        assert 'ci_receiver_pending_runs{handler="broken"} 0.0' in metrics
        assert "ci_receiver_inbox_bytes " in metrics
        assert receiver.terminate() == 0
    finally:
        receiver.stop()
