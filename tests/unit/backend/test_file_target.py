"""What a copy does to a volume as its target (``LocalTarget``) runs in the volume's own
target threads, never in the pool that every volume's reads, writes and flushes share;
``close`` waits for them as for any thread that uses the file, then ends them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deltavol.backend.file import FileBackend
from deltavol.copy.targets import LocalTarget
from deltavol.errors import DeltavolError
from deltavol.store import fs

MiB = 1 << 20


class Recorded(fs.RealFS):
    """Real file calls; which thread made each that changes a file, by the fd it names."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []  # (call, fd, thread name)
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def _note(self, call: str, fd: int) -> None:
        self.calls.append((call, fd, threading.current_thread().name))

    def copy_file_range(self, src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
        self._note("copy_file_range", dst)
        self.entered.set()
        assert self.release.wait(10)
        return super().copy_file_range(src, dst, count, src_offset, dst_offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self._note("pwrite", fd)
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._note("fsync", fd)
        super().fsync(fd)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._note("fallocate", fd)
        super().fallocate(fd, mode, offset, length)

    def start_writeback(self, fd: int) -> None:
        self._note("start_writeback", fd)
        super().start_writeback(fd)


@pytest.fixture
async def volumes(tmp_path: Path) -> AsyncIterator[tuple[FileBackend, FileBackend, Recorded]]:
    (tmp_path / "src").write_bytes(b"S" * MiB)
    (tmp_path / "dst").write_bytes(bytes(MiB))
    src, dst = FileBackend("src", str(tmp_path / "src")), FileBackend("dst", str(tmp_path / "dst"))
    recorded = Recorded()
    real = fs.use(recorded)
    try:
        yield src, dst, recorded
    finally:
        recorded.release.set()
        fs.use(real)
        await src.close()
        await dst.close()


async def test_a_copy_writes_its_target_in_the_target_threads_only(
    volumes: tuple[FileBackend, FileBackend, Recorded],
) -> None:
    src, dst, recorded = volumes
    target = LocalTarget(dst)
    assert await target.copy_spans(src, [(0, 64 << 10)]) == 64 << 10
    await target.zero_spans([(128 << 10, 64 << 10)])
    await target.zero(256 << 10, 4096)
    await dst.pwrite(512 << 10, b"P" * (256 << 10), as_target=True)  # too large to go inline
    await dst.start_writeback()
    await target.flush()
    await src.flush()  # the source's flush: in the shared pool
    await src.pwrite(0, b"Q" * (256 << 10))
    mine = [(call, name) for call, fd, name in recorded.calls if fd == dst._fd]
    calls = {"copy_file_range", "fallocate", "pwrite", "start_writeback", "fsync"}
    assert {call for call, _ in mine} >= calls
    assert all(name.startswith("deltavol-target") for _, name in mine), mine
    theirs = [name for _, fd, name in recorded.calls if fd == src._fd]
    assert theirs and all(name.startswith("deltavol-io") for name in theirs), theirs
    assert Path(dst.path).read_bytes()[: 64 << 10] == b"S" * (64 << 10)


async def test_the_sources_pool_is_free_while_every_target_thread_stalls(
    volumes: tuple[FileBackend, FileBackend, Recorded],
) -> None:
    """A copy's 16 requests in flight, all stalled in the target's disk: the source's
    reads and flushes in the pool still complete."""
    src, dst, recorded = volumes
    recorded.release.clear()
    copies = [asyncio.ensure_future(dst.copy_from(src, i * 4096, 4096)) for i in range(16)]
    async with asyncio.timeout(10):
        while sum(call == "copy_file_range" for call, _, _ in recorded.calls) < 16:
            await asyncio.sleep(0.001)
    async with asyncio.timeout(5):
        await src.flush()
        data = await src._run("read", src._pread_full, 0, 4096)  # a read the page cache missed
    assert data == b"S" * 4096
    assert not any(c.done() for c in copies)
    recorded.release.set()
    await asyncio.wait_for(asyncio.gather(*copies), 10)
    assert Path(dst.path).read_bytes()[: 16 * 4096] == b"S" * (16 * 4096)


async def test_close_waits_for_a_target_thread_then_ends_them_and_refuses_more(
    volumes: tuple[FileBackend, FileBackend, Recorded],
) -> None:
    src, dst, recorded = volumes
    recorded.release.clear()
    recorded.entered.clear()
    copy = asyncio.ensure_future(dst.copy_from(src, 0, 4096))
    assert await asyncio.to_thread(recorded.entered.wait, 10)  # in the copy, with the fd
    pool = dst._target_pool
    assert pool is not None
    closing = asyncio.ensure_future(dst.close())
    async with asyncio.timeout(10):
        while dst._fd >= 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert not closing.done(), "the volume closed while a target thread used its file"
    recorded.release.set()
    await asyncio.wait_for(copy, 10)
    await asyncio.wait_for(closing, 10)
    assert not any(t.is_alive() for t in pool._threads), "a target thread outlived close"
    with pytest.raises(DeltavolError, match="closed"):
        await dst.zero_spans([(8192, 4096)])
    with pytest.raises(DeltavolError, match="closed"):
        await dst.flush(as_target=True)
    assert Path(dst.path).read_bytes()[:4096] == b"S" * 4096
