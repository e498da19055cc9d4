"""The sessions of one source share a group-commit round, and each tracking file of it
syncs in a thread of its own: a change is acknowledged for a session only once that
session's own file synced, and one file's failed fdatasync fails only its own session's
waiters. Real Sessions and TrackingFiles on the simulated file system of ``tests/sim``
(through the ``store/fs.py`` seam), which keeps per file what a power loss would leave.
"""

from __future__ import annotations

import asyncio
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
from tests.fakes import until
from tests.sim.simfs import Clock, SimFS

G, SIZE, B = 64 * 1024, 1 << 30, 4096
DIR = Path("/sim/bitmaps")
NAMES = ("s1", "s2", "s3", "s4")


@pytest.fixture
def sim() -> Iterator[SimFS]:
    simfs = SimFS(random.Random(1), Clock())
    old = fs.use(simfs)
    try:
        yield simfs
    finally:
        fs.use(old)


def new_sessions(commit: GroupCommit) -> list[Session]:
    made = []
    for name in NAMES:
        s = Session(
            name=name,
            source=SimpleNamespace(name="src", size=SIZE),
            target_spec=f"dst-{name}",
            granularity=G,
            files=DIR,
            save_dir=DIR,
            gate=WriteGate(),
            commit=commit,
            open_target=None,
            persist_row=lambda s: None,
        )
        s.create_files()
        made.append(s)
    return made


def durable_bit(sim: SimFS, s: Session, chunk: int) -> bool:
    """What a power loss now would leave of ``chunk``'s bit, or of its region's hot bit."""
    data = sim.names[str(DIR / f"{s.name}.tracking")].durable
    if data[persist.HEADER_SIZE + chunk // 8] >> (chunk % 8) & 1:
        return True
    tf = s.tracking_file
    assert tf is not None
    r = chunk >> tf._shift
    return bool(data[tf._hot_at + r // 8] >> (r % 8) & 1)


def acknowledge(sim: SimFS, sessions: list[Session], chunk: int) -> dict[str, BaseException | None]:
    """Track a change of ``chunk`` on every session, as the source's hook does; returns
    (once every round is over) each session's outcome, checked as its round ends."""
    got: dict[str, BaseException | None] = {}
    rounds = {s.name: s.track(chunk * G, B) for s in sessions}
    assert all(len(r) == 1 for r in rounds.values())

    def ended(s: Session, fut: asyncio.Future[None]) -> None:
        got[s.name] = fut.exception()
        if got[s.name] is None:  # acknowledged: its own file holds the bit durably, now
            assert durable_bit(sim, s, chunk), f"{s.name} acknowledged before its file synced"

    for s in sessions:
        rounds[s.name][0].add_done_callback(lambda f, s=s: ended(s, f))
    return got


async def settle(sessions: list[Session], got: dict[str, BaseException | None]) -> None:
    await until(lambda: len(got) == len(sessions), "every session's round to end")


async def test_one_files_failed_fdatasync_fails_only_its_sessions_writers(sim: SimFS) -> None:
    sessions = new_sessions(GroupCommit())
    bad = str(DIR / "s2.tracking")
    sim.fault = lambda op, p: errno.EIO if op == "fdatasync" and p == bad else None
    chunk = 100
    got = acknowledge(sim, sessions, chunk)
    await settle(sessions, got)
    assert isinstance(got["s2"], DeltavolError) and bad in got["s2"].message
    assert [got[n] for n in ("s1", "s3", "s4")] == [None, None, None]
    assert [s.tracked(chunk * G, B) for s in sessions] == [True, False, True, True]
    tf = sessions[1].tracking_file
    assert tf is not None and tf.lost is not None  # its file may have lost pages: never trusted
    sim.fault = lambda op, p: None
    sim.power_loss()
    for s in sessions:
        bits, _, _ = persist.load_tracking(DIR / f"{s.name}.tracking", G, SIZE)
        if s.name != "s2":
            assert bits.test(chunk), f"{s.name}: an acknowledged change lost its bit"


async def test_each_session_is_acknowledged_when_its_own_file_synced(sim: SimFS) -> None:
    sessions = new_sessions(GroupCommit())
    delays = iter([0.08, 0.0, 0.04, 0.0])  # the files' syncs, in the order they are handed out
    sim.io_delay = lambda: next(delays)
    order: list[str] = []
    rounds = [s.track(7 * G, B)[0] for s in sessions]
    for s, r in zip(sessions, rounds, strict=True):
        r.add_done_callback(lambda f, s=s: order.append(s.name))
    for s, r in zip(sessions, rounds, strict=True):
        await s._commit.wait(r)
        assert durable_bit(sim, s, 7)
    assert order[-1] == "s1" and order[-2] == "s3", f"a session waited for another's sync: {order}"


async def test_a_write_out_failing_for_one_file_fails_only_its_session(sim: SimFS) -> None:
    sessions = new_sessions(GroupCommit())
    chunk = 300  # the first change of its region: its hot bit is written as the round begins
    bad = str(DIR / "s3.tracking")
    writes = {"n": 0}

    def fault(op: str, p: str) -> int | None:
        if op == "pwrite" and p == bad:
            writes["n"] += 1
            if writes["n"] == 2:  # the first is the chunk bit (track), the second the hot bit
                return errno.ENOSPC
        return None

    sim.fault = fault
    got = acknowledge(sim, sessions, chunk)
    await settle(sessions, got)
    assert isinstance(got["s3"], DeltavolError)
    assert [got[n] for n in ("s1", "s2", "s4")] == [None, None, None]
    sim.fault = lambda op, p: None
    # s3's next change of the chunk writes it again and asks a round of its own
    for r in sessions[2].track(chunk * G, B):
        await sessions[2]._commit.wait(r)
    assert durable_bit(sim, sessions[2], chunk)
