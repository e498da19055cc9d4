"""Change bitmaps: one bit per chunk of ``granularity`` bytes of a volume.

Design notes
------------
Bits live in a ``bytearray`` (or a mapping, below), bit ``i`` in byte ``i >> 3`` at position ``i & 7`` (least
significant first). Whole-bitmap operations never loop over bits in Python: zero regions
are skipped with ``bytes.lstrip``-style scans done in C over slices, counts use
``int.bit_count`` over big slices, and OR uses big-int arithmetic over slices. A 16 TiB
volume at 64 KiB is 256 Mi bits = 32 MiB, scanned in milliseconds when sparse.

A bitmap of ``MAPPED`` bytes or more lives in an anonymous memory mapping rather than a
``bytearray`` (which zeroes, and so touches, every page): a page of bits nobody set is
never resident, and reading it maps the kernel's shared zero page. So a sparse 16 TiB
volume's bitmaps cost the pages that hold set bits, not 32 MiB each. Whatever copies bits
in (``copy``, ``from_bytes``) or clears them (``clear_all``) writes only the windows that
are not zero already, so that it touches no page it need not.

Iteration (``runs``) is lazy and tolerates bits being cleared while it runs (the copy
engine clears bits behind it): it re-reads the live bytes each step.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

MIN_GRANULARITY = 4096
MAX_GRANULARITY = 16 * 1024 * 1024
_SCAN = 1 << 16  # bytes examined per step when skipping zero regions
MAPPED = 1 << 20  # bitmaps of this many bytes or more live in an anonymous mapping
_WINDOW = 1 << 16  # bytes compared with zeroes at a time when copying or clearing sparsely
_ZEROES = bytes(_WINDOW)


def _alloc(n: int) -> bytearray | mmap.mmap:
    """``n`` zero bytes: in an anonymous mapping if big (see the notes). Huge pages are
    refused for it: with them, one set bit would make 2 MiB resident."""
    if not n or n < MAPPED:
        return bytearray(n)
    try:
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)
    except OSError as exc:  # ENOMEM: out of memory, not a file's error
        raise MemoryError(f"cannot map a bitmap of {n} bytes: {exc.strerror}") from exc
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return m


def _put_sparse(dst: bytearray | mmap.mmap, src: bytes | bytearray | memoryview | mmap.mmap) -> None:
    """Make ``dst`` (all zeroes) equal to ``src`` of the same length, writing only the
    windows of ``src`` that are not zero."""
    with memoryview(src) as view:
        for i in range(0, len(dst), _WINDOW):
            window = view[i : i + _WINDOW].tobytes()  # a copy, but compared by memcmp
            if window != _ZEROES[: len(window)]:
                dst[i : i + len(window)] = window


def check_granularity(granularity: int) -> int:
    if granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY or granularity & (granularity - 1):
        raise ValueError(f"granularity {granularity} must be a power of two from 4 KiB to 16 MiB")
    return granularity


class Bitmap:
    __slots__ = ("_bits", "granularity", "nbits", "size")

    def __init__(self, size: int, granularity: int) -> None:
        self.size = size
        self.granularity = check_granularity(granularity)
        self.nbits = (size + granularity - 1) // granularity
        self._bits = _alloc((self.nbits + 7) // 8)

    # --- single bits ------------------------------------------------------------------------
    def test(self, chunk: int) -> bool:
        return bool(self._bits[chunk >> 3] & (1 << (chunk & 7)))

    def set(self, chunk: int) -> None:
        self._bits[chunk >> 3] |= 1 << (chunk & 7)

    def set_new(self, chunk: int, page: int) -> bytes | bytearray | None:
        """Set the bit; None if it was set already, else a copy of the ``page`` bytes
        (a power of two) of bits that hold it (fewer at the end): what a file of the
        bits needs written, in one call (the write path's, for every new bit)."""
        bits, i = self._bits, chunk >> 3
        old = bits[i]
        new = old | 1 << (chunk & 7)
        if new == old:
            return None
        bits[i] = new
        lo = i & -page
        return bits[lo : lo + page]

    def clear(self, chunk: int) -> None:
        self._bits[chunk >> 3] &= ~(1 << (chunk & 7)) & 0xFF

    # --- ranges ------------------------------------------------------------------------------
    def chunk_range(self, offset: int, length: int) -> range:
        """Chunks touched by the byte range [offset, offset+length)."""
        if length <= 0:
            return range(0)
        first = offset // self.granularity
        last = min((offset + length - 1) // self.granularity, self.nbits - 1)
        return range(first, last + 1)

    def all_set(self, offset: int, length: int) -> bool:
        """True if every chunk touched by the byte range is set (asked on every write)."""
        first = offset // self.granularity
        if length > 0 and (offset + length - 1) // self.granularity == first < self.nbits:
            return bool(self._bits[first >> 3] & (1 << (first & 7)))
        return all(self.test(c) for c in self.chunk_range(offset, length))

    def set_range(self, offset: int, length: int) -> list[int]:
        """Set the chunks of a byte range; returns those that were not set before."""
        new = []
        bits = self._bits
        for c in self.chunk_range(offset, length):
            mask = 1 << (c & 7)
            if not bits[c >> 3] & mask:
                bits[c >> 3] |= mask
                new.append(c)
        return new

    def set_run(self, first: int, count: int) -> None:
        """Set chunks [first, first+count), a byte at a time where it can."""
        end = min(first + count, self.nbits)
        c = first
        while c < end and (c & 7 or end - c < 8):
            self.set(c)
            c += 1
        lo, hi = c >> 3, end >> 3
        if hi > lo:
            self._bits[lo:hi] = b"\xff" * (hi - lo)
        for tail in range(max(c, hi * 8), end):
            self.set(tail)

    def clear_run(self, first: int, count: int) -> int:
        """Clear chunks [first, first+count); returns the bytes of those that were set."""
        end = min(first + count, self.nbits)
        if end <= first:
            return 0
        short = self.granularity - self.chunk_bytes(end - 1) if self.test(end - 1) else 0
        cleared = 0
        c = first
        while c < end and (c & 7 or end - c < 8):  # a ragged head, or a run inside one byte
            cleared += self._take(c)
            c += 1
        lo, hi = c >> 3, end >> 3
        bits = self._bits
        step = _WINDOW if isinstance(bits, mmap.mmap) else 1 << 20  # (as in or_)
        for i in range(lo, hi, step):
            j = min(hi, i + step)
            n = int.from_bytes(bits[i:j], "little").bit_count()
            if n:  # a window already clear is not written: its pages may not be resident
                cleared += n
                bits[i:j] = bytes(j - i)
        for tail in range(max(c, hi * 8), end):  # the ragged tail
            cleared += self._take(tail)
        return cleared * self.granularity - short

    def _take(self, chunk: int) -> int:
        was = self.test(chunk)
        self.clear(chunk)
        return int(was)

    def set_all(self) -> None:
        ones, bits = b"\xff" * (1 << 20), self._bits
        for i in range(0, len(bits), len(ones)):
            bits[i : i + len(ones)] = ones[: len(bits) - i]
        extra = len(self._bits) * 8 - self.nbits
        if extra:
            self._bits[-1] &= 0xFF >> extra

    def clear_all(self) -> None:
        bits = self._bits
        for i in range(0, len(bits), _WINDOW):
            window = bits[i : i + _WINDOW]
            if window != _ZEROES[: len(window)]:  # a zero window stays untouched (see the notes)
                bits[i : i + len(window)] = _ZEROES[: len(window)]

    def chunk_bytes(self, chunk: int) -> int:
        """Bytes of the volume in ``chunk`` (the last one may be short)."""
        return min(self.granularity, self.size - chunk * self.granularity)

    # --- whole bitmap --------------------------------------------------------------------
    def count(self) -> int:
        bits = self._bits
        step = 1 << 20
        return sum(
            int.from_bytes(bits[i : i + step], "little").bit_count() for i in range(0, len(bits), step)
        )

    def is_empty(self) -> bool:
        return self.first_set(0) is None

    def bytes_set(self) -> int:
        """Bytes of the volume covered by set bits."""
        total = self.count() * self.granularity
        last = self.nbits - 1
        if last >= 0 and self.test(last):
            total -= self.granularity - self.chunk_bytes(last)
        return total

    def first_set(self, start: int = 0) -> int | None:
        """The first set chunk at or after ``start``."""
        found = self._find(start, 0x00)
        return found if found < self.nbits else None

    def first_clear(self, start: int) -> int:
        """The first clear chunk at or after ``start`` (``nbits`` if none)."""
        return min(self.nbits, self._find(start, 0xFF))

    def _find(self, start: int, skip: int) -> int:
        """First bit at or after ``start`` that differs from the bits of byte ``skip``
        (0x00: find a set bit; 0xFF: find a clear one). Whole bytes of ``skip`` are
        passed over by ``lstrip`` in C. Returns at least ``nbits`` if there is none."""
        bits = self._bits
        byte = start >> 3
        if byte >= len(bits):
            return self.nbits
        head = ((bits[byte] ^ skip) & 0xFF) >> (start & 7)
        if head:
            return start + ((head & -head).bit_length() - 1)
        byte += 1
        fill = bytes([skip])
        while byte < len(bits):
            window = bits[byte : byte + _SCAN]
            rest = window.lstrip(fill)
            if rest:
                byte += len(window) - len(rest)
                b = bits[byte] ^ skip
                return byte * 8 + ((b & -b).bit_length() - 1)
            byte += len(window)
        return self.nbits

    def runs(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """(first chunk, count) of each run of set bits, ascending; lazy."""
        pos = start
        while True:
            first = self.first_set(pos)
            if first is None:
                return
            end = self.first_clear(first)
            yield first, end - first
            pos = end

    def or_(self, other: Bitmap) -> None:
        if (other.nbits, other.granularity) != (self.nbits, self.granularity):
            raise ValueError("bitmaps of different geometry")
        # a mapped bitmap goes by small windows, so that a few bits scattered over the other
        # make only their windows' pages resident, not the whole bitmap
        step = _WINDOW if isinstance(self._bits, mmap.mmap) else 1 << 20
        mine, theirs = self._bits, other._bits
        for i in range(0, len(mine), step):
            b = int.from_bytes(theirs[i : i + step], "little")
            if not b:
                continue
            a = int.from_bytes(mine[i : i + step], "little")
            if a | b != a:  # written only where bits change
                mine[i : i + step] = (a | b).to_bytes(len(mine[i : i + step]), "little")

    def copy(self) -> Bitmap:
        new = Bitmap(self.size, self.granularity)
        _put_sparse(new._bits, self._bits)
        return new

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def view(self) -> memoryview:
        """The bits without a copy, for writing them out (use as a context manager)."""
        return memoryview(self._bits).toreadonly()

    @classmethod
    def from_bytes(cls, size: int, granularity: int, data: bytes | memoryview) -> Bitmap:
        bm = cls(size, granularity)
        if len(data) != len(bm._bits):
            raise ValueError(f"bitmap data is {len(data)} bytes, expected {len(bm._bits)}")
        _put_sparse(bm._bits, data)
        return bm
