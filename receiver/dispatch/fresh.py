"""Events just stored, kept in memory until each handler they were routed to claims its
run: what those claims would otherwise read back from the inbox and decode again.

Bounded: once dispatch falls behind, what is held lives long, and the collector's full
passes walk all of it (10,000 events: 60-120 ms pauses of the loop, the p99 of every
callback; see the HTTP benchmark in docs/benchmarks.md). An event pushed out is simply read back by
its claims, as one stored by another process is.

Each handler's attempt gets an event of its own, so that none sees what another changed:
the held event itself goes to the last handler to claim it, a copy to each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from receiver.callback.event import Event

# Events held at most.
FRESH_EVENTS = 2_000


class FreshEvents:
    def __init__(self, capacity: int = FRESH_EVENTS) -> None:
        self._capacity = capacity
        # By event id, oldest first: what a claim may take instead of reading it back.
        self.events: dict[str, Event] = {}
        # By event id: the handlers whose runs of it are not claimed yet.
        self._unclaimed: dict[str, set[str]] = {}

    def keep(self, stored: Iterable[tuple[Event, set[str]]]) -> None:
        """Hold these events for the claims of these handlers; the oldest go past the
        capacity."""
        for event, handlers in stored:
            if handlers:
                self.events[event.id] = event
                self._unclaimed[event.id] = set(handlers)
        while len(self.events) > self._capacity:
            self._drop(next(iter(self.events)))

    def for_handler(self, handler: str) -> Mapping[str, Event]:
        """What a claim of this handler may take instead of reading it back."""
        return _Handout(self, handler)

    def take(self, event_id: str, handler: str) -> Event | None:
        """The event for this handler's run: the one held if no other handler will claim
        it, else a copy."""
        event = self.events.get(event_id)
        if event is None or self._unclaimed[event_id] <= {handler}:
            return event
        return event.copy()

    def claimed(self, event_id: str, handler: str) -> None:
        """`handler` claimed its run of the event: once every handler has, it goes."""
        waiting = self._unclaimed.get(event_id)
        if waiting is not None:
            waiting.discard(handler)
            if not waiting:
                self._drop(event_id)

    def forget_handlers(self, gone: set[str]) -> None:
        """These handlers will claim nothing (a reload took them out): events held only
        for them go."""
        for event_id in list(self._unclaimed):
            self._unclaimed[event_id] -= gone
            if not self._unclaimed[event_id]:
                self._drop(event_id)

    def _drop(self, event_id: str) -> None:
        del self.events[event_id], self._unclaimed[event_id]


class _Handout(Mapping[str, Event]):
    """The held events as one handler's claim reads them (`FreshEvents.take`)."""

    def __init__(self, fresh: FreshEvents, handler: str) -> None:
        self._fresh = fresh
        self._handler = handler

    def __getitem__(self, event_id: str) -> Event:
        event = self._fresh.take(event_id, self._handler)
        if event is None:
            raise KeyError(event_id)
        return event

    def __iter__(self) -> Iterator[str]:
        return iter(self._fresh.events)

    def __len__(self) -> int:
        return len(self._fresh.events)
