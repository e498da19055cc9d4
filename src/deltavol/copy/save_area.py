"""The save area: old contents of source chunks overwritten while an update still has to
copy them (copy-on-first-write).

Design notes
------------
One append-only file per session update: a 4096-byte header (magic, version, granularity,
volume size, update id, CRC32) and then records, each a 24-byte record header (magic,
chunk number, length, CRC32 of the data) followed by the data. ``save`` returns only when
its record is durable (pwrite + fdatasync), and the caller issues the overwrite only
after that: so after a crash every chunk whose source was overwritten has a complete
record. A torn record at the tail belongs to a save that never returned, whose overwrite
never happened; ``open`` drops it and truncates the file there.

A chunk is saved at most once per update (its first write). Records are appended one at a
time, so a failed append (a full disk) never leaves a gap before a good record. The file
is deleted when the update finishes or is cancelled. ``limit`` bounds the file; past it ``save`` returns False
and the caller falls back to copy-before-write.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from pathlib import Path

from deltavol.errors import CorruptFile, os_error
from deltavol.store.fsio import sync_dir

MAGIC = b"DVSAVEAR"
VERSION = 1
HEADER = struct.Struct(">8sIIQQQ")  # magic, version, granularity, size, update id, reserved
HEADER_SIZE = 4096
RECORD = struct.Struct(">IQII")  # magic, chunk, length, crc32(data)
RECORD_MAGIC = 0x44565352  # "DVSR"


class SaveArea:
    def __init__(self, path: Path, granularity: int, size: int, update_id: int, limit: int) -> None:
        self.path = path
        self.granularity = granularity
        self.size = size
        self.update_id = update_id
        self.limit = limit
        self.index: dict[int, tuple[int, int]] = {}  # chunk -> (data offset, length)
        self._end = HEADER_SIZE
        self._fd = -1
        self._append = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------
    def create(self) -> SaveArea:
        head = HEADER.pack(MAGIC, VERSION, self.granularity, self.size, self.update_id, 0)
        head += struct.pack(">I", zlib.crc32(head))
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, head.ljust(HEADER_SIZE, b"\0"), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise os_error(exc, f"creating save area {self.path}") from exc
        os.replace(tmp, self.path)
        sync_dir(self.path.parent)
        self._fd = fd
        return self

    def open(self) -> SaveArea:
        """Reopen after a restart, validating the header and every record."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptFile(path=self.path, why="save area is missing") from None
        self._fd = fd
        raw = os.pread(fd, HEADER_SIZE, 0)
        if len(raw) < HEADER.size + 4:
            raise CorruptFile(path=self.path, why="header is truncated")
        head = raw[: HEADER.size]
        (crc,) = struct.unpack_from(">I", raw, HEADER.size)
        magic, version, gran, size, update_id, _ = HEADER.unpack(head)
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
        end = os.fstat(fd).st_size
        pos = HEADER_SIZE
        while pos + RECORD.size <= end:
            magic2, chunk, length, dcrc = RECORD.unpack(os.pread(fd, RECORD.size, pos))
            if magic2 != RECORD_MAGIC or pos + RECORD.size + length > end:
                break
            data = os.pread(fd, length, pos + RECORD.size)
            if zlib.crc32(data) != dcrc:
                break
            self.index[chunk] = (pos + RECORD.size, length)
            pos += RECORD.size + length
        if pos != end:
            os.ftruncate(fd, pos)  # a torn tail: its save never returned
        self._end = pos
        return self

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def delete(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    # --- data ---------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return self._end - HEADER_SIZE

    def __contains__(self, chunk: int) -> bool:
        return chunk in self.index

    async def save(self, chunk: int, data: bytes) -> bool:
        """Durably keep ``data`` as chunk's old contents; False if the area is full."""
        if chunk in self.index:
            return True
        async with self._append:  # one record at a time: a failed one never leaves a gap
            if chunk in self.index:
                return True
            need = RECORD.size + len(data)
            if self.used + need > self.limit:
                return False
            pos = self._end
            record = RECORD.pack(RECORD_MAGIC, chunk, len(data), zlib.crc32(data)) + bytes(data)
            try:
                await asyncio.to_thread(self._write, record, pos)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise os_error(exc, f"save area {self.path}") from exc
                self.limit = self.used  # the data dir is full: as good as a full save area
                return False
            self._end = pos + need
            self.index[chunk] = (pos + RECORD.size, len(data))
            return True

    def _write(self, record: bytes, pos: int) -> None:
        if os.pwrite(self._fd, record, pos) != len(record):  # a full disk can write short
            raise OSError(errno.ENOSPC, "short write to the save area")
        os.fdatasync(self._fd)

    async def load(self, chunk: int) -> bytes:
        offset, length = self.index[chunk]
        data = await asyncio.to_thread(os.pread, self._fd, length, offset)
        if len(data) != length:
            raise CorruptFile(path=self.path, why=f"record of chunk {chunk} is short")
        return data
