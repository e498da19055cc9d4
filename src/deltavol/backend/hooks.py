"""A filter that runs hooks before every change (write, zero, trim) passes down.

On a source volume with sessions the hooks are each session's ``protect`` (copy-on-first-
write: save a chunk a running update has yet to copy) and ``track`` (write-ahead change
tracking: a change goes down only after its tracking bits are durable). The work is the
sessions'; the layer only runs it. The hooks do not depend on one another — each needs
only to be done before the change goes down — so they run concurrently, and a first write
under copy-on-first-write, or with several sessions, waits for one fsync's time, not one
per hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from deltavol.backend.base import Backend, Layer


@dataclass(frozen=True)
class Hook:
    before: Callable[[int, int], Awaitable[None]]  # the work to do before a change goes down
    ready: Callable[[int, int], bool]  # True when ``before`` would have nothing to do


class BeforeChange(Layer):
    def __init__(self, next: Backend, hooks: Sequence[Hook]) -> None:
        super().__init__(next)
        self.hooks = hooks  # live: its owner changes it as hooks come and go

    async def _before(self, offset: int, length: int) -> None:
        todo = [hook.before for hook in self.hooks if not hook.ready(offset, length)]
        if len(todo) == 1:
            await todo[0](offset, length)
        elif todo:
            await asyncio.gather(*(before(offset, length) for before in todo))

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        n = len(data)
        return all(hook.ready(offset, n) for hook in self.hooks) and self.next.pwrite_now(offset, data)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._before(offset, len(data))
        await self.next.pwrite(offset, data, fua)

    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        await self._before(offset, length)
        await self.next.zero(offset, length, may_trim, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._before(offset, length)
        await self.next.trim(offset, length, fua)
