"""`ci-receiver new-handler NAME`: a package of a handler of one's own, ready to grow.

What it writes (from the templates beside this file): a pyproject naming the handler's
entry point (`type = "NAME"` then finds it once installed), the handler with typed
options (a pydantic model) and the attempt's `Context`, and tests on the sample
callbacks (`receiver.testing`) that pass as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

import handlers

NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


class ScaffoldError(Exception):
    """The name cannot be a handler type, or the folder is taken."""


@dataclass(frozen=True, slots=True)
class Names:
    name: str  # the handler type: `type = "NAME"`
    module: str  # its package: ci_receiver_NAME
    cls: str  # its class: NameHandler

    @classmethod
    def of(cls, name: str) -> Names:
        if not NAME.fullmatch(name):
            raise ScaffoldError(
                f"{name!r}: a handler type is lower-case letters and digits, words joined"
                " by '-' (e.g. 'warehouse', 'failed-jobs')"
            )
        if name in handlers.BUILTINS:
            raise ScaffoldError(f"{name!r} is a built-in handler type; choose another name")
        words = name.split("-")
        return cls(
            name, "ci_receiver_" + "_".join(words), "".join(map(str.title, words)) + "Handler"
        )


def write(name: str, into: Path) -> Path:
    """Write the package of handler `name` as `into/ci-receiver-NAME`; never over
    anything there."""
    names = Names.of(name)
    root = into / f"ci-receiver-{names.name}"
    if root.exists():
        raise ScaffoldError(f"{root} exists; nothing was written")
    values = {"name": names.name, "module": names.module, "cls": names.cls}
    template = files(__name__).joinpath("template")
    made = {
        root / "pyproject.toml": "pyproject.toml.tmpl",
        root / "README.md": "README.md.tmpl",
        root / names.module / "__init__.py": "handler.py.tmpl",
        root / "tests" / f"test_{names.module}.py": "test_handler.py.tmpl",
    }
    for path, source in made.items():
        text = Template(template.joinpath(source).read_text(encoding="utf-8"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.substitute(values), encoding="utf-8")
    return root
