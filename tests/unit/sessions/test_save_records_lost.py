"""Save records written but not synced (save area version 5) may be lost behind the server's
back, and a failed checkpoint write may leave the transfer file with chunks cleared that
memory still owes. An update must never end consistent with what it did not copy from its
mark, and a change must never land with its tracking bit durable nowhere.

* a record that reads back wrong (a page the kernel dropped after a writeback error reads
  as what the disk holds) gives up the mark: the update re-marks, and ends with the new
  mark's contents, not the stale bytes;
* the records are synced before a checkpoint records as done a chunk copied from them, and
  before the update ends: a failed sync gives up the mark in the same way;
* after a checkpoint whose write failed half-way, and after a checkpoint that lands once a
  failure owed its chunks again in memory, no tracking bit is left to a save record for a
  chunk the transfer file may not hold.

The rig (a session wired into the real write path, its target and a disk that checks each
change lands only once it is safe) is the one of ``test_save_implies_tracking``.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.save_area import HEADER_SIZE, RECORD
from deltavol.errors import DeltavolError
from deltavol.sessions.tracker import Pending
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


async def test_no_bit_is_left_to_a_save_after_a_failed_checkpoint_write(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write of a checkpoint reached the file and then failed: memory keeps the chunk
    owed (``durable`` = old | snapshot), the file may have it cleared. A change to it must
    have its bit made durable in the tracking file, not left to its unsynced record."""
    rig = await rig_of(rigs)
    s, c = rig.session, OWED.start + 1
    assert s.transfer is not None
    s.transfer.clear(c)  # copied, not yet checkpointed: owed through copier.durable
    real = persist.write_bits_in_place

    def half_failed(path: Path, bitmap: Bitmap) -> None:
        real(path, bitmap)  # the bytes reached the file ...
        raise OSError(errno.EIO, "fdatasync: Input/output error")  # ... and the sync failed

    monkeypatch.setattr(persist, "write_bits_in_place", half_failed)
    with pytest.raises(OSError):
        await s.copier.checkpoint()
    monkeypatch.setattr(persist, "write_bits_in_place", real)
    assert s.copier.owed(c) and c not in rig.owed_on_disk()
    await rig.write(*rig.chunk(c))
    assert rig.disk.violations == [], "the change landed with its bit durable nowhere"
    assert s.tracker.unsynced.get(c) is not Pending.BY_SAVE
    # a checkpoint that lands makes the file sure again: bits go to saves once more
    d = OWED.start + 4
    await s.copier.checkpoint()
    assert s.protector.saving(d)


async def test_no_bit_is_left_to_a_save_for_a_checkpoint_landing_late(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure owes the unflushed chunks again in memory (``forget_unflushed``) while a
    checkpoint -- the shielded one of a copy-before-write -- is still on its way: it lands
    after, clearing in the file a chunk memory owes again. A change to that chunk must not
    leave its bit to a save."""
    rig = await rig_of(rigs)
    s, c = rig.session, OWED.start + 5
    assert s.transfer is not None
    s.transfer.clear(c)  # copied
    flushing, go = asyncio.Event(), asyncio.Event()

    async def slow_flush() -> None:
        flushing.set()
        await go.wait()

    monkeypatch.setattr(rig.target, "flush", slow_flush)
    checkpoint = asyncio.ensure_future(s.copier.checkpoint())
    await flushing.wait()  # its snapshot is taken: c is done in it
    s.copier.forget_unflushed()  # a failure meanwhile: c owed again in memory
    assert s.transfer.test(c)
    go.set()
    await checkpoint
    assert c not in rig.owed_on_disk(), "the late checkpoint cleared c in the file"
    saving: Callable[[int], bool] = s.protector.saving
    assert not saving(c)
    await rig.write(*rig.chunk(c))
    assert rig.disk.violations == [], "the change landed with its bit durable nowhere"
