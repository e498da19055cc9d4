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
from deltavol.service import Service
from deltavol.sessions.states import State
from tests.fakes import until
from tests.unit.sessions.test_kernel_copy import dst_sha, sha, svc  # noqa: F401  (fixture)
from tests.unit.sessions.test_operations import G, consistent_session


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
