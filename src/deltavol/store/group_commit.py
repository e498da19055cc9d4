"""Group commit: many writers, one round of fdatasync for all of them.

Writers change their file's contents in memory and ask for the round that will make
them durable. A round starts on the next turn of the event loop, so every writer of one
burst joins it; while it runs, newcomers gather for the next one. A round first has each
file write out what its writers changed (on the loop: a page-cache write, one per file
and round rather than one per writer), then syncs them all in one thread hop: the
tracking files of all sessions on one source cost one round per burst, not one per
session.

Rounds run one after another, so a round that succeeds covers only what was written
before it began; a failed round fails every writer waiting for it and leaves the next
round to start afresh.

The way back from the thread is short, because a protected write waits for it: the
thread hands the result to the loop itself (``call_soon_threadsafe``), and the round
wakes each writer's own future (``wait``) in that same turn of the loop. Through
``run_in_executor`` and ``asyncio.shield`` a writer would resume three turns later, and
on a busy loop a turn is a burst of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from deltavol.store import fs

# rounds of different group commits (each save area has its own, each source one for its
# tracking files) sync in parallel; as many as the file pool, so no disk's slow fdatasync
# holds up the others' rounds before there are that many sessions
_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="deltavol-sync")

# what the metrics show, by kind of file (its class): rounds that synced such a file, and
# the files synced; counted on the loop as a round starts
ROUNDS: dict[str, int] = {}
SYNCS: dict[str, int] = {}


class Syncable(Protocol):
    def write_out(self) -> None:
        """Put what changed since the last round into the file (on the loop; may raise)."""

    def sync(self) -> None:
        """Make everything written so far durable (blocking; runs in a worker thread)."""


class GroupCommit:
    def __init__(self) -> None:
        self._files: dict[int, Syncable] = {}  # written since the running round began, by id
        self._next: asyncio.Future[None] | None = None
        self._running: asyncio.Future[None] | None = None
        self._waiters: dict[asyncio.Future[None], list[asyncio.Future[None]]] = {}

    def round(self, file: Syncable) -> asyncio.Future[None]:
        """The round that makes what ``file`` holds now durable. It is shared by every
        writer of the round: add done callbacks to it, but await ``wait(round)``."""
        self._files[id(file)] = file
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            if self._running is None:
                loop.call_soon(self._start)
        return self._next

    def wait(self, round: asyncio.Future[None]) -> asyncio.Future[None]:
        """A future of the caller's own that ends as ``round`` does, in the same turn of
        the loop (after the round's done callbacks have run). Cancelling it cancels no
        other writer and not the round."""
        mine: asyncio.Future[None] = round.get_loop().create_future()
        if round.done():
            _copy(round, mine)
        elif round is self._next or round is self._running:
            self._waiters.setdefault(round, []).append(mine)
        else:
            raise ValueError("not a round of this group commit")
        return mine

    def _start(self) -> None:
        fut, files = self._next, list(self._files.values())
        assert fut is not None
        self._next, self._files, self._running = None, {}, fut
        loop = asyncio.get_running_loop()
        kinds = {type(f).__name__ for f in files}
        for kind in kinds:
            ROUNDS[kind] = ROUNDS.get(kind, 0) + 1
        for file in files:
            kind = type(file).__name__
            SYNCS[kind] = SYNCS.get(kind, 0) + 1
        try:
            for file in files:
                file.write_out()
            fs.submit(_pool, _sync_all, files, loop, self._finish, fut)
        except Exception as exc:  # a write failed, or the pool is shut down: fail the round
            self._finish(fut, exc)

    def _finish(self, fut: asyncio.Future[None], exc: BaseException | None) -> None:
        self._running = None
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
                fut.exception()  # its waiters and callbacks see it; no "never retrieved"
        for mine in self._waiters.pop(fut, ()):
            if not mine.done():
                _copy(fut, mine)
        if self._next is not None:  # writers who came while this round ran
            self._start()


def _copy(done: asyncio.Future[None], to: asyncio.Future[None]) -> None:
    if done.cancelled():
        to.cancel()
    elif (exc := done.exception()) is not None:
        to.set_exception(exc)
    else:
        to.set_result(None)


def _sync_all(
    files: list[Syncable],
    loop: asyncio.AbstractEventLoop,
    finish: Callable[[asyncio.Future[None], BaseException | None], None],
    fut: asyncio.Future[None],
) -> None:
    """In a worker thread: sync every file, then hand the outcome to the loop."""
    exc: BaseException | None = None
    try:
        for file in files:
            file.sync()
    except BaseException as e:  # handed to the waiters
        exc = e
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(finish, fut, exc)
