"""A session row that does not commit (SQLite full, a locked database) leaves memory as the
row says, and loses no change after a power cut.

* the end of an update: memory stays the update's (it protects and owes on), and the
  update fails; resumed, or after a restart, it finishes its own mark;
* a resume: the session stays paused, resumable; one that restarts a lost copy task keeps
  ``last_error``;
* ``session update`` over a paused update: the new save area voided the unfinished
  update's records on disk, which made its saved chunks' tracking bits durable; those bits
  must be durable in the tracking file before that.

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target (those of ``test_silent_target.py``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from deltavol.bitmap import persist
from deltavol.errors import DeltavolError
from deltavol.sessions import copier as copier_module
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from tests.unit.sessions.test_silent_target import (
    CHANGED,
    SIZE,
    WAIT,
    G,
    Rig,
    Rows,
    Target,
    fill,
    finished,
    until,
)


class FailingRows(Rows):
    """Rows that do not commit while ``failing`` says so of the session."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: Callable[[Session], bool] = lambda s: False

    def __call__(self, s: Session) -> None:
        if self.failing(s):
            raise DeltavolError(msg="database or disk is full")
        super().__call__(s)


async def test_an_update_whose_end_does_not_commit_fails_and_keeps_protecting(rig: Rig) -> None:
    target, rows = Target(), FailingRows()
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    rows.failing = lambda s: s.state is State.IDLE
    await s.start_update(False)
    async with asyncio.timeout(WAIT):
        await s.wait()
    assert s.state is State.FAILED and rows.row["state"] is State.FAILED
    assert s.transfer is not None and s.point_in_time == "t0", "memory says done, the row does not"
    await rig.write(3, 0xEE)  # the update still protects: the old contents are saved
    assert s.save is not None and 3 in s.save
    rig.crash()  # a restart finishes the update's own mark
    rows.failing = lambda s: False
    t2 = Target()
    t2.data[:] = t2.durable[:] = target.durable
    s2 = rig.session("s", t2, rows, save_limit=1 << 20, row=rows.row)
    await s2.resume()
    await finished(s2)
    assert t2.data[: 8 * G] == fill(0xA1) * 8  # as of the mark, not chunk 3's later 0xEE


async def test_a_resume_that_does_not_commit_leaves_the_session_paused(rig: Rig) -> None:
    target, rows = Target(), FailingRows()
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    await s.pause()
    rows.failing = lambda s: s.state is State.COPYING
    with pytest.raises(DeltavolError):
        await s.resume()
    assert s.state is State.PAUSED and not s.busy
    rows.failing = lambda s: False
    target.go.set()
    await s.resume()
    await finished(s)


async def test_a_restart_of_a_copy_task_that_does_not_commit_keeps_what_went_wrong(rig: Rig) -> None:
    target, rows = Target(), FailingRows()
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    assert s._task is not None
    s._task.cancel()  # copying with no copy task: a step between the state and the spawn failed
    async with asyncio.timeout(WAIT):
        await s.wait()
    s.last_error = "the copy task was lost"
    rows.failing = lambda s: True
    with pytest.raises(DeltavolError):
        await s.resume()
    assert s.state is State.COPYING and not s.busy
    assert s.last_error == "the copy task was lost", "memory says it went well, the row does not"
    rows.failing = lambda s: False
    target.go.set()
    await s.resume()
    await finished(s)


async def test_an_update_over_a_paused_one_that_does_not_commit_loses_no_change_on_a_power_cut(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk saved for the paused update had its tracking bit made durable by its save
    record alone; the new mark's save area voids that record. The paused update goes on,
    copies the chunk as of its mark and checkpoints it: the change must still be in a
    durable bitmap."""
    synced: dict[str, bytes] = {}  # the tracking file as its last sync left it
    tracking = str(rig.tmp_path / "s.tracking")

    def recording(real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
            raw = Path(path).read_bytes() if path in (tracking, tracking + ".tmp") else None
            real(fd)
            if raw is not None:
                synced["tracking"] = raw

        return sync

    monkeypatch.setattr(os, "fdatasync", recording(os.fdatasync))
    monkeypatch.setattr(os, "fsync", recording(os.fsync))
    monkeypatch.setattr(copier_module, "CHECKPOINT_SECONDS", 0.05)
    target, rows = HoldHigh(), FailingRows()
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()  # copies wait: the chunks stay owed
    await s.start_update(False)
    assert s.update is not None
    first = s.update.id
    await s.pause()
    await rig.write(3, 0xEE)  # owed: saved, its tracking bit durable by the save record
    assert s.save is not None and 3 in s.save
    rows.failing = lambda s: s.update is not None and s.update.id != first
    with pytest.raises(DeltavolError):
        await s.start_update(False)
    rows.failing = lambda s: False
    assert s.update is not None and s.update.id == first
    await rig.write(2, 0xE2)  # saved after the failed mark: its record is void on disk too
    target.go.set()
    await s.resume()
    await until(lambda: s.copier._landed > 0 and not any(s.copier.durable.test(c) for c in range(4)))  # type: ignore[union-attr]
    # a power cut: the row has the paused update's, the transfer file is another's (an
    # orphan: into tracking), the tracking file is what its last sync wrote
    rig.crash()
    after_cut = rig.tmp_path / "after-cut.tracking"
    after_cut.write_bytes(synced["tracking"])
    monkeypatch.setattr(persist, "boot_id", lambda: b"another boot")
    known, _, _ = persist.load_tracking(after_cut, G, SIZE)
    transfer, generation = persist.load(s.files.transfer_path, persist.KIND_TRANSFER, G, SIZE)
    assert generation != first
    known.or_(transfer)
    assert known.test(3), "chunk 3 changed after the mark, and no durable bitmap says so"
    assert known.test(2), "chunk 2 changed after the mark, and no durable bitmap says so"


class HoldHigh(Target):
    """Copies of chunks 4 and up never end: the update stays under way."""

    async def pwrite(self, offset: int, data: bytes) -> None:
        if offset >= 4 * G:
            await asyncio.Event().wait()
        await super().pwrite(offset, data)
