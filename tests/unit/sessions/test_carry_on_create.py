"""A new session's tracking file carries hot the regions its source wrote lately.

The source is written at random, through its write gate, before any session exists; a
session is then created (its tracking file written under the closed gate, as
``SessionManager.create`` does it) and the workload goes on. The regions written before
are hot in the new file, durably, so none of the first writes after the creation waits for
a tracking sync; writes in regions nobody wrote still do. Either way every acknowledged
write is covered by the tracking file as a power cut would leave it, and after the cut, in
another boot, every one is tracked, with a re-copy within the hot set.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.backend.file import FileBackend
from deltavol.backend.gate import GateLayer, WriteGate
from deltavol.backend.hooks import BeforeChange
from deltavol.backend.recent import RecentWrites
from deltavol.bitmap import persist
from deltavol.sessions.manager import _SourceWiring
from deltavol.sessions.session import Session
from deltavol.store.group_commit import GroupCommit
from tests.unit.sessions.test_hot_set import (  # noqa: F401 (fixtures)
    BLOCK,
    GIB,
    INFLIGHT,
    MIB,
    REGION,
    SIZE,
    G,
    PowerCut,
    cut,
    hot_of,
    volume,
)


def new_session(tmp_path: Path, gate: WriteGate | None = None, **kw: Any) -> Session:
    source: Any = SimpleNamespace(name="src", size=SIZE)
    return Session(
        name="s",
        source=source,
        target_spec="dst",
        granularity=G,
        files=tmp_path,
        save_dir=tmp_path,
        gate=gate if gate is not None else WriteGate(),
        commit=GroupCommit(),
        open_target=None,
        persist_row=lambda s: None,
        **kw,
    )


async def _writes(layer: GateLayer, offsets: list[int], pc: PowerCut, missed: list[int]) -> set[int]:
    acked: set[int] = set()

    async def writer(mine: list[int]) -> None:
        for off in mine:
            data = off.to_bytes(8, "big") * (BLOCK // 8)
            if not layer.pwrite_now(off, data):
                await layer.pwrite(off, data)
            if not pc.covers(off // G):
                missed.append(off // G)
            acked.add(off // G)

    await asyncio.gather(*(writer(offsets[i::INFLIGHT]) for i in range(INFLIGHT)))
    return acked


@pytest.mark.parametrize(
    ("hot_set", "ws_regions", "cold"),
    [(None, 64, False), (16 * MIB, 64, False), (None, 64, True)],
    ids=[
        "written before, in the hot set: no sync",
        "more regions than the hot set: syncs",
        "regions nobody wrote: syncs",
    ],
)
async def test_first_writes_after_a_session_is_created_in_regions_written_before_need_no_sync(
    tmp_path: Path,
    cut: PowerCut,  # noqa: F811
    volume: FileBackend,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    hot_set: int | None,
    ws_regions: int,
    cold: bool,
) -> None:
    kw = {} if hot_set is None else {"hot_set": hot_set}
    bound = GIB if hot_set is None else hot_set
    gate = WriteGate(RecentWrites(bound))
    rng = random.Random(1201)
    base = [rng.randrange(SIZE // REGION) * REGION for _ in range(ws_regions)]
    missed: list[int] = []

    def offsets(n: int, regions: list[int]) -> list[int]:
        return [rng.choice(regions) + rng.randrange(REGION // BLOCK) * BLOCK for _ in range(n)]

    # no session yet: the source is written through its gate only
    await _writes(GateLayer(volume, gate), offsets(1000, base), cut, [])
    assert not cut.synced

    s = new_session(tmp_path, gate=gate, **kw)
    async with gate.closed():  # as SessionManager.create: the file, then the hooks
        s.create_files()
        wiring = _SourceWiring(gate=gate, commit=s._commit, sessions=[s])
        wiring.rehook()
    layer = GateLayer(BeforeChange(volume, wiring.hooks, gate), gate)  # type: ignore[arg-type]
    carried = hot_of(cut.raw)  # the file as a power cut leaves it now: fsynced at its creation
    if bound >= ws_regions * REGION:
        assert all(carried.test(r // REGION) for r in base), "the regions written before are not hot"
    assert carried.count() <= bound // REGION

    later = base if not cold else [r + REGION for r in base if r + REGION < SIZE]
    syncs = len(cut.synced)
    acked = await _writes(layer, offsets(1000, later), cut, missed)
    syncs = len(cut.synced) - syncs
    assert not missed, f"acknowledged before a durable record covered them: {missed[:10]}"
    if bound >= ws_regions * REGION and not cold:
        assert syncs == 0, f"{syncs} tracking syncs for first writes in regions written before"
    else:
        assert syncs > 0  # the regions come in, a sync each round
    assert not cut.violations, cut.violations[:5]

    # the power goes; the machine reboots
    tracked = s.tracking.copy()
    assert s.tracking_file is not None
    s.tracking_file.close()
    Path(cut.path).write_bytes(cut.raw)
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))
    again = new_session(tmp_path, **kw)
    again.load_files()
    try:
        back = again.tracking
        assert all(back.test(c) for c in acked), (
            "a change after the creation is not tracked after the power loss"
        )
        recopy = back.bytes_set() - tracked.bytes_set()
        assert 0 < recopy <= bound + INFLIGHT * REGION, f"re-copies {recopy / MIB:.0f} MiB"
    finally:
        assert again.tracking_file is not None
        again.tracking_file.close()


def test_the_record_keeps_the_last_regions_written_least_recent_first() -> None:
    rec = RecentWrites(hot_set=3 * REGION)
    for r in (5, 1, 5, 7, 2):  # 5 again: it moves to the end
        rec.note(r * REGION + 4096, 4096)
    assert rec.regions(REGION) == [5, 7, 2]  # 1 went first: the bound is 3
    rec.note(9 * REGION - 4096, 2 * 4096)  # across two regions
    assert rec.regions(REGION) == [2, 8, 9]
    assert rec.regions(2 * REGION) == [1, 4]  # 2 -> 1, 8 and 9 -> 4
    assert rec.regions(REGION // 2) == [4, 5, 16, 17, 18, 19]
    rec.note(0, 1 << 40)  # a trim of a huge range: only its last regions stay
    assert rec.regions(REGION) == [(1 << 40) // REGION - 3, (1 << 40) // REGION - 2, (1 << 40) // REGION - 1]
