"""Closing or rewriting a tracking file never waits on the event loop for a round's sync
stalled in its thread: the fd swapped out stays open until that sync is done with it,
and is closed then, never before."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.store import fs
from deltavol.store.group_commit import GroupCommit
from tests.fakes import until

G = 4096
SIZE = 64 * G


class StalledSync(fs.RealFS):
    """An fdatasync that stalls, once armed, until released; records the fds closed."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = False
        self.closed: list[int] = []

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.armed = False  # only the round's sync stalls
            self.entered.set()
            self.release.wait(3.0)  # a bound, so a close that waits cannot hang the run
            self.returned = True
        super().fdatasync(fd)

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)


@pytest.mark.parametrize("how", ["close", "rewrite"])
async def test_a_stalled_round_does_not_stop_the_loop(tmp_path: Path, how: str) -> None:
    stalled = StalledSync()
    old = fs.use(stalled)
    tf = persist.TrackingFile(tmp_path / "s.tracking", SIZE, G, GroupCommit(), region=G)
    try:
        bm = Bitmap(SIZE, G)
        tf.rewrite(bm, 1)
        fd = tf._fd
        bm.set(5)
        tf.write_bits(bm, [5])
        stalled.armed = True
        done = tf.cover(5)  # the round that makes the hot region durable, in a thread
        assert done is not None
        await until(stalled.entered.is_set, "the round's sync to stall")
        try:
            if how == "close":
                tf.close()
            else:
                tf.rewrite(bm, 2)  # its own syncs are not stalled
            assert not stalled.returned, f"{how} waited on the loop for the stalled sync"
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            tick = asyncio.ensure_future(ticker())
            await until(lambda: ticks >= 5, "the loop to tick while the sync stalls")
            tick.cancel()
            assert fd not in stalled.closed, "closed under the round's thread still syncing it"
        finally:
            stalled.release.set()
        await asyncio.wait_for(asyncio.shield(done), 10)
        assert stalled.closed.count(fd) == 1  # closed once the sync is done with it
        if how == "rewrite":  # the new file is the one in use, and bits reach it
            bm.set(9)
            tf.write_bits(bm, [9])
            on_disk, _ = persist.load(tmp_path / "s.tracking", persist.KIND_TRACKING, G, SIZE)
            assert on_disk.test(9)
    finally:
        tf.close()
        fs.use(old)
