"""Copies to a local volume go in the kernel (``copy_file_range``), with no Python buffer:
the bytes that land must still be exactly the mark's.

Under copy-on-first-write the kernel reads the source while the copy holds the chunks'
locks; a write to a chunk being copied takes it over instead of waiting (the target's disk
may stall): it saves the old blocks first, and the copy copies that chunk again from the
source and the saved blocks once its thread is over. Holes of the source go as zero
requests, over whatever the target held there before.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deltavol.backend.file import FileBackend
from deltavol.service import Service
from deltavol.sessions.states import State
from tests.fakes import until
from tests.unit.sessions.test_operations import SIZE, G, MiB, Server, consistent_session


@pytest.fixture
async def svc(tmp_path) -> AsyncIterator[Service]:  # type: ignore[no-untyped-def]
    srv = Server(tmp_path / "data")
    try:
        yield srv.svc
    finally:
        await srv.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def dst_sha(svc: Service, offset: int, length: int) -> str:
    return sha(await svc.volumes.get("dst").backend.pread(offset, length))


async def test_a_write_racing_the_kernel_copy_of_its_chunk_goes_on_and_the_copy_keeps_the_mark(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, b"B" * G)  # chunk 2 changed since the point in time
    copying, release = threading.Event(), threading.Event()
    copy_from = FileBackend._copy_from
    copied: list[tuple[int, int]] = []
    buffered: list[tuple[int, int]] = []
    pwrite = FileBackend.pwrite

    def held_copy(self: FileBackend, source: FileBackend, offset: int, length: int) -> None:
        if self.name == "dst":
            copying.set()
            release.wait(timeout=30)
            copied.append((offset, length))
        copy_from(self, source, offset, length)

    async def spy_pwrite(self: FileBackend, offset: int, data: bytes, fua: bool = False, **kw: Any) -> None:
        if self.name == "dst":
            buffered.append((offset, len(data)))
        await pwrite(self, offset, data, fua, **kw)

    monkeypatch.setattr(FileBackend, "_copy_from", held_copy)
    monkeypatch.setattr(FileBackend, "pwrite", spy_pwrite)
    await s.start_update(False)  # marks chunk 2: its image is "B"
    await until(copying.is_set)
    write = asyncio.create_task(src.export.pwrite(2 * G + 4096, b"C" * 8192))
    await asyncio.wait({write}, timeout=5)
    assert write.done(), "the write waited for the kernel copy of its chunk"
    assert s.protector.save is not None and 2 in s.protector.save  # it saved the old blocks
    release.set()
    await s.wait()

    assert s.state is State.IDLE and s.consistent
    assert copied == [(2 * G, G)]  # in the kernel, the write's change maybe with it: it does not count
    assert buffered == [(2 * G, G)]  # so chunk 2 again, from the source and the saved blocks
    assert await dst_sha(svc, 2 * G, G) == sha(b"B" * G)  # the mark's image, not the later write
    assert await dst_sha(svc, 0, 2 * G) == sha(b"A" * 2 * G)
    # the write is tracked for the next update, which brings it over
    await s.start_update(False)
    await s.wait()
    want = b"B" * 4096 + b"C" * 8192 + b"B" * (G - 12288)
    assert await dst_sha(svc, 2 * G, G) == sha(want)


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
async def test_source_holes_over_old_target_data_land_as_zeroes(svc: Service, full: bool) -> None:
    """The target held data where the source is now a hole: those bytes must read as zeroes
    after the update, and go as zero requests, not as data."""
    s = await consistent_session(svc)  # src and dst: "A" in the first MiB, zeroes after
    dst = svc.volumes.get("dst")
    await dst.backend.pwrite(MiB, b"\x77" * MiB)  # old data beyond: a full update must clear it
    await svc.volumes.get("src").export.trim(4 * G, 4 * G)  # a hole of the source, over "A"
    await s.start_update(full)
    await s.wait()

    assert s.state is State.IDLE and s.consistent
    u = s.update
    assert u is not None
    assert await dst_sha(svc, 4 * G, 4 * G) == sha(bytes(4 * G))
    assert await dst_sha(svc, 0, 4 * G) == sha(b"A" * 4 * G)
    assert await dst_sha(svc, 8 * G, MiB - 8 * G) == sha(b"A" * (MiB - 8 * G))
    if full:  # data went only where the source has data: 12 chunks of "A"
        assert await dst_sha(svc, MiB, SIZE - MiB) == sha(bytes(SIZE - MiB))
        assert u.bytes_sent == MiB - 4 * G
    else:
        assert await dst_sha(svc, MiB, MiB) == sha(b"\x77" * MiB)  # not owed: untouched
        assert u.bytes_sent == 0
