"""FileBackend's inline writes back off after a write that slept in the kernel, and only
then: a write that was merely slow (the thread preempted on a loaded machine) keeps the
inline path. The back-off doubles while the stalls go on, and no write goes inline while
a pool write of the same file runs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltavol.backend import file
from deltavol.backend.file import INLINE_BACKOFF, INLINE_BACKOFF_MAX, INLINE_STALL, FileBackend
from deltavol.store import fs


class SlowWrites(fs.RealFS):
    """Real writes, each made slow first: by sleeping, or by spinning on the CPU."""

    def __init__(self, how: str) -> None:
        self.how = how

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
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


async def test_no_inline_write_while_a_pool_write_of_the_file_runs(backend: FileBackend) -> None:
    """The inline write would wait on the loop for the inode lock the pool write holds."""
    started, release = threading.Event(), threading.Event()
    real = backend._pwrite_full

    def held(offset: int, data: bytes, fua: bool) -> None:
        started.set()
        assert release.wait(10)
        real(offset, data, fua)

    backend._pwrite_full = held  # type: ignore[method-assign]
    pool_write = asyncio.ensure_future(backend.pwrite(65536, b"\x33" * 4096, fua=True))
    assert await asyncio.to_thread(started.wait, 10)
    backend._pwrite_full = real  # type: ignore[method-assign]
    try:
        assert not backend.pwrite_now(0, b"\x11" * 4096)  # to the pool, the loop stays free
    finally:
        release.set()
    await asyncio.wait_for(pool_write, 10)
    zeroing = asyncio.ensure_future(backend.zero(0, 8192))
    await asyncio.wait_for(zeroing, 10)
    assert backend.pwrite_now(0, b"\x11" * 4096)  # nothing runs: inline again
    with open(backend.path, "rb") as f:
        got = f.read(65536 + 4096)
    assert got[:4096] == b"\x11" * 4096 and got[65536:] == b"\x33" * 4096


def test_the_back_off_doubles_with_each_stall_in_a_row_and_resets(
    backend: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def backed_off() -> float:
        waited = backend._inline_after - time.monotonic()
        backend._inline_after = 0.0  # as if it had run out
        return waited

    monkeypatch.setattr(file, "INLINE_STALL", -1.0)  # every write took too long...
    switches = iter(range(10**6))
    monkeypatch.setattr(file, "_voluntary_switches", lambda: next(switches))  # ...asleep
    got = []
    for _ in range(8):
        assert backend.pwrite_now(0, b"\x11" * 4096)
        got.append(backed_off())
    want = [min(INLINE_BACKOFF * 2**i, INLINE_BACKOFF_MAX) for i in range(8)]
    assert all(w - 0.5 < g <= w for g, w in zip(got, want, strict=True)), got
    monkeypatch.setattr(file, "_voluntary_switches", lambda: 0)  # a write that did not sleep
    assert backend.pwrite_now(0, b"\x11" * 4096)
    assert backed_off() <= 0
    monkeypatch.setattr(file, "_voluntary_switches", lambda: next(switches))
    assert backend.pwrite_now(0, b"\x11" * 4096)
    assert INLINE_BACKOFF - 0.5 < backed_off() <= INLINE_BACKOFF  # back to the first step
