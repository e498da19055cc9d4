"""Races of the kernel copy to a local volume with what else touches its chunks: a copy
cancelled (pause, give-up) must not go on reading the source once its locks are gone,
and a chunk is copied in the kernel only when the source there is surely the mark's."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from deltavol.backend.file import FileBackend
from deltavol.copy.save_area import SaveArea
from deltavol.copy.targets import LocalTarget
from deltavol.service import Service
from deltavol.sessions.states import State
from tests.fakes import until
from tests.unit.sessions.test_kernel_copy import dst_sha, sha, svc  # noqa: F401  (fixture)
from tests.unit.sessions.test_operations import G, MiB, consistent_session


async def test_a_save_not_indexed_yet_keeps_the_copy_out_of_the_kernel(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A save area of an older version (``synced_saves``) indexes a record only once its
    sync is over, and the write lets its chunk's lock go meanwhile: the copy must not take
    the chunk for unsaved and copy the source, which the write then changes."""
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, b"B" * G)
    await src.backend.pread(2 * G, G)  # cached: the write saves its old contents at once
    opened, sync_go, copy_go = asyncio.Event(), threading.Event(), threading.Event()
    syncing, decided, kernel = threading.Event(), threading.Event(), threading.Event()
    real_open = s._open_target

    async def slow_open(sess: Any) -> Any:
        await opened.wait()
        return await real_open(sess)

    s._open_target = slow_open
    real_sync = SaveArea.sync

    def held_sync(self: SaveArea) -> None:
        syncing.set()
        sync_go.wait(timeout=30)
        real_sync(self)

    monkeypatch.setattr(SaveArea, "sync", held_sync)
    copy_from = FileBackend._copy_from

    def held_copy(self: FileBackend, source: FileBackend, offset: int, length: int) -> None:
        if self.name == "dst":
            kernel.set()
            decided.set()
            copy_go.wait(timeout=30)
        copy_from(self, source, offset, length)

    monkeypatch.setattr(FileBackend, "_copy_from", held_copy)
    await s.start_update(False)
    assert s.protector.save is not None
    s.protector.save.synced_saves = True  # as an area of an older version, reopened
    write = asyncio.create_task(src.export.pwrite(2 * G + 4096, b"C" * 8192))
    await until(syncing.is_set)  # the record is written, its sync runs: not indexed
    assert 2 not in s.protector.save
    real_pread = src.backend.pread

    async def spy_pread(offset: int, length: int) -> bytes:
        data = await real_pread(offset, length)
        decided.set()  # the copy read the source through its buffer
        return data

    monkeypatch.setattr(src.backend, "pread", spy_pread)
    opened.set()  # the copy starts and takes chunk 2's lock
    await until(decided.is_set)
    sync_go.set()
    await write  # the write lands on the source
    copy_go.set()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert not kernel.is_set(), "copied in the kernel with a save area of an older version"
    assert await dst_sha(svc, 2 * G, G) == sha(b"B" * G), "the target holds data written after the mark"


def hold_first_kernel_copy(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, ...]:
    """Hold the first kernel copy to the target in its thread until ``release``; returns
    (copying, release, finished)."""
    copying, release, finished = threading.Event(), threading.Event(), threading.Event()
    copy_from = FileBackend._copy_from
    lock = threading.Lock()

    def held_copy(self: FileBackend, source: FileBackend, offset: int, length: int) -> None:
        hold = False
        if self.name == "dst":
            with lock:
                hold = not copying.is_set()
                copying.set()
        if hold:
            release.wait(timeout=30)
        copy_from(self, source, offset, length)
        if hold:
            finished.set()

    monkeypatch.setattr(FileBackend, "_copy_from", held_copy)
    return copying, release, finished


async def pause_waits_for(s: Any, release: threading.Event, finished: threading.Event) -> None:
    """Pause while a kernel copy's thread runs: the pause, and the chunk's lock, last until
    the thread is over."""
    pausing = asyncio.create_task(s.pause())
    await asyncio.wait({pausing}, timeout=0.3)
    assert not pausing.done(), "the pause returned while the kernel copy still read the source"
    assert s.protector.locks.any_held([2]), "the chunk's lock was let go under a running kernel copy"
    release.set()
    await pausing
    assert finished.is_set()
    assert s.state is State.PAUSED
    assert not s.protector.locks.any_held(range(s.source.size // G))


async def test_a_pause_keeps_the_locks_until_the_kernel_copy_is_over(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a pause is over, a write copied before it lands (the save area full: straight
    to the target) and nothing of the cancelled copy comes after it."""
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, b"B" * G)  # chunk 2 owed by the next update; its image is "B"
    copying, release, finished = hold_first_kernel_copy(monkeypatch)
    await s.start_update(False)
    await until(copying.is_set)
    await pause_waits_for(s, release, finished)
    assert s.protector.save is not None and s.transfer is not None
    s.protector.save.limit = 0  # save area full: copy-before-write to the target from now
    await src.export.pwrite(2 * G + 4096, b"C" * 8192)
    assert not s.transfer.test(2)  # the write copied chunk 2's image "B" first
    await s.resume()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert await dst_sha(svc, 2 * G, G) == sha(b"B" * G), "the target holds data written after the mark"


async def test_no_copy_cancelled_by_a_pause_outlives_the_next_update(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pause, then a new update from paused (the same target, no new connection): what the
    first update's copy wrote is over before the new mark, so the new update's point in
    time holds on the target after it, whatever the source gets next."""
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, b"B" * G)
    copying, release, finished = hold_first_kernel_copy(monkeypatch)
    await s.start_update(False)  # mark 1: chunk 2 = "B"
    await until(copying.is_set)
    await pause_waits_for(s, release, finished)
    await s.start_update(False)  # mark 2, from paused: chunk 2 still "B"
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    await src.export.pwrite(2 * G, b"C" * G)  # after the point in time: tracked for the next
    assert await dst_sha(svc, 2 * G, G) == sha(b"B" * G)


async def test_a_pause_waits_for_the_target_writes_of_the_cancelled_copy(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write to the target through a buffer (a chunk with a saved block) goes on in its
    thread when the copy is cancelled: the pause returns only once it is over, so that it
    cannot land after what a next update copies there."""
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, b"B" * G)
    writing, release = threading.Event(), threading.Event()
    landed: list[int] = []
    pwrite = FileBackend.pwrite

    async def held_pwrite(self: FileBackend, offset: int, data: bytes, fua: bool = False, **kw: Any) -> None:
        if self.name == "dst" and not writing.is_set():
            writing.set()
            await asyncio.to_thread(release.wait, 30)
            await pwrite(self, offset, data, fua, **kw)
            landed.append(offset)
            return
        await pwrite(self, offset, data, fua, **kw)

    monkeypatch.setattr(FileBackend, "pwrite", held_pwrite)
    opened = asyncio.Event()
    real_open = s._open_target

    async def slow_open(sess: Any) -> Any:
        await opened.wait()
        return await real_open(sess)

    s._open_target = slow_open
    await s.start_update(False)
    await src.export.pwrite(2 * G, b"C" * 4096)  # saved: chunk 2 goes through a buffer
    assert s.protector.save is not None and 2 in s.protector.save
    opened.set()
    await until(writing.is_set)
    pausing = asyncio.create_task(s.pause())
    await asyncio.wait({pausing}, timeout=0.3)
    assert not pausing.done(), "the pause returned while a write of the cancelled copy ran"
    release.set()
    await pausing
    assert landed == [2 * G] and s.state is State.PAUSED


async def test_a_write_does_not_wait_for_the_writeback_of_its_copied_chunk(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writeback start after a kernel copy may wait for the target's disk: the copy has
    let its chunks' locks go by then, so a client's write does not wait with it."""
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, b"B" * G)
    in_writeback, go = asyncio.Event(), asyncio.Event()
    start_writeback = FileBackend.start_writeback

    async def slow_writeback(self: FileBackend) -> None:
        if self.name == "dst":
            in_writeback.set()
            await go.wait()  # a disk slow to take the writes
        await start_writeback(self)

    monkeypatch.setattr(FileBackend, "start_writeback", slow_writeback)
    monkeypatch.setattr(LocalTarget, "WRITEBACK_BYTES", 1)  # after every copy
    await s.start_update(False)
    await in_writeback.wait()
    write = asyncio.create_task(src.export.pwrite(2 * G + 4096, b"C" * 8192))
    await asyncio.wait({write}, timeout=5)
    assert write.done(), "the write waited for the target's writeback with the chunk's lock"
    go.set()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert await dst_sha(svc, 2 * G, G) == sha(b"B" * G)


async def test_a_remark_waits_for_the_writes_to_the_target_given_up(
    svc: Service,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A give-up drops the target while a write of the copy to it runs on in its thread
    (its copy was cancelled): the re-mark waits for it, or it would land the old mark's
    image over what the new mark copies there."""
    size = 16 * MiB
    svc.create_volume("src", size)
    svc.create_volume("dst", size)
    src = svc.volumes.get("src")
    await src.export.pwrite(0, b"A" * MiB)
    await svc.create_session(name="s", source="src", target="dst")
    s = svc.sessions.get("s")
    await s.start_update(True)
    await s.wait()
    await src.export.pwrite(2 * G, b"B" * G)
    await src.export.pwrite(100 * G, b"D" * 100 * G)  # chunk 2 and these: two requests, side by side
    opened = asyncio.Event()
    real_open = s._open_target

    async def slow_open(sess: Any) -> Any:
        await opened.wait()
        return await real_open(sess)

    s._open_target = slow_open
    writing, write_go, copying, copy_go = (threading.Event() for _ in range(4))
    pwrite = FileBackend.pwrite

    async def held_pwrite(self: FileBackend, offset: int, data: bytes, fua: bool = False, **kw: Any) -> None:
        if self.name == "dst" and offset == 2 * G and not writing.is_set():
            writing.set()
            await asyncio.to_thread(write_go.wait, 30)
        await pwrite(self, offset, data, fua, **kw)

    copy_from = FileBackend._copy_from

    def held_copy(self: FileBackend, source: FileBackend, offset: int, length: int) -> None:
        if self.name == "dst" and not copying.is_set():  # the second request's, in the kernel
            copying.set()
            copy_go.wait(timeout=30)
        copy_from(self, source, offset, length)

    monkeypatch.setattr(FileBackend, "pwrite", held_pwrite)
    monkeypatch.setattr(FileBackend, "_copy_from", held_copy)
    await s.start_update(False)  # mark 1: chunk 2 = "B"
    await src.export.pwrite(2 * G, b"C" * 4096)  # saved: chunk 2 goes through a buffer
    opened.set()
    await until(lambda: writing.is_set() and copying.is_set())
    assert s.update is not None
    s._give_up_mark(s.update, "copy-before-write of chunk 9: no answer")
    copy_go.set()  # its copy over, the batch finds the target gone: the copy pass stops
    finishing = asyncio.create_task(s.wait())
    await asyncio.wait({finishing}, timeout=1.0)
    assert not finishing.done(), "re-marked and finished while a write to the old target ran"
    write_go.set()
    await finishing
    assert s.state is State.IDLE and s.consistent
    want = b"C" * 4096 + b"B" * (G - 4096)  # chunk 2 as of the new mark
    assert await dst_sha(svc, 2 * G, G) == sha(want)
    assert await dst_sha(svc, 100 * G, 100 * G) == sha(b"D" * 100 * G)
