"""How a handler type is found: built-ins, a dotted path, and an entry point of an
installed package (examples/custom-handler, installed for real and run by
`ci-receiver serve`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import handlers
from handlers import Context, Handler
from receiver.callback.event import Event
from tests.support.callbacks import load
from tests.support.processes import REPO, Receiver
from tests.support.sample_events import event
from tests.support.waiting import wait_until

EXAMPLE = REPO / "examples" / "custom-handler"


class Recorder:
    """A handler found by dotted path: `tests.handlers.test_plugins:Recorder`."""

    def __init__(self, options) -> None:
        self.seen: list[str] = []
        self.prefix = options.get("prefix", "")

    async def __call__(self, event: Event) -> None:
        self.seen.append(self.prefix + event.id)


async def bare(event: Event) -> None:
    """A plain function is a handler without options."""


class Warehouse(Handler):
    """The README's handler: a class with no `__init__`, as the test kit makes it."""

    async def __call__(self, event: Event, ctx: Context) -> None:
        pass


@pytest.mark.parametrize("name", sorted(handlers.BUILTINS))
def test_every_builtin_type_loads(name):
    assert callable(handlers.load_factory(name))


async def test_a_handler_by_dotted_path():
    handler = handlers.build("tests.handlers.test_plugins:Recorder", {"prefix": "> "})
    await handlers.start(handler)  # no start() or close(): both are optional
    await handler(event())
    await handlers.close(handler)
    assert handler.seen == [f"> {event().id}"]


def test_a_plain_function_takes_no_options():
    assert handlers.build("tests.handlers.test_plugins:bare", {}) is bare
    with pytest.raises(handlers.HandlerConfigError, match="takes no options"):
        handlers.build("tests.handlers.test_plugins:bare", {"x": 1})


def test_a_class_without_init_is_made_without_options():
    assert isinstance(handlers.build("tests.handlers.test_plugins:Warehouse", {}), Warehouse)
    with pytest.raises(handlers.HandlerConfigError, match=r"without __init__.*takes no options"):
        handlers.build("tests.handlers.test_plugins:Warehouse", {"x": 1})


@pytest.mark.parametrize(
    ("type_name", "says"),
    [
        ("no-such-type", "unknown handler type 'no-such-type': not built in (dingtalk, email"),
        ("tests.nowhere:Handler", "cannot import handler 'tests.nowhere:Handler'"),
        ("tests.handlers.test_plugins:Nothing", "has no attribute 'Nothing'"),
    ],
)
def test_unknown_types_are_explained(type_name, says):
    with pytest.raises(handlers.HandlerConfigError, match=re.escape(says)):
        handlers.load_factory(type_name)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """examples/custom-handler pip-installed into a folder of its own."""
    work = tmp_path_factory.mktemp("example")
    source = work / "source"
    shutil.copytree(EXAMPLE, source)  # building writes into the tree: not into the repo's
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, timeout=300,
    )  # fmt: skip
    return target


def example_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config with the example handler as `failures`; the config file and its folder."""
    config = tmp_path / "ci-receiver.toml"
    folder = tmp_path / "failed-jobs"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[dispatch]
poll_interval = 0.2
[handlers.failures]
type = "failed-jobs"
folder = "{folder}"
"""
    )
    return config, folder


def with_example(installed_example: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{installed_example}{os.pathsep}{REPO}"}


def test_the_example_package_is_found_through_its_entry_point(installed_example, tmp_path):
    config, folder = example_config(tmp_path)
    pythonpath = with_example(installed_example)
    checked = subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, env={**os.environ, **pythonpath}, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr

    receiver = Receiver(config).start(env=pythonpath)
    try:
        assert receiver.post(load("smartcover.xml")).status_code == 200
        assert receiver.post(load("smartcover_failed.xml")).status_code == 200
        failed = event("smartcover_failed.xml")
        note = folder / f"{failed.job_id}.txt"
        wait_until(note.exists, what=f"{note} written by the example handler")
    finally:
        receiver.stop()
    assert note.read_text() == f"SmartCover Failed: {failed.code} {failed.message}\n"
    assert [p.name for p in folder.iterdir()] == [note.name]  # the success left no file


def test_the_example_keeps_a_hostile_job_id_inside_its_folder(installed_example, tmp_path):
    config, folder = example_config(tmp_path)
    failed = load("smartcover_failed.xml")
    hostile = ["../../escaped", "/etc/ci-receiver-escaped"]  # JobIds of a forged callback
    receiver = Receiver(config).start(env=with_example(installed_example))
    try:
        for job_id in hostile:
            body = failed.replace(b"j9f42765cf84611ecb8546d80f2baf5aa", job_id.encode())
            assert receiver.post(body).status_code == 200
        notes = wait_until(
            lambda: len(found := sorted(folder.glob("*.txt"))) == 2 and found,
            what="a note for each hostile JobId, in the folder",
        )
    finally:
        receiver.stop()
    assert all(note.read_text().startswith("SmartCover Failed: ") for note in notes)
    assert sorted(folder.iterdir()) == notes  # and no partial note left behind
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not Path("/etc/ci-receiver-escaped.txt").exists()


def test_without_the_package_the_type_is_unknown(tmp_path):
    config = tmp_path / "ci-receiver.toml"
    config.write_text('[handlers.failures]\ntype = "failed-jobs"\nfolder = "x"\n')
    checked = subprocess.run(
        [sys.executable, "-m", "receiver.cli", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 1
    assert "handlers.failures: unknown handler type 'failed-jobs'" in checked.stderr


def test_a_handler_written_against_the_former_module_name_still_loads(tmp_path, monkeypatch):
    """Plugins written before the layout by stage import `receiver.model` (the README's
    example did): they load, warned, and get the one Event class."""
    (tmp_path / "old_plugin.py").write_text(
        "from receiver.model import Event\n\nasync def handle(event: Event) -> None:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "receiver.model", raising=False)
    with pytest.warns(DeprecationWarning, match="import Event from receiver"):
        handler = handlers.build("old_plugin:handle", {})
    assert handler.__globals__["Event"] is Event
    del sys.modules["old_plugin"]


def test_the_examples_own_tests_pass_on_the_test_kit(tmp_path):
    """examples/custom-handler/tests, run as its author runs them: in its folder, with
    its pytest settings, the kit's fixtures from the installed ci-receiver."""
    source = tmp_path / "source"
    shutil.copytree(EXAMPLE, source)
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=source, timeout=300,
        env={**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{REPO}"},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "4 passed" in ran.stdout
