"""Group commit: many writers, one round of fdatasync for all of them.

Writers change their file's contents in memory and ask for the round that will make
them durable. A round starts on the next turn of the event loop, so every writer of one
burst joins it; while it runs, newcomers gather for the next one. A round first has each
file write out what its writers changed (on the loop: a page-cache write, one per file
and round rather than one per writer), then syncs the files side by side in worker
threads (up to four at once, see below): the tracking files of all sessions on one
source cost one round per burst, not one per session, and a round of four files lasts
about as long as its slowest fdatasync, not the sum of four.

Each file of a round has its own future (``round(file)``), which its writers share: it
ends when that file's sync does, and fails only if that file's write or sync failed.
One file's failure thus fails exactly its own writers; the writers of the others are
acknowledged when, and only if, their own file synced.

Rounds run one after another: the next begins once every file of the running one is
done. So a round that succeeds covers only what was written before it began, a file is
never synced by two rounds at once (two concurrent fdatasyncs of one file descriptor
may each report the other's error: the kernel reports a writeback error once per open
file), and a failed round leaves the next one to start afresh.

Each group commit syncs in threads of its own, at most ``THREADS`` at once: the files
of a round beyond that sync as its threads free up (each still with its own future).
A disk whose fdatasyncs stall thus holds only the threads of the group commits with files
on it (the tracking files of a source, a session's save area), never another's: a
save-area round of a healthy volume, on the protected-write path, never queues behind a
stalled bitmaps disk, however many sessions that disk holds. Threads start as needed (a
save area, one file per round, keeps one) and end with their group commit.

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

# the threads of one group commit: the files of a round sync this many at once, and
# different group commits in threads of their own (see the notes above)
THREADS = 4

# what the metrics show, by kind of file (its class): rounds that synced such a file, and
# the files synced; counted on the loop as a round starts
ROUNDS: dict[str, int] = {}
SYNCS: dict[str, int] = {}


class Syncable(Protocol):
    def write_out(self) -> None:
        """Put what changed since the last round into the file (on the loop; may raise)."""

    def sync(self) -> None:
        """Make everything written so far durable (blocking; runs in a worker thread, at
        the same time as the other files' syncs of the round, never as its own)."""


class GroupCommit:
    def __init__(self) -> None:
        # the next round: each file written since the running round began, by id, with the
        # future its writers share
        self._next: dict[int, tuple[Syncable, asyncio.Future[None]]] = {}
        self._running: dict[asyncio.Future[None], Syncable] = {}  # the running round's, not done yet
        self._waiters: dict[asyncio.Future[None], list[asyncio.Future[None]]] = {}
        self._pool: ThreadPoolExecutor | None = None  # its threads, from the first round on

    def round(self, file: Syncable) -> asyncio.Future[None]:
        """The next round's future for ``file``: done once what ``file`` holds now is
        durable (or failed to be). It is shared by every writer of ``file`` in the round:
        add done callbacks to it, but await ``wait(round)``."""
        entry = self._next.get(id(file))
        if entry is None:
            loop = asyncio.get_running_loop()
            if not self._next and not self._running:
                loop.call_soon(self._start)
            entry = self._next[id(file)] = (file, loop.create_future())
        return entry[1]

    def wait(self, round: asyncio.Future[None]) -> asyncio.Future[None]:
        """A future of the caller's own that ends as ``round`` does, in the same turn of
        the loop (after the round's done callbacks have run). Cancelling it cancels no
        other writer and not the round."""
        mine: asyncio.Future[None] = round.get_loop().create_future()
        if round.done():
            _copy(round, mine)
        elif round in self._running or any(fut is round for _, fut in self._next.values()):
            self._waiters.setdefault(round, []).append(mine)
        else:
            raise ValueError("not a round of this group commit")
        return mine

    def _start(self) -> None:
        entries = list(self._next.values())
        self._next = {}
        self._running = {fut: file for file, fut in entries}
        loop = asyncio.get_running_loop()
        kinds = {type(f).__name__ for f, _ in entries}
        for kind in kinds:
            ROUNDS[kind] = ROUNDS.get(kind, 0) + 1
        for file, _ in entries:
            kind = type(file).__name__
            SYNCS[kind] = SYNCS.get(kind, 0) + 1
        # every file is written out first (on the loop), then each syncs in a thread of
        # its own: a file's outcome is its own writers' (a failed write or sync of one
        # file fails none of the others), and a round lasts as long as its slowest sync
        # rather than the sum of them
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="deltavol-sync")
        syncing = []
        for file, fut in entries:
            try:
                file.write_out()
            except Exception as exc:  # not written: not synced, and its writers are told
                self._finish(fut, exc)
            else:
                syncing.append((file, fut))
        for i, (file, fut) in enumerate(syncing):
            try:
                fs.submit(self._pool, _sync, file, loop, self._finish, fut)
            except Exception as exc:  # no more threads (interpreter exit): fail this file and the rest
                for _, left in syncing[i:]:
                    self._finish(left, exc)
                break

    def _finish(self, fut: asyncio.Future[None], exc: BaseException | None) -> None:
        if self._running.pop(fut, None) is None:
            return  # (not this round's: already finished)
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
                fut.exception()  # its waiters and callbacks see it; no "never retrieved"
        for mine in self._waiters.pop(fut, ()):
            if not mine.done():
                _copy(fut, mine)
        if not self._running and self._next:  # writers who came while this round ran
            self._start()


def _copy(done: asyncio.Future[None], to: asyncio.Future[None]) -> None:
    if done.cancelled():
        to.cancel()
    elif (exc := done.exception()) is not None:
        to.set_exception(exc)
    else:
        to.set_result(None)


def _sync(
    file: Syncable,
    loop: asyncio.AbstractEventLoop,
    finish: Callable[[asyncio.Future[None], BaseException | None], None],
    fut: asyncio.Future[None],
) -> None:
    """In a worker thread: sync one file, then hand the outcome to the loop."""
    exc: BaseException | None = None
    try:
        file.sync()
    except BaseException as e:  # handed to the waiters
        exc = e
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(finish, fut, exc)
