"""A session's peer file goes with its row, before any await of its removal.

``session remove`` asks the peer to drop its guard (an HTTP call that may take seconds);
the name is free from the row's delete on. A create of that name with ``--peer-api``
meanwhile writes its own peer file, which the removal must not delete afterwards. And a
peer file a crash left behind (the row gone, the file not yet) must not become the peer
of a later session of that name made without one.

Drives the real Service, SessionManager and SQLite in a tmp dir; the peer's API is a fake
whose answers wait until the test lets them go.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deltavol.errors import InUse, PeerRefused
from deltavol.sessions import manager, peers
from deltavol.sessions.peers import Peer
from tests.unit.sessions.service_rig import SIZE, WAIT, ServiceRig, svc_rig

__all__ = ["svc_rig"]


class FakePeerApi:
    """Records the calls; each waits for ``release`` of its method, then answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.arrived = {m: asyncio.Event() for m in ("PUT", "DELETE")}
        self.release = {m: asyncio.Event() for m in ("PUT", "DELETE")}
        self.refuse: set[str] = set()

    async def __call__(self, peer: Peer, method: str, path: str, body: Any = None, root: Any = None) -> Any:
        self.calls.append((method, path, body))
        self.arrived[method].set()
        await self.release[method].wait()
        if method in self.refuse:
            raise PeerRefused(api=peer.api, why="refused by the test")
        return {}


class FakeTarget:
    """The peer's volume as an NBD target: only its size is asked for here."""

    def __init__(self, uri: str, timeout: float, export: str | None = None) -> None:
        self.size = SIZE

    async def open(self) -> FakeTarget:
        return self

    async def close(self) -> None:
        pass


async def test_a_create_during_a_remove_waits_for_it_and_keeps_its_peer_file(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removal deletes the session's files by name once its awaits are over (here the
    peer's DELETE): a create of that name meanwhile is refused, and one after it keeps
    the peer file it writes."""
    api = FakePeerApi()
    monkeypatch.setattr(peers, "call", api)
    monkeypatch.setattr(manager, "NbdTarget", FakeTarget)
    svc = svc_rig.open()
    svc.create_volume("A", SIZE)
    svc.create_volume("A2", SIZE)
    await svc.start()
    m = svc.sessions
    api.release["PUT"].set()
    old = Peer(api="http://127.0.0.1:9", token="t")
    await m.create("s", "A", "nbd://127.0.0.1:9/B", peer=old)
    old_secret = old.guard
    assert old_secret and m.peer_files.path("s").exists()
    api.release["PUT"].clear()
    api.arrived["PUT"].clear()
    removing = asyncio.create_task(svc.remove_session("s"))
    async with asyncio.timeout(WAIT):
        await api.arrived["DELETE"].wait()  # the removal waits for the peer
    assert not m.peer_files.path("s").exists(), "the peer file outlived the row"
    with pytest.raises(InUse):  # its volumes stay the removal's until it is done
        await m.create("s", "A", "nbd://127.0.0.1:9/B", peer=Peer(api="http://127.0.0.1:9", token="t"))
    with pytest.raises(InUse, match="being removed"):  # and so does its name
        await m.create("s", "A2", "nbd://127.0.0.1:9/C", peer=Peer(api="http://127.0.0.1:9", token="t"))
    assert not api.arrived["PUT"].is_set()
    api.release["DELETE"].set()
    async with asyncio.timeout(WAIT):
        await removing
    assert ("DELETE", "/v1/peer/guards/B", {"secret": old_secret}) in api.calls
    new = Peer(api="http://127.0.0.1:9", token="t")
    api.release["PUT"].set()
    await m.create("s", "A2", "nbd://127.0.0.1:9/C", peer=new)
    kept = m.peer_files.load("s")
    assert kept is not None and new.guard not in (None, old_secret) and kept.guard == new.guard


async def test_a_leftover_peer_file_is_no_later_sessions_peer(svc_rig: ServiceRig) -> None:
    svc = svc_rig.open()
    for v in ("A", "B"):
        svc.create_volume(v, SIZE)
    m = svc.sessions
    # a session "s" with a peer whose removal died after its row and before its peer file
    m.peer_files.save("s", Peer(api="http://127.0.0.1:9", token="t", guard="stale"))
    await svc.start()
    await svc.create_session(name="s", source="A", target="B")
    assert not m.peer_files.path("s").exists()
    assert "s" not in m.peers
    await svc_rig.close()
    svc = svc_rig.open()
    await svc.start()
    assert "s" not in svc.sessions.peers
    assert svc.sessions.get("s").status().get("peer") is None
