"""The `ci-receiver` command: one module per command group."""

from __future__ import annotations

import click

from receiver.cli.check import check_config
from receiver.cli.events import events
from receiver.cli.health import health
from receiver.cli.inbox import inbox
from receiver.cli.init import init
from receiver.cli.prune import prune
from receiver.cli.reconcile import reconcile
from receiver.cli.replay import replay
from receiver.cli.serving import consume, run_all, serve
from receiver.cli.setup import new_handler, send
from receiver.cli.stats import stats


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ci-receiver")
def main() -> None:
    """Receive Tencent Cloud Infinite (CI) job callbacks, keep them, and act on them."""


for command in (
    init,
    serve,
    consume,
    run_all,
    check_config,
    health,
    send,
    new_handler,
    events,
    stats,
    replay,
    reconcile,
    prune,
    inbox,
):
    main.add_command(command)
