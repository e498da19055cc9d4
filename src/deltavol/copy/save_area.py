"""The save area: old contents of source chunks overwritten while an update still has to
copy them (copy-on-first-write).

Design notes
------------
One file per session: a 4096-byte header (magic, version, granularity, volume size,
update id, nonce, CRC32) and then the current update's records, one after the other, each
a 32-byte record header (magic, the update's nonce, chunk number, start within the chunk,
length, CRC32 of those fields and the data) followed by the data. ``save`` returns only
when its record is durable (pwrite + fdatasync), and the caller issues the overwrite only
after that: so after a crash every block whose source was overwritten has a complete
record. ``open`` reads records up to the first one that is torn, damaged or of another
nonce: a torn record belongs to a save that never returned, whose overwrite never happened.

The fdatasync is most of a protected write's latency, and it costs half as much when the
record overwrites blocks already written as when it appends (an append changes the file
size: a journal commit). So ``prepare`` writes ``SPACE_AHEAD`` bytes of record space
ahead (zeroes, before the mark, off the write path), and the file stays from one update to
the next: ``create`` gives it a new header and nonce, which void every older record, and
the new records overwrite them in place. Past the space written ahead, records append.
A nonce, not the update id, marks the records: a source block that happens to look like
a record of this update cannot be forged without knowing it.

A record holds only the 4 KiB blocks a change overwrites, not its whole chunk: a 4 KiB
write under copy-on-first-write costs a 4 KiB durable append, not a chunk's (the fsync is
most of a protected write's latency), and the area holds sixteen times as many of them.
A block's first record counts (``_index``); ``pieces`` gives a chunk's saved blocks, which
the copy lays over the source's current contents.

Records go into the page cache one after another, on the event loop, so a failed write (a
full disk) never leaves a gap before a good record; the saves of a burst then share one
fdatasync (group commit: with 32 writes in flight they would otherwise queue behind each
other's). A failed fdatasync ends saving for the update: the kernel may have dropped the
pages it could not write, and a later fdatasync would make records durable behind that
gap. The file is deleted when its session goes. Rewriting the header in
place relies on its 48 bytes being written whole (one sector); the header only changes
before the session row commits a mark, and a restart drops a save area no update owns.
``limit`` bounds the file; past it (or after a failed fdatasync) ``save`` returns False
and the caller falls back to copy-before-write.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import struct
import zlib
from pathlib import Path

from deltavol.errors import CorruptFile, os_error
from deltavol.store import fs
from deltavol.store.fs import sync_dir
from deltavol.store.group_commit import GroupCommit

log = logging.getLogger("deltavol.save_area")

MAGIC = b"DVSAVEAR"
VERSION = 3
HEADER = struct.Struct(">8sIIQQQ")  # magic, version, granularity, size, update id, nonce
HEADER_SIZE = 4096
RECORD = struct.Struct(">IQQIII")  # magic, nonce, chunk, start in chunk, length, crc32(fields, data)
RECORD_MAGIC = 0x44565352  # "DVSR"
BLOCK = 4096  # what a record holds is whole blocks (or the end of the volume)
SPACE_AHEAD = 32 * 1024 * 1024  # record space written before an update (at most its limit)


class SaveArea:
    def __init__(self, path: Path, granularity: int, size: int, update_id: int, limit: int) -> None:
        self.path = path
        self.granularity = granularity
        self.size = size
        self.update_id = update_id
        self.limit = limit
        self.index: dict[int, list[tuple[int, int, int]]] = {}  # chunk -> [(start, at, length)]
        self._saved: dict[int, int] = {}  # chunk -> bit mask of its saved blocks
        self.nonce = 0
        self._end = HEADER_SIZE
        self._fd = -1
        self._commit = GroupCommit()
        self._failed = False  # a sync failed: saves return False (copy-before-write)

    # --- lifecycle -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Write the record space ahead, so that saves overwrite blocks in place (blocking:
        run it off the event loop, before the mark). Only for a file no update uses. A
        full disk is no error here: the saves then append."""
        want = HEADER_SIZE + min(self.limit, SPACE_AHEAD)
        try:
            fd = fs.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                have = start = fs.fstat(fd).st_size
                vfs = fs.fstatvfs(fd)
                if have >= want or vfs.f_bavail * vfs.f_frsize < 4 * want:
                    return  # done before, or the disk is nearly full: leave the room to others
                zeroes = bytes(1 << 20)
                try:
                    while have < want:
                        have += fs.pwrite(fd, zeroes[: want - have], have)
                    fs.fsync(fd)
                except OSError:
                    fs.ftruncate(fd, start)  # give back what it took
                    raise
            finally:
                fs.close(fd)
            sync_dir(self.path.parent)
        except OSError as exc:
            log.warning("save area %s: no space written ahead: %s", self.path, exc.strerror or exc)

    def create(self) -> SaveArea:
        """Begin this update's area: a header with a new nonce, durable. A file left by an
        earlier update (and ``prepare``) is kept, its old records void; else a new one."""
        self.nonce = secrets.randbits(64)
        head = HEADER.pack(MAGIC, VERSION, self.granularity, self.size, self.update_id, self.nonce)
        head = (head + struct.pack(">I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")
        if fs.exists(self.path):  # one sector of header, overwritten in place
            try:
                fd = fs.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise os_error(exc, f"opening save area {self.path}") from exc
            try:
                fs.pwrite(fd, head, 0)
                fs.fdatasync(fd)
                sync_dir(self.path.parent)  # prepare may have created it and not got that far
            except OSError as exc:
                fs.close(fd)
                raise os_error(exc, f"creating save area {self.path}") from exc
            self._fd = fd
            return self
        try:
            self._fd = fs.replace_atomic(
                self.path, [(0, head)], tmp=self.path.with_suffix(".tmp"), keep_open=True
            )
        except OSError as exc:
            raise os_error(exc, f"creating save area {self.path}") from exc
        return self

    def open(self) -> SaveArea:
        """Reopen after a restart, validating the header and every record."""
        try:
            fd = fs.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptFile(path=self.path, why="save area is missing") from None
        self._fd = fd
        raw = fs.pread(fd, HEADER_SIZE, 0)
        if len(raw) < HEADER.size + 4:
            raise CorruptFile(path=self.path, why="header is truncated")
        head = raw[: HEADER.size]
        (crc,) = struct.unpack_from(">I", raw, HEADER.size)
        magic, version, gran, size, update_id, self.nonce = HEADER.unpack(head)
        if magic != MAGIC:
            raise CorruptFile(path=self.path, why="not a deltavol save area (bad magic)")
        if zlib.crc32(head) != crc:
            raise CorruptFile(path=self.path, why="header checksum mismatch")
        if version != VERSION:
            raise CorruptFile(path=self.path, why=f"unsupported version {version}")
        if (gran, size, update_id) != (self.granularity, self.size, self.update_id):
            raise CorruptFile(
                path=self.path,
                why=f"belongs to another update (granularity {gran}, size {size}, update {update_id})",
            )
        end = fs.fstat(fd).st_size
        pos = HEADER_SIZE
        while pos + RECORD.size <= end:
            head = fs.pread(fd, RECORD.size, pos)
            magic2, nonce, chunk, start, length, crc = RECORD.unpack(head)
            if magic2 != RECORD_MAGIC or nonce != self.nonce or pos + RECORD.size + length > end:
                break
            data = fs.pread(fd, length, pos + RECORD.size)
            if _crc(head, data) != crc or not self._whole_blocks(chunk, start, length):
                break
            self._index(chunk, start, pos + RECORD.size, length)
            pos += RECORD.size + length
        self._end = pos  # what follows is torn, void or space written ahead: the next save's
        return self

    def close(self) -> None:
        if self._fd >= 0:
            fs.close(self._fd)
            self._fd = -1

    def delete(self) -> None:
        self.close()
        fs.unlink(self.path, missing_ok=True)

    # --- data ---------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self._end - HEADER_SIZE

    def __contains__(self, chunk: int) -> bool:
        """True once any block of ``chunk`` is saved (its tracking bit came with that save)."""
        return chunk in self.index

    def missing(self, chunk: int, start: int, end: int) -> list[tuple[int, int]]:
        """The runs ``(start, end)`` of blocks of [start, end) in ``chunk`` not saved yet,
        widened to whole blocks (clipped to the chunk's end)."""
        saved, limit = self._saved.get(chunk, 0), self._chunk_end(chunk)
        runs: list[tuple[int, int]] = []
        for b in range(start // BLOCK, -(-end // BLOCK)):
            if saved >> b & 1:
                continue
            lo, hi = b * BLOCK, min((b + 1) * BLOCK, limit)
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        return runs

    async def save(self, chunk: int, start: int, data: bytes) -> bool:
        """Durably keep ``data`` as the old contents of ``chunk`` from ``start`` (whole
        blocks: see ``missing``; a block saved before keeps its first record); False if
        the area is full or failed."""
        done = self.put(chunk, start, data)
        if done is None:
            return False
        with contextlib.suppress(Exception):  # _settle has seen it
            await self.wait(done)
        return not self._failed  # never turns back: not failed now, so the record is indexed

    def wait(self, done: asyncio.Future[None]) -> asyncio.Future[None]:
        """Await this for a round ``put`` returned (see ``GroupCommit.wait``)."""
        return self._commit.wait(done)

    @property
    def failed(self) -> bool:
        return self._failed

    def room(self, need: int) -> bool:
        """True if records of ``need`` bytes (headers included) fit and saving goes on."""
        return not self._failed and self.used + need <= self.limit

    def put(self, chunk: int, start: int, data: bytes) -> asyncio.Future[None] | None:
        """The first half of ``save``: the record goes into the page cache at once, at the
        end of the records (on the loop: one after another, so a failed write leaves no
        gap before a later record). Returns the round that makes it durable (shared by the
        saves of a burst: ``GroupCommit``), or None if the area is full or failed.

        The round itself settles the record, so a waiter cancelled meanwhile leaves no
        record that is durable but unknown, and no failed round unnoticed.
        """
        if not self._whole_blocks(chunk, start, len(data)):
            raise ValueError(f"save of chunk {chunk} at {start}+{len(data)}: not whole blocks")
        need = RECORD.size + len(data)
        if not self.room(need):
            return None
        pos = self._end
        fields = RECORD.pack(RECORD_MAGIC, self.nonce, chunk, start, len(data), 0)[:-4]
        record = fields + struct.pack(">I", _crc(fields, data)) + bytes(data)
        try:
            self._put(record, pos)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise os_error(exc, f"save area {self.path}") from exc
            self.limit = self.used  # the data dir is full: as good as a full save area
            return None
        self._end = pos + need
        done = self._commit.round(self)
        done.add_done_callback(lambda f: self._settle(f, chunk, start, pos + RECORD.size, len(data)))
        return done

    def _settle(self, done: asyncio.Future[None], chunk: int, start: int, at: int, length: int) -> None:
        if not self._failed and not done.cancelled() and done.exception() is None:
            self._index(chunk, start, at, length)
        elif not self._failed:
            # after a failed fdatasync the kernel may drop what it could not write: a later
            # round could make records durable behind a gap, so none is trusted any more
            why = "cancelled" if done.cancelled() else done.exception()
            log.error("save area %s: sync failed, copy-before-write from now: %s", self.path, why)
            self._failed = True

    def _put(self, record: bytes, pos: int) -> None:
        if fs.pwrite(self._fd, record, pos) != len(record):  # a full disk can write short
            raise OSError(errno.ENOSPC, "short write to the save area")

    def write_out(self) -> None:
        """For ``GroupCommit``: records are written as they are saved."""

    def sync(self) -> None:
        fs.fdatasync(self._fd)

    async def pieces(self, chunk: int) -> list[tuple[int, bytes]]:
        """The saved old contents of ``chunk``: ``(start in chunk, data)`` pieces."""
        return await fs.to_thread(self._read_pieces, self.index.get(chunk, []), chunk)

    def _read_pieces(self, where: list[tuple[int, int, int]], chunk: int) -> list[tuple[int, bytes]]:
        pieces = []
        for start, at, length in where:
            data = fs.pread(self._fd, length, at)
            if len(data) != length:
                raise CorruptFile(path=self.path, why=f"record of chunk {chunk} is short")
            pieces.append((start, data))
        return pieces

    def _chunk_end(self, chunk: int) -> int:
        return min(self.granularity, self.size - chunk * self.granularity)

    def _whole_blocks(self, chunk: int, start: int, length: int) -> bool:
        end = start + length
        if start % BLOCK or length <= 0 or chunk < 0 or end > self._chunk_end(chunk):
            return False
        return not end % BLOCK or end == self._chunk_end(chunk)

    def _index(self, chunk: int, start: int, at: int, length: int) -> None:
        """Index a record, for its blocks no earlier record holds. A block saved twice: two
        changes raced to it (see ``Session._save_at_once``), and the later one may have read
        it after the first change went down; or a save never returned, its overwrite never
        happened. Either way the first record holds the contents as of the mark."""
        for lo, hi in self.missing(chunk, start, start + length):
            self._add(chunk, lo, at + lo - start, hi - lo)

    def _add(self, chunk: int, start: int, at: int, length: int) -> None:
        self._saved[chunk] = self._saved.get(chunk, 0) | _blocks(start, start + length)
        self.index.setdefault(chunk, []).append((start, at, length))


def _blocks(start: int, end: int) -> int:
    """The bit mask of the blocks [start, end) touches."""
    return ((1 << -(-end // BLOCK)) - 1) ^ ((1 << start // BLOCK) - 1)


def _crc(fields: bytes, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(fields[: RECORD.size - 4]))
