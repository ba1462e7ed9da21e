"""`init`: write a starter config, and say how to start it and what to give CI."""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
from pathlib import Path

import click

from receiver.cli.starter import new_token, starter_config
from receiver.config import ConfigError, load_config
from receiver.sources.addresses import PUBLIC_PLACEHOLDER, callback_url, public_address


@click.command()
@click.argument(
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("ci-receiver.toml"),
)
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path: Path, force: bool) -> None:
    """Write a starter config at PATH (default ci-receiver.toml): a random path token, the
    SQLite inbox beside it, the `log` handler, and every optional section as a comment.
    Then print the CallBack URL to give CI, and the next steps."""
    token = new_token()
    text = starter_config(path, token)
    try:
        _write_private(path, text, overwrite=force)
    except FileExistsError:
        raise click.ClickException(f"{path} exists: --force to overwrite it") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        config = load_config(path)
    except ConfigError as exc:  # the template is tested to load: this would be a bug
        raise click.ClickException(f"config: {exc}") from None
    click.echo(f"wrote {path} (readable by you alone: it holds the path token)")
    address = public_address()
    click.echo("\nCallBack URL for CI:")
    click.echo(f"  {callback_url(config, address or PUBLIC_PLACEHOLDER, reveal_token=True)}")
    if address is None:
        click.echo(
            f"  Replace {PUBLIC_PLACEHOLDER} with this host's public IP address or domain name:"
            "\n  CI calls back over the internet, and refuses private addresses."
        )
    else:
        click.echo(f"  ({address} is this host's public address, as its route out shows it.)")
    where = f"--config {shlex.quote(str(path))}"
    steps = [
        (f"ci-receiver serve {where}", "start it"),
        (f"ci-receiver send {where} --sample smartcover", "try it: post a sample callback"),
        (f"ci-receiver events list {where}", "what it stored"),
        (f"ci-receiver check-config {where}", "after each edit of the config"),
    ]
    width = max(len(command) for command, _ in steps)
    click.echo("\nnext:")
    for command, why in steps:
        click.echo(f"  {command.ljust(width)}  # {why}")
    click.echo(
        "  Then give CI the CallBack URL: in the CI console, as the callback of the bucket's"
        "\n  queue or workflow (NotifyConfig.Url in the API), or as a job's CallBack when the"
        "\n  job is created by the API."
    )


def _write_private(path: Path, text: str, *, overwrite: bool) -> None:
    """Write `text` at `path` readable and writable by its owner alone (0600) from the
    first byte: the path token is never readable by others, not even for a moment. Over
    an existing file (`overwrite`), a new file takes its place whole: the old one's mode,
    and any reader holding it open, never see the token."""
    if not overwrite:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        return
    # Made beside it (same file system, so the rename is atomic) with mode 0600.
    descriptor, written = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(written, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(written)
        raise
