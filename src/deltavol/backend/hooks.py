"""A filter that runs hooks before every change (write, zero, trim) passes down.

Two of them sit on a source volume with sessions, each with one job:
``protect`` hooks (copy-on-first-write: save a chunk a running update has yet to copy)
above ``track`` hooks (write-ahead change tracking: a change goes down only after its
tracking bits are durable). The work is the sessions'; the layer only orders it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from deltavol.backend.base import Backend, Layer


@dataclass(frozen=True)
class Hook:
    before: Callable[[int, int], Awaitable[None]]  # the work to do before a change goes down
    ready: Callable[[int, int], bool]  # True when ``before`` would have nothing to do


class BeforeChange(Layer):
    def __init__(self, next: Backend, hooks: Callable[[], Iterable[Hook]]) -> None:
        super().__init__(next)
        self.hooks = hooks

    async def _before(self, offset: int, length: int) -> None:
        for hook in self.hooks():
            await hook.before(offset, length)

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        n = len(data)
        return all(hook.ready(offset, n) for hook in self.hooks()) and self.next.pwrite_now(offset, data)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._before(offset, len(data))
        await self.next.pwrite(offset, data, fua)

    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        await self._before(offset, length)
        await self.next.zero(offset, length, may_trim, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._before(offset, length)
        await self.next.trim(offset, length, fua)
