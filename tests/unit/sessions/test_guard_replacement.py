"""A peer's guard replaced by a create retried after a crash (``current``: the old secret).

The old copier's changes checked under the old guard must have landed before the new guard
stands (the retried create's full copy comes after them), and no connection opened with
the old secret may be left to write after it. Drives the real Service, SQLite and the
volume's export; the file backend holds one write back past the gate.
"""

from __future__ import annotations

import asyncio

import pytest

from deltavol.errors import InUse, Protected
from tests.unit.sessions.service_rig import SIZE, WAIT, ServiceRig, svc_rig

__all__ = ["svc_rig"]

HOLDER = "session 's' of the deltavol server L"


async def test_a_replaced_guard_waits_for_the_old_writes_and_connections(svc_rig: ServiceRig) -> None:
    svc = svc_rig.open()
    svc.create_volume("B", SIZE, peer_target=True)
    await svc.start()
    vol = svc.volumes.get("B")
    await svc.put_guard("B", HOLDER, "old-secret")
    old = svc.open_export("B@old-secret")  # the copier of the first attempt

    # its connection still open: the retried create's guard is refused, nothing changes
    with pytest.raises(InUse, match="connection") as refused:
        await svc.put_guard("B", HOLDER, "new-secret", current="old-secret")
    assert refused.value.http_status == 409
    assert vol.peer_guard is not None and vol.peer_guard.admits("old-secret")
    row = svc.db.conn.execute("SELECT secret_sha256 FROM guards WHERE volume = 'B'").fetchone()
    assert row[0] == vol.peer_guard.secret_sha256

    # a write of the old copier past the gate, held in the file backend; its connection goes
    backend, down, release = vol.backend, asyncio.Event(), asyncio.Event()
    real_pwrite = backend.pwrite

    async def held_pwrite(offset: int, data: bytes, fua: bool = False) -> None:
        down.set()
        await release.wait()
        await real_pwrite(offset, data, fua)

    backend.pwrite = held_pwrite  # type: ignore[method-assign]
    write = asyncio.ensure_future(old.pwrite(0, b"\x11" * 4096))
    async with asyncio.timeout(WAIT):
        await down.wait()
    backend.pwrite = real_pwrite  # type: ignore[method-assign]
    svc.close_export("B@old-secret")

    replace = asyncio.ensure_future(svc.put_guard("B", HOLDER, "new-secret", current="old-secret"))
    async with asyncio.timeout(WAIT):
        while vol.gate.open:  # the replacement closes the gate, and waits for the write
            await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert not replace.done(), "the guard was replaced with an old write still under way"
    assert vol.peer_guard.admits("old-secret")
    release.set()
    async with asyncio.timeout(WAIT):
        await write
        assert await replace == {"volume": "B", "guarded_by": HOLDER}
    assert vol.peer_guard.admits("new-secret") and not vol.peer_guard.admits("old-secret")

    # what the new guard's copy writes stays; the old secret writes no more
    new = svc.open_export("B@new-secret")
    await new.pwrite(0, b"\x22" * 4096)
    with pytest.raises(Protected):
        await old.pwrite(0, b"\x11" * 4096)
    assert await vol.backend.pread(0, 4096) == b"\x22" * 4096
    svc.close_export("B@new-secret")


async def test_a_dropped_guard_waits_for_its_holders_writes(svc_rig: ServiceRig) -> None:
    """The holder's session removed: its copier's write that passed the gate lands before
    the drop returns (a next writer's data must not be overwritten by it), and its
    connections write no more."""
    svc = svc_rig.open()
    svc.create_volume("B", SIZE, peer_target=True)
    await svc.start()
    vol = svc.volumes.get("B")
    await svc.put_guard("B", HOLDER, "secret")
    old = svc.open_export("B@secret")

    backend, down, release = vol.backend, asyncio.Event(), asyncio.Event()
    real_pwrite = backend.pwrite

    async def held_pwrite(offset: int, data: bytes, fua: bool = False) -> None:
        down.set()
        await release.wait()
        await real_pwrite(offset, data, fua)

    backend.pwrite = held_pwrite  # type: ignore[method-assign]
    write = asyncio.ensure_future(old.pwrite(0, b"\x11" * 4096))
    async with asyncio.timeout(WAIT):
        await down.wait()
    backend.pwrite = real_pwrite  # type: ignore[method-assign]

    drop = asyncio.ensure_future(svc.drop_guard("B", "secret"))
    async with asyncio.timeout(WAIT):
        while vol.gate.open:  # the drop closes the gate, and waits for the write
            await asyncio.sleep(0)
    assert not drop.done(), "the guard was dropped with its holder's write still under way"
    assert vol.peer_guard is not None
    release.set()
    async with asyncio.timeout(WAIT):
        await write
        assert await drop == {"volume": "B", "dropped": True}
    assert vol.peer_guard is None
    with pytest.raises(Protected):
        await old.pwrite(0, b"\x33" * 4096)
    assert await vol.backend.pread(0, 4096) == b"\x11" * 4096
    svc.close_export("B@secret")
