"""Bitmap files, crash-safe.

Design notes
------------
A file is a 4096-byte header -- magic, format version, granularity, volume size, number
of bits, generation, kind (tracking or transfer), for a tracking file the size of its hot
regions and the boot it was written in, CRC32 of all that -- then the bit bytes. A
tracking file then has, from the next page on, one bit per hot region. ``load`` checks
every field and the length and names the file and the exact problem: a damaged bitmap is
never read as an empty one.

Two ways of writing:

* ``save_atomic``: the whole bitmap to a tmp file in the same directory, fsync,
  ``os.replace``, fsync of the directory. A crash leaves either the old or the new file.
* ``TrackingFile``: the write-ahead path under every acknowledged NBD write, in two tiers,
  as DRBD's activity log and md's write-intent bitmap do it:

  - a chunk's bit is written into the file (the page cache) before the chunk's first
    change goes down: a pwrite, no fsync. A killed server loses none of them;
  - the chunk's *hot region* (``HOT_REGION``, several chunks) is durable before that:
    the first change in a region sets its bit and waits for a group-commit round
    (``store/group_commit.py``) that writes it and fdatasyncs the file. The writers of
    one burst, on every session of a source, share a round; later first changes in the
    region need no fsync at all.

  ``load`` trusts the chunk bits of a file written in this boot (the server died, the
  page cache did not). After a reboot it adds every chunk of every hot region: a power
  loss may have taken chunk bits, never a hot one. So that this costs little, hot bits
  are cleared lazily: ``settle``, some seconds after a region turns hot, makes the chunk
  bits durable and clears the regions that got no new chunk bit meanwhile. A power loss
  thus copies again at most the regions first-written to in the last seconds.

  Chunk bits are never cleared in place; clearing happens in memory and reaches the disk
  with ``rewrite`` (atomic) at a mark or a reset, which also empties the hot regions: the
  file is always a superset of the acknowledged changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

from deltavol.bitmap.bitmap import MAX_GRANULARITY, Bitmap
from deltavol.errors import CorruptFile, DeltavolError, os_error
from deltavol.store import fs
from deltavol.store.fs import boot_id
from deltavol.store.group_commit import GroupCommit

log = logging.getLogger("deltavol.bitmap")

MAGIC = b"DVBITMAP"
VERSION = 2
HEADER_SIZE = 4096
HOT_REGION = 4 * 1024 * 1024  # bytes of volume behind one hot bit (as DRBD's activity-log extent)
SETTLE_SECONDS = 10.0  # a hot region with no new chunk bit for this long is cleared
_PAGE = 4096  # bytes of bits written for a chunk or region: the page that holds its bit
_PAGE_BITS = (_PAGE * 8).bit_length() - 1  # bit >> _PAGE_BITS: its page
# magic, version, granularity, size, nbits, generation, kind, hot region bytes, boot
_HEADER = struct.Struct(">8sIIQQQBI16s")
KIND_TRACKING = 1
KIND_TRANSFER = 2
_KINDS = {KIND_TRACKING: "tracking", KIND_TRANSFER: "transfer"}


def _hot_at(nbits: int) -> int:
    """Where a tracking file's hot bits begin: the page after its chunk bits."""
    return HEADER_SIZE + -(-((nbits + 7) // 8) // _PAGE) * _PAGE


def _header(bitmap: Bitmap, generation: int, kind: int, region: int) -> bytes:
    boot = boot_id() if region else b""
    head = _HEADER.pack(
        MAGIC, VERSION, bitmap.granularity, bitmap.size, bitmap.nbits, generation, kind, region, boot
    )
    return (head + struct.pack(">I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def save_atomic(
    path: Path,
    bitmap: Bitmap,
    generation: int,
    kind: int,
    hot: Bitmap | None = None,
    adopt: Callable[[int], None] | None = None,
) -> None:
    """Replace ``path`` with ``bitmap`` (and for a tracking file its hot regions, ``hot``,
    by default none). ``adopt``, if given, gets a read-write fd of the new file as it
    replaces the old one: one opened before, so that a caller keeping the file open
    never keeps a replaced inode (an ``open`` after the replace may fail: EMFILE)."""
    if kind == KIND_TRACKING and hot is None:
        hot = Bitmap(bitmap.size, max(HOT_REGION, bitmap.granularity))
    try:
        with contextlib.ExitStack() as views:  # no copy: a 16 TiB volume's bitmap is 32 MiB
            parts = [(0, _header(bitmap, generation, kind, hot.granularity if hot else 0))]
            parts.append((HEADER_SIZE, views.enter_context(bitmap.view())))
            if hot is not None:
                parts.append((_hot_at(bitmap.nbits), views.enter_context(hot.view())))
            fs.replace_atomic(path, parts, adopt=adopt)
    except OSError as exc:
        raise os_error(exc, f"bitmap {path}") from exc


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = fs.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_bits_in_place(path: Path, bitmap: Bitmap) -> None:
    """Overwrite the bit bytes of an existing file with ``bitmap`` and make them durable.

    Only for bits going from set to clear (checkpoints of a transfer bitmap): it needs
    no new space, and a torn write leaves every byte either old (a superset) or new.
    """
    try:
        fd = fs.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with bitmap.view() as bits:
                _write_all(fd, bits, HEADER_SIZE)
            fs.fdatasync(fd)
        finally:
            fs.close(fd)
    except OSError as exc:
        raise os_error(exc, f"bitmap {path}") from exc


def load(path: Path, kind: int, granularity: int, size: int) -> tuple[Bitmap, int]:
    """Read and validate a bitmap file; returns (bitmap, generation).

    A tracking file written before this boot comes back with its hot regions added.
    """
    try:
        raw = fs.read_bytes(path)
    except FileNotFoundError:
        raise CorruptFile(path=path, why=f"{_KINDS.get(kind, 'bitmap')} bitmap file is missing") from None
    except OSError as exc:
        raise CorruptFile(path=path, why=exc.strerror or str(exc)) from exc
    if len(raw) < HEADER_SIZE:
        raise CorruptFile(path=path, why=f"header truncated ({len(raw)} bytes)")
    head = raw[: _HEADER.size]
    (crc,) = struct.unpack_from(">I", raw, _HEADER.size)
    magic, version, gran, vsize, nbits, generation, got_kind, region, boot = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptFile(path=path, why="not a deltavol bitmap (bad magic)")
    if zlib.crc32(head) != crc:
        raise CorruptFile(path=path, why="header checksum mismatch")
    if version != VERSION:
        raise CorruptFile(path=path, why=f"unsupported format version {version}")
    if got_kind != kind:
        raise CorruptFile(
            path=path, why=f"is a {_KINDS.get(got_kind, got_kind)} bitmap, expected {_KINDS[kind]}"
        )
    if (gran, vsize) != (granularity, size):
        raise CorruptFile(
            path=path,
            why=f"geometry {gran}-byte chunks of {vsize} bytes, expected {granularity} of {size}",
        )
    tracking = kind == KIND_TRACKING
    if tracking != bool(region) or region % granularity or region & (region - 1) or region > MAX_GRANULARITY:
        raise CorruptFile(path=path, why=f"hot region of {region} bytes is not valid here")
    bitmap = Bitmap(size, granularity)
    end = HEADER_SIZE + (bitmap.nbits + 7) // 8
    hot = Bitmap(size, region) if tracking else None
    expected = _hot_at(bitmap.nbits) + (hot.nbits + 7) // 8 if hot else end
    if nbits != bitmap.nbits or len(raw) != expected:
        raise CorruptFile(path=path, why=f"length {len(raw)} bytes, expected {expected} (truncated?)")
    for what, last, n in (("chunk", end - 1, nbits), ("hot region", expected - 1, hot.nbits if hot else 0)):
        if n % 8 and raw[last] >> (n % 8):
            raise CorruptFile(path=path, why=f"bits set past the end of the volume ({what} {n} or later)")
    bitmap = Bitmap.from_bytes(size, granularity, memoryview(raw)[HEADER_SIZE:end])
    if hot is not None and (not boot_id() or boot != boot_id()):
        hot = Bitmap.from_bytes(size, region, memoryview(raw)[_hot_at(nbits) :])
        per = region // granularity
        for first, count in hot.runs():  # the chunk bits of these may be lost: all of them
            bitmap.set_run(first * per, count * per)
    return bitmap, generation


def _write_pages(fd: int, bits: memoryview, at: int, pages: list[int]) -> None:
    """pwrite the given pages (sorted) of ``bits`` to the file at ``at``, adjacent ones at once."""
    i = 0
    while i < len(pages):
        first = end = pages[i]
        i += 1
        while i < len(pages) and pages[i] == end + 1:
            end = pages[i]
            i += 1
        lo = first * _PAGE
        _write_all(fd, bits[lo : (end + 1) * _PAGE], at + lo)


class TrackingFile:
    """The tracking bitmap's file, written ahead of every change (see the module notes).

    Owns the hot regions: in memory a region is hot from its first change on, and
    durable once no round for it is running (``_covering``)."""

    def __init__(
        self, path: Path, size: int, granularity: int, commit: GroupCommit, region: int = HOT_REGION
    ) -> None:
        self.path = path
        self.commit = commit  # shared by the sessions of one source
        self.hot = Bitmap(size, max(region, granularity))
        self._shift = (self.hot.granularity // granularity).bit_length() - 1  # chunk >> _shift: region
        self._hot_at = _hot_at(Bitmap(size, granularity).nbits)
        self._fd = -1  # until ``rewrite`` writes the file
        self._fd_lock = threading.Lock()
        self._pending: set[int] = set()  # pages of hot bits to write at the next round
        self._covering: dict[int, asyncio.Future[None]] = {}  # region -> round making it durable
        self._rounds: dict[asyncio.Future[None], list[int]] = {}  # the same, by round
        self._touched: set[int] = set()  # regions with a new chunk bit since settling began
        self._settle: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self._settling = asyncio.Lock()  # one settle at a time: each owns the regions touched meanwhile

    def write_bits(self, bitmap: Bitmap, chunks: list[int]) -> None:
        """Write the bit bytes of ``chunks`` (sorted, already set in ``bitmap``) into the
        file now: into the page cache, which outlives the server, not a power loss."""
        shift = self._shift
        self._touched.update(c >> shift for c in chunks)
        pages = sorted({c >> _PAGE_BITS for c in chunks})
        try:
            with bitmap.view() as bits:
                _write_pages(self._fd, bits, HEADER_SIZE, pages)
        except OSError as exc:
            raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def covered(self, chunks: range) -> bool:
        """True if the hot regions of ``chunks`` are durable: their first changes need no round."""
        if not chunks:
            return True
        shift, hot, covering = self._shift, self.hot, self._covering
        for r in range(chunks.start >> shift, ((chunks.stop - 1) >> shift) + 1):
            if not hot.test(r) or r in covering:
                return False
        return True

    def cover(self, chunk: int) -> asyncio.Future[None] | None:
        """The round that makes ``chunk``'s hot region durable; None if it already is."""
        r = chunk >> self._shift
        fut = self._covering.get(r)
        if fut is not None or self.hot.test(r):
            return fut
        self.hot.set(r)
        self._pending.add(r >> _PAGE_BITS)
        fut = self._covering[r] = self.round()
        regions = self._rounds.get(fut)
        if regions is None:
            regions = self._rounds[fut] = []
            fut.add_done_callback(self._round_done)
        regions.append(r)
        if self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._start_settle)
        return fut

    def _round_done(self, fut: asyncio.Future[None]) -> None:
        failed = fut.cancelled() or fut.exception() is not None
        for r in self._rounds.pop(fut, ()):
            if self._covering.get(r) is fut:
                del self._covering[r]
                if failed:  # not known to be durable: the next change in it asks again
                    self.hot.clear(r)

    def write_out(self) -> None:
        """Write the pending pages of hot bits as they are now (a round begins: on the loop)."""
        pages, self._pending = sorted(self._pending), set()
        if not pages or self._fd < 0:
            return
        try:
            with self.hot.view() as bits:
                _write_pages(self._fd, bits, self._hot_at, pages)
        except OSError as exc:
            raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def sync(self) -> None:
        with self._fd_lock:  # close() and rewrite() must not swap the fd under a round's thread
            if self._fd < 0:  # closed (its session is gone): nothing left to make durable
                return
            try:
                fs.fdatasync(self._fd)
            except OSError as exc:
                raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def round(self) -> asyncio.Future[None]:
        """The group-commit round that makes the bits written so far durable."""
        return self.commit.round(self)

    async def durable(self) -> None:
        """Wait for that round."""
        await self.commit.wait(self.round())

    def _start_settle(self) -> None:
        self._settle = asyncio.get_running_loop().create_task(self._settle_later())

    async def _settle_later(self) -> None:
        try:
            await self.settle()
        except DeltavolError as exc:  # the hot regions stay: a superset, and it is tried again
            log.warning("%s", exc.message)
        finally:
            self._settle = None
            if not self.hot.is_empty() and self._fd >= 0:
                self._settle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._start_settle)

    async def settle(self, everything: bool = False) -> None:
        """Make the chunk bits durable, then clear the hot regions that got no new chunk
        bit since the last settle (with ``everything``, all of them, durably: the server
        stops, so a clean reboot costs no copy)."""
        async with self._settling:
            touched, self._touched = self._touched, set()
            await self.durable()  # every chunk bit written so far
            keep = self._touched | self._covering.keys() | (set() if everything else touched)
            idle = [r for first, n in self.hot.runs() for r in range(first, first + n) if r not in keep]
            for r in idle:
                self.hot.clear(r)
            self._pending.update(r >> _PAGE_BITS for r in idle)
            if everything:
                await self.durable()
            else:
                self.write_out()  # lazily: a hot bit left on disk only costs a copy after a power loss

    def rewrite(self, bitmap: Bitmap, generation: int) -> None:
        """Replace the file atomically with ``bitmap`` and no hot region (every bit set is
        durable in it); this is where cleared bits land. If it fails, the fd stays on the
        file in place (the old one, or the new one once it has replaced it)."""
        self.hot.clear_all()
        self._pending.clear()
        self._touched.clear()
        save_atomic(self.path, bitmap, generation, KIND_TRACKING, self.hot, adopt=self._adopt)

    def _adopt(self, fd: int) -> None:
        with self._fd_lock:
            old, self._fd = self._fd, fd
            if old >= 0:
                fs.close(old)

    def close(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        with self._fd_lock:
            if self._fd >= 0:
                fs.close(self._fd)
                self._fd = -1
