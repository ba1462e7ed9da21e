"""What the load benchmarks need on the machine, or a one-line reason to stop."""

from __future__ import annotations

import shutil
import sys

from tests.support.databases import answers, server_url


def wrk(bench: str) -> None:
    if shutil.which("wrk") is None:
        sys.exit(f"{bench} needs wrk: apt-get install wrk")


def postgres(bench: str) -> str:
    """The URL of the PostgreSQL server the benchmark uses (CI_RECEIVER_TEST_POSTGRES_URL)."""
    url = server_url("postgresql")
    if not answers(url):
        sys.exit(f"{bench} needs PostgreSQL: nothing answers at {url}")
    return url
