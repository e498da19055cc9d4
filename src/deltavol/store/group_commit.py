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
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Syncable(Protocol):
    def write_out(self) -> None:
        """Put what changed since the last round into the file (on the loop; may raise)."""

    def sync(self) -> None:
        """Make everything written so far durable (blocking; runs in a worker thread)."""


class GroupCommit:
    def __init__(self) -> None:
        self._files: dict[int, Syncable] = {}  # written since the running round began, by id
        self._next: asyncio.Future[None] | None = None
        self._running = False

    def round(self, file: Syncable) -> asyncio.Future[None]:
        """The round that makes what ``file`` holds now durable (await it shielded: the
        future is shared by every writer of the round)."""
        self._files[id(file)] = file
        if self._next is None:
            loop = asyncio.get_running_loop()
            self._next = loop.create_future()
            if not self._running:
                loop.call_soon(self._start)
        return self._next

    def _start(self) -> None:
        fut, files = self._next, list(self._files.values())
        assert fut is not None
        self._next, self._files, self._running = None, {}, True
        try:
            for file in files:
                file.write_out()
            done = asyncio.get_running_loop().run_in_executor(None, _sync_all, files)
        except Exception as exc:  # a write failed, or the executor is shut down: fail the round
            self._running = False
            fut.set_exception(exc)
            return
        done.add_done_callback(lambda d: self._finish(d, fut))

    def _finish(self, done: asyncio.Future[None], fut: asyncio.Future[None]) -> None:
        self._running = False
        exc = asyncio.CancelledError() if done.cancelled() else done.exception()
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
        if self._next is not None:  # writers who came while this round ran
            self._start()


def _sync_all(files: list[Syncable]) -> None:
    for file in files:
        file.sync()
