"""The write lane runs a connection's writes in order, on a worker thread, and hands them
back to the loop in order; a barrier comes back only after every write put before it. A
write the lane holds keeps the write gate entered: a mark waits for it. A real file ends
with the bytes of the last of overlapping writes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from deltavol.backend import lane as lane_module
from deltavol.backend.base import WriteJob
from deltavol.backend.file import FileBackend
from deltavol.backend.gate import GateLayer, WriteGate
from deltavol.backend.lane import BARRIER, Done, WriteLane
from deltavol.errors import DeltavolError
from deltavol.store import fs
from tests.fakes import Disk


class Lane:
    """A lane on the running loop, recording what it hands back."""

    def __init__(self) -> None:
        self.back: list[Done] = []
        self.changed = asyncio.Event()
        self.lane = WriteLane(asyncio.get_running_loop(), self._done)

    def _done(self, done: list[Done]) -> None:
        self.back.extend(done)
        self.changed.set()

    async def until(self, n: int) -> None:
        while len(self.back) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


async def test_jobs_run_in_order_off_the_loop_and_come_back_in_order() -> None:
    lane = Lane()
    ran: list[tuple[int, str]] = []

    def job(i: int) -> WriteJob:
        return WriteJob(lambda: ran.append((i, threading.current_thread().name)))

    for i in range(50):
        lane.lane.put(job(i), i)
    await lane.until(50)
    assert [i for i, _ in ran] == list(range(50))
    assert all(name != threading.current_thread().name for _, name in ran)
    assert [token for _, token, _ in lane.back] == list(range(50))
    assert all(error is None for _, _, error in lane.back)
    assert lane.lane.pending == 0


async def test_a_barrier_comes_back_after_every_job_put_before_it_and_errors_are_handed_back() -> None:
    lane = Lane()
    release = threading.Event()
    landed: list[int] = []

    def slow(i: int) -> None:
        assert release.wait(10)
        landed.append(i)

    def broken() -> None:
        raise OSError(5, "disk on fire")

    for i in range(8):
        lane.lane.put(WriteJob(lambda i=i: slow(i)), i)  # type: ignore[misc]
    lane.lane.put(WriteJob(broken), "broken")
    lane.lane.put(BARRIER, "barrier")
    await asyncio.sleep(0.05)
    assert lane.back == [] and lane.lane.pending == 10  # nothing done while the first waits
    release.set()
    await lane.until(10)
    assert [token for _, token, _ in lane.back] == [*range(8), "broken", "barrier"]
    assert landed == list(range(8))
    error = lane.back[8][2]
    assert isinstance(error, OSError) and error.errno == 5
    assert lane.lane.pending == 0


async def test_a_write_in_the_lane_holds_the_gate_until_it_is_done() -> None:
    gate = WriteGate()
    layer = GateLayer(Disk(1 << 20), gate)
    job = layer.pwrite_soon(0, b"x" * 4096)
    assert job is not None
    marked = asyncio.Event()

    async def mark() -> None:
        async with gate.closed():
            marked.set()

    task = asyncio.create_task(mark())
    await asyncio.sleep(0.05)
    assert not marked.is_set(), "a mark began while a write agreed to was still to land"
    assert layer.pwrite_soon(4096, b"y" * 4096) is None  # the gate closes: no new one now
    job.run()
    job.finish(None)
    await asyncio.wait_for(marked.wait(), 5)
    await task
    assert layer.pwrite_soon(4096, b"y" * 4096) is not None  # open again


@pytest.fixture
def backend(tmp_path: Path) -> FileBackend:
    path = tmp_path / "vol"
    path.write_bytes(bytes(1 << 20))
    return FileBackend("vol", str(path))


async def test_overlapping_file_writes_in_the_lane_land_in_the_order_put(backend: FileBackend) -> None:
    lane = Lane()
    for i in range(200):  # each covers the one before and one more byte each side
        offset = 65536 - i
        job = backend.pwrite_soon(offset, bytes([i % 251 + 1]) * (4096 + 2 * i))
        assert job is not None
        lane.lane.put(job, i)
    await lane.until(200)
    assert all(error is None for _, _, error in lane.back)
    data = fs.pread(backend._fd, 8192, 65536 - 199)
    assert data[: 4096 + 2 * 199] == bytes([199 % 251 + 1]) * (4096 + 2 * 199)
    await backend.close()


async def test_a_failed_file_write_comes_back_as_a_deltavol_error(backend: FileBackend) -> None:
    lane = Lane()
    job = backend.pwrite_soon(0, b"x" * 4096)
    assert job is not None
    await backend.close()  # the fd is gone: EBADF
    lane.lane.put(job, "w")
    await lane.until(1)
    error = lane.back[0][2]
    assert isinstance(error, DeltavolError) and "write on volume 'vol'" in error.message


class BusyPool:
    """Every thread of the lanes' pool taken by a lane that never runs dry: each of
    ``lane.WORKERS`` connections keeps ``DEPTH`` writes of ``DISK`` seconds queued, and sends
    the next as soon as one is acknowledged, until ``stop``."""

    DISK, DEPTH = 0.002, 32

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = False
        self.lanes: list[WriteLane] = []
        self.back: list[list[int]] = []  # the tokens each busy lane handed back
        self.sent: list[int] = []
        self.idle = asyncio.Event()

    def _on_done(self, i: int) -> Callable[[list[Done]], None]:
        def on_done(done: list[Done]) -> None:
            self.back[i].extend(cast(int, token) for _, token, _ in done)
            for _ in done:
                if not self.stopped:
                    self._put(i)
            if self.stopped and not any(lane.pending for lane in self.lanes):
                self.idle.set()

        return on_done

    def _put(self, i: int) -> None:
        self.lanes[i].put(WriteJob(lambda: time.sleep(self.DISK)), self.sent[i])
        self.sent[i] += 1

    async def __aenter__(self) -> BusyPool:
        for i in range(lane_module.WORKERS):
            self.lanes.append(WriteLane(self.loop, self._on_done(i)))
            self.back.append([])
            self.sent.append(0)
            for _ in range(self.DEPTH):
                self._put(i)
        while sum(map(len, self.back)) < 4 * lane_module.WORKERS:  # every thread has a lane
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert not self.stopped, "the busy connections stopped writing before the end"
        self.stopped = True
        await asyncio.wait_for(self.idle.wait(), 30)
        for i, back in enumerate(self.back):  # each busy lane's writes, in the order put
            assert back == list(range(self.sent[i]))


async def test_a_lane_gets_a_thread_while_every_thread_serves_lanes_that_never_run_dry() -> None:
    async with BusyPool():
        lane = Lane()
        lane.lane.put(WriteJob(lambda: None), "write")
        lane.lane.put(BARRIER, "flush")
        # before: both waited until the busy connections stopped writing
        await asyncio.wait_for(lane.until(2), 5)
        assert [token for _, token, _ in lane.back] == ["write", "flush"]


async def test_a_mark_gets_its_gate_while_other_volumes_lanes_take_every_thread() -> None:
    async with BusyPool() as busy:
        gate = WriteGate()
        layer = GateLayer(Disk(1 << 20), gate)
        lane = WriteLane(busy.loop, lambda done: [job.finish(err) for job, _, err in done])
        job = layer.pwrite_soon(0, b"x" * 4096)
        assert job is not None
        lane.put(job, None)  # it entered the gate: a mark waits for it

        async def mark() -> None:
            async with gate.closed():
                pass

        await asyncio.wait_for(mark(), 5)


class HeldWrites(fs.RealFS):
    """The real file calls; ``pwrite`` waits for ``release`` once it has its fd."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        self.entered.set()
        assert self.release.wait(10)
        return super().pwrite(fd, data, offset)


async def test_a_file_is_closed_only_after_the_lane_write_under_way_in_it(
    backend: FileBackend, tmp_path: Path
) -> None:
    held = HeldWrites()
    real = fs.use(held)
    try:
        lane = Lane()
        job = backend.pwrite_soon(0, b"X" * 4096)
        assert job is not None
        lane.lane.put(job, "w")
        assert await asyncio.to_thread(held.entered.wait, 10)  # in the write, with the fd
        closing = asyncio.ensure_future(backend.close())
        async with asyncio.timeout(10):
            while backend._fd >= 0:
                await asyncio.sleep(0)
        # a file opened now (a volume created at shutdown, say) must not get that fd's
        # number: before, the write under way went into this file
        other = tmp_path / "other"
        other.write_bytes(bytes(8192))
        fd = fs.open(other, os.O_RDWR)
        held.release.set()
        await lane.until(1)
        await asyncio.wait_for(closing, 10)
        fs.close(fd)
    finally:
        fs.use(real)
        held.release.set()
    assert lane.back[0][2] is None
    assert other.read_bytes() == bytes(8192)
    assert Path(backend.path).read_bytes()[:4096] == b"X" * 4096


async def test_a_lane_write_handed_to_a_thread_after_close_fails_and_writes_nothing(
    backend: FileBackend,
) -> None:
    lane = Lane()
    job = backend.pwrite_soon(0, b"X" * 4096)
    assert job is not None
    await backend.close()
    lane.lane.put(job, "w")
    await lane.until(1)
    error = lane.back[0][2]
    assert isinstance(error, DeltavolError) and "closed" in error.message
    assert Path(backend.path).read_bytes()[:4096] == bytes(4096)
