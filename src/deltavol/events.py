"""What happened in the server, in order: the feed of the event stream, the metrics and ``--wait``.

Publishing never awaits and never blocks: a publisher (a session changing state, a copy making
progress) calls ``publish`` and goes on. Every event gets the next sequence number, which is its
Server-Sent Events id. A bounded ring keeps the most recent events, so a client that reconnects
with ``Last-Event-ID`` gets what it missed, as long as it was recent; one that fell further behind
is told so (``gap``). Each subscriber has a bounded queue: a subscriber that does not keep up is
dropped (its iterator ends) rather than let memory grow or slow down the publisher.

Progress is frequent (every copied piece); ``progress`` keeps at most ``PROGRESS_EVERY`` seconds
between two events of one session, and the last one before an update ends is always published by
the finished or failed event that follows.

Kinds: ``session.created``, ``session.removed``, ``session.state``, ``update.marked``,
``update.progress``, ``update.finished``, ``update.failed``, ``update.retry``, ``update.cancelled``
(a restore took back an update that had not written its target), ``volume.created``,
``volume.removed``, ``restore.started``, ``restore.finished``, ``restore.failed`` (a restore's
progress is ``update.progress`` with its id), ``session.reversed``. ``data`` always has
``name`` (the session's or volume's).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("deltavol.events")

KEEP = 1024  # events kept for reconnecting clients
QUEUE = 256  # events a subscriber may lag behind before it is dropped
PROGRESS_EVERY = 0.25  # seconds between two progress events of one session


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    kind: str
    at: float  # Unix time
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, **self.data}


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(QUEUE))
    dropped: bool = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.queue.get()) is not None:
            yield event


class EventBus:
    def __init__(self, keep: int = KEEP, clock: Callable[[], float] = time.time) -> None:
        self._recent: collections.deque[Event] = collections.deque(maxlen=keep)
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self._last_progress: dict[str, float] = {}
        self._clock = clock
        self.last_id = 0

    def publish(self, kind: str, /, **data: Any) -> Event:
        self.last_id += 1
        event = Event(self.last_id, kind, self._clock(), data)
        self._recent.append(event)
        for listen in self._listeners:
            try:
                listen(event)
            except Exception:  # a listener's bug must not fail the publisher's operation
                log.exception("events: a listener failed on %s", kind)
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(sub)
        if kind != "update.progress":
            self._last_progress.pop(data.get("name", ""), None)
        return event

    def progress(self, name: str, **data: Any) -> Event | None:
        """Publish ``update.progress`` for ``name`` unless one went out very recently."""
        now = time.monotonic()
        if now - self._last_progress.get(name, -PROGRESS_EVERY) < PROGRESS_EVERY:
            return None
        self._last_progress[name] = now
        return self.publish("update.progress", name=name, **data)

    def since(self, last_id: int) -> tuple[list[Event], bool]:
        """The kept events after ``last_id``, and whether some after it were already let go."""
        events = [e for e in self._recent if e.id > last_id]
        first = events[0].id if events else self.last_id + 1
        return events, first > last_id + 1

    def listen(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn`` with every event as it is published, before any subscriber sees it
        (what must be recorded durably, such as the facts the metrics count)."""
        self._listeners.append(fn)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription()
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)

    def _drop(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        sub.dropped = True
        while not sub.queue.empty():  # make room for the end marker
            sub.queue.get_nowait()
        sub.queue.put_nowait(None)
