"""An example ci-receiver handler: write one file per failed job, for a script to pick up."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handlers import Context, Handler
from receiver import Event


def file_name(job_id: str) -> str:
    """The JobId when it is a plain name, else its SHA-256: the id comes from the
    callback, and a forged one (`../..`, `/etc/x`) must not choose where to write."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,128}", job_id):
        return job_id
    return hashlib.sha256(job_id.encode()).hexdigest()


class FailedJobs(Handler):
    def __init__(self, options: Mapping[str, Any]) -> None:
        # Options come from the handler's table in the config, generic keys removed.
        self.folder = Path(options["folder"])

    async def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    async def __call__(self, event: Event, ctx: Context) -> None:
        if event.state in ("Failed", "Cancel"):
            note = f"{event.tag} {event.state}: {event.code} {event.message}\n"
            name = file_name(event.subject)  # the JobId (a workflow's: its RunId)
            # Write, then rename: a script watching the folder never sees half a note.
            partial = self.folder / f".{name}.txt.partial"
            partial.write_text(note)
            partial.replace(self.folder / f"{name}.txt")
            ctx.log.info("noted a failed job", file=f"{name}.txt")
