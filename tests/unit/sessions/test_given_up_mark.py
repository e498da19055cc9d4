"""A mark that copy-before-write gives up, in the company of what else may happen meanwhile.

A client's write waiting in copy-before-write holds the source's write gate; when the
target does not answer in time, the update gives up its point in time instead of the
write (see ``test_silent_target.py``). These tests cover what runs at the same time:

* ``session update`` of a paused update: the write gives up the unfinished update's mark,
  never one not committed yet; if the new mark then fails, the unfinished update re-marks
  (it never finishes its old mark, whose old contents the write overwrote);
* the connection that did not answer is aborted, so that what it still queues cannot land
  on the target after the re-mark copied newer contents; the re-mark copies over a new one.

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target (those of ``test_silent_target.py``).
"""

from __future__ import annotations

import asyncio

import pytest

from deltavol.bitmap import persist
from deltavol.errors import DeltavolError, TargetError
from deltavol.sessions import session as session_module
from deltavol.sessions.states import State
from deltavol.sessions.tracker import Pending
from tests.unit.sessions.test_silent_target import (
    CHANGED,
    SIZE,
    TIMEOUT,
    WAIT,
    G,
    Rig,
    Rows,
    Target,
    fill,
    finished,
    until,
)


async def test_update_of_a_paused_update_while_a_write_waits_gives_up_the_unfinished_mark(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)  # no room in its save area: copy-before-write
    rig.change_before_mark(s, CHANGED, 0xA1)  # chunks 0..7 hold 0xA1 as of the mark
    rig.disk.row_at = rows.remark
    target.go.clear()
    await s.start_update(False)
    assert s.update is not None
    old, old_mark = s.update, s.update.marked_at
    await s.pause()
    target.silent = True
    loop = asyncio.get_running_loop()
    began = loop.time()
    write = asyncio.create_task(rig.stack.pwrite(0, fill(0xEE) * 4))  # four owed chunks
    await until(lambda: target.asked > 0)  # it waits for the target, holding the gate

    def no_space(*_a: object, **_k: object) -> None:
        raise DeltavolError(msg="bitmap: No space left on device")

    monkeypatch.setattr(session_module.persist, "save_atomic", no_space)
    with pytest.raises(DeltavolError, match="No space"):
        await s.start_update(False)  # its mark waits for the write, then fails
    monkeypatch.undo()
    async with asyncio.timeout(WAIT):
        await write
    assert loop.time() - began < 2 * TIMEOUT + 0.5, "the write waited for the target once per chunk"
    assert rig.disk.data[0 : 4 * G] == fill(0xEE) * 4
    # the unfinished update is back, its mark given up durably before the write went down
    assert s.update is old and s.state is State.PAUSED
    assert not old.protecting and old.remark is not None and "did not answer" in old.remark
    assert rows.remark() == old.remark and rows.row["state"] is State.PAUSED
    assert s.last_error is not None and "new mark" in s.last_error
    assert rig.disk.landed[0] == (0, old.remark)
    target.silent = False
    target.go.set()
    await s.resume()
    await finished(s)
    assert s.point_in_time == s.update.marked_at and s.point_in_time != old_mark
    assert target.data == rig.disk.data, "the target is not the source as of the new mark"


async def test_update_of_a_paused_update_while_a_write_waits_marks_after_the_give_up(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    assert s.update is not None
    old = s.update
    await s.pause()
    target.silent = True
    write = asyncio.create_task(rig.write(2, 0xE2))
    await until(lambda: target.asked > 0)  # it waits for the target, holding the gate
    async with asyncio.timeout(WAIT):
        await s.start_update(False)
        await write
    assert old.remark is not None and not old.protecting  # given up before the new mark
    assert s.update is not old and s.update.protecting and s.update.remark is None
    assert s.last_error is None and rows.row["update"]["id"] == s.update.id
    target.silent = False
    target.go.set()
    await finished(s)
    assert target.data == rig.disk.data and target.data[2 * G : 3 * G] == fill(0xE2)


async def test_a_mark_given_up_before_a_change_s_protect_runs_leaves_its_bit_to_a_round(rig: Rig) -> None:
    """Two sessions on one source: a change's tracking leaves the chunk's bit to the save
    its protect will make, then the mark is given up before that protect runs (another
    write's copy-before-write timed out in the same turn of the loop)."""
    t1, t2 = Target(), Target()
    t1.go.clear()  # copies wait: chunks stay owed
    t2.go.clear()
    s1 = rig.session("s1", t1, Rows(), save_limit=1 << 20)
    s2 = rig.session("s2", t2, Rows(), save_limit=1 << 20)
    for s in (s1, s2):
        rig.change_before_mark(s, CHANGED, 0xA1)
        await s.start_update(False)
    assert s1.tracking_file is not None and s1.update is not None
    tf = s1.tracking_file
    unsynced = s1.tracker.unsynced
    rig.disk.row_at = lambda: (3 not in unsynced and tf.covered(range(3, 4)), s1.save and 3 in s1.save)
    write = asyncio.create_task(rig.write(3, 0xEE))
    await asyncio.sleep(0)  # its tracking ran, its protects are tasks not started yet
    assert s1.tracker.unsynced.get(3) is Pending.BY_SAVE
    s1._give_up_mark(s1.update, "copy-before-write of chunk 5: no answer")
    await write
    assert rig.disk.data[3 * G : 4 * G] == fill(0xEE)
    durable, saved = rig.disk.landed[-1][1]
    assert not saved
    assert durable, "the change went down with its tracking bit neither saved nor durable"


class Stalling(Target):
    """Its first copy-before-write of chunk 3 goes out on a connection that stops answering
    (a partition, a stuck I/O): sent, it is in the socket's queue and will land when the
    connection comes back, unless the connection is reset first (``abort``). A reset fails
    the requests waiting for an answer (the copy's)."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[tuple[int, bytes]] = []
        self.stalled = False
        self.aborts = 0

    async def pwrite(self, offset: int, data: bytes) -> None:
        if not self.stalled and offset == 3 * G:
            self.stalled = True
            self.queued.append((offset, bytes(data)))
            await asyncio.Event().wait()  # never answered
        aborts = self.aborts
        await self._answer()
        if self.aborts != aborts:
            raise TargetError(msg="target: connection reset")
        self.data[offset : offset + len(data)] = data
        self.writes += 1

    def abort(self) -> None:
        self.aborts += 1
        self.queued.clear()  # a reset: what the socket queued is discarded

    def come_back(self) -> None:
        for offset, data in self.queued:
            self.data[offset : offset + len(data)] = data
        self.queued.clear()


async def test_a_timed_out_copy_before_write_cannot_land_after_the_re_mark(rig: Rig) -> None:
    target, rows = Stalling(), Rows()
    s = rig.session("s", target, rows)  # no room in its save area: copy-before-write
    opened = 0
    open_target = s._open_target

    async def counting(session: object) -> Target:
        nonlocal opened
        opened += 1
        return await open_target(session)

    s._open_target = counting
    rig.change_before_mark(s, CHANGED, 0xA1)
    rig.disk.row_at = lambda: target.aborts
    target.go.clear()  # the copy waits: chunk 3 stays owed
    await s.start_update(False)
    assert s.update is not None
    marked_at = s.update.marked_at
    await until(lambda: target.asked > 0, "the copy's first request")
    await rig.write(3, 0xEE)  # its copy-before-write does not answer: the mark is given up
    assert s.update.remark is not None and rig.disk.landed[-1] == (3, 1), "not reset before the write"
    assert target.asked > 1  # the copy's requests wait: the reset fails them
    target.go.set()
    await finished(s)
    assert s.update.marked_at != marked_at and s.consistent
    assert opened >= 2, "the re-mark copied over the connection that did not answer"
    target.come_back()
    assert target.data[3 * G : 4 * G] == fill(0xEE), "the old contents landed over the re-mark's copy"
    assert target.data == rig.disk.data


class Slow(Target):
    """Answers each write just inside the sessions' target_timeout."""

    async def pwrite(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(TIMEOUT * 0.8)
        await super().pwrite(offset, data)

    async def flush(self) -> None:
        self.durable[:] = self.data


async def test_a_write_over_many_owed_chunks_waits_for_the_target_once_not_per_chunk(rig: Rig) -> None:
    s = rig.session("s", Slow(), Rows())  # no room in its save area: copy-before-write
    rig.change_before_mark(s, CHANGED, 0xA1)
    await s.start_update(False)
    assert s._task is not None
    s._task.cancel()  # no copy meanwhile: every chunk stays owed
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(WAIT):
        await rig.stack.pwrite(0, fill(0xEE) * 8)  # eight owed chunks
    assert loop.time() - began < 2.5 * TIMEOUT, "the write waited target_timeout once per chunk"
    assert s.update is not None and s.update.remark is not None and "did not answer" in s.update.remark
    assert rig.disk.data[0 : 8 * G] == fill(0xEE) * 8


async def test_a_failed_re_mark_keeps_on_disk_the_bits_its_save_area_voided(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-mark writes a new save area header (the given-up mark's records are void on disk
    from then on) before its commit; if the commit fails, the chunks whose bits only those
    records made durable must stay owed in the transfer file, whatever a checkpoint writes."""
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows, save_limit=2 * G)  # room for one saved chunk
    rig.change_before_mark(s, CHANGED, 0xA1)
    await s.start_update(False)
    assert s._task is not None and s.save is not None and s.transfer is not None
    s._task.cancel()  # the copy is driven by hand
    assert s.tracking_file is not None
    await s.tracking_file.settle(everything=True)  # the regions the mark carried as hot went idle
    await rig.write(4, 0xB4)  # saved: its tracking bit is durable by the save record alone
    assert 4 in s.save and s.tracking_file is not None and not s.tracking_file.covered(range(4, 5))
    target.data[4 * G : 5 * G] = fill(0xA1)  # the copy of chunk 4 as of the mark, checkpointed
    s.transfer.clear(4)
    s.target = target
    await s.copier.checkpoint()
    target.go.clear()
    await rig.write(5, 0xB5)  # save area full, no answer: the mark is given up
    assert s.update is not None and s.update.remark is not None

    def db_down(_s: object) -> None:
        raise OSError("database is locked")

    monkeypatch.setattr(s, "_persist_row", db_down)
    with pytest.raises(OSError):
        await s._remark()
    monkeypatch.undo()
    target.go.set()
    s.target = target
    await s.copier.checkpoint()
    on_disk = persist.load(s.files.transfer_path, persist.KIND_TRANSFER, G, SIZE)[0]
    saved = s.protector.save_area(s.update.id).open()
    try:
        assert on_disk.test(4) or 4 in saved, "chunk 4's change is recorded nowhere durable"
    finally:
        saved.close()


async def test_a_copy_before_write_that_outlives_a_remove_does_not_bring_the_row_back(rig: Rig) -> None:
    """``session remove`` deletes the session's row, stops it and waits at the write gate
    for a client's write in copy-before-write before its hooks and files go (as
    SessionManager.remove does); the write's wait for the target ends during the remove."""
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)  # no room in its save area: copy-before-write
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()  # a target that does not answer in time
    await s.start_update(False)
    write = asyncio.create_task(rig.write(3, 0xEE))  # an owed chunk: copy-before-write
    await until(lambda: target.asked > 0)  # the write (or the copy) waits for the target
    rows.row.clear()  # DELETE FROM sessions
    s.removed = s.closed = True
    await s._stop_task()
    await s.copier.drop_target()
    async with s._gate.closed():  # the write in flight ends first
        rig.wiring.sessions.remove(s)
        rig.wiring.rehook()
    await s.copier.drop_target()
    s.delete_files()
    async with asyncio.timeout(WAIT):
        await asyncio.wait([write])
    assert rows.row == {}, "the removed session's row is back"
    write.result()  # nor does the write fail on the session's closed files
    assert rig.disk.data[3 * G : 4 * G] == fill(0xEE)


class Connection:
    """One connection to a shared ``Target``: each open makes a new one."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def __getattr__(self, name: str) -> object:
        return getattr(self.target, name)


async def test_resume_while_a_copy_before_write_is_in_flight_keeps_the_mark(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)  # no room in its save area: copy-before-write

    async def connect(_s: object) -> Connection:
        return Connection(target)

    s._open_target = connect
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    assert s.update is not None
    marked_at = s.update.marked_at
    await s.pause()
    write = asyncio.create_task(rig.write(3, 0xEE))  # its old contents go to the target first
    await until(lambda: s.locks.any_held([3]) and target.asked > 0)
    resuming = asyncio.create_task(s.resume())
    await asyncio.sleep(0.01)
    target.go.set()  # the target answers in time
    async with asyncio.timeout(WAIT):
        await resuming
        await write
    assert s.update.remark is None and s.update.protecting, "resume cost the update its mark"
    await finished(s)
    assert s.point_in_time == marked_at
    assert target.data[3 * G : 4 * G] == fill(0xA1)  # as of the mark
    assert target.data[: 3 * G] == rig.disk.data[: 3 * G]
