"""A reverse racing a create on its volumes: neither may leave a volume both a source and
a target. Drives the real Service, SessionManager and SQLite (local targets, and a fake
NBD target whose probe waits until the test lets it go)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deltavol.errors import InUse, NotReversible
from deltavol.sessions import manager
from tests.unit.sessions.service_rig import SIZE, WAIT, ServiceRig, idle, svc_rig

__all__ = ["svc_rig"]


async def test_a_create_on_the_source_of_a_reverse_under_way_is_refused(svc_rig: ServiceRig) -> None:
    svc = svc_rig.open()
    for v in ("src", "t1", "y"):
        svc.create_volume(v, SIZE)
    await svc.start()
    src = svc.volumes.get("src")
    await src.export.pwrite(0, b"\x01" * SIZE)
    await svc.create_session(name="a", source="src", target="t1")
    await svc.update_session("a", True, None)
    await idle(svc, "a")
    rev = asyncio.create_task(svc.reverse_session("a"))
    async with asyncio.timeout(WAIT):
        while src.gate.open:  # the reverse holds src's gate closed
            await asyncio.sleep(0)
    cr = asyncio.create_task(svc.create_session(name="x", source="src", target="y"))
    done = await asyncio.gather(rev, cr, return_exceptions=True)
    assert isinstance(done[0], dict) and done[0]["source"] == "t1" and done[0]["target"] == "src", done
    assert isinstance(done[1], InUse), done
    m = svc.sessions
    assert [s.name for s in m.all()] == ["a"] and m.of_source("src") == []
    rows = svc.db.conn.execute("SELECT name, source, target FROM sessions").fetchall()
    assert [tuple(r) for r in rows] == [("a", "t1", "src")]


class HeldProbe:
    """An NBD target whose ``open`` waits for ``release``; ``probing`` is set meanwhile."""

    probing: asyncio.Event
    release: asyncio.Event

    def __init__(self, uri: str, timeout: float) -> None:
        self.size = SIZE

    async def open(self) -> HeldProbe:
        HeldProbe.probing.set()
        await HeldProbe.release.wait()
        return self

    async def close(self) -> None:
        pass


async def test_a_reverse_is_refused_while_a_create_on_its_volume_is_under_way(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    HeldProbe.probing, HeldProbe.release = asyncio.Event(), asyncio.Event()
    monkeypatch.setattr(manager, "NbdTarget", HeldProbe)
    svc = svc_rig.open()
    for v in ("src", "t1"):
        svc.create_volume(v, SIZE)
    await svc.start()
    await svc.create_session(name="a", source="src", target="t1")
    await svc.update_session("a", True, None)
    await idle(svc, "a")
    cr = asyncio.create_task(svc.create_session(name="x", source="src", target="nbd://dr/vol"))
    await HeldProbe.probing.wait()
    with pytest.raises(NotReversible, match="'x'"):
        await svc.reverse_session("a")
    HeldProbe.release.set()
    st: dict[str, Any] = await cr
    assert st["source"] == "src"
    a = svc.sessions.get("a")
    assert a.source.name == "src" and a.target_spec == "t1"
