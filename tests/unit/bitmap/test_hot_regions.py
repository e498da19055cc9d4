"""The two tiers of a tracking file: chunk bits in the page cache at once, hot regions
durable before a first change, expanded after a reboot, cleared lazily by ``settle``.

``Disk`` watches the file: what each fdatasync made durable (the file as it was when the
sync began, once the sync returned) and every pwrite, in order. Its ``violations`` are
the writes that cleared a hot bit while a chunk bit of that region was in the file but
not durable: a power loss could then lose an acknowledged change.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import DeltavolError
from deltavol.store.group_commit import GroupCommit
from tests.fakes import until

G = 4096
R = 4 * G  # 4 chunks per hot region
SIZE = 98 * G - 512  # 98 chunks, the last one short; 25 regions, the last of 2 chunks
NBITS, NREGIONS = 98, 25
CHUNK_AT = 4096
CHUNK_BYTES = (NBITS + 7) // 8
HOT_AT = 2 * 4096  # header page, one page for the 13 bytes of chunk bits
LENGTH = HOT_AT + (NREGIONS + 7) // 8
WAIT = 10.0


def chunks_of(data: bytes) -> Bitmap:
    return Bitmap.from_bytes(SIZE, G, data[CHUNK_AT : CHUNK_AT + CHUNK_BYTES])


def hot_of(data: bytes) -> Bitmap:
    return Bitmap.from_bytes(SIZE, R, data[HOT_AT:LENGTH])


def ones(bm: Bitmap) -> list[int]:
    return [c for first, n in bm.runs() for c in range(first, first + n)]


@dataclass
class Disk:
    """os.fdatasync and os.pwrite of the tracking file, watched."""

    path: Path
    events: list[tuple[str, bytes]] = field(default_factory=list)  # ("sync" | "hot", the file then)
    durable: bytes = b""  # the file at the start of the last fdatasync that returned
    fail: bool = False  # fdatasync raises EIO
    # each sync takes the first gate, if any, and waits for it once it took its snapshot
    gates: list[threading.Event] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def syncs(self) -> list[bytes]:
        return [data for what, data in self.events if what == "sync"]

    def durable_chunks(self) -> list[int]:
        return ones(chunks_of(self.durable)) if self.durable else []

    def durable_hot(self) -> list[int]:
        return ones(hot_of(self.durable)) if self.durable else []

    def on_disk(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Disk:
    d = Disk(tmp_path / "t.bitmap")
    real_sync, real_pwrite = os.fdatasync, os.pwrite

    def fdatasync(fd: int) -> None:
        if d.fail:
            raise OSError(errno.EIO, "Input/output error")
        gate = d.gates.pop(0) if d.gates else None
        data = os.pread(fd, 1 << 16, 0)
        d.events.append(("sync", data))
        if gate is not None:
            assert gate.wait(WAIT)
        real_sync(fd)
        d.durable = data

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if offset >= HOT_AT and os.fstat(fd).st_size == LENGTH:  # the hot section of our file
            before = hot_of(os.pread(fd, 1 << 16, 0))
            n = real_pwrite(fd, data, offset)
            now = os.pread(fd, 1 << 16, 0)
            d.events.append(("hot", now))
            in_file, durable = chunks_of(now), chunks_of(d.durable) if d.durable else Bitmap(SIZE, G)
            for r in ones(before):
                if not hot_of(now).test(r):
                    lost = [
                        c
                        for c in range(r * 4, min(r * 4 + 4, NBITS))
                        if in_file.test(c) and not durable.test(c)
                    ]
                    if lost:
                        d.violations.append(f"hot region {r} cleared while chunks {lost} were not durable")
            return n
        return real_pwrite(fd, data, offset)

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        """A rewrite's new file, fsynced before it replaces the file: durable as a whole."""
        tmp = os.readlink(f"/proc/self/fd/{fd}") == f"{d.path}.tmp"
        data = os.pread(fd, 1 << 16, 0) if tmp else b""
        real_fsync(fd)
        if tmp:
            d.durable = data

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)
    return d


@pytest.fixture
def tf(disk: Disk) -> Iterator[persist.TrackingFile]:
    tf = persist.TrackingFile(disk.path, SIZE, G, GroupCommit(), region=R)
    tf.rewrite(Bitmap(SIZE, G), 1)
    data = disk.on_disk()
    assert len(data) == LENGTH and hot_of(data).is_empty()
    try:
        yield tf
    finally:
        tf.close()


@pytest.fixture
def bm() -> Bitmap:
    return Bitmap(SIZE, G)


def write(tf: persist.TrackingFile, bm: Bitmap, *chunks: int) -> asyncio.Future[None] | None:
    """A first write to ``chunks``: bits into the file, then the round that covers them if one is needed."""
    new = sorted(c for c in chunks if not bm.test(c))
    for c in new:
        bm.set(c)
    tf.write_bits(bm, new)
    futs = {id(f): f for c in new if (f := tf.cover(c)) is not None}
    assert len(futs) <= 1, "one loop turn, one round"
    return next(iter(futs.values()), None)


async def written(tf: persist.TrackingFile, bm: Bitmap, *chunks: int) -> None:
    fut = write(tf, bm, *chunks)
    if fut is not None:
        await asyncio.shield(fut)


# --- chunk bits ----------------------------------------------------------------------------
async def test_write_bits_puts_the_chunk_bit_in_the_file_at_once_without_a_sync(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    new = bm.set_range(5 * G, 2 * G) + bm.set_range(97 * G, G)
    tf.write_bits(bm, new)
    data = disk.on_disk()
    assert ones(chunks_of(data)) == [5, 6, 97]
    assert hot_of(data).is_empty() and not tf.covered(range(5, 6))
    await asyncio.sleep(0.02)  # and write_bits asked for no round
    assert not disk.syncs()
    assert persist.load(disk.path, persist.KIND_TRACKING, G, SIZE)[0].to_bytes() == bm.to_bytes()


def test_write_bits_writes_only_the_pages_of_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 3 * 32768 * G  # three pages of chunk bits
    path = tmp_path / "big.bitmap"
    tf = persist.TrackingFile(path, size, G, GroupCommit(), region=R)
    bm = Bitmap(size, G)
    tf.rewrite(bm, 1)
    writes: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        tf.write_bits(bm, bm.set_range(3 * G, G) + bm.set_range(70000 * G, G))
        assert writes == [(4096, 4096), (4096 + 2 * 4096, 4096)]
        writes.clear()
        tf.write_bits(bm, bm.set_range(32767 * G, 2 * G))  # two adjacent pages: one write
        assert writes == [(4096, 2 * 4096)]
        back = persist.load(path, persist.KIND_TRACKING, G, size)[0]
        assert ones(back) == [3, 32767, 32768, 70000]
    finally:
        tf.close()


# --- covering a region ---------------------------------------------------------------------
async def test_the_first_cover_of_a_region_waits_for_one_fdatasync_then_its_hot_bit_is_durable(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    fut = write(tf, bm, 5)
    assert fut is not None and not fut.done()
    assert write(tf, bm, 4) is fut, "a second chunk of a region being covered waits for the same round"
    assert not tf.covered(range(4, 6)), "not durable while its round runs"
    assert not disk.syncs()
    await asyncio.shield(fut)
    assert len(disk.syncs()) == 1
    assert disk.durable_hot() == [1] and disk.durable_chunks() == [4, 5]
    assert tf.covered(range(4, 8)) and not tf.covered(range(4, 9)) and not tf.covered(range(0, 4))
    assert tf.covered(range(0))

    assert write(tf, bm, 6) is None, "a durably hot region needs no round"
    assert tf.covered(range(6, 7)) and ones(chunks_of(disk.on_disk())) == [4, 5, 6]
    await asyncio.sleep(0.02)
    assert len(disk.syncs()) == 1

    fut2 = write(tf, bm, 9)  # another region: one more round
    assert fut2 is not None and fut2 is not fut
    await asyncio.shield(fut2)
    assert len(disk.syncs()) == 2 and disk.durable_hot() == [1, 2]
    assert tf.covered(range(4, 12))


async def test_a_region_with_a_short_last_chunk_is_covered(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 97)
    assert disk.durable_hot() == [NREGIONS - 1] and tf.covered(range(96, 98))


async def test_concurrent_covers_of_many_regions_share_one_fdatasync(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    starts = list(range(0, NBITS, 4))  # two chunks in each of the 25 regions
    futs: list[asyncio.Future[None] | None] = []

    async def first_write(c: int) -> None:
        fut = write(tf, bm, c, c + 1)
        futs.append(fut)
        assert fut is not None
        await asyncio.shield(fut)

    await asyncio.gather(*(first_write(c) for c in starts))
    assert len(futs) == NREGIONS and all(f is futs[0] for f in futs), "one round for all"
    assert len(disk.syncs()) == 1
    assert disk.durable_hot() == list(range(NREGIONS))
    assert disk.durable_chunks() == sorted(starts + [c + 1 for c in starts])
    assert len([e for e in disk.events if e[0] == "hot"]) == 1, "the hot page written once per round"
    assert tf.covered(range(NBITS))


async def test_a_failed_fdatasync_fails_the_waiters_and_the_next_cover_works(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 1)  # region 0 durably hot before
    disk.fail = True
    a, b = write(tf, bm, 5, 6), write(tf, bm, 9)
    assert a is not None and a is b
    results = await asyncio.gather(asyncio.shield(a), asyncio.shield(b), return_exceptions=True)
    assert all(isinstance(r, DeltavolError) and "Input/output error" in str(r) for r in results), results
    assert not tf.covered(range(4, 5)) and not tf.covered(range(8, 9))
    assert tf.covered(range(0, 4)), "a failed round takes nothing from a region durable before"
    disk.fail = False
    fut = tf.cover(5)
    assert fut is not None, "the next change in a region whose round failed asks again"
    await asyncio.shield(fut)
    assert tf.covered(range(4, 8)) and not tf.covered(range(8, 12))
    # the failed sync may have dropped pages: region 2 keeps its bit too (a superset)
    assert disk.durable_hot() == [0, 1, 2]
    assert disk.durable_chunks() == [1, 5, 6, 9]  # the chunk bits were in the file all along


# --- load ----------------------------------------------------------------------------------
def saved_with_hot(path: Path) -> None:
    chunks, hot = Bitmap(SIZE, G), Bitmap(SIZE, R)
    for c in (1, 50):
        chunks.set(c)
    for r in (0, NREGIONS - 1):
        hot.set(r)
    persist.save_atomic(path, chunks, 3, persist.KIND_TRACKING, hot)


def test_load_in_the_same_boot_returns_only_the_chunk_bits(tmp_path: Path) -> None:
    path = tmp_path / "t.bitmap"
    saved_with_hot(path)
    bm, gen = persist.load(path, persist.KIND_TRACKING, G, SIZE)
    assert gen == 3 and ones(bm) == [1, 50]


@pytest.mark.parametrize("boot", [bytes(range(16)), b""], ids=["another boot", "unknown boot"])
def test_load_after_a_reboot_adds_every_chunk_of_the_hot_regions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot: bytes
) -> None:
    path = tmp_path / "t.bitmap"
    saved_with_hot(path)
    monkeypatch.setattr(persist, "boot_id", lambda: boot)
    bm, gen = persist.load(path, persist.KIND_TRACKING, G, SIZE)
    assert gen == 3 and ones(bm) == [0, 1, 2, 3, 50, 96, 97]  # the last region: 2 chunks, no more
    assert bm.nbits == NBITS and bm.to_bytes()[-1] >> (NBITS % 8) == 0
    assert bm.bytes_set() == 7 * G - 512


def test_a_file_written_when_the_boot_was_unknown_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.bitmap"
    expanded = [0, 1, 2, 3, 50, 96, 97]
    with monkeypatch.context() as m:
        m.setattr(persist, "boot_id", lambda: b"")
        saved_with_hot(path)
        assert path.read_bytes()[45:61] == bytes(16)
        # still unknown: no telling whether the machine rebooted since
        assert ones(persist.load(path, persist.KIND_TRACKING, G, SIZE)[0]) == expanded
    assert ones(persist.load(path, persist.KIND_TRACKING, G, SIZE)[0]) == expanded


async def test_a_reboot_brings_back_the_regions_a_tracking_file_covered(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    await written(tf, bm, 1, 97)
    tf.write_bits(bm, bm.set_range(60 * G, G))  # not covered: only in the page cache
    assert ones(persist.load(disk.path, persist.KIND_TRACKING, G, SIZE)[0]) == [1, 60, 97]
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    assert ones(persist.load(disk.path, persist.KIND_TRACKING, G, SIZE)[0]) == [0, 1, 2, 3, 60, 96, 97]


# --- rewrite -------------------------------------------------------------------------------
async def test_rewrite_empties_the_hot_section_on_disk_and_in_memory(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    await written(tf, bm, 1, 50)
    assert ones(hot_of(disk.on_disk())) == [0, 12]
    tf.rewrite(bm, 9)
    data = disk.on_disk()
    assert len(data) == LENGTH and hot_of(data).is_empty() and ones(chunks_of(data)) == [1, 50]
    assert tf.hot.is_empty() and not tf.covered(range(0, 1)) and not tf.covered(range(48, 52))
    with monkeypatch.context() as m:
        m.setattr(persist, "boot_id", lambda: bytes(range(16)))
        assert ones(persist.load(disk.path, persist.KIND_TRACKING, G, SIZE)[0]) == [1, 50]
    n = len(disk.syncs())
    fut = write(tf, bm, 2)
    assert fut is not None, "after a rewrite a region must be covered again"
    await asyncio.shield(fut)
    assert len(disk.syncs()) == n + 1 and ones(hot_of(disk.on_disk())) == [0]


async def test_a_rewrite_that_fails_before_the_replace_keeps_the_hot_set_of_the_file_in_place(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    await written(tf, bm, 1)  # region 0, durably hot
    assert write(tf, bm, 2) is None  # its chunk 2: only in the page cache

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fsync)
        with pytest.raises(DeltavolError, match="Input/output error"):
            tf.rewrite(bm, 2)
    assert tf.covered(range(0, 4)), "the old file is still the file, region 0 still hot in it"
    await written(tf, bm, 9)  # another region: the hot page is written again
    assert disk.durable_hot() == [0, 2] and disk.violations == []


async def test_a_round_of_the_replaced_file_does_not_cover_a_change_after_a_rewrite(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    """A round that synced the old file before a rewrite, and whose end the loop has not
    seen yet, must not be what a change to the new file waits for."""
    fut = write(tf, bm, 5)  # region 1 comes in
    assert fut is not None
    await asyncio.sleep(0)  # the round begins: its hot bit written out, its sync in a thread
    deadline = time.monotonic() + WAIT
    while not (disk.durable and chunks_of(disk.durable).test(5)):  # the loop does not run meanwhile
        assert time.monotonic() < deadline, "the round's sync never returned"
        time.sleep(0.001)
    assert not fut.done()
    tf.rewrite(bm, 2)  # as a mark does: a new file, no region hot in it
    again = write(tf, bm, 6)  # region 1 again, in the new file
    assert again is not None and again is not fut, "a round of the replaced file covers the new one"
    await asyncio.shield(again)
    assert generation_of(disk.durable) == 2, "no sync of the new file before the change's ack"
    assert chunks_of(disk.durable).test(6) and hot_of(disk.durable).test(1)
    assert fut.done() and tf.covered(range(4, 8))


# --- hot regions carried across a mark ------------------------------------------------------
async def test_a_mark_carries_the_regions_written_since_the_last_one_durably_hot(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first changes after a mark in the regions written before it need no round: the
    new file carries their hot bits, synced with it; after a power loss a load brings back
    every chunk of them (nothing written after the mark is missed)."""
    await written(tf, bm, 1, 50)  # regions 0 and 12, by rounds
    bm.set(97)  # region 24: a bit in tracking (written), not in the hot set any more
    hot = tf.recent(bm)
    assert sorted(hot) == [0, 12, 24] and hot[0] == 24, "the hot set's own regions last: used last"
    bm.clear_all()
    tf.rewrite(bm, 2, hot)  # as a mark does
    assert ones(hot_of(disk.durable)) == [0, 12, 24] and ones(chunks_of(disk.durable)) == []
    assert generation_of(disk.durable) == 2
    n = len(disk.syncs())
    assert write(tf, bm, 2) is None and write(tf, bm, 51) is None and write(tf, bm, 96) is None
    assert len(disk.syncs()) == n, "a first change in a carried region waited for a sync"
    assert ones(chunks_of(disk.on_disk())) == [2, 51, 96]
    fut = write(tf, bm, 9)  # region 2 was not carried: it comes in by a round
    assert fut is not None
    await asyncio.shield(fut)
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    back, _, recopy = persist.load_tracking(disk.path, G, SIZE)
    assert ones(back) == [0, 1, 2, 3, 8, 9, 10, 11, 48, 49, 50, 51, 96, 97]
    assert recopy is not None and recopy.bytes == back.bytes_set() - 4 * G
    assert disk.violations == []


async def test_the_regions_a_mark_carries_keep_to_the_hot_set_and_leave_as_any_other(
    two: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(two, bm, 5)  # region 1, the hot set's
    for c in (1, 9, 13, 17):  # regions 0, 2, 3, 4: tracked, not hot
        bm.set(c)
    hot = two.recent(bm)
    assert hot == [0, 1], "at most the set: its own region first, then the lowest tracked"
    bm.clear_all()
    two.rewrite(bm, 2, hot)
    assert ones(hot_of(disk.durable)) == [0, 1] and two.covered(range(0, 8))
    n = len(disk.syncs())
    assert write(two, bm, 6) is None  # region 1 used after the mark: region 0 is the oldest
    fut = write(two, bm, 9)  # region 2 in, region 0 out in the same round (no chunk bit of it)
    assert fut is not None
    await asyncio.shield(fut)
    assert len(disk.syncs()) == n + 1 and disk.durable_hot() == [1, 2] and ones(two.hot) == [1, 2]
    assert chunks_of(disk.durable).test(6), "region 1's chunk bit durable with the round"
    assert disk.violations == []


async def test_a_region_a_mark_carried_goes_when_idle_for_two_settles(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 1, 9)  # regions 0 and 2
    hot = tf.recent(bm)
    bm.clear_all()
    tf.rewrite(bm, 2, hot)
    assert write(tf, bm, 10) is None  # region 2 written after the mark
    await tf.settle()  # carried at the mark: counts as used then
    assert ones(tf.hot) == [0, 2]
    await tf.settle()  # region 0 idle since the mark, region 2 since the first settle
    await tf.settle()
    assert tf.hot.is_empty() and hot_of(disk.on_disk()).is_empty()
    assert disk.durable_chunks() == [10]
    assert disk.violations == []


async def test_a_mark_whose_directory_sync_fails_does_not_count_the_carried_regions_hot(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the new file's name is durable a power loss may leave the old one, whose hot
    bits need not hold the carried regions: their first changes wait for a round."""
    bm.set(9)  # region 2: tracked, never hot in the old file
    hot = tf.recent(bm)
    assert hot == [2]
    bm.clear_all()

    def sync_dir(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(persist.fs, "sync_dir", sync_dir)
        with pytest.raises(DeltavolError, match="Input/output error"):
            tf.rewrite(bm, 2, hot)
    assert not tf.covered(range(8, 12))
    fut = write(tf, bm, 10)
    assert fut is not None, "a carried region counted hot before the new file's name was durable"
    await asyncio.shield(fut)
    assert tf.covered(range(8, 12))


@pytest.mark.parametrize("seed", range(4))
async def test_random_first_writes_across_marks_that_carry_hot_regions_stay_covered(
    disk: Disk, bm: Bitmap, seed: int
) -> None:
    """As the test above, with every mark carrying the regions written before it: each
    write is covered when acknowledged, by a sync or by the carrying file's fsync."""
    rng = random.Random(seed)
    tf = persist.TrackingFile(disk.path, SIZE, G, GroupCommit(), region=R, hot_set=3 * R)
    tf.rewrite(Bitmap(SIZE, G), 1)
    missed: list[int] = []
    no_round = 0

    async def first_write(c: int) -> None:
        nonlocal no_round
        await asyncio.sleep(0.001 * rng.random())
        if bm.test(c):
            return
        fut = write(tf, bm, c)
        if fut is not None:
            await asyncio.shield(fut)
        elif not chunks_of(disk.durable).test(c):
            no_round += 1
        if not chunks_of(disk.durable).test(c) and not hot_of(disk.durable).test(c * G // R):
            missed.append(c)

    try:
        for step in range(60):
            if step % 6 == 5:
                hot = tf.recent(bm)
                assert len(hot) <= 3
                bm.clear_all()
                tf.rewrite(bm, step, hot)
            burst = [rng.randrange(12) if rng.random() < 0.6 else rng.randrange(NBITS) for _ in range(6)]
            await asyncio.gather(*(first_write(c) for c in burst))
            if rng.random() < 0.2:
                await tf.settle()
        await tf.durable()
    finally:
        tf.close()
    assert not missed, missed
    assert no_round > 0, "no first write went without a round"
    assert disk.violations == []


def generation_of(data: bytes) -> int:
    return int(struct.unpack_from(">Q", data, 32)[0])


# --- the bounded hot set -------------------------------------------------------------------
@pytest.fixture
def two(disk: Disk) -> Iterator[persist.TrackingFile]:
    """A tracking file whose hot set holds two regions."""
    tf = persist.TrackingFile(disk.path, SIZE, G, GroupCommit(), region=R, hot_set=2 * R + G)
    tf.rewrite(Bitmap(SIZE, G), 1)
    try:
        yield tf
    finally:
        tf.close()


async def test_the_hot_set_keeps_to_its_size_and_the_least_recently_used_region_leaves(
    two: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert two.capacity == 2
    await written(two, bm, 1)  # region 0
    await written(two, bm, 5)  # region 1
    assert write(two, bm, 2) is None  # a new chunk bit in region 0: region 1 is the oldest now
    await written(two, bm, 9)  # region 2 comes in, region 1 leaves
    assert disk.durable_hot() == [0, 2] and ones(two.hot) == [0, 2]
    assert len(disk.syncs()) == 3, "its chunk bits were durable: it left with the round that came in"
    assert two.covered(range(0, 4)) and two.covered(range(8, 12)) and not two.covered(range(4, 8))
    assert write(two, bm, 1) is None and write(two, bm, 10) is None  # a set bit is no use
    fut = write(two, bm, 6)  # region 1 again: in with a round, region 0 (last used at 2) out
    assert fut is not None
    await asyncio.shield(fut)
    assert disk.durable_hot() == [1, 2] and ones(two.hot) == [1, 2]
    assert disk.violations == []
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    back, _, recopy = persist.load_tracking(disk.path, G, SIZE)
    assert ones(back) == [1, 2, 4, 5, 6, 7, 8, 9, 10, 11], "after a reboot: the chunks of two regions"
    assert recopy is not None and recopy.bytes == 4 * G and "restarted" in recopy.reason


async def test_a_region_written_since_the_last_sync_leaves_only_after_a_sync_of_its_bits(
    two: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(two, bm, 1)  # region 0
    await written(two, bm, 5)  # region 1
    assert write(two, bm, 2) is None  # region 0: chunk 2's bit only in the page cache
    fut = write(two, bm, 9)  # region 2 comes in; region 1 leaves at once
    assert write(two, bm, 13) is fut  # region 3 too: region 0 leaves, but not before chunk 2 is durable
    await asyncio.shield(fut)
    first = disk.syncs()[2]
    assert chunks_of(first).test(2) and ones(hot_of(first)) == [0, 2, 3], "region 0 stays through that sync"
    await until(lambda: disk.durable_hot() == [2, 3], "region 0's clearing made durable")
    assert ones(two.hot) == [2, 3] and not two.covered(range(0, 4))
    assert disk.violations == []


async def test_a_region_that_left_with_a_round_is_cleared_in_the_round_right_after(
    disk: Disk, bm: Bitmap
) -> None:
    """The group commit begins the next round before the loop runs the last one's
    callbacks: the clearing must go into that round all the same, or a synced file
    holds the regions that came in during two rounds beyond the set."""
    tf = persist.TrackingFile(disk.path, SIZE, G, GroupCommit(), region=R, hot_set=R)  # one region
    tf.rewrite(Bitmap(SIZE, G), 1)
    try:
        await written(tf, bm, 1)  # region 0
        assert write(tf, bm, 2) is None  # chunk 2: not durable yet
        gate = threading.Event()
        disk.gates.append(gate)
        first = write(tf, bm, 5)  # region 1 in; region 0 out once chunk 2 is synced
        assert first is not None
        await until(lambda: len(disk.syncs()) == 2, "that round's sync")
        second = write(tf, bm, 9)  # region 2 in, with the next round; region 1 out after it
        assert second is not None and second is not first
        gate.set()
        await asyncio.shield(second)
        assert ones(hot_of(disk.syncs()[1])) == [0, 1] and chunks_of(disk.syncs()[1]).test(2)
        assert ones(hot_of(disk.syncs()[2])) == [1, 2], "region 0 cleared in the round right after"
        await until(lambda: disk.durable_hot() == [2], "region 1's clearing made durable")
        assert disk.violations == []
    finally:
        tf.close()


async def test_a_region_on_its_way_out_comes_back_without_a_round(
    two: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(two, bm, 1)
    await written(two, bm, 5)
    assert write(two, bm, 6) is None and write(two, bm, 2) is None  # region 0 used last; not synced
    fut = write(two, bm, 9)  # region 2 comes in: region 1 leaves once its bit 6 is durable
    assert ones(two.hot) == [0, 1, 2] and not two.covered(range(4, 8))
    assert write(two, bm, 7) is None, "back in: its bit never left the file, no round"
    assert two.covered(range(4, 8)) and not two.covered(range(0, 4)), "region 0 leaves instead"
    await asyncio.shield(fut)
    await until(lambda: disk.durable_hot() == [1, 2], "region 0's clearing made durable")
    assert ones(two.hot) == [1, 2] and two.covered(range(4, 8))
    assert disk.violations == []


@pytest.mark.parametrize("seed", range(6))
async def test_random_first_writes_keep_every_acknowledged_chunk_covered_and_the_set_bounded(
    disk: Disk, bm: Bitmap, seed: int
) -> None:
    """Bursts of first writes at random (some in a few favourite regions, so that regions
    of the set keep getting new chunk bits), settles in between: each write, when it is
    acknowledged, has its chunk bit or its region's bit in the file as of a sync that
    returned; no write of hot bits clears a region before its chunk bits are durable; and
    a synced file holds at most the set plus the regions that came in during one round."""
    rng = random.Random(seed)
    tf = persist.TrackingFile(disk.path, SIZE, G, GroupCommit(), region=R, hot_set=3 * R)
    tf.rewrite(Bitmap(SIZE, G), 1)
    missed: list[int] = []
    largest_burst = 0

    async def first_write(c: int) -> None:
        await asyncio.sleep(0.001 * rng.random())
        if bm.test(c):
            return
        fut = write(tf, bm, c)
        if fut is not None:
            await asyncio.shield(fut)
        durable = chunks_of(disk.durable)
        if not durable.test(c) and not hot_of(disk.durable).test(c * G // R):
            missed.append(c)

    try:
        for step in range(40):
            if step % 10 == 9:
                bm.clear_all()  # as a mark does: the file replaced, every chunk new again
                tf.rewrite(bm, step)
            burst = [rng.randrange(12) if rng.random() < 0.3 else rng.randrange(NBITS) for _ in range(6)]
            largest_burst = max(largest_burst, len(set(burst)))
            await asyncio.gather(*(first_write(c) for c in burst))
            if rng.random() < 0.2:
                await tf.settle()
        await tf.durable()
    finally:
        tf.close()
    assert not missed, missed
    assert disk.violations == []
    assert max(hot_of(data).count() for data in disk.syncs()) <= 3 + largest_burst


# --- a failed fdatasync --------------------------------------------------------------------
async def test_after_a_failed_fdatasync_hot_regions_stay_and_load_adds_them_in_this_boot(
    two: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may drop the pages a failed writeback held and report it once: the
    next fdatasync succeeds without them. Chunk 2's bit may be gone from the file for good."""
    await written(two, bm, 1)  # region 0
    assert write(two, bm, 2) is None  # only in the page cache
    disk.fail = True
    with pytest.raises(DeltavolError, match="Input/output error"):
        await two.settle()
    disk.fail = False
    assert two.lost is not None
    await written(two, bm, 5)  # region 1
    await written(two, bm, 9)  # region 2: the set holds two, region 0 keeps its bit all the same
    await until(lambda: disk.durable[45:61] == b"\xff" * 16, "the header saying so, durable")
    assert disk.durable_hot() == [0, 1, 2] and disk.violations == []
    back, _, recopy = persist.load_tracking(disk.path, G, SIZE)  # in this boot
    assert ones(back) == list(range(12)) and recopy is not None and "fdatasync" in recopy.reason

    await two.settle()  # writes the file again, from memory
    assert two.lost is None and hot_of(disk.on_disk()).is_empty()
    assert persist.load_tracking(disk.path, G, SIZE)[2] is None
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    assert ones(persist.load(disk.path, persist.KIND_TRACKING, G, SIZE)[0]) == [1, 2, 5, 9]
    await written(two, bm, 13)  # the set works as before
    await written(two, bm, 17)
    assert ones(two.hot) == [3, 4]


async def test_after_a_failed_fdatasync_the_settle_timer_writes_the_file_again(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persist, "SETTLE_SECONDS", 0.05)
    tf.write_bits(bm, bm.set_range(5 * G, G))  # no region comes in: no settle timer yet
    disk.fail = True
    with pytest.raises(DeltavolError, match="Input/output error"):
        await tf.durable()
    disk.fail = False
    assert tf.lost is not None
    await until(lambda: tf.lost is None, "the settle timer writing the file again")
    back, _, recopy = persist.load_tracking(disk.path, G, SIZE)
    assert recopy is None and ones(back) == [5] and hot_of(disk.on_disk()).is_empty()


# --- settle --------------------------------------------------------------------------------
async def test_settle_clears_a_region_idle_for_a_period_and_keeps_one_with_a_new_chunk_bit(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 1, 9)  # regions 0 and 2
    await tf.settle()  # both got chunk bits in this period: both stay
    assert ones(tf.hot) == [0, 2] and ones(hot_of(disk.on_disk())) == [0, 2]
    assert write(tf, bm, 10) is None  # region 2 again, no round
    mark = len(disk.events)
    await tf.settle()
    assert ones(tf.hot) == [2] and ones(hot_of(disk.on_disk())) == [2]
    assert not tf.covered(range(0, 4)) and tf.covered(range(8, 12))
    after = disk.events[mark:]
    assert [what for what, _ in after] == ["sync", "hot"], "chunk bits durable first, then the clearing"
    assert chunks_of(after[0][1]).test(10) and ones(hot_of(after[1][1])) == [2]
    await tf.settle()  # region 2 idle for a period now
    assert tf.hot.is_empty() and hot_of(disk.on_disk()).is_empty()
    assert write(tf, bm, 2) is not None, "a cleared region is covered again"
    assert disk.violations == []


async def test_settle_makes_chunk_bits_durable_before_it_clears_their_region(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 1)
    assert write(tf, bm, 2) is None  # only in the page cache
    assert disk.durable_chunks() == [1]
    await tf.settle(everything=True)
    assert disk.violations == []
    clearing = next(
        i for i, (what, data) in enumerate(disk.events) if what == "hot" and not hot_of(data).test(0)
    )
    assert any(chunks_of(data).test(2) for what, data in disk.events[:clearing] if what == "sync")


async def test_settle_everything_clears_all_and_leaves_the_hot_section_empty_on_disk(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    await written(tf, bm, *range(0, NBITS, 4))
    write(tf, bm, 5)  # new chunk bits in this period: settle() would keep them
    write(tf, bm, 97)
    n = len(disk.syncs())
    await tf.settle(everything=True)
    assert len(disk.syncs()) == n + 2, "one round for the chunk bits, one for the cleared hot bits"
    assert tf.hot.is_empty() and disk.durable_hot() == [] and hot_of(disk.on_disk()).is_empty()
    assert disk.durable_chunks() == ones(bm)
    assert disk.violations == []
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    assert ones(persist.load(disk.path, persist.KIND_TRACKING, G, SIZE)[0]) == ones(bm)


async def test_settle_keeps_the_regions_written_to_while_it_syncs(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 17)  # region 4, durably hot
    gate = threading.Event()
    disk.gates.append(gate)
    settling = asyncio.ensure_future(tf.settle(everything=True))
    await until(lambda: len(disk.syncs()) == 2, "settle's first sync")
    assert write(tf, bm, 18) is None  # region 4: no round, and the sync running began before
    late = write(tf, bm, 21)  # region 5: a round after the running one
    assert late is not None
    gate.set()
    await settling
    await asyncio.shield(late)
    assert ones(tf.hot) == [4, 5] and tf.covered(range(16, 24))
    assert disk.violations == []


async def test_two_settles_at_once_clear_no_region_before_its_chunk_bits_are_durable(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap
) -> None:
    await written(tf, bm, 1)  # region 0, durably hot
    await tf.settle()  # keeps it (a chunk bit in this period); none since
    first, second = threading.Event(), threading.Event()
    disk.gates += [first, second]
    timer = asyncio.ensure_future(tf.settle())  # as the settle timer does
    await until(lambda: len(disk.syncs()) == 3, "the first settle's sync")
    assert write(tf, bm, 2) is None  # region 0 is durably hot: page cache only
    shutdown = asyncio.ensure_future(tf.settle(everything=True))  # as Session.shutdown does
    await asyncio.sleep(0)
    first.set()  # the timer's settle goes on while the shutdown's sync has not returned
    await until(timer.done, "the timer's settle")
    second.set()
    await asyncio.gather(timer, shutdown)
    assert disk.durable_chunks() == [1, 2]
    assert disk.violations == []


# --- the settle timer ----------------------------------------------------------------------
async def test_the_settle_timer_clears_hot_regions_by_itself(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persist, "SETTLE_SECONDS", 0.05)
    await written(tf, bm, 1, 9)
    await until(tf.hot.is_empty, "the settle timer")
    assert hot_of(disk.on_disk()).is_empty()
    n = len(disk.syncs())
    assert n >= 3, "the cover, then two settles: the first keeps what was written in its period"
    await asyncio.sleep(0.2)
    assert len(disk.syncs()) == n, "no more settles once no region is hot"
    await written(tf, bm, 50)  # a new hot region starts the timer again
    await until(tf.hot.is_empty, "the settle timer, again")
    assert disk.violations == []


def count_settles(tf: persist.TrackingFile, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    real = tf.settle

    async def settle(everything: bool = False) -> None:
        calls.append(everything)
        await real(everything)

    monkeypatch.setattr(tf, "settle", settle)
    return calls


async def test_close_cancels_the_settle_timer(
    tf: persist.TrackingFile, disk: Disk, bm: Bitmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(persist, "SETTLE_SECONDS", 0.05)
    settles = count_settles(tf, monkeypatch)
    await written(tf, bm, 1)
    tf.close()
    await asyncio.sleep(0.2)
    assert settles == [] and len(disk.syncs()) == 1 and ones(tf.hot) == [0], "no settle after close"
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_close_during_a_settle_ends_it_without_a_new_timer(
    tf: persist.TrackingFile,
    disk: Disk,
    bm: Bitmap,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(persist, "SETTLE_SECONDS", 0.05)
    settles = count_settles(tf, monkeypatch)
    await written(tf, bm, 1)
    gate = threading.Event()
    disk.gates.append(gate)  # for the settle's sync
    await until(lambda: len(disk.syncs()) == 2, "the timer's settle")
    release = threading.Timer(0.1, gate.set)  # close waits for the running sync
    release.start()
    tf.close()
    release.join()
    # the settle ends once its sync's thread hands back, which a loaded machine may delay
    await until(lambda: asyncio.all_tasks() == {asyncio.current_task()}, "the settle's end")
    await asyncio.sleep(0.2)  # a new timer's settle (0.05 s) would run meanwhile
    assert settles == [False] and len(disk.syncs()) == 2
    assert ones(tf.hot) == [0], "the cancelled settle cleared nothing, and none ran after it"
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
