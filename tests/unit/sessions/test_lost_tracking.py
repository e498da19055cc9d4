"""A tracking file that lost pages (a failed fdatasync) is never trusted on a round.

A failed fdatasync may drop dirty pages for good, and a later round syncs without them:
the end of an update must write the file anew before it takes every bit set for durable.
Drives a real Session and TrackingFile on the simulated file system of ``tests/sim``,
which drops the pages of a failed fdatasync as the kernel does.
"""

from __future__ import annotations

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
from tests.sim.simfs import Clock, SimFS

G, SIZE, B = 64 * 1024, 1 << 30, 4096
DIR = Path("/sim/bitmaps")


@pytest.fixture
def sim() -> Iterator[SimFS]:
    simfs = SimFS(random.Random(1), Clock())
    old = fs.use(simfs)
    try:
        yield simfs
    finally:
        fs.use(old)


def new_session() -> Session:
    s = Session(
        name="s",
        source=SimpleNamespace(name="src", size=SIZE),
        target_spec="dst",
        granularity=G,
        files=DIR,
        save_dir=DIR,
        gate=WriteGate(),
        commit=GroupCommit(),
        open_target=None,
        persist_row=lambda s: None,
    )
    s.create_files()
    return s


async def test_the_end_of_an_update_writes_a_lost_tracking_file_anew(sim: SimFS) -> None:
    s = new_session()
    failing = [True]
    sim.fault = lambda op, p: (
        errno.EIO if failing[0] and op == "fdatasync" and p.endswith("s.tracking") else None
    )
    (r,) = s.track(0, B)  # a change of chunk 0: its round's fdatasync fails, it is not acknowledged
    with pytest.raises(DeltavolError):
        await s._commit.wait(r)
    failing[0] = False
    assert s.tracking_file is not None and s.tracking_file.lost is not None
    await s._tracking_durable()  # the end of an update, under the write gate
    # the next change of chunk 0 is acknowledged with no round: its bit must be durable
    assert s.tracked(0, B)
    sim.power_loss()
    bits, _, _ = persist.load_tracking(DIR / "s.tracking", G, SIZE)
    assert bits.test(0)
