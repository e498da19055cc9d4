"""A tracking file that lost pages (a failed fdatasync) is never trusted on a round.

A failed fdatasync may drop dirty pages for good, and a later round syncs without them:
the end of an update must write the file anew before it takes every bit set for durable.
Drives a real Session and TrackingFile on the simulated file system of ``tests/sim``,
which drops the pages of a failed fdatasync as the kernel does.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from deltavol.backend.gate import WriteGate
from deltavol.bitmap import persist
from deltavol.errors import DeltavolError
from deltavol.sessions.session import Session
from deltavol.store import fs
from deltavol.store.group_commit import GroupCommit
from tests.sim.simfs import Clock, SimFS

G, SIZE, B = 64 * 1024, 1 << 30, 4096
DIR = Path("/sim/bitmaps")


@pytest.fixture
def sim() -> Iterator[SimFS]:
    simfs = SimFS(random.Random(1), Clock())
    old = fs.use(simfs)
    try:
        yield simfs
    finally:
        fs.use(old)


def new_session() -> Session:
    s = Session(
        name="s",
        source=SimpleNamespace(name="src", size=SIZE),
        target_spec="dst",
        granularity=G,
        files=DIR,
        save_dir=DIR,
        gate=WriteGate(),
        commit=GroupCommit(),
        open_target=None,
        persist_row=lambda s: None,
    )
    s.create_files()
    return s


async def test_the_end_of_an_update_writes_a_lost_tracking_file_anew(sim: SimFS) -> None:
    s = new_session()
    failing = [True]
    sim.fault = lambda op, p: (
        errno.EIO if failing[0] and op == "fdatasync" and p.endswith("s.tracking") else None
    )
    (r,) = s.track(0, B)  # a change of chunk 0: its round's fdatasync fails, it is not acknowledged
    with pytest.raises(DeltavolError):
        await s._commit.wait(r)
    failing[0] = False
    assert s.tracking_file is not None and s.tracking_file.lost is not None
    await s._tracking_durable()  # the end of an update, under the write gate
    # the next change of chunk 0 is acknowledged with no round: its bit must be durable
    assert s.tracked(0, B)
    sim.power_loss()
    bits, _, _ = persist.load_tracking(DIR / "s.tracking", G, SIZE)
    assert bits.test(0)


async def test_a_failed_lazy_write_of_hot_pages_leaves_them_to_the_next_round(sim: SimFS) -> None:
    """``settle`` writes its pending pages lazily; if that write fails, a round already
    asked for must still write them, or it syncs a region's hot bit that is in no file."""
    s = new_session()
    tf = s.tracking_file
    assert tf is not None
    path = str(DIR / "s.tracking")
    failing = [False]
    sim.fault = lambda op, p: errno.EIO if failing[0] and op == "pwrite" and p == path else None
    region = persist.HOT_REGION
    c1 = 5 * region // G  # a first change in region 5: a round for its hot bit
    rounds = s.track(c1 * G, B)
    failing[0] = True
    with pytest.raises(DeltavolError):
        tf._write_pending()  # the lazy write at the end of ``settle``
    failing[0] = False
    for r in rounds:
        await s._commit.wait(r)
    c2 = c1 + 1  # another chunk of region 5: tracked with no round, on its hot bit
    assert s.track_now(c2 * G, B)
    sim.power_loss()
    bits, _, _ = persist.load_tracking(DIR / "s.tracking", G, SIZE)
    assert bits.test(c1) and bits.test(c2)


async def test_no_round_is_durable_until_a_rewritten_files_name_is(sim: SimFS) -> None:
    """A rewrite whose directory sync failed leaves the fd on the new inode, whose name
    a power loss may take back: the next round syncs the directory too."""
    s = new_session()
    failing = [True]
    sim.fault = lambda op, p: errno.EIO if failing[0] and op == "sync_dir" else None
    s._after_commit("resetting tracking", s._rewrite_tracking)  # as at the end of a mark
    failing[0] = False
    for r in s.track(100 * G, B):  # a change after the mark: acknowledged after its round
        await s._commit.wait(r)
    sim.pending[str(DIR)] = []  # the power loss keeps no name change not synced
    sim.power_loss()
    bits, _, _ = persist.load_tracking(DIR / "s.tracking", G, SIZE)
    assert bits.test(100)


async def test_rounds_fail_while_the_directory_of_a_rewritten_file_cannot_be_synced(sim: SimFS) -> None:
    s = new_session()
    sim.fault = lambda op, p: errno.EIO if op == "sync_dir" else None
    s._after_commit("resetting tracking", s._rewrite_tracking)
    (r,) = s.track(100 * G, B)
    with pytest.raises(DeltavolError):
        await s._commit.wait(r)  # not acknowledged: its bit is in a file with no durable name
    assert not s.tracked(100 * G, B)


async def test_a_failed_close_of_the_replaced_fd_still_resets_the_hot_set(
    sim: SimFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new file has no hot region: a hot set kept from the old one would let a
    change go down with its bit in no durable page."""
    s = new_session()
    region = persist.HOT_REGION // G
    for r in s.track(5 * region * G, B):  # region 5 durably hot in the old file
        await s._commit.wait(r)
    real = sim.close

    def close(fd: int) -> None:
        real(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sim, "close", close)
    s._after_commit("resetting tracking", s._rewrite_tracking)
    monkeypatch.setattr(sim, "close", real)
    c = 5 * region + 1  # another chunk of region 5
    if not s.track_now(c * G, B):
        for r in s.track(c * G, B):
            await s._commit.wait(r)
    durable = bytes(sim.names[str(DIR / "s.tracking")].durable)  # what any power loss keeps
    assert durable[persist.HEADER_SIZE + c // 8] >> (c % 8) & 1
