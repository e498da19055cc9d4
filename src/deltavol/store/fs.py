"""One seam for durable I/O: every write, sync, rename and unlink of volume, bitmap and
save-area files, and every hand-off of such I/O to a thread, goes through here.

Design notes
------------
The server's crash safety is an ordering of writes, syncs and renames. To test that
ordering it must be possible to run the same server code on a disk that records every
write and sync per file and can lose power (``tests/sim``), and to decide when each
piece of I/O completes. So the modules on the durable paths (``bitmap/persist.py``,
``copy/save_area.py``, ``backend/file.py``, ``store/group_commit.py``, ``volumes.py``)
call the functions of this module, not ``os``, and never start a thread themselves:

* file calls (``open``, ``pwrite``, ``fdatasync``, ``replace``, ``unlink``, ...) take
  and return what ``os`` does (file descriptors are ints, errors are ``OSError``);
* ``to_thread`` / ``run_in_pool`` / ``submit`` hand blocking work to a thread; a
  simulation runs it on the loop at a moment of its choosing instead.

``RealFS`` is the real implementation: the ``os`` calls, looked up at each call (tests
that wrap ``os.fdatasync`` still see every call). ``use`` installs another one; the
server never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, Protocol, TypeVar

from deltavol.store import fsio

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def _checked(rc: int) -> None:
    """A libc call's result: -1 raises OSError from errno."""
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileSystem(Protocol):
    def open(self, path: str | Path, flags: int, mode: int = 0o777) -> int: ...
    def close(self, fd: int) -> None: ...
    def pread(self, fd: int, length: int, offset: int) -> bytes: ...
    def preadv(self, fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int: ...
    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int: ...
    def copy_file_range(self, src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int: ...
    def fsync(self, fd: int) -> None: ...
    def fdatasync(self, fd: int) -> None: ...
    def ftruncate(self, fd: int, length: int) -> None: ...
    def fstat(self, fd: int) -> os.stat_result: ...
    def fstatvfs(self, fd: int) -> os.statvfs_result: ...
    def lseek(self, fd: int, pos: int, how: int) -> int: ...
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None: ...
    def start_writeback(self, fd: int) -> None: ...
    def posix_fadvise(self, fd: int, offset: int, length: int, advice: int) -> None: ...
    def replace(self, src: str | Path, dst: str | Path) -> None: ...
    def rename(self, src: str | Path, dst: str | Path) -> None: ...
    def unlink(self, path: str | Path, missing_ok: bool = False) -> None: ...
    def exists(self, path: str | Path) -> bool: ...
    def same_file(self, fd: int, path: str | Path) -> bool: ...
    def read_bytes(self, path: str | Path) -> bytes: ...
    def sync_dir(self, path: Path) -> None: ...
    def boot_id(self) -> bytes: ...
    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T: ...
    def run_in_pool(self, pool: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]: ...
    def submit(self, pool: Executor, fn: Callable[..., Any], *args: Any) -> Future[Any] | None: ...


class RealFS:
    """The operating system's file calls and threads."""

    def open(self, path: str | Path, flags: int, mode: int = 0o777) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def preadv(self, fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        return os.preadv(fd, buffers, offset, flags)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def copy_file_range(self, src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
        return os.copy_file_range(src, dst, count, src_offset, dst_offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def fstatvfs(self, fd: int) -> os.statvfs_result:
        return os.fstatvfs(fd)

    def lseek(self, fd: int, pos: int, how: int) -> int:
        return os.lseek(fd, pos, how)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        _checked(_libc.fallocate(fd, mode, offset, length))

    def start_writeback(self, fd: int) -> None:
        """sync_file_range(SYNC_FILE_RANGE_WRITE) over the whole file (not in Python's os)."""
        _checked(_libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE))

    def posix_fadvise(self, fd: int, offset: int, length: int, advice: int) -> None:
        os.posix_fadvise(fd, offset, length, advice)

    def replace(self, src: str | Path, dst: str | Path) -> None:
        os.replace(src, dst)

    def rename(self, src: str | Path, dst: str | Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: str | Path, missing_ok: bool = False) -> None:
        Path(path).unlink(missing_ok=missing_ok)

    def exists(self, path: str | Path) -> bool:
        """False only if there is no such file; any other error of the stat (EIO,
        EACCES) is raised: it says nothing about the file being there."""
        try:
            os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def same_file(self, fd: int, path: str | Path) -> bool:
        """True if ``path`` names the inode ``fd`` holds (False if it names none)."""
        held = os.fstat(fd)
        try:
            named = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    def read_bytes(self, path: str | Path) -> bytes:
        return Path(path).read_bytes()

    def sync_dir(self, path: Path) -> None:
        fsio.sync_dir(path)

    def boot_id(self) -> bytes:
        return fsio.boot_id()

    async def to_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def run_in_pool(self, pool: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def submit(self, pool: Executor, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        return pool.submit(fn, *args)


_current: FileSystem = RealFS()


def current() -> FileSystem:
    return _current


def use(fs: FileSystem) -> FileSystem:
    """Install ``fs`` for every later call; returns the one it replaces."""
    global _current
    old, _current = _current, fs
    return old


# The calls, forwarded to the installed file system at each call.
def open(path: str | Path, flags: int, mode: int = 0o777) -> int:
    return _current.open(path, flags, mode)


def close(fd: int) -> None:
    _current.close(fd)


def pread(fd: int, length: int, offset: int) -> bytes:
    return _current.pread(fd, length, offset)


def preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
    return _current.preadv(fd, buffers, offset, flags)


def pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    return _current.pwrite(fd, data, offset)


def copy_file_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    return _current.copy_file_range(src, dst, count, src_offset, dst_offset)


def fsync(fd: int) -> None:
    _current.fsync(fd)


def fdatasync(fd: int) -> None:
    _current.fdatasync(fd)


def ftruncate(fd: int, length: int) -> None:
    _current.ftruncate(fd, length)


def fstat(fd: int) -> os.stat_result:
    return _current.fstat(fd)


def fstatvfs(fd: int) -> os.statvfs_result:
    return _current.fstatvfs(fd)


def lseek(fd: int, pos: int, how: int) -> int:
    return _current.lseek(fd, pos, how)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _current.fallocate(fd, mode, offset, length)


def start_writeback(fd: int) -> None:
    _current.start_writeback(fd)


def posix_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
    _current.posix_fadvise(fd, offset, length, advice)


def replace(src: str | Path, dst: str | Path) -> None:
    _current.replace(src, dst)


def rename(src: str | Path, dst: str | Path) -> None:
    _current.rename(src, dst)


def unlink(path: str | Path, missing_ok: bool = False) -> None:
    _current.unlink(path, missing_ok)


def exists(path: str | Path) -> bool:
    return _current.exists(path)


def same_file(fd: int, path: str | Path) -> bool:
    return _current.same_file(fd, path)


def read_bytes(path: str | Path) -> bytes:
    return _current.read_bytes(path)


def sync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    _current.sync_dir(path)


def boot_id() -> bytes:
    """This boot of the machine (see ``fsio.boot_id``)."""
    return _current.boot_id()


def replace_atomic(
    path: Path,
    parts: Iterable[tuple[int, bytes | memoryview]],
    *,
    tmp: Path | None = None,
    keep_open: bool = False,
    adopt: Callable[[int], None] | None = None,
    write: Callable[[int, bytes | memoryview, int], None] | None = None,
) -> int:
    """Replace ``path`` durably with a file of ``parts`` (offset, data): a tmp file in the
    same directory is written and fsynced, renamed over ``path``, and the directory is
    fsynced. A crash leaves the old file or the new one, whole. On failure the tmp file
    is removed and the ``OSError`` raised. Returns the new file's descriptor (read-write)
    with ``keep_open``, else -1. ``adopt``, if given, takes that descriptor as the new
    file replaces the old one, even if the directory sync then fails: a caller keeping
    the file open never keeps a replaced inode (an ``open`` after the replace may fail).
    ``write(fd, data, offset)`` writes a part whole (default: ``pwrite`` until done)."""
    tmp = tmp if tmp is not None else path.with_name(path.name + ".tmp")
    try:
        fd = open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for offset, data in parts:
                (write or _write_whole)(fd, data, offset)
            fsync(fd)
            replace(tmp, path)
            if adopt is not None:
                fd, new = -1, fd
                adopt(new)
            sync_dir(path.parent)
        except BaseException:
            if fd >= 0:
                close(fd)
            raise
    except OSError:
        with contextlib.suppress(OSError):
            unlink(tmp, missing_ok=True)
        raise
    if keep_open or fd < 0:  # kept, or adopted
        return fd
    close(fd)
    return -1


def _write_whole(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread`` for blocking file I/O."""
    return await _current.to_thread(fn, *args)


def run_in_pool(pool: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``loop.run_in_executor(pool, fn, *args)`` for blocking file I/O."""
    return _current.run_in_pool(pool, fn, *args)


def submit(pool: Executor, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
    """``pool.submit(fn, *args)`` for blocking file I/O whose end ``fn`` reports itself."""
    return _current.submit(pool, fn, *args)
