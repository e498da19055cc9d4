"""A local volume as a copy target: writes land byte for byte, and the kernel is told to
start writing them out every ``WRITEBACK_BYTES``, not once per write."""

from __future__ import annotations

import errno
import hashlib
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


def _sha(path: str, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


@pytest.fixture
async def source(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "src.img"
    with open(path, "wb") as f:
        f.write(os.urandom(16 * MiB))
    backend = FileBackend("src", str(path))
    yield backend
    await backend.close()


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "exdev-fallback"])
async def test_copy_from_lands_the_source_bytes_over_old_data(
    target: LocalTarget, source: FileBackend, kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel copy, and the thread's read and write where the kernel refuses (another
    file system), land exactly the source's bytes over what the target held, and count
    towards the writeback start."""
    calls: list[int] = []
    copy_file_range = os.copy_file_range

    def spy(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
        calls.append(count)
        if not kernel:
            raise OSError(errno.EXDEV, "cross-device")
        return copy_file_range(src, dst, count, src_off, dst_off)

    started: list[int] = []

    async def spy_writeback() -> None:
        started.append(1)

    monkeypatch.setattr(os, "copy_file_range", spy)
    monkeypatch.setattr(target.backend, "start_writeback", spy_writeback)
    await target.pwrite(0, b"\x77" * 16 * MiB)
    await target.copy_from(source, 3 * MiB + 512, 5 * MiB)
    await target.copy_from(source, 12 * MiB, 4 * MiB)  # the fallback is remembered
    await target.flush()
    assert _sha(target.backend.path, 3 * MiB + 512, 5 * MiB) == _sha(source.path, 3 * MiB + 512, 5 * MiB)
    assert _sha(target.backend.path, 12 * MiB, 4 * MiB) == _sha(source.path, 12 * MiB, 4 * MiB)
    old = hashlib.sha256(b"\x77" * (3 * MiB + 512)).hexdigest()
    assert _sha(target.backend.path, 0, 3 * MiB + 512) == old
    assert calls and (len(calls) == 1 if not kernel else calls[0] == 5 * MiB)
    assert len(started) == 2 and target._unstarted == 0  # the 9 MiB copied count like writes


async def test_copy_from_past_the_source_end_lands_zeroes(target: LocalTarget, tmp_path: Path) -> None:
    """An imported source file shorter than its range reads as zeroes there: so must the copy."""
    path = tmp_path / "short.img"
    path.write_bytes(b"\x11" * MiB)
    short = FileBackend("short", str(path))
    try:
        await target.pwrite(0, b"\x77" * 4 * MiB)
        await target.copy_from(short, 0, 4 * MiB)
    finally:
        await short.close()
    with open(target.backend.path, "rb") as f:
        assert f.read(4 * MiB) == b"\x11" * MiB + bytes(3 * MiB)


async def test_copy_file_range_giving_up_early_falls_back_to_reading(
    target: LocalTarget, source: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``copy_file_range`` returning 0 before the range's end (copy offload refused half
    way, a file system that gives up) is no end of file: the thread reads and writes the
    rest, and the source's bytes land, not zeroes."""
    copy_file_range = os.copy_file_range
    calls: list[int] = []

    def gives_up(src: int, dst: int, count: int, src_off: int, dst_off: int) -> int:
        calls.append(count)
        if len(calls) == 2:
            return 0
        return copy_file_range(src, dst, min(count, MiB), src_off, dst_off)

    monkeypatch.setattr(os, "copy_file_range", gives_up)
    await target.pwrite(0, b"\x77" * 4 * MiB)
    await target.copy_spans(source, [(0, 4 * MiB)])
    await target.flush()
    assert len(calls) == 2  # one MiB in the kernel, then the rest through the thread's buffer
    assert _sha(target.backend.path, 0, 4 * MiB) == _sha(source.path, 0, 4 * MiB)
