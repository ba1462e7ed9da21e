"""`ci-receiver <command>` run to its end, as a user at a shell, for the tests of what the
commands print and return."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.support.processes import REPO


def ci_receiver(
    config: Path | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    text: bool = False,
    ok: bool = False,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """The command in the config's folder (or `cwd`), the config named by
    CI_RECEIVER_CONFIG (which every command reads as `--config`). The environment is
    bare, so nothing of the machine's leaks in: PYTHONPATH (configs name the tests'
    handlers by dotted path) and `env`. `ok`: the test fails, showing stderr, unless the
    command exits 0."""
    environment = {"PYTHONPATH": str(REPO), **(env or {})}
    if config is not None:
        environment["CI_RECEIVER_CONFIG"] = str(config)
    result = subprocess.run(
        [sys.executable, "-m", "receiver.cli", *args],
        capture_output=True,
        text=text,
        timeout=60,
        cwd=cwd or (None if config is None else config.parent),
        env=environment,
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def cli(folder: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
    """The command on the `ci-receiver.toml` of a test's folder, bytes out; it must exit 0
    unless `ok` is False."""
    return ci_receiver(folder / "ci-receiver.toml", *args, ok=ok)


def ci_cli(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command on the `ci-receiver.toml` of a test's folder that takes CI's secret key
    from ${CI_TEST_SECRET_KEY}, the key the config's writer left in `secret_key` beside
    it (as the reconciliation and verification tests do); text out."""
    secret_key = (folder / "secret_key").read_text()
    return ci_receiver(
        folder / "ci-receiver.toml",
        *args,
        env={"CI_TEST_SECRET_KEY": secret_key, "PATH": "/usr/bin:/bin", **env},
        text=True,
    )
