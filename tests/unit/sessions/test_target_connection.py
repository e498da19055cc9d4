"""One connection to the target at a time, and copies that count only on it.

The update's copy and the copy-before-writes of clients' writes all ask for the target's
connection; when none is open they ask at the same time (an update starts, a resume, a
failure dropped it). One open serves them all: with two, the later one would replace the
first, a checkpoint would flush the other connection than the one a copy wrote on and
record as done chunks the target never made durable, and a copy-before-write would find
its connection gone and give up the mark for nothing.

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target (those of ``test_silent_target.py``).
"""

from __future__ import annotations

import asyncio

import pytest

from deltavol.errors import DeltavolError, TargetError
from deltavol.sessions.session import Session
from tests.unit.sessions.test_silent_target import (
    CHANGED,
    WAIT,
    G,
    Rig,
    Rows,
    Target,
    fill,
    finished,
)


class Connection:
    """One connection to a shared ``Target``: each open makes a new one."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.target, name)


def slow_opens(s: Session, target: Target) -> list[Connection]:
    """Each open of ``s``'s target takes a while (a handshake) and makes a new connection."""
    opened: list[Connection] = []

    async def connect(_s: object) -> Connection:
        opened.append(conn := Connection(target))
        await asyncio.sleep(0.05)
        return conn

    s._open_target = connect
    return opened


async def test_the_copy_and_a_copy_before_write_that_ask_at_once_share_one_connection(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)  # no room in its save area: copy-before-write
    opened = slow_opens(s, target)
    rig.change_before_mark(s, CHANGED, 0xA1)
    await s.start_update(False)  # its copy opens a connection...
    await asyncio.sleep(0)
    await rig.write(7, 0xEE)  # ...and this write's copy-before-write asks meanwhile
    await finished(s)
    assert len(opened) == 1, "two connections to the target"
    assert s.update is not None and s.update.remark is None and s.consistent
    assert target.data[: 8 * G] == fill(0xA1) * 8  # as of the mark


async def test_two_copy_before_writes_that_ask_at_once_share_one_connection(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    await s.pause()
    await s.copier.drop_target()  # as a failure leaves it: no connection
    opened = slow_opens(s, target)
    target.go.set()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(rig.write(1, 0xE1), rig.write(5, 0xE5))
    assert len(opened) == 1, "two connections to the target"
    assert s.update is not None and s.update.remark is None, "the mark was given up for nothing"
    assert target.data[1 * G : 2 * G] == fill(0xA1) and target.data[5 * G : 6 * G] == fill(0xA1)


async def test_a_connection_opened_for_a_dropped_target_is_aborted_not_used(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    opened = slow_opens(s, target)
    asking = asyncio.create_task(s.ensure_target())
    await asyncio.sleep(0)
    await s.copier.drop_target()  # a pause or a failure while it opens
    with pytest.raises(TargetError):
        async with asyncio.timeout(WAIT):
            await asking
    assert s.target is None and opened[0].aborted
    assert await s.ensure_target() is opened[1]  # the next open is a new connection


async def test_a_copy_over_a_connection_dropped_under_it_leaves_its_chunks_owed(rig: Rig) -> None:
    """A checkpoint flushes the session's connection: chunks written over another one are
    not done."""
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    await s.pause()
    target.go.set()
    old, new = Connection(target), Connection(target)
    s.target = old

    class Replaced(Target):
        async def pwrite(self, offset: int, data: bytes) -> None:
            await target.pwrite(offset, data)
            s.target = new  # the connection was dropped and another opened meanwhile

    assert s.transfer is not None
    with pytest.raises(TargetError):
        await s.copier.copy_run(Replaced(), 0, 2)  # type: ignore[arg-type]
    assert s.transfer.test(0) and s.transfer.test(1), "chunks written over a dropped connection count as done"


async def test_a_give_up_whose_row_fails_keeps_the_mark_and_its_connection(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    await s.pause()
    conn = Connection(target)
    s.target = conn

    def db_full(_s: object) -> None:
        raise DeltavolError(msg="database or disk is full")

    monkeypatch.setattr(s, "_persist_row", db_full)
    assert s.update is not None
    with pytest.raises(DeltavolError):
        s._give_up_mark(s.update, "copy-before-write of chunk 3: no answer")
    assert s.update.protecting and s.update.remark is None
    assert s.target is conn and not conn.aborted, "the mark holds, but its connection is gone"
