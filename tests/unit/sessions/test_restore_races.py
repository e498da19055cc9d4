"""Restores racing other operations on the same source.

Drives the real Service, SessionManager, write path and SQLite in a tmp data dir (local
targets); a restore is held half-way by holding its reads of the target, or one of its
source writes in its thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable

import pytest

from deltavol.errors import NotRestorable, Protected
from deltavol.service import Service
from deltavol.sessions import restore
from deltavol.sessions.states import State
from tests.unit.sessions.service_rig import SIZE, WAIT, MiB, ServiceRig, idle, image, svc_rig

__all__ = ["svc_rig"]


async def two_sessions(svc: Service) -> None:
    """src -> t1 ('a', point in time: 0x01 everywhere) and src -> t2 ('b', 0x02 in the
    first MiB); then src changes again."""
    for v in ("src", "t1", "t2"):
        svc.create_volume(v, SIZE)
    await svc.start()
    src = svc.volumes.get("src")
    await src.export.pwrite(0, b"\x01" * SIZE)
    await svc.create_session(name="a", source="src", target="t1")
    await svc.update_session("a", True, None)
    await idle(svc, "a")
    await src.export.pwrite(0, b"\x02" * MiB)
    await svc.create_session(name="b", source="src", target="t2")
    await svc.update_session("b", True, None)
    await idle(svc, "b")
    await src.export.pwrite(MiB, b"\x03" * MiB)


def hold_target_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Every restore's copy waits for ``release``; ``held`` is set once one waits."""
    held, release = asyncio.Event(), asyncio.Event()
    orig = restore.Restorer._copy_run

    async def copy_run(self: restore.Restorer, first: int, count: int) -> None:
        held.set()
        await release.wait()
        await orig(self, first, count)

    monkeypatch.setattr(restore.Restorer, "_copy_run", copy_run)
    return held, release


async def test_two_restores_of_one_source_never_run_at_once(svc_rig: ServiceRig) -> None:
    svc = svc_rig.open()
    await two_sessions(svc)
    a, b = svc.sessions.get("a"), svc.sessions.get("b")
    b_before = b.status()
    done = await asyncio.gather(svc.restore_session("a"), svc.restore_session("b"), return_exceptions=True)
    assert isinstance(done[0], dict) and done[0]["state"] == "restoring", done
    assert isinstance(done[1], NotRestorable), done
    assert "being restored by session 'a'" in done[1].message
    assert b.state is State.IDLE and b.status()["update"] == b_before["update"]
    row = svc.db.conn.execute("SELECT state FROM sessions WHERE name = 'b'").fetchone()
    assert row["state"] == "idle"
    assert not restore.restore_path(b).exists()
    assert a._task is not None
    await a._task
    assert a.state is State.IDLE and await image(svc, "src") == await image(svc, "t1")
    src = svc.volumes.get("src")
    assert src.write_guard() is None and src.restoring_by is None
    # the source is free again: b's restore runs, and ends at b's point in time
    await svc.restore_session("b")
    assert b._task is not None
    await b._task
    assert b.state is State.IDLE and b.consistent
    assert await image(svc, "src") == await image(svc, "t2")


async def test_a_restore_that_fails_before_its_commit_frees_the_source(svc_rig: ServiceRig) -> None:
    svc = svc_rig.open()
    await two_sessions(svc)
    await svc.volumes.remove("t1", lambda v: None)  # a's target is gone: a's restore is refused
    with pytest.raises(Exception, match="t1"):
        await svc.restore_session("a")
    src = svc.volumes.get("src")
    assert src.restoring_by is None and src.write_guard() is None
    await svc.restore_session("b")
    b = svc.sessions.get("b")
    assert b._task is not None
    await b._task
    assert await image(svc, "src") == await image(svc, "t2")


async def test_a_second_restoring_session_of_a_source_waits_at_start_up(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = svc_rig.open()
    await two_sessions(svc)
    held, release = hold_target_reads(monkeypatch)
    await svc.restore_session("a")
    await held.wait()
    await svc_rig.close()  # a stop mid-restore: 'a' stays restoring
    # as two restores of one source would have left it (before they were refused)
    svc_rig.open()
    assert svc_rig.svc is not None
    svc_rig.svc.db.conn.execute(
        "UPDATE sessions SET state = 'restoring', update_json = "
        "(SELECT update_json FROM sessions WHERE name = 'a') WHERE name = 'b'"
    )
    svc_rig.svc.db.conn.commit()
    await svc_rig.close()
    release.set()

    svc = svc_rig.open()
    a, b = svc.sessions.get("a"), svc.sessions.get("b")
    src = svc.volumes.get("src")
    assert a.state is State.RESTORING and b.state is State.RESTORING
    assert b.last_error is not None and "being restored by session 'a'" in b.last_error
    assert src.restoring_by == "a" and "'a'" in (src.write_guard() or "")
    await svc.start()
    async with asyncio.timeout(WAIT):
        while a.state is State.RESTORING:
            await asyncio.sleep(0.01)
    assert not b.busy and b.state is State.RESTORING  # never ran beside a's
    assert a.state is State.IDLE and await image(svc, "src") == await image(svc, "t1")
    # once a's ended, b's restore starts over from tracking and ends at b's point in time
    await svc.restore_session("b")
    assert b._task is not None
    await b._task
    assert b.state is State.IDLE and b.last_error is None
    assert await image(svc, "src") == await image(svc, "t2")


async def test_other_sessions_of_the_source_do_not_wait_for_a_whole_restore(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = svc_rig.open()
    await two_sessions(svc)
    held, release = hold_target_reads(monkeypatch)
    await svc.restore_session("a")
    await held.wait()  # a's restore is under way, its copy held
    # b marks (its update closes the source's gate) and is removed, meanwhile
    st = await asyncio.wait_for(svc.update_session("b", False, None), WAIT)
    assert st["update"] is not None
    release.set()
    await idle(svc, "b")
    await asyncio.wait_for(svc.remove_session("b"), WAIT)
    a = svc.sessions.get("a")
    assert a._task is not None
    await a._task
    assert a.state is State.IDLE and await image(svc, "src") == await image(svc, "t1")


async def test_a_removed_restores_write_in_a_thread_lands_before_the_guard_goes(
    svc_rig: ServiceRig,
) -> None:
    svc = svc_rig.open()
    await two_sessions(svc)
    src = svc.volumes.get("src")
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    orig: Callable[..., Awaitable[None]] = src.backend.pwrite
    fd: int = src.backend._fd

    at: list[int] = []

    def held_write(offset: int, data: bytes) -> None:
        at.append(offset)
        started.set()
        release.wait(WAIT)
        os.pwrite(fd, data, offset)
        finished.set()

    async def pwrite(offset: int, data: bytes, fua: bool = False) -> None:
        if not started.is_set() and svc.sessions.get("a").state is State.RESTORING:
            await asyncio.to_thread(held_write, offset, data)  # a cancel leaves it running
        else:
            await orig(offset, data, fua)

    src.backend.pwrite = pwrite  # type: ignore[method-assign]
    await svc.restore_session("a")
    await asyncio.to_thread(started.wait, WAIT)
    assert started.is_set()
    offset = at[0]
    rm = asyncio.create_task(svc.remove_session("a"))
    done, _ = await asyncio.wait([rm], timeout=1.0)
    client = b"\x09" * 4096
    if done:  # the guard went at once: a client write is taken
        await src.export.pwrite(offset, client)
    else:  # the removal waits for the write in its thread; clients are refused meanwhile
        with pytest.raises(Protected):
            await src.export.pwrite(offset, client)
    release.set()
    await rm
    if not done:
        await src.export.pwrite(offset, client)
    await asyncio.to_thread(finished.wait, WAIT)
    assert finished.is_set()
    assert src.write_guard() is None
    assert await src.backend.pread(offset, len(client)) == client  # acknowledged: not overwritten
