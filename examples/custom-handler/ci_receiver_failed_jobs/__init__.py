"""An example ci-receiver handler: write one file per failed job, for a script to pick up."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from receiver.model import Event


class FailedJobs:
    def __init__(self, options: Mapping[str, Any]) -> None:
        # Options come from the handler's table in the config, generic keys removed.
        self.folder = Path(options["folder"])

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    async def __call__(self, event: Event) -> None:
        if event.state in ("Failed", "Cancel"):
            note = f"{event.tag} {event.state}: {event.code} {event.message}\n"
            # Write, then rename: a script watching the folder never sees half a note.
            partial = self.folder / f".{event.job_id}.txt.partial"
            partial.write_text(note)
            partial.replace(self.folder / f"{event.job_id}.txt")
