"""The block-device layer interface, in the manner of nbdkit plugins and filters.

A volume's data path is a stack: ``Export`` (validation, once) → filters (one job each:
target guard, copy-on-first-write, change tracking) → ``FileBackend``. A filter subclasses
``Layer`` and overrides only the operations it changes; everything else is delegated to
the layer below. Offsets and lengths reaching a layer are already checked by ``Export``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Extent = tuple[int, int]  # (length, NBD base:allocation flags)


@dataclass(eq=False)
class WriteJob:
    """A write every layer has agreed to, to be done later (``Layer.pwrite_soon``).

    ``run`` does the write: blocking, in a worker thread, never on the event loop.
    ``after`` is called on the event loop once ``run`` returned (with None) or raised
    (with the error), in the order the layers added them: the file's end first, the
    ``Export``'s last. Until then the layers that added one hold what they took (the
    write gate: no mark starts while the write is in flight).
    """

    run: Callable[[], None]
    after: list[Callable[[BaseException | None], None]] = field(default_factory=list)

    def finish(self, error: BaseException | None) -> None:
        """Call every ``after``, even past one that raises (a later one may give back the
        write gate: kept, every mark would wait for ever); then raise the first error."""
        failed: BaseException | None = None
        for after in self.after:
            try:
                after(error)
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed


class Backend(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...

    def can_trim(self) -> bool: ...
    def can_zero(self) -> bool: ...
    def can_fast_zero(self) -> bool: ...
    def can_extents(self) -> bool: ...

    def pread_cached(self, offset: int, length: int) -> bytes | None: ...
    def pwrite_now(self, offset: int, data: bytes) -> bool: ...
    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None: ...
    async def pread(self, offset: int, length: int) -> bytes: ...
    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None: ...
    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def cache(self, offset: int, length: int) -> None: ...
    async def extents(self, offset: int, length: int) -> list[Extent]: ...
    async def close(self) -> None: ...


class Layer:
    """A filter: delegates every operation to ``self.next`` unless it overrides it."""

    def __init__(self, next: Backend) -> None:
        self.next = next

    @property
    def name(self) -> str:
        return self.next.name

    @property
    def size(self) -> int:
        return self.next.size

    def can_trim(self) -> bool:
        return self.next.can_trim()

    def can_zero(self) -> bool:
        return self.next.can_zero()

    def can_fast_zero(self) -> bool:
        return self.next.can_fast_zero()

    def can_extents(self) -> bool:
        return self.next.can_extents()

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        """The data if it can be had without blocking (from the page cache), else None."""
        return self.next.pread_cached(offset, length)

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        """Write at once if no layer has to wait for anything (the disk, a fsync, a mark);
        False if nothing was written and ``pwrite`` must be used."""
        return self.next.pwrite_now(offset, data)

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        """As ``pwrite_now``, but the write itself is left to the caller, to run in a
        worker thread: a ``WriteJob`` if no layer has to wait for anything but the disk,
        else None (nothing was done, and ``pwrite`` must be used)."""
        return self.next.pwrite_soon(offset, data)

    async def pread(self, offset: int, length: int) -> bytes:
        return await self.next.pread(offset, length)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self.next.pwrite(offset, data, fua)

    async def zero(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        await self.next.zero(offset, length, may_trim, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.next.trim(offset, length, fua)

    async def flush(self) -> None:
        await self.next.flush()

    async def cache(self, offset: int, length: int) -> None:
        await self.next.cache(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.next.extents(offset, length)

    async def close(self) -> None:
        await self.next.close()
