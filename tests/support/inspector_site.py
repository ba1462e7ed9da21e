"""A `ci-receiver serve` for the inspector's tests: the admin API and pages on, and a
handler `db` that fails the first attempt of every event with one attempt allowed (so
each event is dead-lettered for it at once, and succeeds when replayed), beside `log`.
What `db` did is in `<tmp_path>/db.jsonl` (see `handler_doubles.recorded`)."""

from __future__ import annotations

from pathlib import Path

from tests.support.processes import Receiver

CONFIG = """
data_dir = "{data}"
{extra}
[admin]
inspector = {inspector}
{admin}
[handlers.db]
type = "tests.support.handler_doubles:Recorder"
path = "{recorder}"
fail_first = 1
max_attempts = 1
[handlers.log]
type = "log"
"""


def start(
    tmp_path: Path,
    admin: str = "",
    inspector: bool = True,
    extra: str = "",
    env: dict[str, str] | None = None,
) -> Receiver:
    """`admin`: more `[admin]` keys; `extra`: sections before it (`[log]` ...)."""
    config = tmp_path / "ci-receiver.toml"
    config.write_text(
        CONFIG.format(
            data=tmp_path / "data",
            recorder=tmp_path / "db.jsonl",
            inspector=str(inspector).lower(),
            admin=admin,
            extra=extra,
        )
    )
    return Receiver(config).start(env=env)
