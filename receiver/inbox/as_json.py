"""The inbox's records as JSON objects: what `events --json` prints and the admin API
answers, in one shape. Times are ISO 8601 in UTC."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from receiver.inbox.types import Attempt, EventDetail, EventSummary, RejectedReceipt, RunState


def summary_json(summary: EventSummary) -> dict[str, Any]:
    """An event as lists show it; `seq` is the cursor of the next page (`before`)."""
    return {
        "seq": summary.seq,
        "id": summary.id,
        "received_at": summary.received_at.isoformat(),
        "kind": summary.kind,
        "event_name": summary.event_name,
        "tag": summary.tag,
        "state": summary.state,
        "job_id": summary.job_id,
        "bucket": summary.bucket,
        "key": summary.key,
        "verdict": summary.verdict,
        "source": summary.source,
        "handlers": {
            r.handler: {"status": r.status, "attempts": r.attempts, "error": r.last_error}
            for r in summary.runs
        },
    }


def detail_json(detail: EventDetail, names: Mapping[str, str]) -> dict[str, Any]:
    """One event whole (its callback decoded), its runs and every attempt; `names`: the
    processes' (`presence.names`), for the runs being run."""
    return {
        "event": detail.event.to_dict(),
        "receipt_id": detail.receipt_id,
        "request_id": detail.request_id,
        "runs": [run_json(run, names) for run in detail.runs],
        "attempts": [attempt_json(attempt) for attempt in detail.attempts],
    }


def run_json(run: RunState, names: Mapping[str, str]) -> dict[str, Any]:
    """A run; `running` while a process runs it: which (its id, and `host (pid N)` when
    it says so) and since when."""
    running = None
    if run.leased_by is not None:
        running = {
            "process": run.leased_by,
            "on": names.get(run.leased_by),
            "since": _time(run.leased_since),
        }
    return {
        "handler": run.handler,
        "status": run.status,
        "attempts": run.attempts,
        "due_at": _time(run.due_at),
        "error": run.last_error,
        "running": running,
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    took = (attempt.finished_at - attempt.started_at).total_seconds()
    return {
        "handler": attempt.handler,
        "number": attempt.number,
        "replayed": attempt.replayed,
        "outcome": attempt.outcome,
        "started_at": attempt.started_at.isoformat(),
        "finished_at": attempt.finished_at.isoformat(),
        "ms": round(took * 1000, 1),
        "error": attempt.error,
    }


def rejected_json(receipt: RejectedReceipt) -> dict[str, Any]:
    """A refused callback; `preview` is its first bytes as text (bad UTF-8 replaced)."""
    return {
        "id": receipt.id,
        "received_at": receipt.received_at.isoformat(),
        "source": receipt.source,
        "request_id": receipt.request_id,
        "reason": receipt.reason,
        "detail": receipt.detail,
        "size": receipt.size,
        "kept": receipt.kept,
        "headers": receipt.headers,
        "source_meta": receipt.source_meta,
        "preview": receipt.preview.decode("utf-8", "replace"),
    }


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
