"""Digests: the events routed to a robot or to e-mail within a window, as one message a
person reads ("300 failed: Transcode 280, Snapshot 20"), not 300.

`digest = "1m"` on the handler makes it a batch handler whose `batch_wait` is the window
(`handlers.Batching`): the dispatcher gathers what comes due in that minute, up to
`DIGEST_MAX_EVENTS`, and hands it over as one batch. The message: a title counting the
events by state and tag, a link to the inspector's page of them (when `[admin]
public_url` is set), the first `digest_lines` events in the handler's usual lines, and
how many more there were. Tags and states come from callbacks, which anyone who reaches
the receiver can forge: they are written through the target's markup like any value.
A window that gathered one event sends the usual message.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from urllib.parse import urlencode

from pydantic import Field, field_validator

from handlers import Batching, HandlerOptions
from handlers.markup import Markup
from receiver.callback.event import Event
from receiver.config import parse_duration

# The most events one digest holds: a window that gathers more sends several.
DIGEST_MAX_EVENTS = 1000


class DigestOptions(HandlerOptions):
    """What the robots and e-mail take for digests: off by default."""

    # The window, e.g. "30s", "1m", "5m", "1h".
    digest: str | None = None
    # How many of a digest's events are listed in full.
    digest_lines: int = Field(5, ge=1, le=50)

    @field_validator("digest")
    @classmethod
    def _window_reads(cls, digest: str | None) -> str | None:
        if digest is not None:
            window_seconds(digest)
        return digest

    def batching(self) -> Batching | None:
        """The handler's batches: none without a digest."""
        if self.digest is None:
            return None
        return Batching(size=DIGEST_MAX_EVENTS, wait=window_seconds(self.digest))


def window_seconds(text: str) -> float:
    """A digest's window in seconds, read as the config reads a duration."""
    try:
        seconds = parse_duration(text.lower())
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"digest {text!r}: a window like '30s', '1m', '5m' or '1h'")
    return seconds


def title(events: Sequence[Event]) -> str:
    """`300 failed: Transcode 280, Snapshot 20`, a part per state, most first."""
    by_state: dict[str, Counter[str]] = {}
    for event in events:
        state = (event.state or event.kind).lower()
        by_state.setdefault(state, Counter())[event.tag or event.event_name or event.kind] += 1
    parts = sorted(by_state.items(), key=lambda item: -sum(item[1].values()))
    return "; ".join(
        f"{sum(tags.values())} {state}: "
        + ", ".join(f"{tag} {count}" for tag, count in tags.most_common())
        for state, tags in parts
    )


def failed(events: Sequence[Event]) -> bool:
    return any(event.state not in (None, "Success") for event in events)


def events_link(inspector_url: str | None, handler: str, events: Sequence[Event]) -> str | None:
    """The inspector's events page of this handler over the digest's receipt times."""
    if inspector_url is None:
        return None
    received = [event.received_at for event in events]
    query = {
        "handler": handler,
        "since": min(received).isoformat(),
        # `until` is exclusive: just past the last.
        "until": (max(received) + timedelta(microseconds=1)).isoformat(),
    }
    return f"{inspector_url}/events?{urlencode(query)}"


def body(
    events: Sequence[Event],
    markup: Markup,
    one: Callable[[Event], str],
    lines: int,
    link: str | None,
) -> str:
    """The digest in `markup`: its title, the link, the first `lines` events each as
    `one` writes it, and how many more. The link comes before the events, so that a
    robot's length limit cannot cut it."""
    head = [markup.bold(markup.escape(title(events)))]
    if link is not None:
        head.append(markup.link(f"All {len(events)} in the inspector", link))
    listed = [one(event) for event in events[:lines]]
    more = len(events) - len(listed)
    tail = [f"and {more} more"] if more else []
    gap = markup.newline * 2
    return gap.join([markup.newline.join(head), *listed, *tail])
