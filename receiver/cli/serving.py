"""`serve`, `consume` and `run`: the long-running commands, assembled from the config by
`receiver.runtime.assemble`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from receiver.cli.common import (
    config_option,
    inbox_errors,
    listen_options,
    load,
    read_config,
    run_async,
)
from receiver.config import Config
from receiver.runtime.worker import WorkerSpec

if TYPE_CHECKING:  # the runtime is imported by the commands that run it
    from receiver.runtime.assemble import Assembly


@click.command()
@config_option
@listen_options
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Worker processes serving the port, each with its dispatcher, over the shared"
    " inbox (default [http] workers, 1: this process alone).",
)
@click.option("--worker", "worker_spec", hidden=True, help="Internal: started as a worker.")
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    worker_spec: str | None,
) -> None:
    """Run the HTTP receiver and the dispatcher (or, with [relay] topic, only relay)."""
    from receiver.runtime.runner import hold_reloads_while_starting

    hold_reloads_while_starting()  # before the rest of the runtime is imported
    from receiver.runtime import assemble

    config = load(config_path, host=host, port=port, workers=workers)
    worker = None if worker_spec is None else WorkerSpec.parse(worker_spec)
    if worker is None and config.http.workers > 1:
        with assembly_errors():
            sys.exit(assemble.supervise(config, config_path, say))
    assemble.start_logging(config, worker)

    def read() -> Config:
        return read_config(config_path, host=host, port=port, workers=workers)

    with assembly_errors():
        assembly = assemble.for_serve(config, read, say, worker)
    sys.exit(_run_relay(assembly) if config.relay.topic else _run(assembly))


@click.command()
@config_option
def consume(config_path: Path | None) -> None:
    """Consume callbacks from CMQ queues ([cmq]) and/or TDMQ topics ([tdmq]), run the
    dispatcher."""
    from receiver.runtime.runner import hold_reloads_while_starting

    hold_reloads_while_starting()  # before the rest of the runtime is imported
    from receiver.runtime import assemble

    config = load(config_path)
    assemble.start_logging(config)

    def read() -> Config:
        return read_config(config_path)

    with assembly_errors():
        assembly = assemble.for_consume(config, read, say)
    sys.exit(_run(assembly))


@click.command("run")
@config_option
@listen_options
def run_all(config_path: Path | None, host: str | None, port: int | None) -> None:
    """HTTP receiver, CMQ and/or TDMQ consumers and dispatcher in one process."""
    from receiver.runtime.runner import hold_reloads_while_starting

    hold_reloads_while_starting()  # before the rest of the runtime is imported
    from receiver.runtime import assemble

    config = load(config_path, host=host, port=port)
    assemble.start_logging(config)

    def read() -> Config:
        return read_config(config_path, host=host, port=port)

    with assembly_errors():
        assembly = assemble.for_run(config, read, say)
    sys.exit(_run(assembly))


def say(line: str) -> None:
    """What the commands tell the operator as they start, on stderr (the log is apart)."""
    click.echo(line, err=True)


def _run(assembly: Assembly) -> int:
    """Run until stopped; an inbox that cannot be used (refused credentials, a newer
    schema) ends the command with its reason."""
    with inbox_errors():
        return run_async(assembly.run())


def _run_relay(assembly: Assembly) -> int:
    """`_run`, and a relay topic that cannot be reached at start ends the command with
    the reason."""
    from receiver.sources.tdmq import TdmqError

    try:
        return _run(assembly)
    except TdmqError as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def assembly_errors() -> Iterator[None]:
    """A config that asks for what cannot be run, a port that cannot be had, or a
    certificate that cannot be served, ends the command with the reason and what to
    change."""
    from receiver.runtime.assemble import CannotAssemble
    from receiver.sources.listen import CannotListen
    from receiver.sources.tls import TlsError

    try:
        yield
    except (CannotAssemble, CannotListen, TlsError) as exc:
        raise click.ClickException(str(exc)) from None
