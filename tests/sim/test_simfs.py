"""The simulated disk and target keep the promises of the real ones, and no more."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from random import Random

import pytest

from tests.sim.simfs import Clock, Halt, SimFS, SimTarget, TargetHost

D = Path("/sim/d")
F = D / "f"


def disk(seed: int = 0) -> SimFS:
    return SimFS(Random(seed), Clock())


def test_synced_writes_and_names_survive_a_power_loss() -> None:
    fs = disk()
    fd = fs.open(F, os.O_RDWR | os.O_CREAT)
    fs.pwrite(fd, b"a" * 1024, 0)
    fs.fsync(fd)
    fs.sync_dir(D)
    fs.power_loss()
    assert fs.read_bytes(F) == b"a" * 1024


def test_unsynced_writes_may_be_lost_or_torn_at_sectors() -> None:
    seen = set()
    for seed in range(200):
        fs = disk(seed)
        fd = fs.open(F, os.O_RDWR | os.O_CREAT)
        fs.pwrite(fd, bytes(1024), 0)
        fs.fsync(fd)
        fs.sync_dir(D)
        fs.pwrite(fd, b"x" * 1024, 0)
        fs.power_loss()
        data = fs.read_bytes(F)
        assert all(data[i : i + 512] in (bytes(512), b"x" * 512) for i in (0, 512))
        seen.add(data)
    assert seen == {bytes(1024), b"x" * 1024, b"x" * 512 + bytes(512), bytes(512) + b"x" * 512}


def test_a_rename_needs_a_directory_sync() -> None:
    lost = 0
    for seed in range(20):
        fs = disk(seed)
        fd = fs.open(D / "tmp", os.O_RDWR | os.O_CREAT)
        fs.pwrite(fd, b"new", 0)
        fs.fsync(fd)
        fs.replace(D / "tmp", F)
        fs.power_loss()
        lost += not fs.exists(F)
    assert 0 < lost < 20


def test_a_failed_fsync_drops_the_writes_it_could_not_make_durable() -> None:
    fs = disk()
    fd = fs.open(F, os.O_RDWR | os.O_CREAT)
    fs.fsync(fd)
    fs.sync_dir(D)
    fs.pwrite(fd, b"y" * 512, 0)
    fs.fault = lambda op, path: errno.EIO if op == "fsync" else None
    with pytest.raises(OSError):
        fs.fsync(fd)
    fs.fault = lambda op, path: None
    fs.fsync(fd)  # succeeds: the kernel marked the pages clean
    assert fs.pread(fd, 512, 0) == b"y" * 512  # still in the page cache
    fs.power_loss()
    assert fs.read_bytes(F) == b""


def test_a_crash_point_kills_the_process_for_good() -> None:
    fs = disk()
    fs.crash_at = 2
    fd = fs.open(F, os.O_RDWR | os.O_CREAT)
    with pytest.raises(Halt):
        fs.pwrite(fd, b"z", 0)
    with pytest.raises(Halt):
        fs.fsync(fd)
    fs.restart()
    assert fs.read_bytes(F) == b""  # a kill -9 keeps the page cache, which never got the write


def test_a_target_flush_covers_only_writes_completed_before_it() -> None:
    async def run() -> TargetHost:
        host = TargetHost("t", 4096, Random(1), disk())
        target = await SimTarget(host, Clock(), 4096).open()
        await target.pwrite(0, b"a" * 512)
        flush = asyncio.ensure_future(target.flush())  # sent now: covers the write above
        await asyncio.sleep(0)
        await target.pwrite(512, b"b" * 512)  # completes while the flush is in flight
        await flush
        return host

    for _ in range(10):
        host = asyncio.run(run())
        host.crash()
        assert host.durable[0:512] == b"a" * 512
        assert host.durable[512:1024] in (bytes(512), b"b" * 512)
