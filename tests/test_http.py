"""The HTTP receiver over real HTTP on loopback, against `ci-receiver serve` as a process."""

from __future__ import annotations

import pytest

from receiver import parse_callback
from tests.callbacks import ALL, load
from tests.processes import Receiver


@pytest.fixture
def receiver(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[dispatch]
poll_interval = 0.2
[handlers.jobs]
type = "sqlite"
path = "{tmp_path / "jobs.db"}"
[handlers.log]
type = "log"
"""
    )
    process = Receiver(config).start()
    yield process
    process.stop()


def test_every_fixture_is_accepted_and_repeats_are_duplicates(receiver):
    seen: set[str] = set()
    for name in ALL:
        expected = [event.id for event in parse_callback(load(name))]
        response = receiver.post(load(name))
        assert response.status_code == 200, (name, response.text)
        answer = response.json()
        assert answer["ids"] == expected
        assert answer["accepted"] == len(set(expected) - seen), name
        assert answer["duplicates"] == len(set(expected) & seen), name
        assert response.headers["x-request-id"]
        seen.update(expected)
