"""Bitmap files, crash-safe.

Design notes
------------
A file is a 4096-byte header -- magic, format version, granularity, volume size, number
of bits, generation, kind (tracking or transfer), for a tracking file the size of its hot
regions and the boot it was written in, CRC32 of all that -- then the bit bytes. A
tracking file then has, from the next page on, one bit per hot region. ``load`` checks
every field and the length and names the file and the exact problem: a damaged bitmap is
never read as an empty one, and a file that cannot be read (EIO, EACCES) is an I/O error,
never a corrupt file.

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

  The hot regions are a bounded set (``hot_set`` bytes of volume, ``serve --hot-set``,
  default ``HOT_SET``), least recently used first out; "used" is a new chunk bit in the
  region. A region leaves it only once its chunk bits are durable: when every bit of it
  was written before a round that has synced (the usual case: the oldest region was
  last written many rounds ago), its bit is cleared in the round that brings the new
  region in; else (more regions than the set holds were first written to since the
  last sync) the new region comes in at once and the old one's bit is cleared in the
  round after the one that syncs its chunk bits. A synced file thus holds at most the
  set plus the regions that came in during one round (at most the writes in flight).

  ``load`` trusts the chunk bits of a file written in this boot (the server died, the
  page cache did not). After a reboot it adds every chunk of every hot region: a power
  loss may have taken chunk bits, never a hot one. That re-copy is bounded by the hot
  set, and ``load_tracking`` reports it (bytes added, and why). Besides the bound,
  ``settle``, some seconds after a region turns hot, makes the chunk bits durable and
  clears the regions that got no new chunk bit meanwhile: an idle volume costs no re-copy.

  A failed fdatasync may have dropped dirty pages for good (the kernel marks them clean
  and reports the error once: a later fdatasync succeeds without writing them). From then
  on the file is *lost*: no hot bit is cleared any more, and its header's boot becomes
  ``_LOST_BOOT`` (written in place and synced with the next round: only the boot and the
  CRC change, both in the first sector), so that a load even in this boot adds the hot
  regions. The next ``settle`` (or a mark) replaces the file from the
  bitmap in memory with ``rewrite``, which ends it (only while the file's name holds its
  fd's inode, and never once it is closed: the name may be another session's file by
  then). Until then the re-copy a power loss
  costs may exceed the hot set; ``lost`` says why.

  Chunk bits are never cleared in place; clearing happens in memory and reaches the disk
  with ``rewrite`` (atomic) at a mark or a reset, which also empties the hot regions: the
  file is always a superset of the acknowledged changes. ``rewrite`` also forgets every
  round started for the replaced file: such a round makes nothing durable in the new one.

  ``write_aside`` and ``put_in_place`` are ``rewrite`` in two halves for the event loop: the
  new file written and fsynced under another name in a thread (a mark does it beside its
  other syncs, before its commit), then renamed into place and its directory synced in
  threads, the new fd adopted on the loop in between.

  A mark (or a full update's start) empties the chunk bits but *carries* hot regions into
  the new file (``rewrite(..., hot=recent(bitmap))``): the regions written since the last
  mark, the hot set's own first, at most the set's bound. The new file holds their hot
  bits, fsynced with it before it replaces the old one, so they are durable before any
  change to the new file: the first change in such a region needs no round, as for a
  region that came in by one. From then on a carried region is one like any other: it
  leaves as the least recently used (its chunk bits are durable: the file was written
  whole) or when ``settle`` finds it idle (it counts as used at the mark, so an idle one
  goes within two settle periods). It only widens what a power loss re-copies, within
  the bound. If the directory sync after the replace fails, a power loss may leave the old
  file: the carried regions then enter the set as regions coming in do, each covered by the
  next round (which syncs the directory before anything counts as durable), so a change in
  one waits for it, and the set still keeps to its bound.

  The layout is the same as version 2 wrote it; ``_LOST_BOOT`` is new, and a version 2
  reader takes it for another boot, which is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from deltavol.bitmap.bitmap import MAX_GRANULARITY, Bitmap
from deltavol.errors import CorruptFile, DeltavolError, IoFailure, os_error
from deltavol.store import fs
from deltavol.store.fs import boot_id
from deltavol.store.group_commit import GroupCommit

log = logging.getLogger("deltavol.bitmap")

MAGIC = b"DVBITMAP"
VERSION = 2
HEADER_SIZE = 4096
HOT_REGION = 4 * 1024 * 1024  # bytes of volume behind one hot bit (as DRBD's activity-log extent)
SETTLE_SECONDS = 10.0  # a hot region with no new chunk bit for this long is cleared
HOT_SET = 1 << 30  # bytes of volume the hot regions of one tracking file cover at most
_LOST_BOOT = b"\xff" * 16  # the boot of a file that may have lost pages (no real boot id is all ones)
_PAGE = 4096  # bytes of bits written for a chunk or region: the page that holds its bit
_PAGE_BITS = (_PAGE * 8).bit_length() - 1  # bit >> _PAGE_BITS: its page
# magic, version, granularity, size, nbits, generation, kind, hot region bytes, boot
_HEADER = struct.Struct(">8sIIQQQBI16s")
KIND_TRACKING = 1
KIND_TRANSFER = 2
KIND_RESTORE = 3  # what a restore still has to copy back (sessions/restore.py)
_KINDS = {KIND_TRACKING: "tracking", KIND_TRANSFER: "transfer", KIND_RESTORE: "restore"}


def _hot_at(nbits: int) -> int:
    """Where a tracking file's hot bits begin: the page after its chunk bits."""
    return HEADER_SIZE + -(-((nbits + 7) // 8) // _PAGE) * _PAGE


def _header(bitmap: Bitmap, generation: int, kind: int, region: int, boot: bytes | None = None) -> bytes:
    if boot is None:
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
        with contextlib.ExitStack() as views:
            parts = _parts(views, bitmap, generation, kind, hot)
            # _write_all looked up at each call: tests put a full disk there
            fs.replace_atomic(path, parts, adopt=adopt, write=lambda *a: _write_all(*a))
    except OSError as exc:
        raise os_error(exc, f"bitmap {path}") from exc


def _parts(
    views: contextlib.ExitStack, bitmap: Bitmap, generation: int, kind: int, hot: Bitmap | None
) -> list[tuple[int, bytes | memoryview]]:
    """A bitmap file's pieces and where each goes: header, bits, and a tracking file's hot
    regions. No copy (a 16 TiB volume's bitmap is 32 MiB): views, released with ``views``."""
    parts: list[tuple[int, bytes | memoryview]] = [
        (0, _header(bitmap, generation, kind, hot.granularity if hot else 0))
    ]
    parts.append((HEADER_SIZE, views.enter_context(bitmap.view())))
    if hot is not None:
        parts.append((_hot_at(bitmap.nbits), views.enter_context(hot.view())))
    return parts


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
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


@dataclass(frozen=True)
class Recopy:
    """What ``load_tracking`` added to a tracking file's bits: every chunk of its hot
    regions, because the file's unsynced pages may be lost."""

    bytes: int  # of volume behind the chunks added (set in no chunk bit of the file)
    reason: str


def _lost_why(boot: bytes) -> str | None:
    """Why the unsynced pages of a tracking file written in ``boot`` may be lost; None
    if they cannot be."""
    now = boot_id()
    if boot == _LOST_BOOT:
        return "an fdatasync of the tracking file failed: pages it had not written may be lost"
    if not now:
        return "this boot's id is unknown: the machine may have restarted since the last sync"
    if boot != now:
        return "the machine restarted since the tracking file was last synced"
    return None


def load(path: Path, kind: int, granularity: int, size: int) -> tuple[Bitmap, int]:
    """Read and validate a bitmap file; returns (bitmap, generation).

    A tracking file that may have lost pages (written before this boot) comes back with
    its hot regions added.
    """
    bitmap, generation, _ = _load(path, kind, granularity, size)
    return bitmap, generation


def load_tracking(path: Path, granularity: int, size: int) -> tuple[Bitmap, int, Recopy | None]:
    """``load`` of a tracking file; also returns what the hot regions added, if any."""
    return _load(path, KIND_TRACKING, granularity, size)


def _load(path: Path, kind: int, granularity: int, size: int) -> tuple[Bitmap, int, Recopy | None]:
    try:
        raw = fs.read_bytes(path)
    except FileNotFoundError:
        raise CorruptFile(path=path, why=f"{_KINDS.get(kind, 'bitmap')} bitmap file is missing") from None
    except OSError as exc:  # EIO, EACCES, ...: the file may well be fine, it is not corrupt
        raise os_error(exc, f"reading bitmap {path}") from exc
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
    why = _lost_why(boot) if hot is not None else None
    recopy = None
    if why is not None:
        hot = Bitmap.from_bytes(size, region, memoryview(raw)[_hot_at(nbits) :])
        if not hot.is_empty():
            tracked = bitmap.bytes_set()
            per = region // granularity
            for first, count in hot.runs():  # the chunk bits of these may be lost: all of them
                bitmap.set_run(first * per, count * per)
            recopy = Recopy(bitmap.bytes_set() - tracked, why)
    return bitmap, generation, recopy


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


@dataclass
class Aside:
    """A tracking file to be: written beside the file in place (``NAME.next``) in a thread,
    and put in its place later on the loop (``TrackingFile.write_aside``, ``put_in_place``).
    ``fd`` is the written file's, read-write, once it is durable; -1 before."""

    bitmap: Bitmap
    generation: int
    hot: list[int]
    fd: int = -1


class TrackingFile:
    """The tracking bitmap's file, written ahead of every change (see the module notes).

    Owns the hot set: in memory a region is in it (``_lru``) from its first change on,
    and durably so once no round for it is running (``_covering``). ``hot`` is the hot
    section as the next round writes it: the set, and the regions on their way out."""

    def __init__(
        self,
        path: Path,
        size: int,
        granularity: int,
        commit: GroupCommit,
        region: int = HOT_REGION,
        hot_set: int = HOT_SET,
    ) -> None:
        self.path = path
        self.commit = commit  # shared by the sessions of one source
        self.hot = Bitmap(size, max(region, granularity))
        self.capacity = max(1, hot_set // self.hot.granularity)  # regions in the hot set at most
        self._shift = (self.hot.granularity // granularity).bit_length() - 1  # chunk >> _shift: region
        self._hot_at = _hot_at(Bitmap(size, granularity).nbits)
        self._fd = -1  # until ``rewrite`` writes the file
        self._closed = False  # by ``close``: its session let it go, it never writes again
        # held only to take, swap or count the fd, never across I/O: the event loop must
        # not wait for a round's sync on a stalled disk (``close``, ``rewrite``)
        self._fd_lock = threading.Lock()
        self._fd_users = 0  # round threads syncing the fd
        self._fd_closing: list[int] = []  # fds replaced or closed meanwhile: the last user closes them
        self._pending: set[int] = set()  # pages of hot bits to write at the next round
        self._lru: dict[int, int] = {}  # the hot set, least recently used first: region -> its last _seq
        self._covering: dict[int, asyncio.Future[None]] = {}  # region -> round making it durable
        self._rounds: dict[asyncio.Future[None], list[int]] = {}  # the same, by round
        self._evicting: dict[int, asyncio.Future[None]] = {}  # left the set: region -> round syncing it
        self._evictions: dict[asyncio.Future[None], list[int]] = {}  # the same, by round
        self._seq = 0  # write_bits calls so far
        self._durable_seq = 0  # the bits of write_bits calls up to this one are durable
        self._round: asyncio.Future[None] | None = None  # the last round asked for
        self._round_seq: dict[asyncio.Future[None], int] = {}  # a round -> _seq when it wrote out
        self._sync_failed = False  # set by ``sync`` in its thread, seen by ``_round_end``
        # the fd's inode replaced the file, but the directory sync that makes its name
        # durable has not succeeded yet: until one does, no round makes anything durable
        self._dir_unsynced = False
        self.lost: str | None = None  # why the file may have lost pages (see the module notes)
        self._lost_header = b""  # the header that says so, to write at the next round
        self._bitmap: Bitmap | None = None  # the bitmap written last (its bits are all set in it)
        self._generation = 0
        self._touched: set[int] = set()  # regions with a new chunk bit since settling began
        self._settle: asyncio.TimerHandle | asyncio.Task[None] | None = None
        self._settling = asyncio.Lock()  # one settle at a time: each owns the regions touched meanwhile
        self._closing: set[asyncio.Future[None]] = set()  # replaced fds being closed in threads

    def write_bits(self, bitmap: Bitmap, chunks: list[int]) -> None:
        """Write the bit bytes of ``chunks`` (sorted, already set in ``bitmap``) into the
        file now: into the page cache, which outlives the server, not a power loss."""
        self._bitmap = bitmap  # what a file that lost pages is written again from
        self._seq = seq = self._seq + 1
        lru = self._lru
        if len(chunks) == 1:  # the usual case, a small write: no sets, one page
            c = chunks[0]
            r = c >> self._shift
            self._touched.add(r)
            if r in lru:  # used: last out of the hot set
                del lru[r]
                lru[r] = seq
            try:
                with bitmap.view() as bits:
                    lo = (c >> _PAGE_BITS) * _PAGE
                    _write_all(self._fd, bits[lo : lo + _PAGE], HEADER_SIZE + lo)
            except OSError as exc:
                raise os_error(exc, f"tracking bitmap {self.path}") from exc
            return
        shift = self._shift
        regions = {c >> shift for c in chunks}
        self._touched.update(regions)
        for r in regions:  # used: last out of the hot set
            if r in lru:
                del lru[r]
                lru[r] = seq
        pages = sorted({c >> _PAGE_BITS for c in chunks})
        try:
            with bitmap.view() as bits:
                _write_pages(self._fd, bits, HEADER_SIZE, pages)
        except OSError as exc:
            raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def write_hot_bit(self, bitmap: Bitmap, chunk: int) -> bool:
        """``write_bits`` of one chunk whose hot region is durable (``covered``): sets
        its bit in ``bitmap`` if it is not set, and writes its page into the file now.
        False (nothing done) if the region is not durably hot. The write path's usual
        case, in one call: the checks and the write of ``write_bits`` for it."""
        r = chunk >> self._shift
        lru = self._lru
        if r not in lru or r in self._covering:
            return False
        page = bitmap.set_new(chunk, _PAGE)
        if page is None:  # set already
            return True
        self._bitmap = bitmap  # what a file that lost pages is written again from
        self._seq = seq = self._seq + 1
        self._touched.add(r)
        del lru[r]  # used: last out of the hot set
        lru[r] = seq
        lo = (chunk >> _PAGE_BITS) * _PAGE
        try:
            if fs.pwrite(self._fd, page, HEADER_SIZE + lo) < len(page):
                _write_all(self._fd, page, HEADER_SIZE + lo)
        except OSError as exc:
            raise os_error(exc, f"tracking bitmap {self.path}") from exc
        return True

    def covered(self, chunks: range) -> bool:
        """True if the hot regions of ``chunks`` are durable: their first changes need no round."""
        if not chunks:
            return True
        shift, lru, covering = self._shift, self._lru, self._covering
        for r in range(chunks.start >> shift, ((chunks.stop - 1) >> shift) + 1):
            if r not in lru or r in covering:
                return False
        return True

    def cover(self, chunk: int) -> asyncio.Future[None] | None:
        """The round that makes ``chunk``'s hot region durable; None if it already is."""
        r = chunk >> self._shift
        lru = self._lru
        if r in lru:
            return self._covering.get(r)
        if r in self._evicting:  # on its way out, its bit still set: back in
            del self._evicting[r]
            lru[r] = self._seq
            self._make_room()
            return self._covering.get(r)
        self.hot.set(r)
        self._pending.add(r >> _PAGE_BITS)
        lru[r] = self._seq
        fut = self._covering[r] = self.round()
        regions = self._rounds.get(fut)
        if regions is None:
            regions = self._rounds[fut] = []
            fut.add_done_callback(self._round_done)
        regions.append(r)
        self._make_room()
        if self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._start_settle)
        return fut

    def _make_room(self) -> None:
        """Take the least recently used regions out of a hot set grown past its bound.

        A region whose chunk bits are all durable (written before a round that synced)
        is cleared at once: in the round about to begin, with the region that came in.
        Another one keeps its bit until the next round has synced its chunk bits."""
        lru = self._lru
        while len(lru) > self.capacity:
            v = next(iter(lru))
            seq = lru.pop(v)
            if self.lost is not None:
                continue  # the file may lack chunk bits of it: its bit stays until a rewrite
            if seq <= self._durable_seq and v not in self._covering:
                self.hot.clear(v)
                self._pending.add(v >> _PAGE_BITS)
                continue
            fut = self._evicting[v] = self.round()
            regions = self._evictions.get(fut)
            if regions is None:
                regions = self._evictions[fut] = []
                fut.add_done_callback(self._evicted)
            regions.append(v)

    def _evicted(self, fut: asyncio.Future[None]) -> None:
        if self._clear_evicted(fut) and self._fd >= 0:
            self.round()  # the clearing durable soon, so the file keeps to the bound

    def _clear_evicted(self, fut: asyncio.Future[None]) -> bool:
        """Clear the regions that left with round ``fut`` (done); True if any was."""
        failed = fut.cancelled() or fut.exception() is not None
        cleared = False
        for v in self._evictions.pop(fut, ()):
            if self._evicting.get(v) is fut:
                del self._evicting[v]
                if not failed and self.lost is None:  # its chunk bits are durable now
                    self.hot.clear(v)
                    self._pending.add(v >> _PAGE_BITS)
                    cleared = True
                # else its bit stays: a superset, that ``settle`` or a rewrite clears
        return cleared

    def _round_done(self, fut: asyncio.Future[None]) -> None:
        failed = fut.cancelled() or fut.exception() is not None
        for r in self._rounds.pop(fut, ()):
            if self._covering.get(r) is fut:
                del self._covering[r]
                if failed:  # not known to be durable: the next change in it asks again
                    self._lru.pop(r, None)
                    self._evicting.pop(r, None)
                    if self.lost is None:
                        self.hot.clear(r)

    def write_out(self) -> None:
        """Write the pending pages of hot bits as they are now (a round begins: on the loop)."""
        if self._round is not None:
            self._round_seq[self._round] = self._seq  # the round that begins: it syncs these
        for fut in [f for f in self._evictions if f.done()]:  # the last round's: the group
            self._clear_evicted(fut)  # commit begins this one before the loop runs its callbacks
        self._write_pending()

    def _write_pending(self) -> None:
        pages, self._pending = sorted(self._pending), set()
        if self._fd < 0:
            return
        try:
            if self._lost_header:
                _write_all(self._fd, self._lost_header, 0)
                self._lost_header = b""
            if pages:
                with self.hot.view() as bits:
                    _write_pages(self._fd, bits, self._hot_at, pages)
        except OSError as exc:
            self._pending.update(pages)  # a round counts on them: the next one writes them
            raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def sync(self) -> None:
        with self._fd_lock:  # close() and rewrite() may swap the fd meanwhile: not close it
            if self._fd < 0:  # closed (its session is gone): nothing left to make durable
                return
            fd, dir_unsynced = self._fd, self._dir_unsynced
            self._fd_users += 1
        try:
            try:
                fs.fdatasync(fd)
            except OSError as exc:
                self._sync_failed = True
                raise os_error(exc, f"tracking bitmap {self.path}") from exc
            if dir_unsynced:
                try:
                    fs.sync_dir(self.path.parent)
                except OSError as exc:
                    raise os_error(exc, f"directory of tracking bitmap {self.path}") from exc
                with self._fd_lock:
                    if self._fd == fd:  # not for a file that replaced it meanwhile
                        self._dir_unsynced = False
        finally:
            self._release_fd()

    def _release_fd(self) -> None:
        """A round's thread is done with the fd: the last one closes what was let go meanwhile."""
        with self._fd_lock:
            self._fd_users -= 1
            closing: list[int] = []
            if not self._fd_users:
                closing, self._fd_closing = self._fd_closing, []
        for fd in closing:
            with contextlib.suppress(OSError):
                fs.close(fd)

    def _let_go(self, fd: int) -> None:
        """Close ``fd`` (swapped out under ``_fd_lock``) now, or, while a round's thread
        syncs it, when that thread is done: the loop never waits for the disk."""
        with self._fd_lock:
            if self._fd_users:
                self._fd_closing.append(fd)
                return
        with contextlib.suppress(OSError):
            fs.close(fd)

    def round(self) -> asyncio.Future[None]:
        """The group-commit round that makes the bits written so far durable."""
        fut = self.commit.round(self)
        if fut is not self._round:
            self._round = fut
            fut.add_done_callback(self._round_end)  # first: before the callbacks of its regions
        return fut

    def _round_end(self, fut: asyncio.Future[None]) -> None:
        seq = self._round_seq.pop(fut, None)
        if not fut.cancelled() and fut.exception() is None:
            if seq is not None:
                self._durable_seq = max(self._durable_seq, seq)
        elif self._sync_failed:
            self._sync_failed = False
            self._pages_lost(fut.exception())

    def _pages_lost(self, exc: BaseException | None) -> None:
        """An fdatasync failed: the kernel may have dropped pages of the file for good."""
        first = self.lost is None
        self.lost = "an fdatasync of the tracking file failed: pages it had not written may be lost"
        if self._bitmap is not None:  # (again: its page may be one of those dropped)
            self._lost_header = _header(
                self._bitmap, self._generation, KIND_TRACKING, self.hot.granularity, _LOST_BOOT
            )
        if first:
            log.error(
                "%s: an fdatasync failed (%s): its hot regions stay until it is written again",
                self.path,
                exc.message if isinstance(exc, DeltavolError) else exc,
            )
            if self._fd >= 0:  # the header says so as soon as a sync succeeds (one round, not
                self.round()  # a loop of them on a disk that keeps failing)
                if self._settle is None:  # which writes the file again
                    self._settle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._start_settle)

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
            if (not self.hot.is_empty() or self.lost is not None) and self._fd >= 0:
                self._settle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._start_settle)

    async def settle(self, everything: bool = False) -> None:
        """Make the chunk bits durable, then clear the hot regions that got no new chunk
        bit since the last settle (with ``everything``, all of them, durably: the server
        stops, so a clean reboot costs no copy). A file that may have lost pages is
        written again from the bitmap in memory instead."""
        async with self._settling:
            touched, self._touched = self._touched, set()
            await self.durable()  # every chunk bit written so far
            if self.lost is not None:
                self._write_again()
                return
            keep = self._touched | self._covering.keys() | (set() if everything else touched)
            idle = [r for first, n in self.hot.runs() for r in range(first, first + n) if r not in keep]
            lru, evicting = self._lru, self._evicting
            for r in idle:
                self.hot.clear(r)
                lru.pop(r, None)
                evicting.pop(r, None)
            self._pending.update(r >> _PAGE_BITS for r in idle)
            if everything:
                await self.durable()
            else:
                self._write_pending()  # lazily: a hot bit left on disk only costs a copy after a power loss

    def _write_again(self) -> None:
        """``rewrite`` with what it last wrote and every bit set since: the file's lost
        pages are in none of its inodes' page caches any more, only in memory. Not once
        closed, nor once its path names another file than its fd's (another session's of
        the same name, created since): that one is not this one's to replace."""
        if self._bitmap is None or self._closed:
            return
        try:
            if self._fd < 0 or not fs.same_file(self._fd, self.path):
                raise IoFailure(what=f"tracking bitmap {self.path}", why="its path names another file now")
            self.rewrite(self._bitmap, self._generation)
        except OSError as exc:
            raise os_error(exc, f"tracking bitmap {self.path}") from exc
        log.info("%s: written again after the failed fdatasync", self.path)

    def recent(self, bitmap: Bitmap) -> list[int]:
        """The hot regions a file replacing this one, with ``bitmap``'s bits cleared,
        carries (see the module notes): the regions of ``bitmap``'s bits, those of the
        hot set first, at most the set's bound; least recently used first. Memory only."""
        cap, shift = self.capacity, self._shift
        keep = list(self._lru)[-cap:]
        have, extra = set(keep), list[int]()
        pos = 0
        while len(keep) + len(extra) < cap:
            c = bitmap.first_set(pos)
            if c is None:
                break
            r = c >> shift
            if r not in have:
                extra.append(r)
            pos = (r + 1) << shift
        return extra + keep

    def rewrite(self, bitmap: Bitmap, generation: int, hot: list[int] | None = None) -> None:
        """Replace the file atomically with ``bitmap`` and the hot regions ``hot`` (none
        by default; see ``recent``): every bit set is durable in it; this is where
        cleared bits land. If it fails, the fd stays on the file in place (the old one,
        or the new one once it has replaced it), and so does the hot set that goes with
        it; after a failed directory sync, the regions of ``hot`` are in the set as regions
        coming in: each waits for a round, which syncs the directory first. A closed
        file is written no more: its path may name another session's file by then."""
        self._check_open()
        carried = self._hot_bitmap(hot or ())
        adopted = False

        def adopt(fd: int) -> None:
            nonlocal adopted
            self._adopt(fd, bitmap, generation, carried)
            adopted = True

        try:
            save_atomic(self.path, bitmap, generation, KIND_TRACKING, carried, adopt=adopt)
        except BaseException:
            if adopted and hot:  # hot in the file in place, its name maybe not durable
                self._carry(hot, durable=False)
            raise
        self._dir_unsynced = False  # (a failed directory sync left it set: see ``sync``)
        if hot:  # durably hot in the file that is the file now: in the set, used at the mark
            self._carry(hot, durable=True)

    # --- the same, off the event loop: a thread writes the file aside, the loop installs it
    @property
    def aside_path(self) -> Path:
        """Where ``write_aside`` writes: not ``rewrite``'s tmp file, which a ``settle`` may
        write meanwhile."""
        return self.path.with_name(self.path.name + ".next")

    def write_aside(self, aside: Aside) -> None:
        """``rewrite``'s first half, for a thread: ``aside``'s bitmap and hot regions written
        to ``aside_path`` and fsynced; its fd goes into ``aside.fd``. Reads nothing of this
        object's state but its geometry: the loop goes on meanwhile. Not the file yet: a
        crash leaves the file in place, and a file at ``aside_path`` that nothing reads
        (the next ``write_aside`` truncates it, a start-up removes it)."""
        tmp = self.aside_path
        carried = self._hot_bitmap(aside.hot)
        try:
            fd = fs.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                with contextlib.ExitStack() as views:
                    for offset, data in _parts(views, aside.bitmap, aside.generation, KIND_TRACKING, carried):
                        _write_all(fd, data, offset)
                fs.fsync(fd)
            except BaseException:
                fs.close(fd)
                raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                fs.unlink(tmp, missing_ok=True)
            raise os_error(exc, f"tracking bitmap {tmp}") from exc
        aside.fd = fd

    def _hot_bitmap(self, regions: Iterable[int]) -> Bitmap:
        """A hot section with ``regions`` set: what a file written anew carries."""
        carried = Bitmap(self.hot.size, self.hot.granularity)
        for r in regions:
            carried.set(r)
        return carried

    def drop_aside(self, aside: Aside) -> None:
        """An ``aside`` that will not be put in place: its fd closed, its file removed."""
        fd, aside.fd = aside.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                fs.close(fd)
            with contextlib.suppress(OSError):
                fs.unlink(self.aside_path, missing_ok=True)

    async def put_in_place(self, aside: Aside, bitmap: Bitmap) -> None:
        """``rewrite``'s second half: ``aside`` (written, or written now, in a thread)
        replaces the file: renamed and its directory synced in one thread, then its fd
        adopted on the loop, and the replaced file's fd closed in a thread (the last close
        of an unlinked file frees it: the journal again). ``bitmap`` is the bitmap in
        memory whose bits ``aside``'s are (what a file that lost pages is written again
        from). As ``rewrite`` if it fails. Meanwhile the fd in use stays the replaced
        file's, which only bits already durable elsewhere reach (the write gate is closed);
        and one ``settle`` at a time: none replaces the file before the fd is adopted.
        Not once the file is closed, nor over a path that names another file than its fd's
        (as ``_write_again``): the name may be another session's by then."""
        async with self._settling:
            try:
                self._check_open()
                if aside.fd < 0:
                    await fs.to_thread(self.write_aside, aside)
                self._check_open()
                dir_failed = await fs.to_thread(self._rename_aside)
            except OSError as exc:
                await fs.to_thread(self.drop_aside, aside)
                raise os_error(exc, f"tracking bitmap {self.path}") from exc
            except DeltavolError:
                await fs.to_thread(self.drop_aside, aside)
                raise
            fd, aside.fd = aside.fd, -1
            if self._closed:  # closed while it was renamed: the new fd is no one's to keep
                await fs.to_thread(fs.close, fd)
                self._check_open()
            carried = self._hot_bitmap(aside.hot)
            with self._fd_lock:
                self._fd_users += 1  # so that _adopt leaves the replaced fd to _release_fd
            try:
                self._adopt(fd, bitmap, aside.generation, carried)
            finally:
                closing = asyncio.ensure_future(fs.to_thread(self._release_fd))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            if dir_failed is not None:
                if aside.hot:  # hot in the file in place, its name maybe not durable
                    self._carry(aside.hot, durable=False)
                raise os_error(dir_failed, f"directory of tracking bitmap {self.path}") from dir_failed
            with self._fd_lock:
                if self._fd == fd:  # (a round's directory sync may have cleared it already)
                    self._dir_unsynced = False
            if aside.hot:
                self._carry(aside.hot, durable=True)

    def _check_open(self) -> None:
        if self._closed:
            raise IoFailure(what=f"tracking bitmap {self.path}", why="closed: its session let it go")

    def _rename_aside(self) -> OSError | None:
        """(In a thread.) ``aside_path`` renamed over the file, then the directory synced:
        the error of that sync, if it failed (the new file is in place all the same)."""
        if self._fd >= 0 and not fs.same_file(self._fd, self.path):
            raise IoFailure(what=f"tracking bitmap {self.path}", why="its path names another file now")
        fs.replace(self.aside_path, self.path)
        try:
            fs.sync_dir(self.path.parent)
        except OSError as exc:
            return exc
        return None

    def _carry(self, hot: list[int], durable: bool) -> None:
        """Put the regions ``hot`` carried by a rewrite (hot in the file now) into the set,
        used at the mark: counted by ``_make_room`` and cleared by ``settle`` like any other.
        Not ``durable`` (the directory sync failed): each is covered by the next round, as a
        region coming in is, and a change in it waits for that round."""
        seq, lru = self._seq, self._lru
        for r in hot:
            lru[r] = seq
        self._touched.update(hot)
        if not durable:
            fut = self.round()
            regions = self._rounds.get(fut)
            if regions is None:
                regions = self._rounds[fut] = []
                fut.add_done_callback(self._round_done)
            for r in hot:
                self._covering[r] = fut
                regions.append(r)
            self._make_room()
        if self._settle is None:
            self._settle = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._start_settle)

    def _adopt(self, fd: int, bitmap: Bitmap, generation: int, hot: Bitmap) -> None:
        with self._fd_lock:
            old, self._fd = self._fd, fd
            self._dir_unsynced = True
        # the new file holds every bit set, durably, and the hot regions ``hot`` (in the
        # set only once its name is durable: see ``rewrite``); a round begun before makes
        # nothing durable in it (it may have synced the old file only)
        self.hot.clear_all()
        self.hot.or_(hot)
        self._pending.clear()
        self._touched.clear()
        self._lru.clear()
        self._covering.clear()
        self._evicting.clear()
        self._durable_seq = self._seq
        self.lost, self._lost_header = None, b""
        self._bitmap, self._generation = bitmap, generation
        if old >= 0:  # last: the state above goes with the new fd whatever this does
            self._let_go(old)

    def close(self) -> None:
        """Let the file go for good: its settle is cancelled, and nothing writes it again."""
        self._closed = True
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        with self._fd_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            self._let_go(fd)
