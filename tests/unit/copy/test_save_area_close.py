"""Closing a save area never waits on the event loop for a thread still using its fd (a
sync on a stalled disk): the area is unusable at once, and the fd is closed as soon as
that thread is done with it, never before."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from deltavol.copy.save_area import BLOCK, SaveArea
from deltavol.store import fs
from tests.fakes import until

G = 4 * BLOCK


class StalledSync(fs.RealFS):
    """An fdatasync that stalls, once armed, until released; records the fds closed."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed: list[int] = []
        self.returned = False  # the stalled sync is over

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.entered.set()
            self.release.wait(3.0)  # a bound, so a close that waits cannot hang the run
            self.returned = True
        super().fdatasync(fd)

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)


async def test_close_during_a_stalled_sync_keeps_the_loop_running(tmp_path: Path) -> None:
    stalled = StalledSync()
    old = fs.use(stalled)
    try:
        area = SaveArea(tmp_path / "s.save", G, 64 * G, 1, 1 << 20).create()
        fd = area._fd
        assert area.put(0, 0, b"x" * BLOCK) is not None
        stalled.armed = True
        sync = asyncio.ensure_future(area.durable())  # as a checkpoint does
        await until(stalled.entered.is_set, "the sync to stall")

        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        try:
            area.close()  # what dropping the area does, on the loop
            assert not stalled.returned, "close() waited on the loop for the stalled sync"
            before = ticks
            await until(lambda: ticks >= before + 5, "the loop to tick while the sync stalls")
            assert not stalled.release.is_set()
            assert fd not in stalled.closed, "closed under a thread still syncing it"
            with pytest.raises(OSError) as err:  # unusable at once
                await area.pieces(0)
            assert err.value.errno == errno.EBADF
        finally:
            stalled.release.set()
            tick.cancel()
        await sync  # the stalled sync itself succeeds
        assert stalled.closed == [fd]  # and the last user closed the fd
        area.close()  # again: nothing left to close
        assert stalled.closed == [fd]
    finally:
        fs.use(old)


async def test_close_with_no_thread_using_the_fd_closes_it_at_once(tmp_path: Path) -> None:
    stalled = StalledSync()
    old = fs.use(stalled)
    try:
        area = SaveArea(tmp_path / "s.save", G, 64 * G, 1, 1 << 20).create()
        fd = area._fd
        assert area.put(0, 0, b"y" * BLOCK) is not None
        assert await area.pieces(0) == [(0, b"y" * BLOCK)]
        area.delete()  # close, then unlink
        assert stalled.closed == [fd]
        assert not (tmp_path / "s.save").exists()
    finally:
        fs.use(old)
