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
(``pwrite_now`` inline, or ``pwrite_soon`` to the connection's write lane). A hook whose
work at once was to save the old blocks (``soon``: copy-on-first-write) sends the change
itself to the lane: ``pwrite_now`` did that work, writes nothing and says False, and the
connection's ``pwrite_soon`` right after finds every hook ready. The connection does so
while more requests wait behind the write (the loop is what they wait for); with none (a
client with one request at a time) it asks ``pwrite_now`` again, and the write goes down
at once: a thread hop would only add to its latency. A 4 KiB write into the
source costs the kernel as much as the save did in Python (a large folio's buffer heads
walked on every write), and in the lane it costs the event loop nothing. The order stays:
the save's record is in the save area's page cache and indexed before the job exists.

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
    # a change ``now`` did work for goes down in the write lane, not inline (see the notes)
    soon: bool = False


NOT_READY, READY, WORKED, WORKED_SOON = range(4)  # what ``_ready_now`` found


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
        # what ``pwrite_now`` found for the change it said no to (see ``_found``)
        self._refused: tuple[int, int, int, int] | None = None

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
        ready, again = self._found(offset, len(data), saved_only=True)
        if ready == NOT_READY or (ready == WORKED_SOON and not again):  # saved: see the notes
            self._refused = (offset, len(data), self.gate.epoch, ready)
            return False
        # asked again right after a save: the caller wants it at once all the same
        return self.next.pwrite_now(offset, data)

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        # the hooks are done (or had nothing to do) before the job exists: the write
        # itself, whenever it runs, comes after them
        ready, _ = self._found(offset, len(data))
        return None if ready == NOT_READY else self.next.pwrite_soon(offset, data)

    def saved_soon(self, offset: int, length: int) -> bool:
        refused = self._refused
        return refused == (offset, length, self.gate.epoch, WORKED_SOON)

    def _found(self, offset: int, n: int, saved_only: bool = False) -> tuple[int, bool]:
        """What ``_ready_now`` finds for this change, and whether it is what ``pwrite_now``
        found when it just said no to it. Right after that (the connection tries the lane,
        or inline again, in the same step of the loop) the hooks stand as it found them:
        work they did at once is done (WORKED_SOON), and one that must wait still must
        (NOT_READY: the task path); new work comes only with a new epoch of the gate. So
        no hook is asked twice, and a save is not tried twice on the slow path. With
        ``saved_only`` (``pwrite_now`` asked again) only a save is taken as found: a hook
        that had to wait is asked again, as a caller may have waited for it meanwhile."""
        refused, self._refused = self._refused, None
        if (
            refused is not None
            and refused[:3] == (offset, n, self.gate.epoch)
            and (refused[3] == WORKED_SOON or not saved_only)
        ):
            return refused[3], True
        return self._ready_now(offset, n), False

    def _ready_now(self, offset: int, n: int) -> int:
        """``READY`` if every hook has nothing to do for this change, ``WORKED`` if some
        did it at once (``WORKED_SOON`` if one of them is ``soon``), else ``NOT_READY``."""
        idle = self._idle
        if self._epoch != self.gate.epoch:
            idle.clear_all()
            self._epoch = self.gate.epoch
        if idle.all_set(offset, n):
            return READY
        found = READY
        for hook in self.hooks:
            if hook.ready(offset, n):
                continue
            if hook.now is None or not hook.now(offset, n):
                return NOT_READY
            found = WORKED_SOON if hook.soon or found == WORKED_SOON else WORKED
        # A hook that had work here mostly still has work in the cell (the other blocks
        # of a protected chunk): asking every hook over the whole cell after each such
        # change was 7 % of a protected write's time. A change that finds them all ready
        # learns it.
        if found == READY:
            self._learn(offset, n)
        return found

    def _learn(self, offset: int, length: int) -> None:
        idle, cell = self._idle, self._idle.granularity
        for c in idle.chunk_range(offset, length):
            start = c * cell
            span = min(cell, self.next.size - start)
            if all(hook.ready(start, span) for hook in self.hooks):
                idle.set(c)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._refused = None  # the change took the task path: nothing is left to take as found
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
