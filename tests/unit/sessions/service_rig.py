"""A real Service in a tmp data dir, closed after the test: for the tests that race
operations of the sessions (restores, reverses, creates) against one another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deltavol.config import ServerConfig
from deltavol.service import Service
from deltavol.store.datadir import DataDir

MiB = 1 << 20
SIZE = 4 * MiB
WAIT = 20.0  # seconds: generous, the machine is shared


class ServiceRig:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dd: DataDir | None = None
        self.svc: Service | None = None

    def open(self) -> Service:
        self.dd = DataDir(self.root)
        self.svc = Service(self.dd.open(), self.dd, ServerConfig(data_dir=self.root, save_limit=4 * MiB))
        self.svc.load()
        return self.svc

    async def close(self) -> None:
        if self.svc is not None:
            await self.svc.close()
            self.svc = None
        if self.dd is not None:
            self.dd.close()
            self.dd = None


@pytest.fixture
async def svc_rig(tmp_path: Path) -> AsyncIterator[ServiceRig]:
    r = ServiceRig(tmp_path / "data")
    try:
        yield r
    finally:
        await r.close()


async def idle(svc: Service, name: str) -> None:
    s = svc.sessions.get(name)
    async with asyncio.timeout(WAIT):
        while s.busy:
            await asyncio.sleep(0.01)


async def image(svc: Service, volume: str) -> bytes:
    return await svc.volumes.get(volume).backend.pread(0, SIZE)
