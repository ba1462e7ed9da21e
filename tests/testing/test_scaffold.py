"""`ci-receiver new-handler`: the package it writes passes its own tests as written, and
once `pip install -e`'d its handler is found by `type = NAME`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import orjson
import pytest

from tests.support.processes import REPO


def cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    into = tmp_path_factory.mktemp("scaffold")
    made = cli("new-handler", "warehouse-rows", "--into", str(into))
    assert made.returncode == 0, made.stderr
    assert "wrote" in made.stdout
    return into / "ci-receiver-warehouse-rows"


def test_it_writes_a_package_with_its_handler_and_tests(written):
    files = sorted(str(p.relative_to(written)) for p in written.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "ci_receiver_warehouse_rows/__init__.py",
        "pyproject.toml",
        "tests/test_ci_receiver_warehouse_rows.py",
    ]
    pyproject = (written / "pyproject.toml").read_text()
    assert 'warehouse-rows = "ci_receiver_warehouse_rows:WarehouseRowsHandler"' in pyproject


def test_its_tests_pass_as_written(written):
    # Run as its author would, in its own folder: its pyproject's pytest settings.
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=written, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "14 passed" in ran.stdout


def test_pip_install_e_makes_it_a_handler_type(written, tmp_path):
    """A fresh virtual environment that sees this one's packages (ci-receiver, its
    dependencies, setuptools) through a .pth file, as ci-receiver's own would be."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # addsitedir, not a bare path: the .pth files there (ci-receiver's editable install)
    # count too.
    outer = sysconfig.get_paths()["purelib"]
    Path(purelib, "outer.pth").write_text(f"import site; site.addsitedir({outer!r})\n")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "-e", str(written)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        '[handlers.rows]\ntype = "warehouse-rows"\nstates = ["Failed"]\n'
    )
    checked = subprocess.run(
        [python, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert orjson.loads(checked.stdout)["handlers"]["rows"]["states"] == ["Failed"]
    refused = config.read_text().replace('states = ["Failed"]', "colour = 1")
    config.write_text(refused)
    checked = subprocess.run(
        [python, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert checked.returncode != 0
    assert "handlers.rows: bad options for handler type 'warehouse-rows': colour: unknown" in (
        checked.stderr
    )


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("Warehouse", "a handler type is lower-case letters and digits"),
        ("rows_2", "a handler type is lower-case letters and digits"),
        ("webhook", "'webhook' is a built-in handler type"),
    ],
)
def test_a_name_that_cannot_be_a_type_is_refused(tmp_path, name, says):
    made = cli("new-handler", name, "--into", str(tmp_path))
    assert made.returncode == 1
    assert says in made.stderr
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_written_over(written):
    before = (written / "README.md").read_text()
    (written / "README.md").write_text("mine")
    try:
        made = cli("new-handler", "warehouse-rows", "--into", str(written.parent))
        assert made.returncode == 1
        assert "exists; nothing was written" in made.stderr
        assert (written / "README.md").read_text() == "mine"
    finally:
        (written / "README.md").write_text(before)
