"""Save records written but not synced (save area version 5) may be lost behind the server's
back, and a failed checkpoint write may leave the transfer file with chunks cleared that
memory still owes. An update must never end consistent with what it did not copy from its
mark, and a change must never land with its tracking bit durable nowhere.

* a record that reads back wrong (a page the kernel dropped after a writeback error reads
  as what the disk holds) gives up the mark: the update re-marks, and ends with the new
  mark's contents, not the stale bytes;
* the records are synced before a checkpoint records as done a chunk copied from them, and
  before the update ends: a failed sync gives up the mark in the same way;

The rig (a session wired into the real write path, its target and a disk that checks each
change lands only once it is safe) is the one of ``test_save_implies_tracking``.
"""

from __future__ import annotations

import errno
import os

import pytest

from deltavol.copy.save_area import HEADER_SIZE, RECORD
from deltavol.errors import DeltavolError
from tests.unit.sessions import test_save_implies_tracking as base
from tests.unit.sessions.test_save_implies_tracking import OWED, G, MakeRig, Rig

rigs, syncs = base.rigs, base.syncs  # its fixtures


async def rig_of(rigs: MakeRig) -> Rig:
    """A rig whose target can be given up (``Session._give_up_mark`` aborts it)."""
    rig = await rigs()
    rig.target.abort = lambda: None  # type: ignore[attr-defined]
    return rig


def fail_next_save_sync(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the next fdatasync of a save area fail (a writeback error, reported once);
    returns the list its failures are counted in."""
    real, failed = os.fdatasync, []

    def once(fd: int) -> None:
        if not failed and os.readlink(f"/proc/self/fd/{fd}").endswith(".save"):
            failed.append(fd)
            raise OSError(errno.EIO, "writeback error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", once)
    return failed


def ends_with_the_new_mark(rig: Rig) -> None:
    """The update re-marked and finished: consistent, every owed chunk as the source is now
    (nothing changed since the re-mark), the changed chunk's new contents among them."""
    s = rig.session
    assert s.update is not None and s.consistent, s.last_error
    assert s.update.remark is not None, "the mark was not given up"
    for c in OWED:
        assert bytes(rig.target.data[c * G : (c + 1) * G]) == bytes(rig.disk.data[c * G : (c + 1) * G]), c


async def test_a_record_that_reads_back_stale_gives_up_the_mark(rigs: MakeRig) -> None:
    rig = await rig_of(rigs)
    s, c = rig.session, OWED.start + 2
    await rig.write(*rig.chunk(c, b"N"))
    assert s.save is not None and c in s.save
    [entry] = s.save.index[c]
    at, length = entry[1], entry[2]
    assert at == HEADER_SIZE + RECORD.size
    fd = os.open(s.save.path, os.O_RDWR)  # the dropped page, read again from disk: zeroes
    os.pwrite(fd, bytes(length), at)
    os.close(fd)
    s._spawn()
    await s.wait()
    assert s.update is not None and "does not read back" in (s.update.remark or "")
    ends_with_the_new_mark(rig)
    assert bytes(rig.target.data[c * G : (c + 1) * G]) == b"N" * G


async def test_a_failed_records_sync_before_a_checkpoint_gives_up_the_mark(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rig_of(rigs)
    s, c = rig.session, OWED.start + 1
    await rig.write(*rig.chunk(c, b"N"))
    target = await s.copier.ensure_target()
    await s.copier.copy_run(target, c, 1)  # copied from its record: the mark's contents
    assert s.transfer is not None and not s.transfer.test(c)
    assert bytes(rig.target.data[c * G : (c + 1) * G]) == rig.old(c)
    failed = fail_next_save_sync(monkeypatch)
    with pytest.raises(DeltavolError):
        await s.copier.checkpoint()
    assert failed, "the checkpoint did not sync the records the copy read"
    assert s.update is not None and not s.update.protecting, "the mark was not given up"
    assert c in rig.owed_on_disk(), "the checkpoint landed"
    assert s.tracking.test(c), "the re-mark must find the saved chunk in tracking"
    s._spawn()
    await s.wait()
    ends_with_the_new_mark(rig)
    assert bytes(rig.target.data[c * G : (c + 1) * G]) == b"N" * G


async def test_a_failed_records_sync_at_the_end_gives_up_the_mark(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rig_of(rigs)
    s, c = rig.session, OWED.start + 3
    await rig.write(*rig.chunk(c, b"N"))
    failed = fail_next_save_sync(monkeypatch)
    s._spawn()
    await s.wait()
    assert failed, "the update ended without syncing the records its copy read"
    assert "save records may be lost" in (s.update.remark or "") if s.update else False
    ends_with_the_new_mark(rig)
    assert bytes(rig.target.data[c * G : (c + 1) * G]) == b"N" * G
