from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.processes import PulsarLite

# `HYPOTHESIS_PROFILE=deep pytest tests/test_properties.py` for a long fuzzing run.
settings.register_profile(
    "default", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def pulsar_broker(tmp_path):
    """A pulsar-lite broker of this test's own; `.stop()` / `.start()` restart it."""
    broker = PulsarLite(tmp_path / "pulsar")
    broker.start()
    yield broker
    broker.stop()
