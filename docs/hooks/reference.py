"""MkDocs hook: the reference pages made from the code at every build, never kept by hand.

- reference/configuration.md: every key of receiver.config.Config, walked through its
  pydantic models (the sections, `[handlers.NAME]`, `[[routes]]`, `[[ci.buckets]]`, ...):
  type, constraints, default, the `CI_RECEIVER_*` variable that overrides it, and its
  description (the field's docstring: `use_attribute_docstrings`).
- reference/metrics.md: every Prometheus metric receiver/ and handlers/ define, read from
  their source (the `Counter(...)`, `Gauge(...)`, `Histogram(...)` calls): most are made
  by the component that counts, when it is built, so no one registry holds them all.

The command line reference is mkdocs-click's (docs/reference/cli.md). A key, metric or
command added to the code shows up with no edit here; one this module cannot read fails
the build, naming it.
"""

from __future__ import annotations

import ast
import html
import inspect
import json
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from markdown import Markdown
from markdown.extensions import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from pydantic import BaseModel, SecretStr, TypeAdapter
from pydantic_core import PydanticUndefined

from receiver import config as receiver_config
from receiver import envvars

ROOT = Path(__file__).resolve().parents[2]
METRIC_SOURCES = ("receiver", "handlers")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Show click's verbatim paragraphs as `--help` does (mkdocs' hook)."""
    config.markdown_extensions.append(ClickVerbatim())  # type: ignore[arg-type]
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages to the site (mkdocs' hook)."""
    for uri, content in (
        ("reference/configuration.md", configuration_page()),
        ("reference/metrics.md", metrics_page()),
    ):
        files.append(File.generated(config, uri, content=content))
    return files


# --- the command line: mkdocs-click's pages, click's verbatim paragraphs kept --------------


class _ClickPage(Preprocessor):
    """mkdocs-click's preprocessor, and then its pages' verbatim paragraphs as code.

    A paragraph a command's help marks `\\b` (not to be rewrapped: the examples) comes
    out of click's formatter as written, indented by two spaces, and mkdocs-click passes
    it on as Markdown, where it would read as prose run together. Only pages with a
    `::: mkdocs-click` block are touched."""

    def __init__(self, md: Markdown, click_page: Preprocessor) -> None:
        super().__init__(md)
        self.click_page = click_page

    def run(self, lines: list[str]) -> list[str]:
        if not any(line.startswith("::: mkdocs-click") for line in lines):
            return list(self.click_page.run(lines))
        out: list[str] = []
        fenced = verbatim = False
        previous = ""
        for line in self.click_page.run(lines):
            if verbatim:
                if line.strip():
                    out.append(line[2:])
                    continue
                out += ["```", ""]
                verbatim, previous = False, ""
                continue
            if line.startswith("```"):
                fenced = not fenced
            if not fenced and not previous.strip() and re.match(r"  \S", line):
                out += ["```text", line[2:]]
                verbatim = True
            else:
                out.append(line)
            previous = line
        return [*out, "```"] if verbatim else out


class ClickVerbatim(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        # In place of mkdocs-click's own preprocessor (registered before this extension).
        click_page = md.preprocessors["mk_click"]
        md.preprocessors.register(_ClickPage(md, click_page), "mk_click", 141)


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """Where a model's keys sit in the TOML file, and how the environment reaches them."""

    path: str  # the dotted key path: `http`, `handlers.NAME`, `routes.match`
    heading: str  # as the file writes it: `[http]`, `[handlers.NAME]`, `[[routes]]`
    env: str | None  # the variables' stem for its keys; None inside a list
    env_whole: str  # the variable that sets the whole table, or the list holding it


def configuration_page() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Every key of the config file, made from the code (`receiver/config.py`) at each",
        "build. [Configuration](../configuration.md) shows them in use. Any key can be set",
        f"by an environment variable, `{envvars.PREFIX}` + the key path in upper case, levels",
        "joined by `__`; a key that takes a list or a table takes JSON. Durations are seconds",
        "or a number with `s`, `m`, `h` or `d` (`90s`, `5m`, `24h`, `7d`). A key marked",
        "**secret** is masked wherever it is printed (`check-config`, logs, errors).",
        "",
    ]
    lines += _tables(receiver_config.Config, None, None)
    return "\n".join(lines) + "\n"


def _tables(model: type[BaseModel], table: Table | None, description: str | None) -> list[str]:
    """The model's own keys as one table, then each nested table after it."""
    rows: list[str] = []
    nested: list[tuple[type[BaseModel], Table, str | None]] = []
    for name, field in model.model_fields.items():
        inner, shape = _nested_model(field.annotation)
        if inner is not None:
            text = field.description or ""
            if shape != "table":  # a table's default is its keys'; a list's or map's is its own
                text += f" Default: {_default(field)}."
            nested.append((inner, _child(table, name, shape), text.strip()))
        else:
            rows.append(_row(name, field, table))
    out: list[str] = []
    if table is not None:
        out += [f"## `{table.heading}`", ""]
        for paragraph in (inspect.cleandoc(model.__dict__.get("__doc__") or ""), description):
            if paragraph:
                out += [_inline(_one_line(paragraph)), ""]
    elif rows:
        out += ["## Top level", ""]
    if rows:
        out += [
            "| key | type | default | environment variable | description |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    for inner, child, note in nested:
        out += _tables(inner, child, note)
    return out


def _child(parent: Table | None, name: str, shape: str) -> Table:
    path = f"{parent.path}.{name}" if parent else name
    if parent is None:
        env: str | None = f"{envvars.PREFIX}{name.upper()}"
    else:
        env = f"{parent.env}__{name.upper()}" if parent.env else None
    whole = env or (parent.env_whole if parent else "")
    if shape == "table":
        return Table(path, f"[{path}]", env, whole)
    if shape == "mapping":
        named = f"{path}.NAME"
        return Table(named, f"[{named}]", f"{env}__<NAME>" if env else None, whole)
    return Table(path, f"[[{path}]]", None, whole)  # a list of tables


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a key holds as a table, a list of tables or a table of tables."""
    for option in envvars.alternatives(annotation):
        if _is_model(option):
            return option, "table"
        args = get_args(option)
        if get_origin(option) is list and args and _is_model(args[0]):
            return args[0], "list"
        if get_origin(option) is dict and len(args) == 2 and _is_model(args[1]):
            return args[1], "mapping"
    return None, ""


def _row(name: str, field: Any, table: Table | None) -> str:
    if table is None:
        env = f"`{envvars.PREFIX}{name.upper()}`"
    elif table.env is not None:
        env = f"`{table.env}__{name.upper()}`"
    else:
        env = f"in `{table.env_whole}` (JSON)"
    description = _inline(_one_line(field.description or ""))
    if not description:
        key = f"{table.path}.{name}" if table else name
        raise ValueError(f"{key}: no docstring under the field in receiver/config.py")
    secret = _mentions(field.annotation, SecretStr)
    kind = _type(field.annotation, field.metadata)
    cells = [
        f"`{name}`",
        ("**secret** " if secret else "") + kind,
        _default(field),
        env,
        description,
    ]
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _cell(text: str) -> str:
    """`text` in a table cell: a `|` escaped where it would end the cell, outside code
    spans (Python-Markdown's tables leave one inside backticks alone, and an escape
    there would show)."""
    parts = text.split("`")  # the odd ones are inside backticks
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def _is_duration(metadata: list[Any]) -> bool:
    return any(getattr(item, "func", None) is receiver_config.parse_duration for item in metadata)


def _duration_text(seconds: float) -> str:
    """A duration as the config writes it: `"30d"`, `"5m"`, `90` (the largest whole unit)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f'"{int(seconds // size)}{unit}"'
    return f"{seconds:g}"


def _type(annotation: Any, metadata: list[Any]) -> str:
    text = "duration" if _is_duration(metadata) else _type_name(annotation)
    bounds = [_bound(item) for item in metadata]
    return ", ".join([text, *(b for b in bounds if b)])


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        optional = type(None) in args
        return " or ".join(names) + (", optional" if optional else "")
    if origin is Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"table of {_type_name(args[1])}"
    plain: dict[Any, str] = {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        Path: "path",
        SecretStr: "string",
    }
    if annotation in plain:
        return plain[annotation]
    if getattr(annotation, "__name__", "") == "IPvAnyNetwork":
        return "CIDR"
    return f"`{getattr(annotation, '__name__', annotation)}`"


# Each bound pydantic keeps in a field's metadata: its class, its value's attribute, and
# how the reference says it.
BOUNDS = (
    (annotated_types.Ge, "ge", "≥ {}"),
    (annotated_types.Gt, "gt", "> {}"),
    (annotated_types.Le, "le", "≤ {}"),
    (annotated_types.Lt, "lt", "< {}"),
    (annotated_types.MinLen, "min_length", "at least {}"),
    (annotated_types.MaxLen, "max_length", "at most {}"),
)


def _bound(item: Any) -> str:
    for kind, attribute, text in BOUNDS:
        if isinstance(item, kind):
            return text.format(getattr(item, attribute))
    pattern = getattr(item, "pattern", None)
    return f"matching `{pattern}`" if pattern else ""


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if _is_duration(field.metadata):
        return f"`{_duration_text(value)}`"
    dumped = TypeAdapter(field.annotation).dump_python(value, mode="json", exclude_defaults=True)
    return f"`{json.dumps(dumped, ensure_ascii=False)}`"


def _mentions(annotation: Any, kind: type) -> bool:
    return annotation is kind or any(_mentions(a, kind) for a in get_args(annotation))


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _inline(text: str) -> str:
    """Markdown text whose `<...>` outside code spans shows as written, not as HTML."""
    parts = text.split("`")
    return "`".join(
        part if i % 2 else html.escape(part, quote=False) for i, part in enumerate(parts)
    )


# --- metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str  # as exposed: a counter's with _total
    type: str
    help: str
    labels: tuple[str, ...]
    where: str  # the module that defines it


KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary"}


def metrics() -> list[Metric]:
    """Every metric the source defines, by name."""
    found: dict[str, Metric] = {}
    for folder in METRIC_SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for metric in _metrics_in(path):
                found.setdefault(metric.name, metric)
    return sorted(found.values(), key=lambda m: m.name)


def _metrics_in(path: Path) -> Iterator[Metric]:
    tree = ast.parse(path.read_text(), str(path))
    imported = _prometheus_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kind = _metric_kind(node.func, imported)
        if kind is None:
            continue
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        where = f"{shown}:{node.lineno}"
        arguments: dict[int | str | None, ast.expr] = dict(enumerate(node.args))
        arguments.update((keyword.arg, keyword.value) for keyword in node.keywords)
        name = _literal(arguments.get(0, arguments.get("name")), where, "name")
        help_text = _literal(arguments.get(1, arguments.get("documentation")), where, "help")
        labels_node = arguments.get(2, arguments.get("labelnames"))
        labels = tuple(_literal(item, where, "label") for item in _items(labels_node, where))
        exposed = name.removesuffix("_total") + "_total" if kind == "counter" else name
        yield Metric(exposed, kind, help_text, labels, str(shown))


def _metric_kind(func: ast.expr, imported: dict[str, str]) -> str | None:
    """`Counter(...)` as imported, or `prometheus_client.Counter(...)`."""
    if isinstance(func, ast.Name):
        return imported.get(func.id)
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id == "prometheus_client"
    ):
        return KINDS.get(func.attr)
    return None


def _prometheus_names(tree: ast.Module) -> dict[str, str]:
    """The local names of prometheus_client's metric classes in this module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client"):
            for alias in node.names:
                if alias.name in KINDS:
                    names[alias.asname or alias.name] = KINDS[alias.name]
    return names


def _literal(node: ast.expr | None, where: str, what: str) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    raise ValueError(f"{where}: the metric's {what} is not a string literal; write it as one")


def _items(node: ast.expr | None, where: str) -> list[ast.expr]:
    if node is None:
        return []
    if isinstance(node, (ast.List, ast.Tuple)):
        return list(node.elts)
    raise ValueError(f"{where}: the metric's labels are not a literal list; write them as one")


def metrics_page() -> str:
    lines = [
        "# Metrics reference",
        "",
        "Every metric on the admin listener's `GET /metrics`, made from the code at each",
        "build. A histogram is exposed as `_bucket`, `_sum` and `_count` series.",
        "Under `serve --workers N` the workers' values are added up.",
        "[Operations](../operations.md#backlog-you-can-alert-on) says which to alert on.",
        "",
        "| metric | type | labels | help | defined in |",
        "| --- | --- | --- | --- | --- |",
    ]
    for metric in metrics():
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "none"
        help_text = _cell(_inline(_one_line(metric.help)))
        lines.append(
            f"| `{metric.name}` | {metric.type} | {labels} | {help_text} | `{metric.where}` |"
        )
    return "\n".join(lines) + "\n"
