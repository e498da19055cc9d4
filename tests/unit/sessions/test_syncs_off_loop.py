"""A mark syncs what its commit depends on in threads, side by side, never on the event
loop: a sync on the loop holds up every client of every volume for as long as the disk
takes (a loaded disk: tens of milliseconds per fsync).

Drives the real Service, SessionManager, write path and SQLite in a tmp data dir (local
targets), with the ``store/fs.py`` seam recording the thread of every sync.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from deltavol.service import Service
from deltavol.sessions.states import State
from deltavol.store import fs
from tests.unit.sessions.service_rig import SIZE, MiB, OnLoopFS, ServiceRig, idle, image, svc_rig

__all__ = ["svc_rig"]


Recording = OnLoopFS  # every sync noted on the loop's thread, and counted


@pytest.fixture
def recording() -> Iterator[Recording]:
    rec = Recording()
    old = fs.use(rec)
    try:
        yield rec
    finally:
        fs.use(old)


async def consistent_session(svc: Service) -> None:
    for v in ("src", "dst"):
        svc.create_volume(v, SIZE)
    await svc.start()
    await svc.volumes.get("src").export.pwrite(0, b"\x01" * SIZE)
    await svc.create_session(name="s", source="src", target="dst")
    await svc.update_session("s", True, None)
    await idle(svc, "s")


async def test_an_incremental_mark_syncs_nothing_on_the_loop_before_it_commits(
    svc_rig: ServiceRig, recording: Recording
) -> None:
    svc = svc_rig.open()
    await consistent_session(svc)
    src = svc.volumes.get("src")
    await src.export.pwrite(MiB, b"\x02" * MiB)
    await svc.update_session("s", False, None)  # an incremental update: marks, copies, ends
    s = svc.sessions.get("s")
    await src.export.pwrite(2 * MiB, b"\x03" * MiB)
    await idle(svc, "s")
    # the second mark: a save area and a transfer file of an update before, both replaced
    at_commit: list[tuple[int, list[tuple[str, Any]]]] = []
    persist_row = s._persist_row

    def committing(session: Any) -> None:
        at_commit.append((recording.syncs, list(recording.on_loop)))
        persist_row(session)

    s._persist_row = committing
    recording.on_loop.clear()
    recording.syncs = 0
    await svc.update_session("s", False, None)
    syncs, on_loop = at_commit[0]
    assert syncs >= 4, syncs  # the source (twice), the transfer file and its directory, the header
    assert on_loop == []
    await idle(svc, "s")
    assert s.state is State.IDLE and s.consistent
    assert await image(svc, "src") == await image(svc, "dst")


async def test_a_mark_flushes_the_source_inside_the_gate_before_it_commits(
    svc_rig: ServiceRig, recording: Recording
) -> None:
    """What a mark copies must be durable on the source: a change that passed the gate
    after the first flush (before the gate closed) is flushed by the one beside the files'
    syncs, which the commit waits for."""
    svc = svc_rig.open()
    await consistent_session(svc)
    src = svc.volumes.get("src")
    s = svc.sessions.get("s")
    source_file = os.path.realpath(src.backend.path)
    gate = s._gate
    seen: list[tuple[str, bool]] = []
    note = recording._note

    def noting(what: str, arg: Any) -> None:
        if what == "fsync" and os.path.realpath(f"/proc/self/fd/{arg}") == source_file:
            seen.append(("source fsync", not gate.open and gate._idle.is_set()))
        note(what, arg)

    recording._note = noting  # type: ignore[method-assign]
    persist_row = s._persist_row

    def committing(session: Any) -> None:
        seen.append(("commit", not gate.open))
        persist_row(session)

    s._persist_row = committing
    await src.export.pwrite(MiB, b"\x02" * MiB)
    await svc.update_session("s", False, None)
    first_commit = seen.index(("commit", True))
    assert ("source fsync", True) in seen[:first_commit], seen
    await idle(svc, "s")
    assert await image(svc, "src") == await image(svc, "dst")
