"""A write gate for a source volume: a mark must see no write half-way through the stack.

Writes pass the gate shared; ``closed()`` waits for writes in flight to finish and holds
new ones back while a session marks (tracking -> transfer) or resets its tracking bitmap.

``shut()`` closes it for good when the server stops: once the writes in flight are
done, the sessions seal and close their files, and no write may pass after that (it
would find them closed, or open their target again).

``epoch`` counts the moments when what the write path may skip could have changed (every
closing, and ``changed()`` for the rest): ``BeforeChange`` forgets what it cached then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from deltavol.backend.base import Backend, Layer, WriteJob
from deltavol.backend.recent import RecentWrites


class WriteGate:
    def __init__(self, recent: RecentWrites | None = None) -> None:
        # the regions the changes passing it touched lately (``backend/recent.py``)
        self.recent = recent if recent is not None else RecentWrites()
        self._writers = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._reopened: asyncio.Event | None = None
        self._shut: asyncio.Event | None = None  # never set: ``shut``
        self.epoch = 0

    def changed(self) -> None:
        """Hooks may have work again where they had none (a session came, a bitmap was reset)."""
        self.epoch += 1

    @property
    def open(self) -> bool:
        return self._reopened is None and self._shut is None

    async def enter(self) -> None:
        while not self.open:
            if self._shut is not None:
                await self._shut.wait()  # until the process ends
            elif self._reopened is not None:
                await self._reopened.wait()
        self._writers += 1
        self._idle.clear()

    def enter_now(self) -> bool:
        """``enter`` if that needs no waiting (the gate is open); False if it would."""
        if not self.open:
            return False
        self._writers += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self._writers -= 1
        if not self._writers:
            self._idle.set()

    async def shut(self) -> None:
        """Close the gate for good (the server stops): no write passes from now on (it
        waits until the process ends); returns once the writes in flight are done.
        ``closed`` still works (it waits for no writer)."""
        if self._shut is None:
            self._shut = asyncio.Event()
            self.epoch += 1
        await self._idle.wait()

    @asynccontextmanager
    async def closed(self) -> AsyncIterator[None]:
        while self._reopened is not None:
            await self._reopened.wait()
        reopened = self._reopened = asyncio.Event()
        try:
            await self._idle.wait()
            self.epoch += 1
            yield
        finally:
            self.epoch += 1
            self._reopened = None
            reopened.set()


class GateLayer(Layer):
    """Every change passes the gate; reads do not need to.

    ``check`` runs once a change has passed the gate, and raises if it may not go down any
    more: a change the export let through before its volume was guarded (a restore, which
    holds the gate closed) must not land once the guard is up."""

    def __init__(self, next: Backend, gate: WriteGate, check: Callable[[], None] = lambda: None) -> None:
        super().__init__(next)
        self.gate = gate
        self.check = check

    async def _enter(self) -> None:
        await self.gate.enter()
        try:
            self.check()
        except BaseException:
            self.gate.leave()
            raise

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        # synchronous, so no mark can fall in the middle of it: no need to enter
        if not self.gate.open:
            return False
        self.gate.recent.note(offset, len(data))
        return self.next.pwrite_now(offset, data)

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        # checked synchronously as ``pwrite_now``; the write itself runs later, so it holds
        # the gate until it is done: a mark waits for it
        if not self.gate.open:
            return None
        self.gate.recent.note(offset, len(data))
        job = self.next.pwrite_soon(offset, data)
        if job is not None:
            self.gate.enter_now()
            job.after.append(self._left)
        return job

    def _left(self, error: BaseException | None) -> None:
        self.gate.leave()

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._enter()
        try:
            self.gate.recent.note(offset, len(data))
            await self.next.pwrite(offset, data, fua)
        finally:
            self.gate.leave()

    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        await self._enter()
        try:
            self.gate.recent.note(offset, length)
            await self.next.zero(offset, length, may_trim, fua)
        finally:
            self.gate.leave()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._enter()
        try:
            self.gate.recent.note(offset, length)
            await self.next.trim(offset, length, fua)
        finally:
            self.gate.leave()
