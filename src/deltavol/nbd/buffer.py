"""The receive buffer both sides parse from.

One ``bytearray`` of fixed capacity: bytes are written at the end (``feed``, or straight
from the socket into ``space`` then ``wrote``) and consumed from a read position, so taking
a header costs no memmove of what follows. The bytearray is never resized, since a
transport may still hold a view of it (``asyncio.BufferedProtocol`` keeps the buffer it
received into alive while ``buffer_updated`` runs): when the free tail is too short, what
is left unconsumed moves to the front, or, if that is not room enough, the bytes move to
a new, larger bytearray. One that grew past ``COMPACT_AT`` is given up for a small one as
soon as everything in it was consumed, so memory stays bounded on a long stream. It starts
at the capacity its owner asks for (a server connection: small until transmission, where
nothing has authenticated the client) and grows when more is needed.

``PayloadPool`` keeps the buffers the payloads of large WRITEs are received into, for the
next ones (see its docstring).
"""

from __future__ import annotations

import struct
import sys
import threading
from typing import Any

CAPACITY = 256 * 1024  # the default size
MIN_SPACE = 64 * 1024  # ``space`` offers at least this much unless told otherwise
COMPACT_AT = 1 << 20  # a buffer grown larger than this shrinks back once drained
POOL_BYTES = 32 << 20  # payload buffers a pool keeps (free or lent) for reuse
POOL_SIZES = 256  # sizes a pool remembers having been asked for


class ReceiveBuffer:
    __slots__ = ("_buf", "_end", "_pos", "_view")

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._new(capacity)

    def _new(self, capacity: int) -> None:
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0

    def __len__(self) -> int:
        """Bytes received and not yet consumed."""
        return self._end - self._pos

    @property
    def held(self) -> int:
        """Bytes of memory the buffer takes."""
        return len(self._buf)

    def _room(self, n: int) -> None:
        """Make the free tail at least ``n`` bytes long."""
        pos, end = self._pos, self._end
        if pos == end:  # all consumed: start again at the front, small again if it grew
            if len(self._buf) > COMPACT_AT:
                self._new(CAPACITY)
            self._pos = self._end = 0
            if len(self._buf) >= n:
                return
        elif len(self._buf) - end >= n:
            return
        left = end - pos
        if left + n <= len(self._buf):
            view = self._view
            view[:left] = view[pos:end]  # memoryview assignment moves overlapping bytes safely
        else:
            old = self._view[pos:end]
            self._new(max(2 * len(self._buf), left + n))
            self._view[:left] = old
            old.release()
        self._pos, self._end = 0, left

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if len(self._buf) - self._end < n or self._pos == self._end:
            self._room(n)
        end = self._end
        self._view[end : end + n] = data
        self._end = end + n

    def space(self, at_least: int = MIN_SPACE) -> memoryview:
        """Where the next received bytes go (``at_least`` bytes long, or more); say how
        many were put there with ``wrote``."""
        if len(self._buf) - self._end < at_least or self._pos == self._end:
            self._room(at_least)
        return self._view[self._end :]

    def wrote(self, n: int) -> None:
        """``n`` bytes were received into the view ``space`` handed out last."""
        self._end += n

    def clear(self) -> None:
        self._new(CAPACITY)

    def peek(self, layout: struct.Struct) -> tuple[Any, ...] | None:
        """``layout`` unpacked at the read position without consuming it, or None when
        fewer bytes than it needs are buffered."""
        if self._end - self._pos < layout.size:
            return None
        return layout.unpack_from(self._buf, self._pos)

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...] | None:
        """``layout`` unpacked at the read position and consumed, or None (nothing
        consumed) when fewer bytes than it needs are buffered."""
        pos = self._pos
        if self._end - pos < layout.size:
            return None
        self._pos = pos + layout.size
        return layout.unpack_from(self._buf, pos)

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes (at most what is buffered)."""
        self._pos += min(n, self._end - self._pos)

    def take(self, n: int, skip: int = 0) -> bytes | None:
        """The ``n`` bytes after the next ``skip`` (a header already peeked at), all
        consumed; None (nothing consumed) if fewer than ``skip + n`` are buffered."""
        start = self._pos + skip
        if self._end - start < n:
            return None
        self._pos = start + n
        return self._view[start : start + n].tobytes()

    def take_into(self, target: bytearray, at: int, n: int) -> bool:
        """Copy the next ``n`` bytes into ``target[at:at + n]`` and consume them; False
        (nothing consumed) if fewer are buffered."""
        pos = self._pos
        if self._end - pos < n:
            return False
        target[at : at + n] = self._view[pos : pos + n]
        self._pos = pos + n
        return True


def _refs(bufs: list[bytearray], i: int) -> int:
    """The reference count of ``bufs[i]`` as seen from here (the list's, and the call's)."""
    return sys.getrefcount(bufs[i])


# The pool's safety rests on CPython's exact reference counts: elsewhere it keeps nothing.
_EXACT_REFS = sys.implementation.name == "cpython" and hasattr(sys, "getrefcount")
if _EXACT_REFS:
    _probe = [bytearray(1)]
    _UNHELD = _refs(_probe, 0)  # the count of a buffer only the pool's list refers to
    del _probe


class PayloadPool:
    """Buffers of exact sizes for WRITE payloads, handed out again once nothing holds them.

    A fresh 1 MiB ``bytearray`` costs a memset of it and, when the allocator maps new
    memory, a page fault per page, on the event loop, for every large WRITE. The pool
    keeps up to ``limit`` bytes of buffers it handed out; ``get`` returns one of them only
    when its reference count (CPython's) says that nothing but the pool refers to it: no
    request, no write job waiting or running in a worker thread (whose ``pwrite`` holds a
    buffer export of it, which counts), no memoryview, no transport. So a buffer whose
    bytes may still be read is never written into, and what a client sends after an
    acknowledged write cannot change what that write put in the file. A buffer handed out
    is always filled whole before it is used (its old bytes are never read).

    Buffers are kept by size, the sizes in the order last asked for, and only for a size
    asked for before (while remembered): a size seen once gets a buffer the pool does not
    keep, since a pool of sizes never asked for again would only hold cold memory. When
    the pool is full, free buffers of the sizes asked for least recently are let go first (a stream
    of writes of one size keeps its buffers; writes of ever other sizes do not fill the
    pool for good); if that is not room enough, ``get`` returns a new buffer the pool
    does not keep.
    """

    __slots__ = ("_held", "_lock", "_sizes", "limit")

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self._sizes: dict[int, list[bytearray]] = {}  # least recently asked for first
        self._held = 0  # bytes of the buffers kept
        self._lock = threading.Lock()  # connections of several event loops may share one

    @property
    def held(self) -> int:
        """Bytes of the buffers the pool keeps (free or lent)."""
        return self._held

    def get(self, n: int) -> bytearray:
        """A buffer of ``n`` bytes that nothing else refers to; its contents are stale."""
        if not _EXACT_REFS:
            return bytearray(n)
        with self._lock:
            sizes = self._sizes
            bufs = sizes.pop(n, None)
            if bufs is None:  # a size not asked for lately: remembered, not kept (yet)
                sizes[n] = []
                if len(sizes) > POOL_SIZES:
                    self._forget()
                return bytearray(n)
            sizes[n] = bufs  # now the most recently asked for
            for i in range(len(bufs)):
                if _refs(bufs, i) == _UNHELD:
                    return bufs[i]
            if self._held + n > self.limit:
                self._let_go(n)
                if self._held + n > self.limit:
                    return bytearray(n)
            buf = bytearray(n)
            bufs.append(buf)
            self._held += n
            return buf

    def _forget(self) -> None:
        """Forget the sizes asked for least recently that hold no buffer, down to half."""
        sizes = self._sizes
        unkept = [size for size, bufs in sizes.items() if not bufs]
        for size in unkept[: len(sizes) - POOL_SIZES // 2]:
            del sizes[size]

    def _let_go(self, n: int) -> None:
        """Drop free buffers, of the sizes least recently asked for first, until ``n``
        more bytes fit or none is free."""
        emptied: list[int] = []
        for size, bufs in self._sizes.items():
            i = 0
            while i < len(bufs) and self._held + n > self.limit:
                if _refs(bufs, i) == _UNHELD:
                    del bufs[i]
                    self._held -= size
                else:
                    i += 1
            if not bufs and size != n:
                emptied.append(size)
            if self._held + n <= self.limit:
                break
        for size in emptied:
            del self._sizes[size]
