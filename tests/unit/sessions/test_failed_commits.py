"""A session row that does not commit (SQLite full, a locked database) leaves memory as the
row says.

* the end of an update: memory stays the update's (it protects and owes on), and the
  update fails; resumed, or after a restart, it finishes its own mark;
* a resume: the session stays paused, resumable.

Real Session, save area, tracking file, write gate and filters; fakes for the source's disk
and the target (those of ``test_silent_target.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deltavol.errors import Error
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
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


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.crash()


class FailingRows(Rows):
    """Rows that do not commit while ``failing`` says so of the session."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: Callable[[Session], bool] = lambda s: False

    def __call__(self, s: Session) -> None:
        if self.failing(s):
            raise Error(msg="database or disk is full")
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
    with pytest.raises(Error):
        await s.resume()
    assert s.state is State.PAUSED and not s.busy
    rows.failing = lambda s: False
    target.go.set()
    await s.resume()
    await finished(s)
