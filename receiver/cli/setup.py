"""`send` and `new-handler`: for trying a receiver and extending it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

import click


@click.command()
@click.argument("file", type=click.File("rb"))
@click.option("--url", default="http://127.0.0.1:8080/callbacks", show_default=True)
@click.option("--header", "-H", "headers", multiple=True, help="Extra header, 'Name: value'.")
def send(file: BinaryIO, url: str, headers: tuple[str, ...]) -> None:
    """POST a callback file to a receiver, as CI would (for testing a setup)."""
    import httpx

    extra = dict(_header(h) for h in headers)
    body = file.read()
    content_type = "application/json" if body.lstrip()[:1] in (b"{", b"[") else "application/xml"
    try:
        response = httpx.post(
            url, content=body, headers={"Content-Type": content_type, **extra}, timeout=30
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot POST to {url}: {exc}") from None
    click.echo(f"{response.status_code} {response.reason_phrase}", err=True)
    click.echo(response.text)
    if not response.is_success:
        sys.exit(1)


def _header(text: str) -> tuple[str, str]:
    name, separator, value = text.partition(":")
    if not separator:
        raise click.BadParameter(f"{text!r} is not 'Name: value'", param_hint="--header")
    return name.strip(), value.strip()


@click.command("new-handler")
@click.argument("name")
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="The folder to write the package's folder in.",
)
def new_handler(name: str, into: Path) -> None:
    """Write a package of a handler of your own, NAME (`type = "NAME"` once installed):
    the handler with typed options, and tests on sample callbacks that pass as written."""
    from receiver.scaffold import Names, ScaffoldError, write

    try:
        root = write(name, into)
    except ScaffoldError as exc:
        raise click.ClickException(str(exc)) from None
    names = Names.of(name)
    click.echo(f"wrote {root}")
    click.echo(
        "\nnext:\n"
        f"  pip install -e '{root}[test]'   # where ci-receiver runs\n"
        f"  pytest {root}\n"
        f"  edit {root / names.module / '__init__.py'}\n"
        f'  and in the config: [handlers.{names.name}] type = "{names.name}"'
    )
