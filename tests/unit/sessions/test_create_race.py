"""Two creates at once never both get a name or a remote target.

``create`` awaits the probe of a remote target between its checks and the session's
coming in; a second create during that await must see the first one's name and target
taken. Drives the real Service, SessionManager and SQLite in a tmp data dir, with a
fake NBD target whose probe waits until the test lets it go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deltavol.config import ServerConfig
from deltavol.errors import AlreadyExists, InUse
from deltavol.service import Service
from deltavol.sessions import manager
from deltavol.store.datadir import DataDir

MiB = 1 << 20


class HeldProbe:
    """An NBD target whose ``open`` waits for ``release``; ``probing`` is set meanwhile."""

    probing: asyncio.Event
    release: asyncio.Event

    def __init__(self, uri: str, timeout: float) -> None:
        self.size = 8 * MiB

    async def open(self) -> HeldProbe:
        HeldProbe.probing.set()
        await HeldProbe.release.wait()
        return self

    async def close(self) -> None:
        pass


@pytest.fixture
async def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    HeldProbe.probing, HeldProbe.release = asyncio.Event(), asyncio.Event()
    monkeypatch.setattr(manager, "NbdTarget", HeldProbe)
    root = tmp_path / "data"
    dd = DataDir(root)
    service = Service(dd.open(), dd, ServerConfig(data_dir=root, save_limit=4 * MiB))
    try:
        service.load()
        service.create_volume("v1", 4 * MiB)
        service.create_volume("v2", 4 * MiB)
        yield service
    finally:
        await service.close()
        dd.close()


def rows(svc: Service) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in svc.db.conn.execute("SELECT name, source, target FROM sessions ORDER BY name")]


async def test_a_second_create_onto_a_remote_target_being_probed_is_refused(svc: Service) -> None:
    uri = "nbd://dr-site/vol"
    first = asyncio.create_task(svc.create_session(name="a", source="v1", target=uri))
    await HeldProbe.probing.wait()
    second = asyncio.create_task(svc.create_session(name="b", source="v2", target=uri))
    HeldProbe.release.set()
    done = await asyncio.gather(first, second, return_exceptions=True)
    assert done[0]["name"] == "a"
    assert isinstance(done[1], InUse)
    assert rows(svc) == [("a", "v1", uri)]
    assert [s.name for s in svc.sessions.all()] == ["a"]
    assert svc.sessions.of_source("v2") == []


async def test_a_second_create_of_a_name_being_created_is_refused(svc: Service) -> None:
    first = asyncio.create_task(svc.create_session(name="c", source="v1", target="nbd://x/1"))
    await HeldProbe.probing.wait()
    second = asyncio.create_task(svc.create_session(name="c", source="v2", target="nbd://x/2"))
    HeldProbe.release.set()
    done = await asyncio.gather(first, second, return_exceptions=True)
    assert done[0]["name"] == "c"
    assert isinstance(done[1], AlreadyExists)
    assert rows(svc) == [("c", "v1", "nbd://x/1")]
    assert [s.source.name for s in svc.sessions.all()] == ["v1"]
    assert svc.sessions.of_source("v2") == []  # no hooks of a session that is not there


async def test_a_failed_probe_leaves_the_name_and_target_free(svc: Service) -> None:
    first = asyncio.create_task(svc.create_session(name="a", source="v1", target="nbd://x/1"))
    await HeldProbe.probing.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    HeldProbe.release.set()
    await svc.create_session(name="a", source="v2", target="nbd://x/1")
    assert rows(svc) == [("a", "v2", "nbd://x/1")]
