"""Raw file or block device backend.

Blocking I/O runs in a thread pool sized for the disk, except what the page cache can
take at once: reads are tried inline with ``RWF_NOWAIT`` first and fall back to the pool
on EAGAIN, and small writes go inline unless they would read from disk, a pool write of
the file runs, or the last one stalled, asleep in the kernel (see ``pwrite_now``) — a
thread hop, with the GIL handed back and forth, costs more than copying a few KiB into
the page cache (4 KiB random writes: 7 K -> 15 K IOPS). A connection's bursts of writes
and its large ones go to its write lane (``pwrite_soon``, ``backend/lane.py``): one
worker thread for many writes, not a hop each.

What a copy writes to the volume as its target (``LocalTarget``: the copies in the kernel,
zeroes, writes, writeback starts and flushes) runs in the volume's own target threads,
never in the pool: a target disk that stalls blocks every thread writing to it, and a
copy keeps 16 requests in flight; in the shared pool they would hold up every source's
reads, flushes and copy-on-first-write saves for as long as the stall lasts.

Zeroing uses ``fallocate`` (punch hole or zero range) on files and ``BLKDISCARD`` /
``BLKZEROOUT`` on block devices, falling back to writing zero buffers where the kernel or
file system refuses; ``extents`` comes from SEEK_DATA / SEEK_HOLE.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import resource
import stat
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

from deltavol.backend.base import Extent, WriteJob
from deltavol.errors import IoFailure, os_error
from deltavol.nbd.constants import STATE_HOLE, STATE_ZERO
from deltavol.store import fs

T = TypeVar("T")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
ZERO_CHUNK = 1 << 20
PROBE = 4096  # bytes of a data block read first to tell zeroes from data (see _copy_data)
PAGE = os.sysconf("SC_PAGE_SIZE")
INLINE_WRITE_MAX = 128 << 10  # larger writes go to the pool: copying MiBs into the page cache
# on several threads beats one loop (seq 1 MiB writes 0.65x -> 1.1x of qemu-nbd here)
INLINE_STALL = 0.002  # seconds
INLINE_BACKOFF = 1.0  # seconds: the back-off after a stall; each stall in a row doubles it
INLINE_BACKOFF_MAX = 64.0  # seconds
CLOSE_WAIT = 10.0  # seconds ``close`` waits for the worker threads still using the file
# a local target's threads: the 16 requests a copy keeps in flight (copy/engine.py's
# INFLIGHT), and its writeback start and flush besides
TARGET_WORKERS = 18

log = logging.getLogger("deltavol.backend")


def _voluntary_switches() -> int:
    """How many times this thread slept in the kernel (waited, not preempted)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="deltavol-io")
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_ZEROES = bytes(ZERO_CHUNK)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    fs.fallocate(fd, mode, offset, length)


def start_writeback(fd: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE) over the whole file (not in Python's os)."""
    fs.start_writeback(fd)


def device_size(fd: int) -> int:
    st = fs.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])
    return st.st_size


class FileBackend:
    def __init__(self, name: str, path: str, *, read_only: bool = False) -> None:
        self.name = name
        self.path = path
        self._fd = fs.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.is_block = stat.S_ISBLK(fs.fstat(self._fd).st_mode)
        self.size = device_size(self._fd)
        self._punch = not self.is_block
        self._zero_range = not self.is_block
        self._seek = not self.is_block
        self._copy_range = True  # copy_file_range into this file works (see copy_from)
        self._nowait = bool(_NOWAIT)
        self._inline_after = 0.0  # monotonic time before which writes go to the pool
        self._backoff = INLINE_BACKOFF  # how long the next stall sends writes to the pool
        # Pool writes, zeroes, trims and syncs running: an inline write would wait behind
        # them for the inode lock, and the event loop with it. Changed by pool threads.
        self._writing = 0
        self._writing_lock = threading.Lock()
        # Worker threads using the file (``_held``): ``close`` waits for them before it
        # closes the fd, whose number the next open could otherwise give to another file
        # while a thread still writes to it (a lane's write at shutdown, say).
        self._users = 0
        self._unused = threading.Event()
        self._unused.set()
        self._fd_lock = threading.Lock()
        # the threads of what is written here as a copy's target (see the module's doc);
        # made on first use, shut down by ``close``
        self._target_pool: ThreadPoolExecutor | None = None
        # The first failed sync of this fd, for good (see ``_sync``). Set by pool threads.
        self._sync_failed: OSError | None = None

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return self._punch or self._zero_range

    def can_extents(self) -> bool:
        return True

    async def _run(self, what: str, fn: Callable[..., T], *args: Any, as_target: bool = False) -> T:
        """``fn(*args)`` in a worker thread: the shared pool's, or, ``as_target``, one of
        the volume's target threads."""
        try:
            return await fs.run_in_pool(self._executor(as_target), self._held, fn, *args)
        except OSError as exc:
            raise os_error(exc, f"{what} on volume {self.name!r}") from exc

    async def _run_writing(self, what: str, fn: Callable[..., T], *args: Any, as_target: bool = False) -> T:
        """``_run`` for what changes the file: counted in ``_writing`` while it runs."""
        return await self._run(what, self._counted, fn, *args, as_target=as_target)

    def _executor(self, as_target: bool) -> Executor:
        if not as_target:
            return _pool
        if self._fd < 0:  # closed: its target threads are shut down (``_held`` refuses anyway)
            raise OSError(errno.EBADF, "the volume is closed")
        if self._target_pool is None:
            self._target_pool = ThreadPoolExecutor(
                max_workers=TARGET_WORKERS, thread_name_prefix="deltavol-target"
            )
        return self._target_pool

    def _held(self, fn: Callable[..., T], *args: Any) -> T:
        """In a worker thread: ``fn(*args)`` with the file kept open meanwhile; EBADF,
        with nothing done, once ``close`` began."""
        with self._fd_lock:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the volume is closed")
            self._users += 1
            self._unused.clear()
        try:
            return fn(*args)
        finally:
            with self._fd_lock:
                self._users -= 1
                if not self._users:
                    self._unused.set()

    def _counted(self, fn: Callable[..., T], *args: Any) -> T:
        with self._writing_lock:
            self._writing += 1
        try:
            return fn(*args)
        finally:
            with self._writing_lock:
                self._writing -= 1

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        if not self._nowait:
            return None
        buf = bytearray(length)
        try:
            n = fs.preadv(self._fd, [buf], offset, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise os_error(exc, f"read on volume {self.name!r}") from exc
            self._nowait = False  # this file system (tmpfs, ...) cannot: use the pool
            return None
        return buf if n == length else None  # type: ignore[return-value]

    async def pread(self, offset: int, length: int, *, as_target: bool = False) -> bytes:
        """``as_target``: a copy's read of its target, in the target threads (so too below)."""
        data = self.pread_cached(offset, length)
        if data is not None:
            return data
        return await self._run("read", self._pread_full, offset, length, as_target=as_target)

    def _pread_full(self, offset: int, length: int) -> bytes:
        data = fs.pread(self._fd, length, offset)
        if len(data) < length:  # short read: past EOF of an imported file or EINTR
            parts = [data]
            got = len(data)
            while got < length:
                more = fs.pread(self._fd, length - got, offset + got)
                if not more:
                    parts.append(bytes(length - got))
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    async def pwrite(self, offset: int, data: bytes, fua: bool = False, *, as_target: bool = False) -> None:
        if not fua and self.pwrite_now(offset, data):
            return
        await self._run_writing("write", self._pwrite_full, offset, data, fua, as_target=as_target)

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        """Write into the page cache at once when that cannot wait for the disk.

        Buffered writes cannot be tried with RWF_NOWAIT here, so: only writes up to
        ``INLINE_WRITE_MAX``, only when any partial page at either end is already cached
        (else the kernel would read it first), and never for ``INLINE_BACKOFF`` seconds
        after an inline write took longer than ``INLINE_STALL`` and slept in the kernel
        (dirty-page throttling, a journal commit): the pool takes them then, and the event
        loop stays free. That back-off doubles with each stall in a row (up to
        ``INLINE_BACKOFF_MAX``), so a disk that stays slow costs the loop ever fewer
        stalls. Nor while a pool write, zero, trim or sync of this file runs: the write
        would wait for the inode lock that holds.
        """
        if (
            len(data) > INLINE_WRITE_MAX
            or self.is_block
            or self._writing
            or time.monotonic() < self._inline_after
        ):
            return False
        end = offset + len(data)
        if not (self._page_cached(offset) and self._page_cached(end)):
            return False
        slept, start = _voluntary_switches(), time.perf_counter()
        try:
            self._pwrite_full(offset, data, False)
        except OSError as exc:
            raise os_error(exc, f"write on volume {self.name!r}") from exc
        # A stall is the write sleeping in the kernel (dirty-page throttling, a journal
        # commit); the thread merely preempted on a loaded machine is none: it would have
        # sent nearly every write to the pool under load, each a thread hop and a GIL
        # handover (4 KiB random writes: 5 K IOPS, 85 % of them in the pool).
        if time.perf_counter() - start > INLINE_STALL and _voluntary_switches() != slept:
            self._inline_after = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, INLINE_BACKOFF_MAX)
        else:
            self._backoff = INLINE_BACKOFF
        return True

    def pwrite_soon(self, offset: int, data: bytes) -> WriteJob | None:
        """The write as a job for a worker thread: there it may wait for the disk (a
        partial page read, dirty-page throttling) without holding up the event loop."""
        return WriteJob(functools.partial(self._pwrite_job, offset, data))

    def _pwrite_job(self, offset: int, data: bytes) -> None:
        try:
            self._held(self._counted, self._pwrite_full, offset, data, False)
        except OSError as exc:
            raise os_error(exc, f"write on volume {self.name!r}") from exc

    def _page_cached(self, offset: int) -> bool:
        """True if the page holding ``offset`` needs no read to be partly overwritten."""
        if offset % PAGE == 0 or offset >= self.size:
            return True
        if not self._nowait:
            return False
        try:
            fs.preadv(self._fd, [bytearray(1)], offset, _NOWAIT)
        except OSError:  # EAGAIN: not in the page cache
            return False
        return True

    def _pwrite_full(self, offset: int, data: bytes, fua: bool) -> None:
        view = memoryview(data)
        while view:
            n = fs.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n
        if fua:
            self._sync(fs.fdatasync)

    async def copy_from(self, source: FileBackend, offset: int, length: int) -> None:
        """Copy [offset, offset+length) of ``source`` to the same place in this file, in a
        target thread with ``copy_file_range``: the data never enters Python, and the loop
        only hands the request over. Where the kernel cannot (another file system, a block
        device), the thread reads and writes instead."""
        await self._run_writing("copy", source._held, self._copy_from, source, offset, length, as_target=True)

    async def copy_spans(
        self,
        source: FileBackend,
        spans: list[tuple[int, int]],
        zeroes: list[tuple[int, int]] | None = None,
        granularity: int = 0,
    ) -> int:
        """Copy each (offset, length) of ``spans`` from ``source``, all in one target thread
        (one hand-over for many scattered chunks): its data as ``copy_from``, its holes as
        zero requests, or, given ``zeroes``, added to it for the caller to zero later
        (``zero_spans``). With a ``granularity``, data is read instead and each of its
        ``granularity`` blocks that is all zeroes goes as zeroes too (``_copy_data``).
        Returns the bytes copied as data."""
        return await self._run_writing(
            "copy", source._held, self._copy_spans, source, spans, zeroes, granularity, as_target=True
        )

    def _copy_spans(
        self,
        source: FileBackend,
        spans: list[tuple[int, int]],
        zeroes: list[tuple[int, int]] | None,
        granularity: int,
    ) -> int:
        sent = 0
        for offset, length in spans:
            for n, flags in source.extents_now(offset, length):
                if not flags & STATE_HOLE:
                    if granularity:
                        sent += self._copy_data(source, offset, n, zeroes, granularity)
                    else:
                        self._copy_from(source, offset, n)
                        sent += n
                elif zeroes is None:
                    self._zero(offset, n, True, False)
                else:
                    zeroes.append((offset, n))
                offset += n
        return sent

    def _copy_data(
        self, source: FileBackend, offset: int, length: int, zeroes: list[tuple[int, int]] | None, g: int
    ) -> int:
        """Copy a data extent of ``source`` as ``copy_from``, but its ``g``-aligned blocks of
        zeroes as zero requests (or into ``zeroes``): zeroes a source stores as data (a thick
        image, a block device with no SEEK_DATA) stay unallocated on the target. A block is
        read to be known as zeroes only if its first ``PROBE`` bytes are: data, which almost
        always differs early, costs a small read per block. Returns the bytes copied as data."""
        runs: list[tuple[int, int, bool]] = []  # (start, end, all zeroes)
        pos, end = offset, offset + length
        while pos < end:
            nxt = min(end, pos // g * g + g)
            zero = _all_zero(source, pos, nxt - pos)
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], nxt, zero)
            else:
                runs.append((pos, nxt, zero))
            pos = nxt
        sent = 0
        for start, stop, zero in runs:
            if not zero:
                self._copy_from(source, start, stop - start)
                sent += stop - start
            elif zeroes is None:
                self._zero(start, stop - start, True, False)
            else:
                zeroes.append((start, stop - start))
        return sent

    async def zero_spans(self, spans: list[tuple[int, int]]) -> None:
        """``zero`` (may trim) each (offset, length) of ``spans``, all in one target thread."""
        await self._run_writing("write zeroes", self._zero_spans, spans, as_target=True)

    def _zero_spans(self, spans: list[tuple[int, int]]) -> None:
        for offset, length in spans:
            self._zero(offset, length, True, False)

    def _copy_from(self, source: FileBackend, offset: int, length: int) -> None:
        end = offset + length
        while offset < end and self._copy_range:
            try:
                n = fs.copy_file_range(source._fd, self._fd, end - offset, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._copy_range = False  # remember: copy through a buffer from now on
                break
            if n == 0:  # the source ends early (an imported file), or the kernel gave up
                break  # (copy offload refused mid-way): read the rest, past EOF as zeroes
            offset += n
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            data = source._pread_full(offset, n)
            self._pwrite_full(offset, data, False)
            offset += n

    async def zero(
        self, offset: int, length: int, may_trim: bool = True, fua: bool = False, *, as_target: bool = False
    ) -> None:
        await self._run_writing(
            "write zeroes", self._zero, offset, length, may_trim, fua, as_target=as_target
        )

    def _zero(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        if length == 0:
            return
        done = False
        if self.is_block:
            done = self._blk_ioctl(BLKZEROOUT, offset, length)
        else:
            if may_trim and self._punch:
                done = self._try_fallocate(
                    "_punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
                )
            if not done and self._zero_range:
                done = self._try_fallocate(
                    "_zero_range", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length
                )
        if not done:
            end = offset + length
            while offset < end:
                n = min(ZERO_CHUNK, end - offset)
                self._pwrite_full(offset, _ZEROES[:n], False)
                offset += n
        if fua:
            self._sync(fs.fdatasync)

    def _try_fallocate(self, attr: str, mode: int, offset: int, length: int) -> bool:
        try:
            fallocate(self._fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                setattr(self, attr, False)  # remember: this file system cannot
                return False
            raise

    def _blk_ioctl(self, request: int, offset: int, length: int) -> bool:
        try:
            fcntl.ioctl(self._fd, request, struct.pack("QQ", offset, length))
            return True
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                return False
            raise

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # A trim that reads back as zeroes is the most useful trim for a copy tool.
        await self.zero(offset, length, may_trim=True, fua=fua)

    async def flush(self, *, as_target: bool = False) -> None:
        if as_target:  # a copy owes again what a failed flush covered: it may retry
            await self._run_writing("flush", fs.fsync, self._fd, as_target=True)
        else:
            await self._run_writing("flush", self._sync, fs.fsync)

    def _sync(self, how: Callable[[int], None]) -> None:
        """Sync the file (``fs.fsync`` or ``fs.fdatasync``) for a client or a mark; once
        such a sync failed, every later one fails too, until the volume is opened again.
        Linux reports a writeback error once per open file: the sync after a failed one
        may succeed although what the failed one was to make durable is lost, and a
        client's FLUSH, a FUA write or a mark would then be told its data is on disk when
        it is not. (A copy's flush of its target does not need this: the chunks a failed
        flush covered are owed again and copied anew before a later flush counts them.)"""
        failed = self._sync_failed
        if failed is not None:
            raise IoFailure(
                what=f"sync of volume {self.name!r}",
                why=f"an earlier sync of this volume failed ({failed.strerror}), so what was "
                "written before it may be lost; restart the server to open the volume again",
            )
        try:
            how(self._fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:  # closed under it: nothing was lost by this fd
                self._sync_failed = exc
            raise

    async def start_writeback(self) -> None:
        """Start writing what is dirty to the device, without waiting for it: a flush
        later then waits for less, and a long copy does not pile up dirty pages. (Only a
        copy to the volume starts it: in a target thread.)"""
        await self._run_writing("writeback", start_writeback, self._fd, as_target=True)

    async def cache(self, offset: int, length: int) -> None:
        await self._run("cache", fs.posix_fadvise, self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return self.extents_now(offset, length)

    def extents_now(self, offset: int, length: int) -> list[Extent]:
        """``extents``, callable from a thread."""
        if not self._seek:
            return [(length, 0)]
        try:
            return scan_extents(self._fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self._seek = False
                return [(length, 0)]
            raise os_error(exc, f"block status on volume {self.name!r}") from exc

    async def close(self) -> None:
        """Close the file once no worker thread uses it (for up to ``CLOSE_WAIT``); what
        is handed to a thread from now on fails with EBADF and does nothing. A thread
        still busy after that (a hung disk) keeps the fd open: never closed under it.
        The target threads are shut down, and waited for once none uses the file."""
        with self._fd_lock:
            fd, self._fd = self._fd, -1
            busy = self._users
        if fd < 0:
            return
        pool, self._target_pool = self._target_pool, None
        if busy and not await fs.to_thread(self._unused.wait, CLOSE_WAIT):
            log.warning("volume %s: still in use by a worker thread: its file stays open", self.name)
            if pool is not None:
                pool.shutdown(wait=False)  # its threads end once the disk answers theirs
            return
        fs.close(fd)
        if pool is not None:  # what is still queued there fails at once (EBADF)
            await fs.to_thread(pool.shutdown, True)


def _all_zero(source: FileBackend, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of ``source`` reads as zeroes; its first ``PROBE``
    bytes read first, the rest only if they are zeroes."""
    probe = min(PROBE, length)
    if source._pread_full(offset, probe) != _ZEROES[:probe]:
        return False
    pos, end = offset + probe, offset + length
    while pos < end:
        n = min(ZERO_CHUNK, end - pos)
        if source._pread_full(pos, n) != _ZEROES[:n]:
            return False
        pos += n
    return True


def scan_extents(fd: int, offset: int, length: int) -> list[Extent]:
    """Data/hole runs of [offset, offset+length) from SEEK_DATA / SEEK_HOLE."""
    end = offset + length
    out: list[Extent] = []
    pos = offset
    while pos < end:
        try:
            data = fs.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end  # nothing but hole to EOF
        if data > pos:
            hole_end = min(data, end)
            out.append((hole_end - pos, STATE_HOLE | STATE_ZERO))
            pos = hole_end
            if pos >= end:
                break
        hole = min(fs.lseek(fd, pos, os.SEEK_HOLE), end)
        out.append((hole - pos, 0))
        pos = hole
    return _merge(out)


def _merge(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for length, flags in extents:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + length, flags)
        elif length:
            merged.append((length, flags))
    return merged
