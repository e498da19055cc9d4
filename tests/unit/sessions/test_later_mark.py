"""A row older than its transfer file: a later update's mark wrote the file, then did not commit.

``session update`` over a paused or failed update marks: the new transfer file (what the
unfinished update owes, ORed with what changed since its mark) replaces the old one before
the row commits. When the save area or the commit then fails, the unfinished update goes on
with the file of an update that does not exist, and a resume commits it ``copying`` again;
a crash (or a clean stop) then finds the row of one update and the file of a later one.

Start-up must not take that file for an orphan of no update (folded into tracking, the
update left copying with no transfer: never resumed, every later update refused). The file
holds all the update owes: it becomes its transfer, the update gives up its mark in the row
(the file holds chunks changed since the mark, the failed mark may have voided its save
records) and resumes by itself as of a new mark. A transfer file older than its update is
no mark's: corrupt, set aside.

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target (those of ``test_silent_target.py``).
"""

from __future__ import annotations

import errno
import os

import pytest

from deltavol.bitmap import persist
from deltavol.copy.save_area import SaveArea
from deltavol.errors import CorruptFile, DeltavolError, os_error
from deltavol.sessions.states import Phase, State
from tests.unit.sessions.test_failed_commits import FailingRows
from tests.unit.sessions.test_silent_target import CHANGED, SIZE, G, Rig, Target, fill, finished

TRANSFER = persist.KIND_TRANSFER


def generation(rig: Rig) -> int:
    return persist.load(rig.tmp_path / "s.transfer", TRANSFER, G, SIZE)[1]


async def unfinished(rig: Rig, target: Target, rows: FailingRows, given_up: bool) -> int:
    """Session s with an incremental update paused before it copied anything, chunk 3
    changed since its mark (saved), and its mark given up if ``given_up``: its id."""
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()  # the copy waits: every chunk stays owed
    await s.start_update(False)
    assert s.update is not None
    await s.pause()
    target.go.set()
    await rig.write(3, 0xB3)  # owed: saved first
    assert s.save is not None and 3 in s.save
    if given_up:  # as a copy-before-write the target did not answer does
        s._give_up_mark(s.update, "target: no answer")
        assert rows.row["update"]["phase"] == Phase.GIVEN_UP.value
    await rig.write(12, 0xBC)  # not owed: tracked for the next update
    return s.update.id


@pytest.mark.parametrize("given_up", [False, True], ids=["protecting", "given-up"])
@pytest.mark.parametrize("failing", ["save area", "commit"])
async def test_a_mark_that_did_not_commit_leaves_the_update_it_replaced_resumable(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, failing: str, given_up: bool
) -> None:
    target, rows = Target(), FailingRows()
    first = await unfinished(rig, target, rows, given_up)
    s = rig.sessions[0]
    if failing == "save area":

        def no_fd(self: SaveArea) -> SaveArea:  # the new header is not written
            raise os_error(OSError(errno.EMFILE, os.strerror(errno.EMFILE)), f"opening save area {self.path}")

        monkeypatch.setattr(SaveArea, "create", no_fd)
    else:  # the new header is written (the old records void), the row is not
        rows.failing = lambda s: s.update is not None and s.update.id != first
    with pytest.raises(DeltavolError):
        await s.start_update(False)
    monkeypatch.undo()
    rows.failing = lambda s: False
    assert s.update is not None and s.update.id == first and s.state is State.PAUSED
    await s.resume()  # commits "copying" for the unfinished update
    rig.crash()  # before its copy ran
    # the on-disk state: the row of one update, the transfer file of a later one
    assert rows.row["state"] is State.COPYING and rows.row["update"]["id"] == first
    assert generation(rig) > first
    marked_at = rows.row["update"]["marked_at"]

    s = rig.session("s", target, rows, save_limit=1 << 20, row=rows.row)
    # what SessionManager.start resumes: copying, with a transfer
    assert s.state is State.COPYING and s.transfer is not None, "copying with nothing to copy: stuck"
    assert s.update is not None and s.update.id == first and s.update.kind == "incremental"
    assert s.update.phase is Phase.GIVEN_UP and rows.row["update"]["phase"] == Phase.GIVEN_UP.value
    owed = s.transfer.copy()
    owed.or_(s.tracking)
    differ = [
        c for c in range(SIZE // G) if target.data[c * G : (c + 1) * G] != rig.disk.data[c * G : (c + 1) * G]
    ]
    assert differ and all(owed.test(c) for c in differ), "a chunk that differs is owed nowhere"
    assert s.transfer_bytes() < SIZE, "a full copy nobody asked for"
    s._spawn()
    await finished(s)  # as of a new mark: the source as it is now
    assert s.consistent and bytes(target.data) == bytes(rig.disk.data)
    assert s.point_in_time is not None and s.point_in_time > marked_at, "consistent as of the old mark"
    await rig.write(20, 0xD4)
    await s.start_update(False)  # and the next update works
    await finished(s)
    assert target.data[20 * G : 21 * G] == fill(0xD4)


async def test_a_paused_update_under_a_later_mark_s_file_is_resumed_by_the_user(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, rows = Target(), FailingRows()
    first = await unfinished(rig, target, rows, given_up=False)
    s = rig.sessions[0]
    rows.failing = lambda s: s.update is not None and s.update.id != first
    with pytest.raises(DeltavolError):
        await s.start_update(False)
    rows.failing = lambda s: False
    rig.crash()
    assert rows.row["state"] is State.PAUSED and generation(rig) > first

    s = rig.session("s", target, rows, save_limit=1 << 20, row=rows.row)
    assert s.state is State.PAUSED and s.transfer is not None and s.update is not None
    assert s.update.phase is Phase.GIVEN_UP
    await s.resume()
    await finished(s)
    assert bytes(target.data) == bytes(rig.disk.data)


async def test_a_transfer_file_older_than_its_update_is_corrupt(rig: Rig) -> None:
    target, rows = Target(), FailingRows()
    first = await unfinished(rig, target, rows, given_up=False)
    s = rig.sessions[0]
    assert s.transfer is not None
    persist.save_atomic(s.files.transfer_path, s.transfer, first - 1, TRANSFER)
    rig.crash()
    with pytest.raises(CorruptFile) as info:
        rig.session("s", target, rows, save_limit=1 << 20, row=rows.row)
    assert str(s.files.transfer_path) in info.value.message and f"update {first - 1}" in info.value.message
