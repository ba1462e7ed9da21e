"""The test kit's pytest fixtures (`receiver.testing`), loaded by pytest wherever
ci-receiver is installed (the `pytest11` entry point `ci_receiver`). The kit is imported
when a fixture is used, not when pytest loads the plugin: a project's tests that use none
of it pay nothing for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from receiver.callback.event import Event


@pytest.fixture
def ci_sample() -> Callable[[str], Event]:
    """`ci_sample("transcode-failed")`: a new event of that sample callback."""
    from receiver import testing

    return testing.sample


@pytest.fixture
def ci_samples() -> dict[str, Event]:
    """One event of every sample callback, by name."""
    from receiver import testing

    return testing.samples()


@pytest.fixture
def ci_run_handler() -> Callable[..., object]:
    """`await ci_run_handler(handler, *events, attempts=3)`: `receiver.testing.run_handler`."""
    from receiver import testing

    return testing.run_handler
