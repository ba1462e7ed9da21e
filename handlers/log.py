"""`log`: one structured log line per event (the embedded default's only handler)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import structlog

from handlers import HandlerOptions
from receiver.callback.event import Event


class LogOptions(HandlerOptions):
    level: Literal["debug", "info", "warning"] = "info"


class LogHandler:
    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = LogOptions.model_validate(options)
        self._logger = structlog.get_logger("ci_receiver.events")

    async def __call__(self, event: Event) -> None:
        fields: dict[str, Any] = {
            "event_id": event.id,
            "kind": event.kind,
            "tag": event.tag or event.event_name,
            "state": event.state,
            "job_id": event.job_id,
            "input": event.input.key if event.input else None,
            "outputs": [output.key for output in event.outputs[:10]],
        }
        if event.state not in (None, "Success"):
            fields.update(code=event.code, message=event.message)
        if event.moderation is not None:
            fields.update(result=event.moderation.result, label=event.moderation.label)
        getattr(self._logger, self.options.level)("event", **fields)
