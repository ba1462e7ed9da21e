"""The test kit's pytest fixtures (`receiver.testing`), loaded by pytest wherever
ci-receiver is installed (the `pytest11` entry point `ci_receiver`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from receiver import testing
from receiver.callback.event import Event


@pytest.fixture
def ci_sample() -> Callable[[str], Event]:
    """`ci_sample("transcode-failed")`: a new event of that sample callback."""
    return testing.sample


@pytest.fixture
def ci_samples() -> dict[str, Event]:
    """One event of every sample callback, by name."""
    return testing.samples()


@pytest.fixture
def ci_run_handler() -> Callable[..., object]:
    """`await ci_run_handler(handler, *events, attempts=3)`: `receiver.testing.run_handler`."""
    return testing.run_handler
