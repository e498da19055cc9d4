"""A clean stop seals the save area only once no client write is under way, and lets no
write pass after: a copy-on-first-write that ran after the seal would find no room,
fall back to copy-before-write and open the target the shutdown dropped (or give up the
mark and write the row while the server stops).

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target (those of ``test_silent_target.py``)."""

from __future__ import annotations

import asyncio

from deltavol.sessions.session import Session
from tests.unit.sessions.test_silent_target import CHANGED, TIMEOUT, WAIT, G, Rig, Rows, Target, fill, until


async def test_no_write_reaches_a_session_after_its_shutdown(rig: Rig) -> None:
    target, rows = Target(), Rows()
    s = rig.session("s", target, rows, save_limit=1 << 20)  # room: copy-on-first-write
    opens = 0
    raw = s._open_raw

    async def counted(session: Session) -> Target:
        nonlocal opens
        opens += 1
        return await raw(session)  # type: ignore[no-any-return]

    s._open_target = counted  # type: ignore[assignment]
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()  # the copy makes no progress: every changed chunk stays owed
    await s.start_update(False)
    assert s.update is not None and s.save is not None
    await until(lambda: target.asked > 0, "the copy to ask the target")
    await rig.write(1, 0xB1)  # saved before the stop: copy-on-first-write
    assert 1 in s.save
    async with asyncio.timeout(WAIT):
        await s.shutdown()
    assert s.save.sealed
    opened, row, before = opens, dict(rows.row), bytes(rig.disk.data)
    write = asyncio.create_task(rig.write(2, 0xB2))  # an owed chunk, after the stop
    done, _ = await asyncio.wait([write], timeout=3 * TIMEOUT)
    try:
        assert not done, "a write passed the gate after the session shut down"
        assert opens == opened, "the shutdown's dropped target was opened again"
        assert s.target is None
        assert rows.row == row and rows.remark() is None  # no mark given up while stopping
        assert s.update.remark is None
        assert bytes(rig.disk.data) == before
        assert rig.disk.data[2 * G : 3 * G] == fill(0xA1)
    finally:
        write.cancel()
