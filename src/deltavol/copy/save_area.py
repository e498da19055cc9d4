"""The save area: old contents of source chunks overwritten while an update still has to
copy them (copy-on-first-write).

Design notes
------------
One file per session: a 4096-byte header (magic, version, granularity, volume size,
update id, nonce, the boot it was written in, CRC32) and then the current update's
records, one after the other, each a 40-byte record header (magic, the update's nonce,
chunk number, start within the chunk, length, synced, CRC32 of those fields and the data)
followed by the data.

**No sync on the write path.** ``put`` writes a record into the page cache (a pwrite on
the loop) and indexes it at once; the caller issues the overwrite only after that. So
the old contents reach the file before the overwrite is issued, and:

* after a killed server (``kill -9``: the page cache survives) every block whose source
  was overwritten has a complete record: ``open`` reads them, fdatasyncs them (they are
  trusted from then on) and the update finishes its own mark;
* after a power loss the records not yet written back may be gone while their
  overwrites reached the source. The header says which boot wrote the records; ``open``
  sets ``intact`` only when that is this boot, or the area is sealed (below), or for an
  area of version 3 or 4, whose saves were each synced. An update whose area is not
  intact gives up its mark at start-up and re-marks (``SessionFiles.load``): what it
  still owes, what changed since its mark (tracking, the hot set, and the records that
  did survive) is copied as of a new mark -- a later point in time, never a wrong one and
  never a full copy. When the boot id is unknown, no unsealed area is intact: a kill
  cannot be told from a power loss.

**Sealed at a clean stop** (``seal``): the records are synced, then a seal (magic, nonce,
where the records end, CRC32) is written at ``SEAL_AT`` in the header's block and synced;
no save is taken after it. A start in another boot trusts a sealed area (records ending
elsewhere than the seal says: ``CorruptFile``), and ``open`` takes the seal off, writing
this boot into the header, durably before any new save. A kill leaves no seal.

What still is synced, and why:

* ``create``: the header, before the mark commits (a new nonce voids the old records;
  the boot in it is what ``open`` judges the records by). Once per update.
* ``open``: what was read from the page cache, so a later save of the same blocks can
  trust it. Once per start-up. A failure here (a writeback error, reported once per file:
  the next start's sync would succeed) means records may be gone, and replay took the
  first hole for a torn tail: the area is not ``intact`` and saves no more.
* ``durable``: one group-commit round over the records written so far, before a
  checkpoint records as done a chunk its copy read from records, and before the update
  ends (``Copier.records_durable``). Nothing else syncs a record, so a background
  writeback error that made the kernel drop one is heard there or nowhere; a failure
  gives up the mark. ``pieces`` also checks every record it reads (magic, nonce, chunk,
  CRC: a dropped page reads back as what the disk holds) and raises ``SaveRecordLost``,
  which gives up the mark too. Each indexed piece keeps the offset of its record for that.
* Not each record as it is written. Their other job -- a saved chunk's tracking bit is left to its record
  (``Tracker`` ``BY_SAVE``) -- needs no durable record: the chunk is owed, so the
  transfer file keeps it until a checkpoint clears it, and a checkpoint first makes the
  tracking file durable (which holds the bit since the change was tracked), while no bit
  is left to a save (``Protector.saving``). At the end of an update the tracking file is
  made durable before the area goes; a cancel rewrites it whole.

Why: with fio (4 KiB random writes, every chunk owed) the per-burst fdatasync this
replaces was most of a protected write's p99 at iodepth 1 and capped its IOPS at
iodepth 32 (``python -m bench --only cofw``).

``synced`` in a record is where the records known durable ended when it was written (the
records ``open`` or ``durable`` synced, for version 5; the end of the last record whose round succeeded,
for an area of version 4): it costs no write and no fsync.

``open`` reads records up to the first one that is torn, damaged or of another nonce: a
torn record belongs to a save that never returned, whose overwrite never happened, and so
does every record after it -- a torn tail. Damage before where a later record says the
records were durable (bit rot, a disk that lied about a flush, a stray write) looks the
same and would silently void those records and every later one; so ``open`` searches the
rest of the file for records of the nonce, and one whose ``synced`` lies past the first
bad record proves that record was durable once: the file is corrupt (``CorruptFile``,
naming it). The search reads the rest of the file, only at a start-up that finds an
update under protection.

Versions 3 (records of 32 bytes, without ``synced``) and 4 (no boot in the header) are
still read: their records were each synced before their overwrite (group commit, see
``GroupCommit``), so they are intact after any crash, and such an area keeps saving the
old way -- its version's records, each save synced -- until its update ends; the next
update's ``create`` writes version 5. (Version 3's first bad record ends its records.)

``prepare`` writes ``SPACE_AHEAD`` bytes of record space ahead (zeroes, before the mark,
off the write path), and the file stays from one update to the next: ``create`` gives it
a new header and nonce, which void every older record, and the new records overwrite them
in place. Past the space written ahead, records append. A nonce, not the update id, marks
the records: a source block that happens to look like a record of this update cannot be
forged without knowing it.

A record holds only the 4 KiB blocks a change overwrites, not its whole chunk: a 4 KiB
write under copy-on-first-write costs a 4 KiB record, not a chunk's, and the area holds
sixteen times as many of them. A block's first record counts (``_index``); ``pieces``
gives a chunk's saved blocks, which the copy lays over the source's current contents.

Records go into the page cache one after another, on the event loop, so a failed write (a
full disk) never leaves a gap before a good record. A write that fails for another reason
(EIO) ends saving for the update, as a failed fdatasync does for an area of version 4
(the kernel may have dropped the pages it could not write, and a later fdatasync would
make records durable behind that gap): ``save`` returns False from then on and the
caller falls back to copy-before-write. Syncs and piece reads run in pool threads:
``close`` never waits for them (the event loop must not wait for a stalled disk): it
makes the area unusable at once (a sync or read from then on raises EBADF) and leaves
the fd to the last thread still using it, which closes it as it returns
(``_using_fd``); so no thread syncs or reads a file that reused the fd. The file is
deleted when its session goes (an unlink with the fd still open is fine).
Rewriting the header in place relies on its 60 bytes being written whole (one sector);
the header only changes before the session row commits a mark, and a restart drops a
save area no update owns. ``limit`` bounds the file; past it ``save`` returns False too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

from deltavol.errors import CorruptFile, IoFailure, SaveRecordLost, os_error
from deltavol.store import fs
from deltavol.store.fs import sync_dir
from deltavol.store.group_commit import GroupCommit

log = logging.getLogger("deltavol.save_area")

MAGIC = b"DVSAVEAR"
VERSION = 5
# magic, version, granularity, size, update id, nonce, boot (see the notes)
HEADER = struct.Struct(">8sIIQQQ16s")
HEADER_V4 = struct.Struct(">8sIIQQQ")  # versions 3 and 4: no boot
HEADER_SIZE = 4096
# the seal of a clean stop (see the notes): magic, nonce, end of the records; then CRC32.
# In the header's block, a sector of its own past the header proper
SEAL = struct.Struct(">8sQQ")
SEAL_MAGIC = b"DVSEALED"
SEAL_AT = 512
# magic, nonce, chunk, start in chunk, length, synced (see the notes), crc32(fields, data)
RECORD = struct.Struct(">IQQIIQI")
RECORD_V3 = struct.Struct(">IQQIII")  # version 3: no synced
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
        # chunk -> [(start, at, length, record)]: data at ``at``, in the record at ``record``
        self.index: dict[int, list[tuple[int, int, int, int]]] = {}
        self._saved: dict[int, int] = {}  # chunk -> bit mask of its saved blocks
        self.nonce = 0
        self._end = HEADER_SIZE
        self._synced = HEADER_SIZE  # the records before this are durable (see the notes)
        self._record = RECORD  # RECORD_V3 for an area of version 3 (``open``)
        self._fd = -1
        # threads using the fd (a sync, reads of pieces): the fd is closed only once there
        # are none, else a thread could sync or read whatever file reused it (``_using_fd``)
        self._fd_users = 0
        self._fd_idle = threading.Lock()
        self._fd_closing = -1  # closed while in use: the last user closes it (``close``)
        # an area of version 3 or 4, reopened: each save is synced (group commit) until
        # its update ends, as that version promised (see the notes)
        self.synced_saves = False
        self._commit = GroupCommit()
        self._now: asyncio.Future[None] | None = None  # the round of a save not synced: done
        self._failed = False  # a write (or a sync) failed: saves return False (copy-before-write)
        self.boot = b""  # the boot the records were written in (``open``)
        # every record whose overwrite may have gone down is here (``open``): see the notes
        self.intact = True
        self.sealed = False  # a clean stop sealed the records (``seal``): no save from then on

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
        self.boot = fs.boot_id()
        head = self._header().ljust(HEADER_SIZE, b"\0")
        try:
            there = fs.exists(self.path)
        except OSError as exc:  # EIO, EACCES: not known to be missing
            raise os_error(exc, f"save area {self.path}") from exc
        if there:  # one sector of header, overwritten in place
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
        """Reopen after a restart, validating the header and every record; damage before
        the records' durable end is ``CorruptFile``, an I/O error is no corruption.
        ``intact`` says whether the records can be trusted to hold every block whose
        overwrite may have gone down (see the notes)."""
        try:
            fd = fs.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptFile(path=self.path, why="save area is missing") from None
        except OSError as exc:
            raise os_error(exc, f"opening save area {self.path}") from exc
        try:
            self._replay(fd)
        except OSError as exc:
            fs.close(fd)
            raise os_error(exc, f"reading save area {self.path}") from exc
        except BaseException:
            fs.close(fd)
            raise
        try:
            if self.sealed:  # saves go on: the seal must not vouch for their records, and
                # they are this boot's (the sealed ones are durable: no boot can lose them)
                self.boot = fs.boot_id()
                fs.pwrite(fd, self._header().ljust(SEAL_AT, b"\0") + bytes(SEAL.size + 4), 0)
            fs.fdatasync(fd)  # what was read from the page cache is trusted from now on
        except OSError as exc:
            # a writeback error: the kernel may have dropped records, and replay took the
            # first hole for a torn tail (the error is reported once: the next start's
            # sync would succeed). Not intact: its update re-marks (see the notes)
            log.error("save area %s: sync failed, its records may be lost: %s", self.path, exc)
            self.intact, self._failed = False, True
        else:
            self._synced = self._end
            self.sealed = False
        self._fd = fd
        return self

    def _header(self) -> bytes:
        """The header (version 5) with its CRC, for this area's nonce and boot."""
        head = HEADER.pack(MAGIC, VERSION, self.granularity, self.size, self.update_id, self.nonce, self.boot)
        return head + struct.pack(">I", zlib.crc32(head))

    async def seal(self) -> bool:
        """At a clean stop: make the records durable and say so in the header, so that the
        update finishes its own mark after a reboot too (see the notes). No save is taken
        from now on. False if there was nothing to seal (an area that syncs its saves, or
        one that failed) or it failed: the boot id then decides at the next start."""
        if self.synced_saves or self._failed or self._fd < 0:
            return False
        self.sealed = True  # before the thread reads where the records end: no put after
        seal = SEAL.pack(SEAL_MAGIC, self.nonce, self._end)
        try:
            await fs.to_thread(self._seal, seal + struct.pack(">I", zlib.crc32(seal)))
        except OSError as exc:
            log.warning("save area %s: not sealed: %s", self.path, exc.strerror or exc)
            return False
        return True

    def _seal(self, seal: bytes) -> None:
        with self._using_fd() as fd:
            fs.fdatasync(fd)  # the records first: the seal says they are durable
            fs.pwrite(fd, seal, SEAL_AT)
            fs.fdatasync(fd)

    def _replay(self, fd: int) -> None:
        raw = fs.pread(fd, HEADER_SIZE, 0)
        if len(raw) < HEADER_V4.size + 4:
            raise CorruptFile(path=self.path, why="header is truncated")
        version = struct.unpack_from(">I", raw, 8)[0]
        header = HEADER if version == VERSION else HEADER_V4
        head = raw[: header.size]
        (crc,) = struct.unpack_from(">I", raw, header.size)
        if head[:8] != MAGIC:
            raise CorruptFile(path=self.path, why="not a deltavol save area (bad magic)")
        if zlib.crc32(head) != crc:
            raise CorruptFile(path=self.path, why="header checksum mismatch")
        if version not in (3, 4, VERSION):
            raise CorruptFile(path=self.path, why=f"unsupported version {version}")
        if version == VERSION:
            _, _, gran, size, update_id, self.nonce, self.boot = HEADER.unpack(head)
            now = fs.boot_id()
            self.intact = bool(now) and self.boot == now  # else the records may be lost
            sealed = _unseal(raw[SEAL_AT : SEAL_AT + SEAL.size + 4], self.nonce)
        else:  # each save was synced before its overwrite: intact after any crash
            _, _, gran, size, update_id, self.nonce = HEADER_V4.unpack(head)
            self.synced_saves, self.intact = True, True
            sealed = None
        self._record = RECORD_V3 if version == 3 else RECORD
        if (gran, size, update_id) != (self.granularity, self.size, self.update_id):
            raise CorruptFile(
                path=self.path,
                why=f"belongs to another update (granularity {gran}, size {size}, update {update_id})",
            )
        end = fs.fstat(fd).st_size
        pos = HEADER_SIZE
        while (record := self._read_record(fd, pos, end)) is not None:
            chunk, start, length, _, _ = record
            self._index(chunk, start, pos + self._record.size, length, pos)
            pos += self._record.size + length
        self._end = pos  # what follows is torn, void or space written ahead: the next save's
        if self._record is RECORD:  # versions 4 and 5
            self._check_torn(fd, pos, end)
        if sealed is not None:  # a clean stop synced the records up to there, and wrote no more
            if sealed != pos:
                raise CorruptFile(
                    path=self.path,
                    why=f"sealed with its records ending at byte {sealed}, but they end at byte {pos}",
                )
            self.intact, self.sealed = True, True

    def _check_torn(self, fd: int, bad: int, end: int) -> None:
        """Raise ``CorruptFile`` if a record of this update after the first bad one, at
        ``bad``, says that the records up to past ``bad`` were durable when it was written."""
        key = struct.pack(">IQ", RECORD_MAGIC, self.nonce)
        at = bad + 1
        while (at := _find(fd, key, at, end)) >= 0:
            record = self._read_record(fd, at, end)
            if record is None:
                at += 1
                continue
            _, _, length, synced, _ = record
            if synced > bad:
                raise CorruptFile(
                    path=self.path,
                    why=f"record at byte {bad} is damaged, but the record at byte {at} was written "
                    f"after every record up to byte {synced} was durable",
                )
            at += self._record.size + length

    def _read_record(self, fd: int, pos: int, end: int) -> tuple[int, int, int, int, bytes] | None:
        """The record at ``pos`` as (chunk, start, length, synced, data), or None if there
        is none: torn, damaged, of another nonce, or zeroes."""
        rec = self._record
        if pos + rec.size > end:
            return None
        head = fs.pread(fd, rec.size, pos)
        if len(head) < rec.size:
            return None
        if rec is RECORD:
            magic, nonce, chunk, start, length, synced, crc = RECORD.unpack(head)
        else:
            magic, nonce, chunk, start, length, crc = RECORD_V3.unpack(head)
            synced = HEADER_SIZE
        if (
            magic != RECORD_MAGIC
            or nonce != self.nonce
            or synced > pos
            or pos + rec.size + length > end
            or not self._whole_blocks(chunk, start, length)
        ):
            return None
        data = fs.pread(fd, length, pos + rec.size)
        if _crc(head[:-4], data) != crc:
            return None
        return chunk, start, length, synced, data

    def close(self) -> None:
        """Close the area at once, without waiting: from now on a sync or a read raises
        EBADF. A thread still using the fd (a read of pieces, a sync on a stalled disk)
        keeps it open, and the last of them closes it as it returns (``_using_fd``): the
        event loop never waits for the disk, and no thread sees the fd reused."""
        with self._fd_idle:  # held only while a thread counts itself in or out
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            if self._fd_users:
                self._fd_closing = fd
                log.info("save area %s: in use by a thread: closed when it is done", self.path)
                return
        fs.close(fd)

    @contextlib.contextmanager
    def _using_fd(self) -> Iterator[int]:
        """The fd, for a thread: ``close`` waits until it is done with it. Syncs and reads
        go on side by side; a closed area raises EBADF."""
        with self._fd_idle:
            if self._fd < 0:
                raise OSError(errno.EBADF, f"save area {self.path} is closed")
            self._fd_users += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._fd_idle:
                self._fd_users -= 1
                closing = -1
                if not self._fd_users:
                    closing, self._fd_closing = self._fd_closing, -1
            if closing >= 0:  # ``close`` came meanwhile and left the fd to the last user
                with contextlib.suppress(OSError):
                    fs.close(closing)

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
        widened to whole blocks (clipped to the chunk's end). Asked several times on every
        change: the runs come from the blocks' bit masks, not block by block."""
        lo, hi = start // BLOCK, -(-end // BLOCK)
        if lo >= hi:
            return []
        todo = ((1 << hi) - 1) ^ ((1 << lo) - 1)
        saved = self._saved.get(chunk, 0)
        if saved:
            todo &= ~saved
            if not todo:
                return []
        limit = self._chunk_end(chunk)
        runs: list[tuple[int, int]] = []
        while todo:
            lo = (todo & -todo).bit_length() - 1  # the first block of the next run
            rest = todo >> lo
            n = (~rest & (rest + 1)).bit_length() - 1  # how many blocks in a row from there
            runs.append((lo * BLOCK, min((lo + n) * BLOCK, limit)))
            todo ^= ((1 << n) - 1) << lo
        return runs

    async def save(self, chunk: int, start: int, data: bytes) -> bool:
        """Keep ``data`` as the old contents of ``chunk`` from ``start`` (whole blocks:
        see ``missing``; a block saved before keeps its first record): written, not
        synced (see the notes); False if the area is full or failed."""
        done = self.put(chunk, start, data)
        if done is None:
            return False
        with contextlib.suppress(Exception):  # _settle has seen it
            await self.wait(done)
        return not self._failed  # never turns back: not failed now, so the record is indexed

    def wait(self, done: asyncio.Future[None]) -> asyncio.Future[None]:
        """Await this for a round ``put`` returned (see ``GroupCommit.wait``)."""
        if done is self._now:  # a save not synced: nothing to wait for
            return done
        return self._commit.wait(done)

    @property
    def failed(self) -> bool:
        return self._failed

    def room(self, need: int) -> bool:
        """True if records of ``need`` bytes (headers included) fit and saving goes on."""
        return not self._failed and not self.sealed and self.used + need <= self.limit

    def put(self, chunk: int, start: int, data: bytes) -> asyncio.Future[None] | None:
        """The first half of ``save``: the record goes into the page cache at once, at the
        end of the records (on the loop: one after another, so a failed write leaves no
        gap before a later record), and is indexed: the change may go down now. Returns a
        round that is done already, or None if the area is full or failed.

        An area that syncs its saves (version 3 or 4, reopened) returns the round that
        makes the record durable instead (shared by the saves of a burst:
        ``GroupCommit``); the round itself settles the record, so a waiter cancelled
        meanwhile leaves no record that is durable but unknown, and no failed round
        unnoticed.
        """
        if not self._whole_blocks(chunk, start, len(data)):
            raise ValueError(f"save of chunk {chunk} at {start}+{len(data)}: not whole blocks")
        need = self._record.size + len(data)
        if not self.room(need):
            return None
        pos = self._end
        if self._record is RECORD:
            fields = RECORD.pack(RECORD_MAGIC, self.nonce, chunk, start, len(data), self._synced, 0)[:-4]
        else:  # an area of version 3, reopened (see the notes)
            fields = RECORD_V3.pack(RECORD_MAGIC, self.nonce, chunk, start, len(data), 0)[:-4]
        record = fields + struct.pack(">I", _crc(fields, data)) + bytes(data)
        try:
            self._put(record, pos)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.limit = self.used  # the data dir is full: as good as a full save area
            else:  # as a failed sync: what it left in the page cache is not to be trusted
                log.error("save area %s: write failed, copy-before-write from now: %s", self.path, exc)
                self._failed = True
            return None
        self._end = pos + need
        at = pos + self._record.size
        if not self.synced_saves:
            if self._saved.get(chunk, 0) & _blocks(start, start + len(data)):
                self._index(chunk, start, at, len(data), pos)
            else:  # no block of it saved before (the common case): all of it, as ``_index``
                self._add(chunk, start, at, len(data), pos)
            if self._now is None:
                self._now = asyncio.get_running_loop().create_future()
                self._now.set_result(None)
            return self._now
        done = self._commit.round(self)
        done.add_done_callback(lambda f: self._settle(f, chunk, start, at, len(data)))
        return done

    def _settle(self, done: asyncio.Future[None], chunk: int, start: int, at: int, length: int) -> None:
        if not self._failed and not done.cancelled() and done.exception() is None:
            self._index(chunk, start, at, length, at - self._record.size)
            self._synced = max(self._synced, at + length)  # rounds succeed in order
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
        """For ``GroupCommit`` (an area that syncs its saves): records are written as they
        are saved."""

    def sync(self) -> None:
        with self._using_fd() as fd:  # closed meanwhile, the fd may be another file's by now
            fs.fdatasync(fd)

    @property
    def unsynced(self) -> bool:
        """True if records were written since the area was last known durable."""
        return self._end > self._synced

    async def durable(self) -> None:
        """Make every record written so far durable: one round of the area's group commit
        (see the notes: before a checkpoint records as done chunks copied from records,
        and before the update's end). A failure raises and ends saving: the kernel may
        have dropped records, and a copy may have read them back wrong."""
        if self._failed:
            raise IoFailure(what=f"save area {self.path}", why="an earlier write or sync failed")
        end = self._end
        if end <= self._synced:
            return
        try:
            await self._commit.wait(self._commit.round(self))
        except OSError as exc:
            self._failed = True
            raise os_error(exc, f"save area {self.path}") from exc
        self._synced = max(self._synced, end)

    async def pieces(self, chunk: int) -> list[tuple[int, bytes]]:
        """The saved old contents of ``chunk``: ``(start in chunk, data)`` pieces. A record
        that does not read back as written (its CRC: a page the kernel dropped after a
        writeback error reads as what the disk holds) raises ``SaveRecordLost``."""
        return await fs.to_thread(self._read_pieces, self.index.get(chunk, []), chunk)

    def _read_pieces(self, where: list[tuple[int, int, int, int]], chunk: int) -> list[tuple[int, bytes]]:
        pieces = []
        records: dict[int, bytes] = {}  # record -> its data, read and checked once
        with self._using_fd() as fd:
            for start, at, length, rec in where:
                data = records.get(rec)
                if data is None:
                    record = self._read_record(fd, rec, self._end)
                    if record is None or record[0] != chunk:
                        raise SaveRecordLost(path=self.path, chunk=chunk, at=rec)
                    data = records[rec] = record[4]
                lo = at - rec - self._record.size
                piece = data[lo : lo + length]
                if len(piece) != length:
                    raise SaveRecordLost(path=self.path, chunk=chunk, at=rec)
                pieces.append((start, piece))
        return pieces

    def _chunk_end(self, chunk: int) -> int:
        return min(self.granularity, self.size - chunk * self.granularity)

    def _whole_blocks(self, chunk: int, start: int, length: int) -> bool:
        end = start + length
        if start % BLOCK or length <= 0 or chunk < 0 or end > self._chunk_end(chunk):
            return False
        return not end % BLOCK or end == self._chunk_end(chunk)

    def _index(self, chunk: int, start: int, at: int, length: int, rec: int) -> None:
        """Index a record, for its blocks no earlier record holds. A block saved twice: two
        changes raced to it (see ``Protector._save_at_once``), and the later one may have read
        it after the first change went down; or a save never returned, its overwrite never
        happened. Either way the first record holds the contents as of the mark."""
        for lo, hi in self.missing(chunk, start, start + length):
            self._add(chunk, lo, at + lo - start, hi - lo, rec)

    def _add(self, chunk: int, start: int, at: int, length: int, rec: int) -> None:
        self._saved[chunk] = self._saved.get(chunk, 0) | _blocks(start, start + length)
        self.index.setdefault(chunk, []).append((start, at, length, rec))


def _unseal(raw: bytes, nonce: int) -> int | None:
    """Where the records end by the seal ``raw`` (see ``seal``), or None if it is no seal
    of these records."""
    if len(raw) < SEAL.size + 4:
        return None
    magic, sealed_nonce, end = SEAL.unpack_from(raw)
    (crc,) = struct.unpack_from(">I", raw, SEAL.size)
    if magic != SEAL_MAGIC or sealed_nonce != nonce or zlib.crc32(raw[: SEAL.size]) != crc:
        return None
    return int(end)


def _blocks(start: int, end: int) -> int:
    """The bit mask of the blocks [start, end) touches."""
    return ((1 << -(-end // BLOCK)) - 1) ^ ((1 << start // BLOCK) - 1)


def _crc(fields: bytes, data: bytes) -> int:
    """CRC32 of a record's fields (all but the CRC) and its data."""
    return zlib.crc32(data, zlib.crc32(fields))


def _find(fd: int, key: bytes, start: int, end: int) -> int:
    """The offset of the first ``key`` in the file at or after ``start`` (before ``end``), or -1."""
    step = 1 << 20
    while start + len(key) <= end:
        buf = fs.pread(fd, min(step, end - start), start)
        if len(buf) < len(key):
            return -1
        i = buf.find(key)
        if i >= 0:
            return start + i
        start += len(buf) - len(key) + 1
    return -1
