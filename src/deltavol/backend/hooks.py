"""A filter that runs hooks before every change (write, zero, trim) passes down.

On a source volume with sessions the hooks are each session's ``Protector.protect``
(``sessions/protector.py``, copy-on-first-write: save a chunk a running update has yet to
copy) and one ``track`` for all its sessions (``Tracker.track`` in ``sessions/tracker.py``,
write-ahead change tracking: a change goes down only after its tracking bits are durable). The work is the
sessions'; the layer only runs it. The hooks do not depend on one another — each needs
only to be done before the change goes down — so they run concurrently, and a first write
under copy-on-first-write, or with several sessions, waits for one fsync's time, not one
per hook. If one fails, the others are cancelled and awaited before the change fails: no
hook goes on working once its change has left the write gate (a mark could run then).
Work that needs no waiting (a first write where tracking only has to put a bit
in its file) a hook may do at once (``now``), and the write stays on the fast path
(``pwrite_now`` inline, or ``pwrite_soon`` to the connection's write lane).

Asking every hook on every write costs more than the write itself once several sessions
track a volume, and almost always the answer is "nothing to do". So the layer keeps a
coarse bitmap of cells (64 KiB or more) for which every hook said so, asked over the whole
cell by a change that found every hook ready (not by one a hook did work for at once: a
protected write leaves the chunk's other blocks to save), and tests one bit. Hooks only
ever run out of work on their own (a bit made durable, a chunk copied); whatever gives
them work again (a mark, a new session, a reset bitmap) goes through the write gate, whose
``epoch`` then moves, and the cache is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from deltavol.backend.base import Backend, Layer, WriteJob
from deltavol.backend.gate import WriteGate
from deltavol.bitmap.bitmap import MAX_GRANULARITY, Bitmap

MIN_CELL = 64 * 1024
MAX_CELLS = 1 << 24  # 2 MiB of cache bits at most, unless cells would exceed MAX_GRANULARITY


@dataclass(frozen=True)
class Hook:
    before: Callable[[int, int], Awaitable[None]]  # the work to do before a change goes down
    ready: Callable[[int, int], bool]  # True when ``before`` would have nothing to do
    # does the work at once if it needs no waiting, and says whether it did
    now: Callable[[int, int], bool] | None = None


class BeforeChange(Layer):
    def __init__(self, next: Backend, hooks: Sequence[Hook], gate: WriteGate) -> None:
        super().__init__(next)
        self.hooks = hooks  # live: its owner changes it as hooks come and go
        self.gate = gate
        cell = MIN_CELL
        while cell < MAX_GRANULARITY and cell * MAX_CELLS < next.size:
            cell *= 2
        self._idle = Bitmap(max(next.size, 1), cell)  # cells where no hook has work
        self._epoch = gate.epoch

    async def _before(self, offset: int, length: int) -> None:
        todo = [
            hook.before
            for hook in self.hooks
            if not hook.ready(offset, length) and not (hook.now and hook.now(offset, length))
        ]
        if len(todo) == 1:
            await todo[0](offset, length)
        elif todo:
            await _all([asyncio.ensure_future(before(offset, length)) for before in todo])

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        return self._ready_now(offset, len(data)) and self.next.pwrite_now(offset, data)

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        # the hooks are done (or had nothing to do) before the job exists: the write
        # itself, whenever it runs, comes after them
        return self.next.pwrite_soon(offset, data) if self._ready_now(offset, len(data)) else None

    def _ready_now(self, offset: int, n: int) -> bool:
        """True if every hook has nothing to do for this change, or did it at once."""
        idle = self._idle
        if self._epoch != self.gate.epoch:
            idle.clear_all()
            self._epoch = self.gate.epoch
        if not idle.all_set(offset, n):
            worked = False
            for hook in self.hooks:
                if hook.ready(offset, n):
                    continue
                if hook.now is None or not hook.now(offset, n):
                    return False
                worked = True
            # A hook that had work here mostly still has work in the cell (the other blocks
            # of a protected chunk): asking every hook over the whole cell after each such
            # change was 7 % of a protected write's time. A change that finds them all ready
            # learns it.
            if not worked:
                self._learn(offset, n)
        return True

    def _learn(self, offset: int, length: int) -> None:
        idle, cell = self._idle, self._idle.granularity
        for c in idle.chunk_range(offset, length):
            start = c * cell
            span = min(cell, self.next.size - start)
            if all(hook.ready(start, span) for hook in self.hooks):
                idle.set(c)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._before(offset, len(data))
        await self.next.pwrite(offset, data, fua)

    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        await self._before(offset, length)
        await self.next.zero(offset, length, may_trim, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._before(offset, length)
        await self.next.trim(offset, length, fua)


async def _all(tasks: list[asyncio.Future[None]]) -> None:
    """Await every task; if one fails (or this is cancelled), cancel the others and wait
    until all are done before the error goes up."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        interrupted = False
        while not all(task.done() for task in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:
                interrupted = True  # cancelled again: still wait, then say so
        for task in tasks:
            if not task.cancelled():
                task.exception()  # one error goes up; the others are seen
        if interrupted:
            raise asyncio.CancelledError from None
        raise
