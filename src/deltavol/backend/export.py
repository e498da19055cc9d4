"""The checked entry point to a volume's layer stack.

Every request from a client passes ``Export`` once: range, read-only and capability
checks happen here and nowhere below, so filters can trust what they receive. The
transmission flags a client sees are derived here from the stack's capabilities.
"""

from __future__ import annotations

from collections.abc import Callable

from deltavol.backend.base import Backend, Extent
from deltavol.errors import NotSupported, OutOfRange, ReadOnly
from deltavol.nbd.constants import TransmissionFlag as TF


class Export:
    def __init__(
        self,
        top: Backend,
        *,
        read_only: Callable[[], bool] = lambda: False,
        description: str = "",
    ) -> None:
        self.top = top
        self._read_only = read_only
        self.description = description

    @property
    def name(self) -> str:
        return self.top.name

    @property
    def size(self) -> int:
        return self.top.size

    @property
    def read_only(self) -> bool:
        return self._read_only()

    def transmission_flags(self) -> int:
        flags = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.CAN_MULTI_CONN | TF.SEND_CACHE
        flags |= TF.SEND_DF
        if self.read_only:
            flags |= TF.READ_ONLY
        else:
            if self.top.can_trim():
                flags |= TF.SEND_TRIM
            if self.top.can_zero():
                flags |= TF.SEND_WRITE_ZEROES
                if self.top.can_fast_zero():
                    flags |= TF.SEND_FAST_ZERO
        return int(flags)

    def _check(self, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise OutOfRange(offset=offset, length=length, name=self.name, size=self.size)

    def _check_write(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.read_only:
            raise ReadOnly(name=self.name)

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        self._check(offset, length)
        return self.top.pread_cached(offset, length)

    async def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return await self.top.pread(offset, length)

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        self._check_write(offset, len(data))
        return self.top.pwrite_now(offset, data)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._check_write(offset, len(data))
        await self.top.pwrite(offset, data, fua)

    async def zero(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        self._check_write(offset, length)
        if fast and not self.top.can_fast_zero():
            raise NotSupported(what="fast zero", name=self.name)
        await self.top.zero(offset, length, may_trim, fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_write(offset, length)
        await self.top.trim(offset, length, fua)

    async def flush(self) -> None:
        await self.top.flush()

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length)
        await self.top.cache(offset, length)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        self._check(offset, length)
        if length == 0:
            return []
        return await self.top.extents(offset, length)
