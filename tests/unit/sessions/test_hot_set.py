"""The bounded hot set under random writes over a large volume.

A session tracks a 64 GiB sparse file written to at random, a few thousand 4 KiB
changes with many in flight, down the real write path (``BeforeChange`` and the
session's hooks over a ``FileBackend``). ``PowerCut`` keeps the tracking file as a power
loss would leave it: as it was when the last fdatasync that returned began (or the
fsync of its last rewrite). Every acknowledged change must be covered by that file --
its chunk bit, or a hot region -- at the instant it is acknowledged; and once the power
is cut and the session reopened in another boot, the tracking bitmap must hold every
acknowledged change and re-copy no more than the hot set beyond the chunks really
written. Without a bound, each region written to stays hot while new chunk bits keep
coming, and a power loss re-copies nearly every region the workload touched.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.backend.file import FileBackend
from deltavol.backend.gate import WriteGate
from deltavol.backend.hooks import BeforeChange
from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import DeltavolError
from deltavol.sessions.manager import _SourceWiring
from deltavol.sessions.session import Session
from deltavol.store import fs
from deltavol.store.group_commit import GroupCommit

GIB = 1 << 30
MIB = 1 << 20
SIZE = 64 * GIB
G = 64 * 1024
REGION = 4 * MIB
BLOCK = 4096
WRITES = 3000
INFLIGHT = 32
NAME = "s"


class PowerCut:
    """The tracking file as a power loss leaves it, and what that file covers."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.raw = b""  # the file at the start of the last sync that returned
        self.synced: list[bytes] = []  # each such file, in order
        self.hot_counts: list[int] = []  # hot regions in each such file
        self.violations: list[str] = []  # hot bits cleared before their chunk bits were durable
        # the last synced file and the chunks it covers, published as one tuple by the
        # sync's thread before that sync returns: a check on the loop never pairs a newer
        # file with an older file's coverage, nor caches coverage the thread then outdates
        self._covered: tuple[bytes, Bitmap] | None = None

    @staticmethod
    def _path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")

    def _synced(self, raw: bytes) -> None:
        self._covered = (raw, covered_by(raw))
        self.raw = raw
        self.synced.append(raw)
        self.hot_counts.append(hot_of(raw).count())

    def fdatasync(self, real: Callable[[int], None], fd: int) -> None:
        if self._path(fd) != self.path:
            real(fd)
            return
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
        real(fd)
        self._synced(raw)

    def fsync(self, real: Callable[[int], None], fd: int) -> None:
        path = self._path(fd)
        raw = Path(path).read_bytes() if path == self.path + ".tmp" else None  # a rewrite
        real(fd)
        if raw is not None:
            self._synced(raw)

    def pwrite(self, real: Callable[[int, bytes, int], int], fd: int, data: bytes, offset: int) -> int:
        """A write of hot bits must clear none whose region has a chunk bit in the file
        that the last sync did not make durable: a power cut could lose that bit."""
        if offset < HOT_AT or self._path(fd) != self.path:
            return real(fd, data, offset)
        before = hot_of(os.pread(fd, os.fstat(fd).st_size, 0))
        n = real(fd, data, offset)
        now = os.pread(fd, os.fstat(fd).st_size, 0)
        in_file, durable = chunks_of(now), chunks_of(self.raw)
        per = REGION // G
        for first, count in before.runs():
            for r in range(first, first + count):
                if not hot_of(now).test(r):
                    lost = [
                        c for c in range(r * per, (r + 1) * per) if in_file.test(c) and not durable.test(c)
                    ]
                    if lost:
                        self.violations.append(f"region {r} cleared before chunks {lost} were durable")
        return n

    def covers(self, chunk: int) -> bool:
        """True if a load in another boot brings ``chunk`` back."""
        covered = self._covered  # one read: a sync may publish a newer one meanwhile
        return covered is not None and covered[1].test(chunk)


def covered_by(raw: bytes) -> Bitmap:
    """The chunks a load of the file ``raw`` in another boot returns."""
    bits = chunks_of(raw)
    for first, n in hot_of(raw).runs():
        bits.set_run(first * (REGION // G), n * (REGION // G))
    return bits


HOT_AT = persist._hot_at(Bitmap(SIZE, G).nbits)


def chunks_of(raw: bytes) -> Bitmap:
    n = (Bitmap(SIZE, G).nbits + 7) // 8
    return Bitmap.from_bytes(SIZE, G, raw[persist.HEADER_SIZE : persist.HEADER_SIZE + n])


def hot_of(raw: bytes) -> Bitmap:
    return Bitmap.from_bytes(SIZE, REGION, raw[HOT_AT : HOT_AT + (SIZE // REGION + 7) // 8])


@pytest.fixture
def cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PowerCut:
    pc = PowerCut(tmp_path / f"{NAME}.tracking")
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: pc.fdatasync(real_fdatasync, fd))
    monkeypatch.setattr(os, "fsync", lambda fd: pc.fsync(real_fsync, fd))
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pc.pwrite(real_pwrite, fd, data, offset))
    return pc


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[FileBackend]:
    path = tmp_path / "src.img"
    with path.open("wb") as f:
        f.truncate(SIZE)  # sparse
    backend = FileBackend("src", str(path))
    yield backend
    os.close(backend._fd)


def new_session(tmp_path: Path, **kw: Any) -> Session:
    source: Any = SimpleNamespace(name="src", size=SIZE)
    return Session(
        name=NAME,
        source=source,
        target_spec="dst",
        granularity=G,
        files=tmp_path,
        save_dir=tmp_path,
        gate=WriteGate(),
        commit=GroupCommit(),
        open_target=None,
        persist_row=lambda s: None,
        **kw,
    )


@pytest.mark.parametrize(
    ("hot_set", "slack", "local"),
    [(None, 0, 0), (16 * MIB, INFLIGHT, 0), (16 * MIB, INFLIGHT, 4)],
    ids=[
        "default 1GiB: the file keeps to it",
        "16MiB: fewer regions than writes in flight",
        "16MiB, every 4th write in 8 regions: regions leave with new chunk bits",
    ],
)
async def test_a_power_loss_after_random_writes_recopies_at_most_the_hot_set(
    tmp_path: Path,
    cut: PowerCut,
    volume: FileBackend,
    monkeypatch: pytest.MonkeyPatch,
    hot_set: int | None,
    slack: int,
    local: int,
) -> None:
    """``slack``: regions the file may hold beyond the set, when more regions than it
    holds are first written to within one round (their bits are not durable yet).
    ``local``: every local-th write goes to the first 8 regions, so that regions of the
    set keep getting new chunk bits while they are the least recently used."""
    s = new_session(tmp_path, **({} if hot_set is None else {"hot_set": hot_set}))
    bound = GIB if hot_set is None else hot_set
    s.create_files()
    wiring = _SourceWiring(gate=s._gate, commit=s._commit, sessions=[s])
    wiring.rehook()
    layer = BeforeChange(volume, wiring.hooks, wiring.gate)  # type: ignore[arg-type]
    rng = random.Random(20261130)
    offsets = [
        rng.randrange((8 * REGION if local and i % local == 0 else SIZE) // BLOCK) * BLOCK
        for i in range(WRITES)
    ]
    acked: set[int] = set()
    missed: list[int] = []
    acks: list[tuple[int, int]] = []  # (chunk, syncs returned before its ack)

    async def writer(mine: list[int]) -> None:
        for off in mine:
            data = off.to_bytes(8, "big") * (BLOCK // 8)
            if not layer.pwrite_now(off, data):
                await layer.pwrite(off, data)
            c = off // G
            if not cut.covers(c):
                missed.append(c)
            acked.add(c)
            acks.append((c, len(cut.synced)))

    await asyncio.gather(*(writer(offsets[i::INFLIGHT]) for i in range(INFLIGHT)))
    assert not missed, f"acknowledged before a durable record covered them: {missed[:10]}"
    assert len(acked) > 2000 and len({c * G // REGION for c in acked}) > 2000  # scattered
    assert max(cut.hot_counts) <= bound // REGION + slack
    assert not cut.violations, cut.violations[:5]
    for i, raw in enumerate(cut.synced):  # a power cut after any later sync loses none of them
        covered = covered_by(raw)
        lost = [c for c, n in acks if n <= i + 1 and not covered.test(c)]
        assert not lost, f"sync {i} of {len(cut.synced)}: acknowledged chunks no longer covered: {lost[:10]}"

    # the power goes: the tracking file is what the last sync left; the machine reboots
    tracked = s.tracking.copy()
    assert s.tracking_file is not None
    s.tracking_file.close()
    Path(cut.path).write_bytes(cut.raw)
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    again = new_session(tmp_path, **({} if hot_set is None else {"hot_set": hot_set}))
    again.load_files()
    try:
        back = again.tracking
        assert all(back.test(c) for c in acked), "an acknowledged change is not tracked after the power loss"
        recopy = back.bytes_set() - tracked.bytes_set()
        assert recopy <= bound + slack * REGION, f"re-copies {recopy / MIB:.0f} MiB beyond what was written"
        assert again.recopy is not None and again.recopy.bytes == recopy
        st = again.status()
        assert st["recopy_bytes"] == recopy and "restarted" in st["full_reason"]
    finally:
        assert again.tracking_file is not None
        again.tracking_file.close()


async def test_a_failed_fdatasync_of_the_tracking_file_shows_in_status_until_it_is_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = new_session(tmp_path)
    s.create_files()
    assert s.tracking_file is not None
    real, failing = os.fdatasync, [True]

    def fdatasync(fd: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        (first,) = s.track(0, BLOCK)
        with pytest.raises(DeltavolError, match="Input/output error"):
            await asyncio.shield(first)
        assert "fdatasync" in s.status()["full_reason"]
        failing[0] = False
        (retry,) = s.track(0, BLOCK)
        await asyncio.shield(retry)
        # a sync succeeds now, yet pages may be gone: a load, even in this boot, adds the hot set
        recopy = persist.load_tracking(s.files.tracking_path, G, SIZE)[2]
        assert recopy is not None and recopy.bytes == REGION - G and "fdatasync" in recopy.reason
        await s.tracking_file.settle()  # the file written again from memory
        assert s.status()["full_reason"] is None
        back, _, recopy = persist.load_tracking(s.files.tracking_path, G, SIZE)
        assert recopy is None and list(back.runs()) == [(0, 1)]
    finally:
        s.tracking_file.close()


@pytest.mark.parametrize(
    ("hot_set", "ws_regions"),
    [(None, 64), (16 * MIB, 64)],
    ids=["working set in the hot set", "working set 16 times the hot set"],
)
async def test_first_writes_after_a_mark_into_the_regions_written_before_it_need_no_sync(
    tmp_path: Path,
    cut: PowerCut,
    volume: FileBackend,
    monkeypatch: pytest.MonkeyPatch,
    hot_set: int | None,
    ws_regions: int,
) -> None:
    """A workload writes at random in a working set of regions, the session marks (the
    tracking file replaced as a mark does it, under the closed gate), and the workload
    goes on in the same regions. When the working set fits in the hot set, the mark
    carries it: none of the first writes after the mark waits for a tracking sync. Either
    way every acknowledged write is covered by the tracking file as a power cut would
    leave it, and after the cut, in another boot, every one is tracked, with a re-copy
    within the hot set."""
    kw = {} if hot_set is None else {"hot_set": hot_set}
    bound = GIB if hot_set is None else hot_set
    s = new_session(tmp_path, **kw)
    s.create_files()
    wiring = _SourceWiring(gate=s._gate, commit=s._commit, sessions=[s])
    wiring.rehook()
    layer = BeforeChange(volume, wiring.hooks, wiring.gate)  # type: ignore[arg-type]
    rng = random.Random(1130)
    base = [rng.randrange(SIZE // REGION) * REGION for _ in range(ws_regions)]  # scattered regions
    missed: list[int] = []

    async def writes(n: int) -> tuple[set[int], int]:
        offsets = [rng.choice(base) + rng.randrange(REGION // BLOCK) * BLOCK for _ in range(n)]
        acked: set[int] = set()
        syncs = len(cut.synced)

        async def writer(mine: list[int]) -> None:
            for off in mine:
                data = off.to_bytes(8, "big") * (BLOCK // 8)
                if not layer.pwrite_now(off, data):
                    await layer.pwrite(off, data)
                if not cut.covers(off // G):
                    missed.append(off // G)
                acked.add(off // G)

        await asyncio.gather(*(writer(offsets[i::INFLIGHT]) for i in range(INFLIGHT)))
        return acked, len(cut.synced) - syncs

    await writes(2000)
    async with s._gate.closed():  # the mark's last step, after its commit
        await s._reset_tracking()
    assert s.tracking.is_empty()
    acked, syncs = await writes(1000)
    assert not missed, f"acknowledged before a durable record covered them: {missed[:10]}"
    if bound >= ws_regions * REGION:
        assert syncs == 0, f"{syncs} tracking syncs for first writes in regions carried by the mark"
    else:
        assert syncs > 10  # the regions come in again, a sync each round
    assert not cut.violations, cut.violations[:5]

    # the power goes; the machine reboots
    tracked = s.tracking.copy()
    assert s.tracking_file is not None
    s.tracking_file.close()
    Path(cut.path).write_bytes(cut.raw)
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    again = new_session(tmp_path, **kw)
    again.load_files()
    try:
        back = again.tracking
        assert all(back.test(c) for c in acked), "a change after the mark is not tracked after the power loss"
        recopy = back.bytes_set() - tracked.bytes_set()
        assert 0 < recopy <= bound + INFLIGHT * REGION, f"re-copies {recopy / MIB:.0f} MiB"
    finally:
        assert again.tracking_file is not None
        again.tracking_file.close()


def failing_dir_sync(monkeypatch: pytest.MonkeyPatch, log: list[str]) -> None:
    """The next directory sync fails (EIO); each call is logged."""
    real = fs._current.sync_dir
    left = {"fail": 1}

    def sync_dir(path: Path) -> None:
        if left["fail"]:
            left["fail"] -= 1
            log.append("sync_dir failed")
            raise OSError(errno.EIO, "Input/output error")
        real(path)
        log.append("sync_dir")

    monkeypatch.setattr(fs._current, "sync_dir", sync_dir)


async def test_after_a_failed_directory_sync_the_carried_regions_count_in_the_bound(
    tmp_path: Path, volume: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hot set of 4 regions: 4 are written, a mark carries them and the directory sync
    of its rewrite fails; 4 new regions come in. The carried ones must leave as any
    other: the file's hot section keeps to the bound (plus the regions of one round)."""
    s = new_session(tmp_path, hot_set=4 * REGION)
    s.create_files()
    wiring = _SourceWiring(gate=s._gate, commit=s._commit, sessions=[s])
    wiring.rehook()
    layer = BeforeChange(volume, wiring.hooks, wiring.gate)  # type: ignore[arg-type]
    tf = s.tracking_file
    assert tf is not None
    try:
        for r in (1, 2, 3, 4):
            await layer.pwrite(r * REGION, b"a" * BLOCK)
        log: list[str] = []
        failing_dir_sync(monkeypatch, log)
        async with s._gate.closed():  # the mark's last step, after its commit
            await s._after_commit_wait("resetting tracking", s._reset_tracking)
        assert log == ["sync_dir failed"]
        assert list(hot_of(Path(tf.path).read_bytes()).runs()) == [(1, 4)], "carried into the new file"
        for r in (20, 21, 22, 23):
            await layer.pwrite(r * REGION, b"c" * BLOCK)
        await tf.durable()
        on_disk = hot_of(Path(tf.path).read_bytes())
        assert on_disk.count() <= tf.capacity + 1, f"{list(on_disk.runs())} hot, bound {tf.capacity}"
        assert all(on_disk.test(r) for r in (20, 21, 22, 23))
    finally:
        tf.close()


async def test_a_change_in_a_region_carried_before_a_failed_directory_sync_waits_for_one(
    tmp_path: Path, volume: FileBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss after a failed directory sync may leave the old file: a change in a
    carried region is acknowledged only after a round that synced the directory."""
    s = new_session(tmp_path, hot_set=16 * REGION)
    s.create_files()
    wiring = _SourceWiring(gate=s._gate, commit=s._commit, sessions=[s])
    wiring.rehook()
    layer = BeforeChange(volume, wiring.hooks, wiring.gate)  # type: ignore[arg-type]
    tf = s.tracking_file
    assert tf is not None
    try:
        for r in (3, 7, 11):
            await layer.pwrite(r * REGION, b"a" * BLOCK)
        log: list[str] = []
        failing_dir_sync(monkeypatch, log)
        async with s._gate.closed():
            await s._after_commit_wait("resetting tracking", s._reset_tracking)
        assert tf._dir_unsynced
        await layer.pwrite(3 * REGION + G, b"b" * BLOCK)
        log.append("acked")
        assert log[0] == "sync_dir failed" and "sync_dir" in log
        assert log.index("sync_dir") < log.index("acked"), log
        assert not tf._dir_unsynced
    finally:
        tf.close()
