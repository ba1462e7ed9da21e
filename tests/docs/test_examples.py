"""Every example in the README and the documentation site is checked against the code.

- ```toml: loaded through the config loader (receiver.config.load_config) from a file,
  then every handler is built from its options, as `check-config` does
  (receiver.runtime.service.build_slots): a key, value or handler option the code
  refuses fails here, naming the page and line. `${NAME}`s get values from ENVIRONMENT.
  A block that is only part of a config is marked by `<!-- toml: fragment -->` on the
  line before it: it is laid over the page's previous ```toml block (none: an empty
  config), and a handler its routes name that neither defines is a `log` handler.
- ```sh, ```shell, ```bash, ```console: `bash -n` passes (in a transcript, whose lines
  start with `$ `, the commands alone), and every `ci-receiver ...` command in it names
  a command that exists, with options it has (click parses it, as the command would).
- A table of a section's keys (its header `| `[admin]` key | ...`) names keys the
  section has.
- A usage summary (a block without a language whose lines are `ci-receiver ...`):
  every command and option it names exists.
- ```python: compiles, and passes `ruff format --check` and `ruff check` with the
  project's settings (less what an excerpt cannot help: EXCERPT_IGNORES).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import tomli_w
from markdown_it import MarkdownIt

from receiver.cli import main
from receiver.config import Config, load_config
from receiver.envvars import merge
from receiver.runtime.service import build_slots

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", REPO / "SECURITY.md", *(REPO / "docs").rglob("*.md")])
FRAGMENT = "<!-- toml: fragment -->"
SHELLS = {"sh", "shell", "bash", "console"}

# What the examples' `${NAME}`s stand for: values of the form each key takes (a webhook
# secret is whsec_<base64>, a Slack URL a URL); any other name gets DEFAULT_VALUE.
ENVIRONMENT = {
    "HOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "HOOK_SECRET_OLD": "whsec_c2VjcmV0LXRoYXQtd2FzLXJvdGF0ZWQtb3V0",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX",
}
DEFAULT_VALUE = "example-value-0123456789"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based, of the opening fence
    language: str
    text: str
    fragment: bool

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, as CommonMark reads them (inside lists
    too), each with whether the line before it marks it a fragment."""
    text = page.read_text()
    lines = text.splitlines()
    found = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence" or token.map is None:
            continue
        start = token.map[0]
        before = lines[start - 1].strip() if start else ""
        language = token.info.split()[0] if token.info.strip() else ""
        found.append(Block(page, start + 1, language, token.content, before == FRAGMENT))
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def of(*languages: str) -> list[Block]:
    return [block for block in ALL if block.language in languages]


def cases(found: list[Block]) -> list[object]:
    return [pytest.param(block, id=str(block)) for block in found]


def test_the_pages_have_examples_of_each_kind():
    """The collection reads the pages (a change of fence syntax would leave nothing)."""
    counts = {language: len(of(language)) for language in ("toml", "sh", "python")}
    assert all(counts.values()), counts
    assert any(block.page.name == "README.md" for block in of("toml"))


# --- TOML ----------------------------------------------------------------------------


def _config_text(block: Block) -> str:
    """The block as a whole config: a fragment laid over the page's previous TOML block."""
    if not block.fragment:
        return block.text
    earlier = [b for b in of("toml") if b.page == block.page and b.line < block.line]
    base = tomllib.loads(_config_text(earlier[-1])) if earlier else {}
    data = merge(base, tomllib.loads(block.text))
    handlers = data.setdefault("handlers", {})
    for route in data.get("routes", []):
        for name in route.get("handlers", []):
            handlers.setdefault(name, {"type": "log"})
    return tomli_w.dumps(data)


@pytest.mark.parametrize("block", cases(of("toml")))
def test_toml_examples_load_as_configs(block, tmp_path, monkeypatch):
    text = _config_text(block)
    for name in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)):
        monkeypatch.setenv(name, ENVIRONMENT.get(name, DEFAULT_VALUE))
    for name in [n for n in os.environ if n.startswith("CI_RECEIVER_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "ci-receiver.toml"
    path.write_text(text)
    config = load_config(path)  # raises ConfigError naming the key
    build_slots(config)  # raises HandlerConfigError naming the handler and option


def test_a_toml_example_the_code_refuses_fails(tmp_path):
    """What the check above relies on: a bad key and a bad handler option are errors."""
    from handlers import HandlerConfigError
    from receiver.config import ConfigError

    bad_key = tmp_path / "key.toml"
    bad_key.write_text("[http]\nprot = 8080\n")
    with pytest.raises(ConfigError, match=r"http\.prot: unknown key"):
        load_config(bad_key)
    bad_option = tmp_path / "option.toml"
    bad_option.write_text('[handlers.a]\ntype = "jsonl"\npath = "a.jsonl"\nrotate = "hourly"\n')
    with pytest.raises(HandlerConfigError, match=r"handlers\.a"):
        build_slots(load_config(bad_option))


# --- shell ---------------------------------------------------------------------------


def shell_text(block: Block) -> str:
    """The commands of a block: a transcript's `$ ` lines, or the whole block."""
    lines = block.text.splitlines()
    if any(line.startswith("$ ") for line in lines):
        return "\n".join(line[2:] for line in lines if line.startswith("$ ")) + "\n"
    return block.text


def ci_receiver_commands(text: str) -> list[list[str]]:
    """The arguments of every `ci-receiver` (or .venv/bin/ci-receiver) command in shell
    text: up to the end of its command (`;`, `&&`, `|`, a line's end or a comment). Only
    where a command starts (`-g ci-receiver` is an argument of another)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        command: list[str] | None = None
        starting = True
        for word in [*words, ";"]:
            separator = set(word) <= set(";&|()<>")
            if command is not None and separator:
                found.append(command)
                command = None
            elif command is not None:
                command.append(word)
            elif starting and word.rsplit("/", 1)[-1] == "ci-receiver":
                command = []
            # An assignment or `sudo` before a command leaves it where a command starts.
            starting = separator or (starting and (word == "sudo" or "=" in word))
    return found


def resolve(arguments: list[str]) -> click.Command:
    """The command `ci-receiver ARGS` runs, its options and arguments parsed by click
    (an unknown command or option, or a missing argument, raises click's UsageError)."""
    command: click.Command = main
    name = "ci-receiver"
    parent = None
    rest = list(arguments)
    while True:
        context = command.make_context(name, rest, parent=parent)
        if not isinstance(command, click.Group):
            context.close()
            return command
        rest = [*getattr(context, "_protected_args", []), *context.args]
        found, sub, rest = command.resolve_command(context, rest)
        if sub is None or found is None:
            raise click.UsageError(f"no command in {arguments}")
        command, name, parent = sub, found, context


@pytest.mark.parametrize("block", cases(of(*SHELLS)))
def test_shell_examples_parse_and_name_real_commands(block, monkeypatch):
    checked = subprocess.run(
        ["bash", "-n"], input=shell_text(block), capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, f"{block}: {checked.stderr}"
    monkeypatch.chdir(REPO)  # `send receiver/testing/samples/...` opens its file
    for arguments in ci_receiver_commands(shell_text(block)):
        try:
            resolve(arguments)
        except click.UsageError as exc:
            pytest.fail(f"{block}: ci-receiver {shlex.join(arguments)}: {exc.format_message()}")


def test_a_command_the_cli_does_not_have_is_refused():
    assert ci_receiver_commands("x=1; .venv/bin/ci-receiver events list --limit 3 | head\n") == [
        ["events", "list", "--limit", "3"]
    ]
    resolve(["events", "list", "--status", "dead"])
    for wrong in (["event", "list"], ["events", "list", "--colour"], ["replay", "--dead", "-z"]):
        with pytest.raises(click.UsageError):
            resolve(wrong)


def synopses(block: Block) -> list[tuple[list[str], list[str]]]:
    """A usage summary (a block without a language, lines `ci-receiver COMMAND [--opt X]
    ...`, continued on indented lines): each command's words and the options it names."""
    found: list[tuple[list[str], list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("ci-receiver "):
            words = re.findall(r"^ci-receiver((?: [a-z][a-z-]*)+)", line)[0].split()
            found.append((words, []))
        elif not found:
            continue
        found[-1][1].extend(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", line))
    return found


def test_the_command_summaries_name_real_commands_and_options():
    summaries = [s for block in of("") for s in synopses(block)]
    assert len(summaries) > 10  # the summary in docs/operations.md was read
    for words, options in summaries:
        command: click.Command = main
        for word in words:
            if isinstance(command, click.Group) and word in command.commands:
                command = command.commands[word]
        assert not isinstance(command, click.Group), f"ci-receiver {' '.join(words)}"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        unknown = set(options) - known - {"--help", "-h"}
        assert not unknown, f"ci-receiver {' '.join(words)}: no {sorted(unknown)}"


# --- tables of keys ------------------------------------------------------------------


def key_tables(page: Path) -> list[tuple[str, int, list[str]]]:
    """The pages' tables of a section's keys (a header `| `[admin]` key | ...`): the
    section, the table's line, and the keys its rows name in their first cell."""
    found = []
    lines = page.read_text().splitlines()
    for number, line in enumerate(lines):
        header = re.match(r"\| `\[(\w+)\]` key \|", line)
        if not header:
            continue
        keys = []
        for row in lines[number + 2 :]:
            if not row.startswith("|"):
                break
            first = row.split("|")[1]
            keys += re.findall(r"`(\w+)`", first.split(" (")[0])
        found.append((header.group(1), number + 1, keys))
    return found


def test_tables_of_a_sections_keys_name_keys_it_has():
    tables = [(page, *table) for page in PAGES for table in key_tables(page)]
    assert len(tables) >= 5
    for page, section, line, keys in tables:
        model = Config.model_fields[section].annotation
        assert keys, f"{page.relative_to(REPO)}:{line}"
        unknown = [key for key in keys if key not in model.model_fields]
        assert not unknown, f"{page.relative_to(REPO)}:{line}: [{section}] has no {unknown}"


# --- Python --------------------------------------------------------------------------


# An example is an excerpt: it may use names from the page's text or an earlier block
# (F821), and import what its comments name (F401); type annotations are the reader's.
EXCERPT_IGNORES = "F821,F401,ANN"


@pytest.mark.parametrize("block", cases(of("python")))
def test_python_examples_compile_and_pass_ruff(block):
    compile(block.text, str(block), "exec")
    for command in (
        ["format", "--check", "--diff"],
        ["check", "--extend-ignore", EXCERPT_IGNORES, "--output-format", "concise"],
    ):
        ran = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--stdin-filename", "example.py", "-"],
            input=block.text, capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        assert ran.returncode == 0, f"{block}: ruff {command[0]}:\n{ran.stdout}{ran.stderr}"
