"""`send` and `new-handler`: for trying a receiver and extending it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

import click

from receiver.cli.common import config_option, load
from receiver.sources.addresses import local_url
from receiver.testing import SAMPLES, sample_body


@click.command()
@config_option
@click.argument("file", type=click.File("rb"), required=False)
@click.option(
    "--sample",
    type=click.Choice(sorted(SAMPLES)),
    help="Post this sample callback (as CI sends it) instead of a FILE.",
)
@click.option(
    "--url",
    help="Where to POST (default: the configured listener, on the loopback when it listens"
    " on every address, with the first path token).",
)
@click.option("--header", "-H", "headers", multiple=True, help="Extra header, 'Name: value'.")
def send(
    config_path: Path | None,
    file: BinaryIO | None,
    sample: str | None,
    url: str | None,
    headers: tuple[str, ...],
) -> None:
    """POST a callback FILE (or --sample) to a receiver, as CI would (for testing a setup)."""
    import httpx

    if file is not None and sample is None:
        body = file.read()
    elif sample is not None and file is None:
        body = sample_body(sample)
    else:
        raise click.UsageError("give a callback FILE or --sample NAME (one of them)")
    auth = None
    shown = url  # what an error shows of the URL: not the path token of the config's
    verify = True
    if url is None:
        config = load(config_path, needs=("http",))
        url, shown = local_url(config), local_url(config, reveal_token=False)
        # Our own listener, reached on this host by an address its certificate does not
        # name (the loopback): its TLS is not what is being tried.
        verify = False
        if not config.http.tokens and config.http.basic_auth:
            user, password = next(iter(config.http.basic_auth.items()))
            auth = (user, password.get_secret_value())
    extra = dict(_header(h) for h in headers)
    content_type = "application/json" if body.lstrip()[:1] in (b"{", b"[") else "application/xml"
    try:
        response = httpx.post(
            url,
            content=body,
            headers={"Content-Type": content_type, **extra},
            auth=auth,
            timeout=30,
            verify=verify,
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot POST to {shown}: {exc}") from None
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
