"""The environment's part of the configuration: `CI_RECEIVER_*` overrides and `${NAME}`
references inside the file.

`CI_RECEIVER_HTTP__PORT=9000` sets `[http] port` (levels joined by `__`, case does not
matter). A key that takes a list or a table takes JSON (`'["a", "b"]'`, `'{"env": "prod"}'`);
a list of strings also takes its items comma-separated (`abc,def`). A handler's own
options are not known here: a value that reads as a JSON array or object is taken as
one, anything else as a string. Variables whose first level is not a config section
(`CI_RECEIVER_CONFIG`) are not overrides and are left alone.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import orjson
from pydantic import BaseModel, SecretStr

PREFIX = "CI_RECEIVER_"
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Path = tuple[str | int, ...]


class EnvironmentProblem(ValueError):
    """Variables that cannot be used; the message names every one and why."""


class _Anything:
    """What a key of a table that takes any key (a handler's options) is typed as."""


def overrides(
    model: type[BaseModel], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[Path, str]]:
    """The nested config data the `CI_RECEIVER_*` variables give, and which variable set
    each key path (for naming it in an error)."""
    data: dict[str, Any] = {}
    sources: dict[Path, str] = {}
    problems = []
    # Sorted, so that a whole table (CI_RECEIVER_HTTP) is set before a key inside it.
    for name in sorted(environ):
        if not name.upper().startswith(PREFIX):
            continue
        path = tuple(name[len(PREFIX) :].lower().split("__"))
        if path[0] not in model.model_fields:
            continue
        try:
            if not all(path):
                raise ValueError("an empty level (four underscores in a row?)")
            value = _decode(environ[name], annotation_at(model, path))
            _put(data, path, value)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        sources[path] = name
    if problems:
        raise EnvironmentProblem("; ".join(problems))
    return data, sources


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it, table by table; anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class Unset:
    """A `${NAME}` reference to a variable that is not set, and the key holding it."""

    key: Path
    variable: str

    def __str__(self) -> str:
        return f"{dotted(self.key)}: environment variable {self.variable} is not set"


def placeholder(variable: str) -> str:
    """What an unset variable that is not needed reads as: letters, digits, '-' and '_'
    only, so that the keys that take a secret (a path token, a password) still validate,
    and naming the variable wherever it shows."""
    return f"unset-{variable}"


def expand_references(
    data: Any, environ: Mapping[str, str], needed: Callable[[Path], bool]
) -> tuple[Any, list[Unset]]:
    """Replace every `${NAME}` in the strings of `data`. A reference to an unset variable
    under a key whose value is `needed` is an error, every one reported together with the
    key that holds it; one elsewhere reads as its `placeholder`, and is returned."""
    unset: list[Unset] = []
    expanded = _expand(data, environ, (), unset)
    missing = [str(reference) for reference in unset if needed(reference.key)]
    if missing:
        raise EnvironmentProblem("; ".join(missing))
    return expanded, unset


def source_of(location: Path, sources: Mapping[Path, str]) -> str | None:
    """The variable that set this key, or a table or list holding it."""
    key = tuple(str(part).lower() if isinstance(part, str) else part for part in location)
    for end in range(len(key), 0, -1):
        if key[:end] in sources:
            return sources[key[:end]]
    return None


def dotted(key: Path) -> str:
    """`routes[1].match.tag`: a key as a person finds it in the file, where the first
    `[[routes]]` table (or item of a list) is the 1st."""
    out = ""
    for part in key:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- decoding one value ------------------------------------------------------------------


def _decode(raw: str, annotation: Any) -> Any:
    text = raw.strip()
    as_json = text[:1] in ("[", "{")
    if annotation is _Anything:
        if as_json:
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                pass  # a string that happens to start with a bracket: "[CI] $title"
        return raw
    if not _takes_container(annotation):
        return raw  # a scalar: validation reads it, and names the variable if it cannot
    if as_json:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    if _takes(annotation, str):
        return raw
    if _is_string_list(annotation):
        return [item.strip() for item in raw.split(",") if item.strip()]
    raise ValueError(
        'takes JSON here: an array like \'["a", "b"]\' or an object like \'{"key": "value"}\''
    )


def annotation_at(model: type[BaseModel], path: Path) -> Any:
    """The type the config expects at `path` (a list's items by their index),
    `_Anything` inside a table of free keys or where the path leads nowhere known."""
    annotation: Any = model
    for part in path:
        options = alternatives(annotation)
        table = next((o for o in options if isinstance(o, type) and issubclass(o, BaseModel)), None)
        mapping = next((o for o in options if get_origin(o) is dict), None)
        sequence = next((o for o in options if get_origin(o) is list), None)
        if table is not None:
            field = table.model_fields.get(str(part))
            if field is None:
                # A table with free keys (a handler's options) takes anything; another
                # one refuses the key, which validation reports by name.
                return _Anything if table.model_config.get("extra") == "allow" else str
            annotation = field.annotation
        elif mapping is not None:
            annotation = get_args(mapping)[1]
        elif sequence is not None and isinstance(part, int):
            annotation = get_args(sequence)[0]
        else:
            return _Anything
    return annotation


def alternatives(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union (`str | list[str] | None`), or the type itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _takes(annotation: Any, kind: type) -> bool:
    return any(option is kind for option in alternatives(annotation))


def _takes_container(annotation: Any) -> bool:
    return any(
        get_origin(option) in (list, dict)
        or (isinstance(option, type) and issubclass(option, BaseModel))
        for option in alternatives(annotation)
    )


def _is_string_list(annotation: Any) -> bool:
    return any(
        get_origin(option) is list and get_args(option)[0] in (str, SecretStr)
        for option in alternatives(annotation)
    )


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    table = data
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ValueError(f"{dotted(path[:-1])} is already set to a value that is not a table")
    last = path[-1]
    if isinstance(value, dict) and isinstance(table.get(last), dict):
        table[last] = merge(table[last], value)
    else:
        table[last] = value


# --- ${NAME} ----------------------------------------------------------------------------


def _expand(value: Any, environ: Mapping[str, str], key: Path, unset: list[Unset]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, environ, (*key, k), unset) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, environ, (*key, i), unset) for i, v in enumerate(value)]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                unset.append(Unset(key, name))
                return placeholder(name)
            return environ[name]

        return _REFERENCE.sub(replace, value)
    return value
