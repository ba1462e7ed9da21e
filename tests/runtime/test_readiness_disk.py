"""Readiness tells the truth: with the disk of the inbox full, /readyz is 503 with the
reason, callbacks get 503 + Retry-After (nothing is answered 200 unless kept), and all of
it recovers by itself when space returns.

The full disk is real: a small tmpfs mounted for the test (which needs the privilege to
mount; the test is skipped without it).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.callbacks import load
from tests.support.processes import Receiver
from tests.support.waiting import wait_until


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        for size in (65536, 512):  # then the last few bytes
            with contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * size)
    return filler


def serve(disk: Path, min_free_bytes: int) -> Receiver:
    config = disk.parent / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{disk / "data"}"\n[inbox]\nmin_free_bytes = {min_free_bytes}\n'
        '[handlers.log]\ntype = "log"\n'
    )
    return Receiver(config).start()


def job(number: int) -> bytes:
    # A callback of ~40 KiB: past what SQLite can fit in pages it already has.
    return (
        load("transcode.xml")
        .replace(b"</JobsDetail>", b"<Pad>" + b"x" * 40_000 + b"</Pad></JobsDetail>")
        .replace(b"<JobId>j", b"<JobId>j%d" % number, 1)
    )


def admin_checks(receiver: Receiver) -> dict[str, str]:
    return httpx.get(receiver.admin_url + "/readyz").json()["checks"]


def test_a_full_disk_makes_it_unready_with_the_reason_and_it_recovers(small_disk):
    receiver = serve(small_disk, min_free_bytes=1024 * 1024)
    try:
        assert receiver.post(job(1)).status_code == 200
        filler = fill(small_disk)
        public = httpx.get(receiver.url + "/readyz")
        assert (public.status_code, public.json()) == (503, {"ready": False})
        assert public.headers["retry-after"] == "5"
        assert "below inbox.min_free_bytes" in admin_checks(receiver)["disk"]
        refused = receiver.post(job(2))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        filler.unlink()
        wait_until(lambda: httpx.get(receiver.url + "/readyz").status_code == 200, what="ready")
        assert receiver.post(job(2)).status_code == 200  # sent again: kept this time
    finally:
        receiver.stop()


def test_without_the_free_space_check_a_failing_commit_shows_until_one_succeeds(small_disk):
    receiver = serve(small_disk, min_free_bytes=0)
    try:
        filler = fill(small_disk)
        assert receiver.post(job(1)).status_code == 503
        checks = admin_checks(receiver)
        # The inbox tries a write of its own after a failed commit: the disk is full.
        assert checks["inbox"].startswith("not writable: ")
        assert "full" in checks["inbox"] or str(errno.ENOSPC) in checks["inbox"]
        assert httpx.get(receiver.url + "/readyz").status_code == 503
        assert receiver.post(job(2)).status_code == 503
        filler.unlink()
        assert receiver.post(job(1)).status_code == 200
        assert admin_checks(receiver)["inbox"] == "writable"
    finally:
        receiver.stop()
    # Said once as it began and once as it ended, however many callbacks failed between:
    # no traceback per callback.
    log = receiver.log()
    assert log.count("inbox not writable; callbacks are answered 503 until it is") == 1
    assert log.count("inbox writable again") == 1
    assert "Traceback" not in log
