"""A copy in the kernel to a local volume whose disk stalls: the protected writes to the
chunks it copies must not stall with it, and the copy must still be the mark's image.

The stall is the target's ``copy_file_range`` itself (the seam of ``store/fs.py``), on
real files: the thread that copies a batch blocks in it, half-way through the batch,
for as long as the test likes.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from deltavol.copy.engine import INFLIGHT
from deltavol.service import Service
from deltavol.sessions.protector import ChunkLocks
from deltavol.sessions.states import Phase, State
from deltavol.store import fs
from tests.fakes import until
from tests.unit.sessions.test_kernel_copy import dst_sha, sha, svc  # noqa: F401  (fixture)
from tests.unit.sessions.test_operations import SIZE, G, MiB, consistent_session

WRITE_BOUND = 5.0  # seconds a protected write may take while the target stalls


class StalledTarget:
    """Make the target's ``copy_file_range`` at ``offset`` block until ``release``; count
    the bytes the kernel copies to the target, per offset."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dst_fd: int, offset: int) -> None:
        self.stalled, self.release = threading.Event(), threading.Event()
        self.copied: list[int] = []  # offsets of the target's copy_file_range calls
        real = fs._current.copy_file_range

        def copy_file_range(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
            if dst == dst_fd:
                self.copied.append(dst_offset)
                if dst_offset == offset and not self.stalled.is_set():
                    self.stalled.set()
                    self.release.wait(timeout=60)  # the disk stalls
            return real(src, dst, count, src_offset, dst_offset)

        monkeypatch.setattr(fs._current, "copy_file_range", copy_file_range)


async def bounded(op: Any, what: str) -> None:
    task = asyncio.ensure_future(op)
    await asyncio.wait({task}, timeout=WRITE_BOUND)
    assert task.done(), f"{what} waited for the stalled target"
    task.result()


async def marked_image(service: Service) -> bytes:
    return await service.volumes.get("src").backend.pread(0, SIZE)


@pytest.mark.parametrize("rate", [None, 1 << 30], ids=["batch", "throttled"])
async def test_protected_writes_do_not_wait_for_a_stalled_kernel_copy(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    rate: int | None,
) -> None:
    """Chunks 2, 4, 6 and 8 owed, in one batch (or, throttled, one request each); the
    target stalls on chunk 6: chunk 2 and 4 are copied, 6 and 8 not yet. Writes to 4, 6
    and a trim of 8 complete while it stalls; once it goes on, the target is exactly the
    source at the mark, and the next update brings the writes over."""
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    for c in (2, 4, 6, 8):
        await src.export.pwrite(c * G, bytes([c]) * G)
    stall = StalledTarget(monkeypatch, svc.volumes.get("dst").backend._fd, 6 * G)
    await s.start_update(False, max_rate=rate)
    mark = await marked_image(svc)
    await until(stall.stalled.is_set, "the copy to stall")
    assert s.protector.locks.any_held([6]), "the copy of chunk 6 runs in the kernel"
    await bounded(src.export.pwrite(4 * G + 4096, b"C" * 8192), "a write to a chunk copied before the stall")
    await bounded(src.export.pwrite(6 * G, b"D" * 4096), "a write to the stalled chunk")
    await bounded(src.export.trim(8 * G, G), "a trim of a chunk not copied yet")
    assert s.update is not None and s.update.phase is Phase.PROTECTING  # the mark holds
    stall.release.set()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert await dst_sha(svc, 0, SIZE) == sha(mark), "the target is not the source at the mark"
    assert s.update is not None and s.update.cofw_saved_bytes > 0  # the writes saved the old blocks
    assert s.update.bytes_sent <= 4 * G, "chunks copied again after a take-over counted twice"
    await s.start_update(False)
    await s.wait()
    assert await dst_sha(svc, 0, SIZE) == sha(await marked_image(svc))


@pytest.mark.parametrize("goes_on", [True, False], ids=["stall-ends", "stall-lasts"])
async def test_a_copy_before_write_waits_for_the_stalled_copy_at_most_the_target_timeout(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    goes_on: bool,
) -> None:
    """The save area full, a write to a chunk the stalled thread still holds must write
    the chunk's old contents to the target after what the thread writes there: it waits
    for the thread, at most ``target_timeout``. If the stall ends in time, the mark holds
    and the copy is exact; else the update gives up its point in time, the write goes on,
    and the copy as of the re-mark is exact."""
    s = await consistent_session(svc)
    s.target_timeout = 1.0
    src = svc.volumes.get("src")
    for c in (2, 4, 6, 8):
        await src.export.pwrite(c * G, bytes([c]) * G)
    stall = StalledTarget(monkeypatch, svc.volumes.get("dst").backend._fd, 6 * G)
    await s.start_update(False)
    mark = await marked_image(svc)
    await until(stall.stalled.is_set, "the copy to stall")
    assert s.protector.save is not None and s.update is not None
    s.protector.save.limit = 0  # save area full: copy-before-write to the target
    update = s.update
    write = asyncio.ensure_future(src.export.pwrite(8 * G, b"E" * 4096))
    await asyncio.wait({write}, timeout=0.3)
    assert not write.done(), "the copy-before-write did not wait for the thread that copies its chunk"
    if goes_on:
        stall.release.set()
    await bounded(write, "a copy-before-write")
    if goes_on:
        assert update.phase is Phase.PROTECTING and update is s.update  # the mark holds
    else:
        assert update.remark is not None and "did not answer" in update.remark, update.remark
        stall.release.set()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    if goes_on:
        assert await dst_sha(svc, 0, SIZE) == sha(mark), "the target is not the source at the mark"
        await s.start_update(False)
        await s.wait()
    assert await dst_sha(svc, 0, SIZE) == sha(await marked_image(svc))
    assert await dst_sha(svc, 8 * G, 4096) == sha(b"E" * 4096)


async def test_a_write_waiting_for_a_copy_takes_its_chunk_once_the_copy_lets_writes_through() -> None:
    """A write that waited for a chunk before its copy's thread started is woken when it
    starts, and takes the chunk over; until the copy's hold is over, the chunk is known as
    one that copy may still write. A copy never takes a chunk over."""
    locks = ChunkLocks()
    took, copy_waits = asyncio.Event(), asyncio.Event()

    async def write() -> None:
        async with locks.hold([3, 5], take_over=True):
            took.set()

    async def other_copy() -> None:
        async with locks.hold([6]):
            copy_waits.set()

    async with locks.hold([4, 5, 6]) as held:
        writer = asyncio.ensure_future(write())
        copy = asyncio.ensure_future(other_copy())
        await asyncio.wait({writer}, timeout=0.2)
        assert not writer.done(), "a write took a chunk from a copy that holds writes back"
        locks.let_writes_through(held)
        await asyncio.wait_for(writer, 5)
        assert held.taken == {5} and locks.copying(5) is held
        await asyncio.wait({copy}, timeout=0.2)
        assert not copy_waits.is_set(), "a copy took a chunk from a copy that lets writes through"
    assert locks.copying(5) is None and held.over.is_set()
    await asyncio.wait_for(copy, 5)
    assert not locks.any_held(range(10))


async def test_a_stalled_target_leaves_the_sources_io_its_threads(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scattered chunks owed, many batches; the target's disk stalls every copy, so all the
    batches the copy keeps in flight block in the kernel at once. A protected write whose
    old blocks are not in the page cache (its save reads them from the disk), one to a
    chunk no copy started yet, a flush of the source and a client's read of it still
    complete while that lasts: the copies to the target wait in threads of their own, not
    in those the source's I/O needs. Once the stall ends, the target is the source at the
    mark."""
    size, g = 16 * MiB, 4096
    svc.create_volume("src", size)
    svc.create_volume("dst", size)
    await svc.create_session(name="s", source="src", target="dst", granularity=g)
    s = svc.sessions.get("s")
    await s.start_update(True)
    await s.wait()
    src = svc.volumes.get("src")
    for c in range(0, size // g, 2):  # 2048 runs of one chunk: 32 batches of BATCH_RUNS
        await src.export.pwrite(c * g, bytes([c % 251 + 1]) * g)
    dst_fd = svc.volumes.get("dst").backend._fd
    release, lock, stalled = threading.Event(), threading.Lock(), [0]
    real = fs._current.copy_file_range

    def copy_file_range(src_fd: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
        if dst == dst_fd and not release.is_set():
            with lock:
                stalled[0] += 1
            release.wait(timeout=60)  # the target's disk stalls
        return real(src_fd, dst, count, src_offset, dst_offset)

    monkeypatch.setattr(fs._current, "copy_file_range", copy_file_range)
    try:
        await s.start_update(False)
        mark = await src.backend.pread(0, size)
        await until(lambda: stalled[0] >= INFLIGHT, f"{INFLIGHT} copies to stall")
        # the source's blocks are not in the page cache: every read goes to a worker thread
        monkeypatch.setattr(src.backend, "pread_cached", lambda offset, length: None)
        await bounded(src.export.pwrite(0, b"Y" * g), "an uncached protected write to a stalled chunk")
        last = size // g - 2  # owed, in a batch no thread copies yet
        await bounded(src.export.pwrite(last * g, b"Z" * g), "an uncached protected write to an owed chunk")
        await bounded(src.export.flush(), "a flush of the source")
        await bounded(src.export.pread(2 * MiB + 8192, 4096), "a client's read of the source")
        assert stalled[0] == INFLIGHT, "a copy started beyond those in flight"
        assert s.update is not None and s.update.phase is Phase.PROTECTING  # the mark holds
        assert s.update.cofw_saved_bytes >= 2 * g  # both writes saved their chunk's old blocks
    finally:
        release.set()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert await dst_sha(svc, 0, size) == sha(mark), "the target is not the source at the mark"
    await s.start_update(False)
    await s.wait()
    assert await dst_sha(svc, 0, size) == sha(await src.backend.pread(0, size))
