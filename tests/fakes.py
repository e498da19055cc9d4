"""Fakes and helpers shared by the in-process tests: a volume's bottom backend in memory
(``Disk``) and ``until``, which waits for a condition the test cannot await directly."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from deltavol.backend.base import Extent, WriteJob


class Disk:
    """A volume's bottom backend in memory: what a filter stack (``BeforeChange``,
    ``GateLayer``) calls below it, all of ``backend.base.Backend``.

    ``landed`` has one entry per change that went down, in order: what ``landing(offset,
    length)`` returns, by default ``(offset, length)``. A test overrides ``landing`` to
    check, or record, what holds at the instant a change goes down. A read takes a turn of
    the loop, as a read from disk lets other tasks run; with ``cached`` it can also come
    from the page cache (``pread_cached``) without one. Changes land at once and for good:
    ``flush`` has nothing to do."""

    name = "src"

    def __init__(self, size: int, data: bytes | None = None, *, cached: bool = False) -> None:
        self.size = size
        self.data = bytearray(data if data is not None else size)
        assert len(self.data) == size
        self.cached = cached
        self.landed: list[Any] = []

    def landing(self, offset: int, length: int) -> Any:
        return (offset, length)

    def _land(self, offset: int, data: bytes) -> None:
        self.landed.append(self.landing(offset, len(data)))
        self.data[offset : offset + len(data)] = data

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return False

    def can_extents(self) -> bool:
        return True

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        return bytes(self.data[offset : offset + length]) if self.cached else None

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        self._land(offset, data)
        return True

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        return WriteJob(functools.partial(self._land, offset, data))

    async def pread(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(0)  # I/O: other tasks run meanwhile
        return bytes(self.data[offset : offset + length])

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._land(offset, data)

    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        self._land(offset, bytes(length))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._land(offset, bytes(length))

    async def flush(self) -> None:
        """Every change here has landed (no page cache in this model): nothing to do."""

    async def cache(self, offset: int, length: int) -> None:
        pass

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return [(length, 0)]

    async def close(self) -> None:
        pass


async def until(cond: Callable[[], bool], what: str = "the condition", *, timeout: float = 20.0) -> None:
    """Let the loop run until ``cond()`` holds; fail after ``timeout`` seconds. For a state
    no event announces: where one does, await the event instead."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)
