"""A local volume as a copy target: writes land byte for byte, and the kernel is told to
start writing them out every ``WRITEBACK_BYTES``, not once per write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from deltavol.backend.file import FileBackend, start_writeback
from deltavol.copy.targets import LocalTarget

MiB = 1024 * 1024


@pytest.fixture
async def target(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "dst.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    backend = FileBackend("dst", str(path))
    yield LocalTarget(backend)
    await backend.close()


async def test_writeback_starts_once_per_writeback_bytes(target: LocalTarget, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    started = []

    async def spy() -> None:
        started.append(target._unstarted)

    monkeypatch.setattr(target.backend, "start_writeback", spy)
    monkeypatch.setattr(target, "WRITEBACK_BYTES", 3 * MiB)
    block = os.urandom(MiB)
    for i in range(7):
        await target.pwrite(i * MiB, block)
    assert len(started) == 2  # after the 3rd and the 6th MiB
    assert target._unstarted == MiB
    for i in range(7):
        assert await target.pread(i * MiB, MiB) == block


async def test_start_writeback_on_a_real_file(target: LocalTarget) -> None:
    data = os.urandom(2 * MiB)
    await target.pwrite(MiB, data)
    await target.backend.start_writeback()  # the real syscall: no error on a regular file
    await target.flush()
    with open(target.backend.path, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == data


def test_start_writeback_reports_a_bad_descriptor() -> None:
    with pytest.raises(OSError) as exc:
        start_writeback(-1)
    assert exc.value.errno == errno.EBADF
