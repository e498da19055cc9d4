"""Bitmap files, crash-safe.

Design notes
------------
A file is a 4096-byte header — magic, format version, granularity, volume size, number
of bits, generation, kind (tracking or transfer), CRC32 of all that — then the bit bytes.
``load`` checks every field and the length and names the file and the exact problem:
a damaged bitmap is never read as an empty one.

Two ways of writing:

* ``save_atomic``: the whole bitmap to a tmp file in the same directory, fsync,
  ``os.replace``, fsync of the directory. A crash leaves either the old or the new file.
* ``TrackingFile.write_bits`` + ``round``: the write-ahead path under every acknowledged
  NBD write. Only the bit bytes that cover newly set chunks are written in place, then
  fdatasync — by group commit (``store/group_commit.py``): the writers of one burst share
  a round, which writes the pages of bit bytes they changed once and syncs them, so many
  concurrent first-writes, on every session of a source, cost one write and one
  fdatasync per file. Bits are never cleared in place; clearing
  happens in memory and reaches the disk with ``rewrite`` (atomic) at a checkpoint, so
  the file is always a superset of the acknowledged changes.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib
from pathlib import Path

from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import CorruptFile, os_error
from deltavol.store.fsio import sync_dir
from deltavol.store.group_commit import GroupCommit

MAGIC = b"DVBITMAP"
VERSION = 1
HEADER_SIZE = 4096
_PAGE = 4096  # bytes of bits a round writes for a chunk: the page that holds its bit
_PAGE_BITS = (_PAGE * 8).bit_length() - 1  # chunk >> _PAGE_BITS: its page
_HEADER = struct.Struct(">8sIIQQQB")  # magic, version, granularity, size, nbits, generation, kind
KIND_TRACKING = 1
KIND_TRANSFER = 2
_KINDS = {KIND_TRACKING: "tracking", KIND_TRANSFER: "transfer"}


def _header(bitmap: Bitmap, generation: int, kind: int) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, bitmap.granularity, bitmap.size, bitmap.nbits, generation, kind)
    return (head + struct.pack(">I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def save_atomic(path: Path, bitmap: Bitmap, generation: int, kind: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _header(bitmap, generation, kind), 0)
            with bitmap.view() as bits:  # no copy: a 16 TiB volume's bitmap is 32 MiB
                _write_all(fd, bits, HEADER_SIZE)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        sync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, f"bitmap {path}") from exc


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_bits_in_place(path: Path, bitmap: Bitmap) -> None:
    """Overwrite the bit bytes of an existing file with ``bitmap`` and make them durable.

    Only for bits going from set to clear (checkpoints of a transfer bitmap): it needs
    no new space, and a torn write leaves every byte either old (a superset) or new.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with bitmap.view() as bits:
                _write_all(fd, bits, HEADER_SIZE)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise os_error(exc, f"bitmap {path}") from exc


def load(path: Path, kind: int, granularity: int, size: int) -> tuple[Bitmap, int]:
    """Read and validate a bitmap file; returns (bitmap, generation)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CorruptFile(path=path, why=f"{_KINDS.get(kind, 'bitmap')} bitmap file is missing") from None
    except OSError as exc:
        raise CorruptFile(path=path, why=exc.strerror or str(exc)) from exc
    if len(raw) < HEADER_SIZE:
        raise CorruptFile(path=path, why=f"header truncated ({len(raw)} bytes)")
    head = raw[: _HEADER.size]
    (crc,) = struct.unpack_from(">I", raw, _HEADER.size)
    magic, version, gran, vsize, nbits, generation, got_kind = _HEADER.unpack(head)
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
    bitmap = Bitmap(size, granularity)
    expected = HEADER_SIZE + (bitmap.nbits + 7) // 8
    if nbits != bitmap.nbits or len(raw) != expected:
        raise CorruptFile(path=path, why=f"length {len(raw)} bytes, expected {expected} (truncated?)")
    if nbits % 8 and raw[-1] >> (nbits % 8):
        raise CorruptFile(path=path, why=f"bits set past the end of the volume (chunk {nbits} or later)")
    return Bitmap.from_bytes(size, granularity, memoryview(raw)[HEADER_SIZE:]), generation


class TrackingFile:
    """The tracking bitmap's file, written ahead of every change (see the module notes)."""

    def __init__(self, path: Path, commit: GroupCommit | None = None) -> None:
        self.path = path
        self.commit = commit or GroupCommit()  # shared by the sessions of one source
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._fd_lock = threading.Lock()
        self._bitmap: Bitmap | None = None
        self._pending: set[int] = set()  # pages of bit bytes to write at the next round

    def write_bits(self, bitmap: Bitmap, chunks: list[int]) -> None:
        """Have the next round write the bit bytes of ``chunks`` (sorted, already set in
        ``bitmap``) to the file."""
        self._bitmap = bitmap
        pending = self._pending
        for page in range(chunks[0] >> _PAGE_BITS, (chunks[-1] >> _PAGE_BITS) + 1):
            pending.add(page)

    def write_out(self) -> None:
        """Write the pending pages of bit bytes as they are now (a round begins: on the loop)."""
        pages, self._pending = sorted(self._pending), set()
        if not pages or self._fd < 0 or self._bitmap is None:
            return
        runs: list[list[int]] = []
        for page in pages:  # adjacent pages in one write
            if runs and runs[-1][1] == page:
                runs[-1][1] = page + 1
            else:
                runs.append([page, page + 1])
        try:
            with self._bitmap.view() as bits:
                for first, end in runs:
                    lo = first * _PAGE
                    os.pwrite(self._fd, bits[lo : end * _PAGE], HEADER_SIZE + lo)  # page cache
        except OSError as exc:
            raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def sync(self) -> None:
        with self._fd_lock:  # close() and rewrite() must not swap the fd under a round's thread
            if self._fd < 0:  # closed (its session is gone): nothing left to make durable
                return
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise os_error(exc, f"tracking bitmap {self.path}") from exc

    def round(self) -> asyncio.Future[None]:
        """The group-commit round that makes the bits written so far durable."""
        return self.commit.round(self)

    async def persist(self, bitmap: Bitmap, chunks: list[int]) -> None:
        """Make the bits of ``chunks`` (already set in ``bitmap``) durable."""
        self.write_bits(bitmap, chunks)
        await asyncio.shield(self.round())

    def rewrite(self, bitmap: Bitmap, generation: int) -> None:
        """Replace the file atomically with ``bitmap`` (this is where cleared bits land)."""
        save_atomic(self.path, bitmap, generation, KIND_TRACKING)
        self._pending.clear()  # every bit is in the new file
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        with self._fd_lock:
            old, self._fd = self._fd, fd
            os.close(old)

    def close(self) -> None:
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
