"""The reference pages docs/hooks/reference.py makes: every config key and every metric
the code has, and nothing it lacks; a model or metric added later is picked up alone."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import click
import pytest
from pydantic import BaseModel, Field, SecretStr

from receiver.config import Config, HandlerConfig, Section
from tests.deploy.test_deploy import SERIES_SUFFIXES, every_series

REPO = Path(__file__).resolve().parents[2]


def load_hook():
    """The hook as MkDocs loads it: a module from its file, registered by its name."""
    spec = importlib.util.spec_from_file_location("reference", REPO / "docs/hooks/reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reference = load_hook()


def leaf_keys(model: type[BaseModel]) -> int:
    """How many keys that hold values (not tables) the model has, nested models included."""
    count = 0
    for field in model.model_fields.values():
        inner, _ = reference._nested_model(field.annotation)
        count += leaf_keys(inner) if inner is not None else 1
    return count


def rows(page: str) -> list[str]:
    return [line for line in page.splitlines() if re.match(r"\| `\w+` \|", line)]


def test_every_config_key_has_a_row_with_its_variable_and_description():
    page = reference.configuration_page()
    assert len(rows(page)) == leaf_keys(Config)
    assert "| `port` | integer, ≥ 0, ≤ 65535 | `8080` | `CI_RECEIVER_HTTP__PORT` |" in page
    assert "`CI_RECEIVER_HANDLERS__<NAME>__TIMEOUT`" in page
    assert '| `events` | duration, ≥ 0 | `"30d"` | `CI_RECEIVER_RETENTION__EVENTS` |' in page
    assert "## `[[ci.buckets]]`" in page
    assert "in `CI_RECEIVER_CI__BUCKETS` (JSON)" in page
    assert "## `[routes.match]`" in page
    secret = next(row for row in rows(page) if row.startswith("| `secret_key` |"))
    assert "**secret**" in secret
    assert "**secret**" not in next(row for row in rows(page) if row.startswith("| `host` |"))
    # A default made by a factory: the handlers the embedded default has.
    assert '`{"log": {"type": "log", "concurrency": 64}}`' in page
    for name, field in HandlerConfig.model_fields.items():
        assert field.description, name
        assert f"| `{name}` |" in page


def test_a_model_added_later_is_documented_as_it_is_written():
    class Bucket(Section):
        """A table in a list."""

        name: str
        """Its name."""

    class Extra(Section):
        """A new section."""

        secret: SecretStr | None = None
        """A secret."""
        buckets: list[Bucket] = Field(default_factory=list)
        """Some buckets."""
        limit: int = Field(3, ge=1)
        """A bound."""
        by_name: dict[str, Bucket] = Field(default_factory=dict)
        """Tables by name."""

    class Root(BaseModel):
        extra: Extra = Extra()

    page = "\n".join(reference._tables(Root, None, None))
    assert "## `[extra]`" in page
    assert "A new section." in page
    secret = "| `secret` | **secret** string, optional | unset | `CI_RECEIVER_EXTRA__SECRET` |"
    assert secret in page
    assert "| `limit` | integer, ≥ 1 | `3` | `CI_RECEIVER_EXTRA__LIMIT` | A bound. |" in page
    assert "## `[[extra.buckets]]`" in page
    assert "in `CI_RECEIVER_EXTRA__BUCKETS` (JSON)" in page
    assert "`CI_RECEIVER_EXTRA__BY_NAME__<NAME>__NAME`" in page
    assert "| `name` | string | required |" in page


def test_a_key_without_a_docstring_stops_the_build():
    class Undocumented(Section):
        """A section."""

        size: int = 1

    class Root(BaseModel):
        part: Undocumented = Undocumented()

    with pytest.raises(ValueError, match=r"part\.size: no docstring"):
        reference._tables(Root, None, None)


def test_every_metric_the_service_exposes_is_listed_and_no_other(tmp_path):
    """The metrics read from the source are those a fully configured service registers
    (the deploy tests' build of it), series for series."""
    listed = set()
    for metric in reference.metrics():
        suffixes = SERIES_SUFFIXES.get(metric.type, ("",))
        listed.update(metric.name.removesuffix("_total") + suffix for suffix in suffixes)
    assert listed == every_series(tmp_path)
    page = reference.metrics_page()
    assert "| `ci_receiver_callbacks_total` | counter | `source`, `outcome` |" in page


def test_a_metric_whose_name_cannot_be_read_stops_the_build(tmp_path):
    source = tmp_path / "made.py"
    source.write_text(
        "from prometheus_client import Counter\nNAME = 'x'\nmade = Counter(NAME, 'help')\n"
    )
    with pytest.raises(ValueError, match=r"made\.py:3: the metric's name is not a string"):
        list(reference._metrics_in(source))


def test_the_readme_links_to_pages_that_exist():
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(((?!https?://)[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    for target in targets:
        assert (REPO / target).exists(), target


# Names of that form that are not metrics: the sql handler's registry table.
NOT_METRICS = {"ci_receiver_tables"}


def test_every_metric_the_pages_name_exists():
    from tests.docs.test_examples import PAGES

    series = set(NOT_METRICS)
    for metric in reference.metrics():
        base = metric.name.removesuffix("_total")  # a counter is named without it too
        series |= {metric.name, base}
        series |= {base + suffix for suffix in SERIES_SUFFIXES.get(metric.type, ())}
    for page in PAGES:
        named = set(re.findall(r"ci_receiver_[a-z_]*[a-z]", page.read_text()))
        assert named <= series, f"{page.relative_to(REPO)}: no metric {sorted(named - series)}"


def command_paths(group: click.Group, prefix: str = "ci-receiver") -> list[str]:
    paths = []
    for name, command in group.commands.items():
        paths.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            paths += command_paths(command, f"{prefix} {name}")
    return paths


def test_the_command_line_page_has_every_command_and_its_examples_as_written():
    """docs/reference/cli.md as the site renders it (mkdocs-click, and the hook's
    verbatim paragraphs): a heading per command, and replay's examples one per line."""
    import markdown

    from receiver.cli import main

    renderer = markdown.Markdown(
        extensions=["attr_list", "pymdownx.superfences", "mkdocs-click", reference.ClickVerbatim()]
    )
    page = renderer.convert((REPO / "docs/reference/cli.md").read_text())
    headings = re.findall(r"<h\d[^>]*>([^<]+)</h\d>", page)
    for path in command_paths(main):
        assert path in headings, path
    assert (
        "<code>ci-receiver replay --dead                     every dead-lettered run\n"
        "ci-receiver replay --dead --handler db" in page
    )
