"""FileBackend's inline writes back off after a write that slept in the kernel, and only
then: a write that was merely slow (the thread preempted on a loaded machine) keeps the
inline path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavol.backend import file
from deltavol.backend.file import INLINE_STALL, FileBackend
from deltavol.store import fs


class SlowWrites(fs.RealFS):
    """Real writes, each made slow first: by sleeping, or by spinning on the CPU."""

    def __init__(self, how: str) -> None:
        self.how = how

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if self.how == "sleep":
            time.sleep(3 * INLINE_STALL)
        else:
            end = time.perf_counter() + 3 * INLINE_STALL
            while time.perf_counter() < end:
                pass
        return super().pwrite(fd, data, offset)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[FileBackend]:
    path = tmp_path / "vol"
    path.write_bytes(bytes(1 << 20))
    b = FileBackend("vol", str(path))
    yield b
    fs.close(b._fd)


@pytest.mark.parametrize(("how", "inline_after"), [("sleep", False), ("spin", True)])
def test_only_a_write_that_slept_sends_the_next_to_the_pool(
    backend: FileBackend, how: str, inline_after: bool
) -> None:
    old = fs.use(SlowWrites(how))
    try:
        assert backend.pwrite_now(0, b"\x11" * 4096)  # done inline, however slowly
    finally:
        fs.use(old)
    assert backend.pwrite_now(4096, b"\x22" * 4096) is inline_after
    with open(backend.path, "rb") as f:
        got = f.read(8192)
    assert got[:4096] == b"\x11" * 4096
    assert got[4096:] == (b"\x22" * 4096 if inline_after else bytes(4096))


def test_voluntary_switches_count_sleeps_of_this_thread() -> None:
    before = file._voluntary_switches()
    time.sleep(0.001)
    assert file._voluntary_switches() > before
