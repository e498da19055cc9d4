"""A mark's syncs run side by side; two orders still matter. A source flush that fails in
the mark of an update over a paused one must leave that update exactly as it was (its
transfer file and save records valid: a kill -9 then finishes its own mark). And a cancel
(pause, cancel, stop) waits only for the jobs that write files, never for a slow source
flush, which writes none: the gate must not stay shut for as long as the disk takes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deltavol.errors import DeltavolError, IoFailure
from deltavol.sessions.states import Phase
from tests.fakes import until
from tests.unit.sessions.test_failed_commits import HoldHigh
from tests.unit.sessions.test_silent_target import CHANGED, Rig, Rows, Target


async def test_a_failed_flush_leaves_the_paused_update_to_finish_its_own_mark(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    target, rows = HoldHigh(), Rows()
    s = rig.session("s", target, rows, save_limit=1 << 20)
    rig.change_before_mark(s, CHANGED, 0xA1)
    target.go.clear()
    await s.start_update(False)
    assert s.update is not None
    first = s.update.id
    await s.pause()
    await rig.write(3, 0xEE)  # owed: saved in the paused update's area
    gate = rig.wiring.gate

    async def flush() -> None:
        if not gate.open:
            raise IoFailure(what="flush on volume 'src'", why="EIO (transient)")

    rig.disk.flush = flush  # type: ignore[method-assign]
    with pytest.raises(DeltavolError, match="EIO"):
        await s.start_update(False)
    assert not s.protector.records_void
    row = rows.row
    rig.crash()  # kill -9: files as they are, the row as committed
    again = Rig(tmp_path)
    again.disk.data[:] = rig.disk.data
    t2 = Target()
    t2.data[:] = target.data
    t2.durable[:] = target.durable
    s2 = again.session("s", t2, Rows(), save_limit=1 << 20, row=row)
    assert s2.update is not None and s2.update.id == first
    assert s2.update.phase is Phase.PROTECTING and s2.update.remark is None
    again.crash()


async def test_a_pause_does_not_wait_for_a_slow_flush_in_a_mark(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    s = rig.session("s", Target(), Rows(), save_limit=1 << 20)
    gate = rig.wiring.gate
    stalled, held = asyncio.Event(), asyncio.Event()

    async def flush() -> None:  # a source disk that takes its time inside the catch-up mark
        in_mark = not gate.open and s.update is not None and s.update.phase is Phase.FULL_COPY
        if in_mark and s.progress is not None and s.progress.bytes_done:
            held.set()
            await stalled.wait()

    rig.disk.flush = flush  # type: ignore[method-assign]
    await s.start_update(True)
    await until(held.is_set, "the catch-up mark's flush")
    pause = asyncio.ensure_future(s.pause())
    done, _ = await asyncio.wait([pause], timeout=5.0)
    stalled.set()
    await pause
    assert done, "the pause waited for the source's flush"
    assert gate.open
    rig.crash()
