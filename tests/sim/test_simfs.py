"""The simulated disk and target keep the promises of the real ones, and no more."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from random import Random

import pytest

from tests.sim.simfs import BLOCK, FALLOC_FL_PUNCH_HOLE, Clock, Halt, SimFS, SimLoop, SimTarget, TargetHost

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


def extents(fs: SimFS, fd: int) -> list[tuple[int, int]]:
    """(start, end) of each data run, by SEEK_DATA / SEEK_HOLE as a backend scans them."""
    out, pos = [], 0
    while True:
        try:
            start = fs.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            return out
        pos = fs.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, pos))


def test_seek_data_and_hole_follow_what_was_written_punched_and_cut() -> None:
    fs = disk()
    fd = fs.open(F, os.O_RDWR | os.O_CREAT)
    fs.ftruncate(fd, 8 * BLOCK)
    assert extents(fs, fd) == []  # a new file of that size: all hole
    fs.pwrite(fd, b"a" * 100, BLOCK + 10)  # its block is data, whole (the file system's unit)
    fs.pwrite(fd, b"b" * (BLOCK + 200), 3 * BLOCK)
    assert extents(fs, fd) == [(BLOCK, 2 * BLOCK), (3 * BLOCK, 5 * BLOCK)]
    fs.fallocate(fd, FALLOC_FL_PUNCH_HOLE | 1, 3 * BLOCK, BLOCK + 100)  # frees only whole blocks
    assert extents(fs, fd) == [(BLOCK, 2 * BLOCK), (4 * BLOCK, 5 * BLOCK)]
    assert fs.pread(fd, BLOCK + 200, 3 * BLOCK) == bytes(BLOCK + 100) + b"b" * 100
    fs.fallocate(fd, 0x10 | 1, 6 * BLOCK, BLOCK)  # FALLOC_FL_ZERO_RANGE: zeroes, allocated
    fs.ftruncate(fd, 4 * BLOCK + 1)  # cuts the zeroed block off, keeps the one it ends in
    assert extents(fs, fd) == [(BLOCK, 2 * BLOCK), (4 * BLOCK, 4 * BLOCK + 1)]
    with pytest.raises(OSError) as err:
        fs.lseek(fd, 4 * BLOCK + 1, os.SEEK_HOLE)
    assert err.value.errno == errno.ENXIO


def test_a_punch_not_synced_survives_a_power_loss_whole_or_not_at_all() -> None:
    seen = set()
    for seed in range(30):
        fs = disk(seed)
        fd = fs.open(F, os.O_RDWR | os.O_CREAT)
        fs.pwrite(fd, b"d" * 2 * BLOCK, 0)
        fs.fsync(fd)
        fs.sync_dir(D)
        fs.fallocate(fd, FALLOC_FL_PUNCH_HOLE | 1, 0, 2 * BLOCK)
        fs.power_loss()
        fd = fs.open(F, os.O_RDWR)
        data, runs = fs.pread(fd, 2 * BLOCK, 0), extents(fs, fd)
        assert (data, runs) in ((bytes(2 * BLOCK), []), (b"d" * 2 * BLOCK, [(0, 2 * BLOCK)]))
        seen.add(runs == [])
    assert seen == {True, False}


def copy_racing_a_write(seed: int, sync: bool = False, die: bool = False) -> tuple[SimFS, bytes, list[str]]:
    """Copy 16 blocks of "o" from file ``F`` to ``G`` in a pool thread, with copy_file_range,
    while the loop writes "n" over the source's first and last blocks; -> the disk, the
    target's page cache, and the order things happened in."""
    clock = Clock()
    fs, loop = SimFS(Random(seed), clock), SimLoop(clock)
    fs.io_delay = lambda: 0.001
    size, order = 16 * BLOCK, []
    src, dst = fs.open(F, os.O_RDWR | os.O_CREAT), fs.open(D / "g", os.O_RDWR | os.O_CREAT)
    fs.pwrite(src, b"o" * size, 0)
    fs.ftruncate(dst, size)
    fs.fsync(dst)
    fs.sync_dir(D)

    def _copy_from() -> None:  # (FileBackend's name: a hand-off of it runs in a worker)
        pos = 0
        while pos < size:
            order.append(f"copy at {pos}")
            pos += fs.copy_file_range(src, dst, size - pos, pos, pos)
        order.append(f"copied {pos}")

    async def run() -> None:
        job = fs.run_in_pool(None, _copy_from)  # type: ignore[arg-type]
        await asyncio.sleep(0.0015)  # the copy started, and parked after a piece
        for at in (0, size - BLOCK):
            fs.pwrite(src, b"n" * BLOCK, at)
            order.append(f"wrote {at}")
        if die:
            fs.dead = True
            return
        await job
        if sync:
            fs.fsync(dst)

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    if die:
        fs.restart()
    copied = fs.view(D / "g")
    fs.close_workers()
    return fs, copied, order


def test_a_kernel_copy_goes_in_pieces_that_a_write_can_come_between() -> None:
    mixes = set()
    for seed in range(6):
        _, copied, order = copy_racing_a_write(seed)
        assert order.index("wrote 0") > 0 and order[-1] == f"copied {16 * BLOCK}", order
        assert all(copied[i : i + 512] in (b"o" * 512, b"n" * 512) for i in range(0, len(copied), 512))
        mixes.add((copied[0:1], copied[-1:]))
        assert copy_racing_a_write(seed)[1:] == (copied, order)  # a seed replays
    assert (b"o", b"n") in mixes  # the first block copied before the write, the last after


def test_a_kernel_copy_is_lost_unless_synced_and_stops_where_its_process_died() -> None:
    kept = set()
    for seed in range(20):
        fs, copied, _ = copy_racing_a_write(seed)
        fs.power_loss()
        after = fs.read_bytes(D / "g")
        for i in range(0, len(copied), 512):
            assert after[i : i + 512] in (copied[i : i + 512], bytes(512))
            kept.add(after[i : i + 512] == copied[i : i + 512])
        fs, copied, _ = copy_racing_a_write(seed, sync=True)
        fs.power_loss()
        assert fs.read_bytes(D / "g") == copied
    assert kept == {True, False}
    fs, copied, order = copy_racing_a_write(1, die=True)
    assert order[-2:] == ["wrote 0", f"wrote {15 * BLOCK}"]  # and then it died, in a piece
    assert order[-3].startswith("copy at") and copied == fs.view(D / "g")
    assert copied[:1] == b"o" and copied[-BLOCK:] == bytes(BLOCK)  # the rest never happened
