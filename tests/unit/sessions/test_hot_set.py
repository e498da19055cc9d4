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
        self.hot_counts: list[int] = []  # hot regions in each such file
        self._covers: Bitmap | None = None

    @staticmethod
    def _path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")

    def _synced(self, raw: bytes) -> None:
        self.raw, self._covers = raw, None
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

    def covers(self, chunk: int) -> bool:
        """True if a load in another boot brings ``chunk`` back."""
        if self._covers is None:
            self._covers = chunks_of(self.raw)
            for first, n in hot_of(self.raw).runs():
                per = REGION // G
                self._covers.set_run(first * per, n * per)
        return self._covers.test(chunk)


def chunks_of(raw: bytes) -> Bitmap:
    n = (Bitmap(SIZE, G).nbits + 7) // 8
    return Bitmap.from_bytes(SIZE, G, raw[persist.HEADER_SIZE : persist.HEADER_SIZE + n])


def hot_of(raw: bytes) -> Bitmap:
    at = persist._hot_at(Bitmap(SIZE, G).nbits)
    return Bitmap.from_bytes(SIZE, REGION, raw[at : at + (SIZE // REGION + 7) // 8])


@pytest.fixture
def cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PowerCut:
    pc = PowerCut(tmp_path / f"{NAME}.tracking")
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: pc.fdatasync(real_fdatasync, fd))
    monkeypatch.setattr(os, "fsync", lambda fd: pc.fsync(real_fsync, fd))
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
    ("hot_set", "slack"),
    [(None, 0), (16 * MIB, INFLIGHT)],
    ids=["default 1GiB: the file keeps to it", "16MiB: fewer regions than writes in flight"],
)
async def test_a_power_loss_after_random_writes_recopies_at_most_the_hot_set(
    tmp_path: Path,
    cut: PowerCut,
    volume: FileBackend,
    monkeypatch: pytest.MonkeyPatch,
    hot_set: int | None,
    slack: int,
) -> None:
    """``slack``: regions the file may hold beyond the set, when more regions than it
    holds are first written to within one round (their bits are not durable yet)."""
    s = new_session(tmp_path, **({} if hot_set is None else {"hot_set": hot_set}))
    bound = GIB if hot_set is None else hot_set
    s.create_files()
    wiring = _SourceWiring(gate=s._gate, commit=s._commit, sessions=[s])
    wiring.rehook()
    layer = BeforeChange(volume, wiring.hooks, wiring.gate)  # type: ignore[arg-type]
    rng = random.Random(20261130)
    offsets = [rng.randrange(SIZE // BLOCK) * BLOCK for _ in range(WRITES)]
    acked: set[int] = set()
    missed: list[int] = []

    async def writer(mine: list[int]) -> None:
        for off in mine:
            data = off.to_bytes(8, "big") * (BLOCK // 8)
            if not layer.pwrite_now(off, data):
                await layer.pwrite(off, data)
            c = off // G
            if not cut.covers(c):
                missed.append(c)
            acked.add(c)

    await asyncio.gather(*(writer(offsets[i::INFLIGHT]) for i in range(INFLIGHT)))
    assert not missed, f"acknowledged before a durable record covered them: {missed[:10]}"
    assert len(acked) > 2900 and len({c * G // REGION for c in acked}) > 2000  # scattered
    assert max(cut.hot_counts) <= bound // REGION + slack

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
        recopy = persist.load_tracking(s._tracking_path, G, SIZE)[2]
        assert recopy is not None and recopy.bytes == REGION - G and "fdatasync" in recopy.reason
        await s.tracking_file.settle()  # the file written again from memory
        assert s.status()["full_reason"] is None
        back, _, recopy = persist.load_tracking(s._tracking_path, G, SIZE)
        assert recopy is None and list(back.runs()) == [(0, 1)]
    finally:
        s.tracking_file.close()
