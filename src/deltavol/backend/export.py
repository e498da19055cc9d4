"""The checked entry point to a volume's layer stack.

Every request from a client passes ``Export`` once: range, read-only and capability
checks happen here and nowhere below, so filters can trust what they receive. The
transmission flags a client sees are derived here from the stack's capabilities.

It is also where requests are counted for the metrics: per operation, requests, bytes,
errors and a latency histogram, in plain lists of ints that a request bumps (two clock
reads and one bisect). A read or write served at once, from the page cache without
waiting, bumps just two ints (a count and bytes), with no clock read: it took
microseconds, and the first bucket gets it when the collector folds those in at scrape
time. A request that fails its checks here is counted as an error with no latency. ``COUNTING`` (``serve
--no-nbd-metrics``) leaves ``stats`` None: what a request costs without them.
"""

from __future__ import annotations

import functools
import time
from bisect import bisect_left
from collections.abc import Callable

from deltavol.backend.base import Backend, Extent, WriteJob
from deltavol.errors import NotSupported, OutOfRange, Protected, ReadOnly
from deltavol.nbd.constants import TransmissionFlag as TF

COUNTING = True  # new exports count their requests (see the notes above)

OPS = ("read", "write", "zero", "trim", "flush", "cache", "block_status")
READ, WRITE, ZERO, TRIM, FLUSH, CACHE, BLOCK_STATUS = range(len(OPS))
# upper bounds (seconds) of the latency histogram's buckets; one more bucket holds the rest
BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
_now = time.perf_counter


class ExportStats:
    """Counters of one export since the server started, indexed by ``OPS``.

    Reads and writes served at once (``pread_cached``, ``pwrite_now``) bump two plain ints
    each, and are folded into ``requests``, ``bytes`` and the first bucket when those are
    read (at scrape time): the commonest request pays two increments, not three list
    updates."""

    __slots__ = (
        "_buckets", "_bytes", "_requests", "errors", "now_read_bytes", "now_reads", "now_write_bytes",
        "now_writes", "seconds",
    )  # fmt: skip

    def __init__(self) -> None:
        n = len(OPS)
        self._requests = [0] * n
        self._bytes = [0] * n
        self.errors = [0] * n
        self.seconds = [0.0] * n
        self._buckets = [[0] * (len(BUCKETS) + 1) for _ in range(n)]
        self.now_reads = self.now_read_bytes = 0  # served at once: no clock read, first bucket
        self.now_writes = self.now_write_bytes = 0

    @property
    def requests(self) -> list[int]:
        folded = self._requests.copy()
        folded[READ] += self.now_reads
        folded[WRITE] += self.now_writes
        return folded

    @property
    def bytes(self) -> list[int]:
        folded = self._bytes.copy()
        folded[READ] += self.now_read_bytes
        folded[WRITE] += self.now_write_bytes
        return folded

    @property
    def buckets(self) -> list[list[int]]:
        folded = [b.copy() for b in self._buckets]
        folded[READ][0] += self.now_reads
        folded[WRITE][0] += self.now_writes
        return folded

    def done(self, op: int, nbytes: int, took: float) -> None:
        self._requests[op] += 1
        self._bytes[op] += nbytes
        self.seconds[op] += took
        self._buckets[op][bisect_left(BUCKETS, took)] += 1

    def failed(self, op: int) -> None:
        self.errors[op] += 1


class Export:
    def __init__(
        self,
        top: Backend,
        *,
        read_only: Callable[[], bool] = lambda: False,
        description: str = "",
        why_read_only: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.top = top
        self._read_only = read_only
        self._why_read_only = why_read_only  # a refused change says why, when there is a reason
        self.description = description
        self.stats: ExportStats | None = ExportStats() if COUNTING else None

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
            why = self._why_read_only()
            raise Protected(name=self.name, why=why) if why else ReadOnly(name=self.name)

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        st = self.stats
        if st is None:
            self._check(offset, length)
            return self.top.pread_cached(offset, length)
        try:
            self._check(offset, length)
            data = self.top.pread_cached(offset, length)
        except Exception:
            st.failed(READ)
            raise
        if data is not None:  # served at once: below the first bucket, no clock read
            st.now_reads += 1
            st.now_read_bytes += length
        return data

    async def pread(self, offset: int, length: int) -> bytes:
        st = self.stats
        if st is None:
            self._check(offset, length)
            return await self.top.pread(offset, length)
        t = _now()
        try:
            self._check(offset, length)
            data = await self.top.pread(offset, length)
        except Exception:
            st.failed(READ)
            raise
        st.done(READ, length, _now() - t)
        return data

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        st = self.stats
        if st is None:
            self._check_write(offset, len(data))
            return self.top.pwrite_now(offset, data)
        try:
            self._check_write(offset, len(data))
            done = self.top.pwrite_now(offset, data)
        except Exception:
            st.failed(WRITE)
            raise
        if done:  # written at once: below the first bucket, no clock read
            st.now_writes += 1
            st.now_write_bytes += len(data)
        return done

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        st = self.stats
        try:
            self._check_write(offset, len(data))
            job = self.top.pwrite_soon(offset, data)
        except Exception:
            if st is not None:
                st.failed(WRITE)
            raise
        if job is not None and st is not None:
            job.after.append(functools.partial(self._written, len(data), _now()))
        return job

    def _written(self, nbytes: int, t: float, error: BaseException | None) -> None:
        assert self.stats is not None
        if error is None:
            self.stats.done(WRITE, nbytes, _now() - t)
        else:
            self.stats.failed(WRITE)

    async def pwrite(self, offset: int, data: bytes, fua: bool = False) -> None:
        st = self.stats
        if st is None:
            self._check_write(offset, len(data))
            await self.top.pwrite(offset, data, fua)
            return
        t = _now()
        try:
            self._check_write(offset, len(data))
            await self.top.pwrite(offset, data, fua)
        except Exception:
            st.failed(WRITE)
            raise
        st.done(WRITE, len(data), _now() - t)

    async def zero(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, fast: bool = False
    ) -> None:
        t = _now()
        try:
            self._check_write(offset, length)
            if fast and not self.top.can_fast_zero():
                raise NotSupported(what="fast zero", name=self.name)
            await self.top.zero(offset, length, may_trim, fua)
        except Exception:
            self._failed(ZERO)
            raise
        self._done(ZERO, length, t)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        t = _now()
        try:
            self._check_write(offset, length)
            await self.top.trim(offset, length, fua)
        except Exception:
            self._failed(TRIM)
            raise
        self._done(TRIM, length, t)

    async def flush(self) -> None:
        t = _now()
        try:
            await self.top.flush()
        except Exception:
            self._failed(FLUSH)
            raise
        self._done(FLUSH, 0, t)

    async def cache(self, offset: int, length: int) -> None:
        t = _now()
        try:
            self._check(offset, length)
            await self.top.cache(offset, length)
        except Exception:
            self._failed(CACHE)
            raise
        self._done(CACHE, length, t)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        t = _now()
        try:
            self._check(offset, length)
            found = [] if length == 0 else await self.top.extents(offset, length)
        except Exception:
            self._failed(BLOCK_STATUS)
            raise
        self._done(BLOCK_STATUS, length, t)
        return found

    # the less frequent requests share these (reads and writes are inlined above)
    def _done(self, op: int, nbytes: int, t: float) -> None:
        if self.stats is not None:
            self.stats.done(op, nbytes, _now() - t)

    def _failed(self, op: int) -> None:
        if self.stats is not None:
            self.stats.failed(op)
