"""A real Service in a tmp data dir, closed after the test: for the tests that race
operations of the sessions (restores, reverses, creates) against one another."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deltavol.config import ServerConfig
from deltavol.service import Service
from deltavol.store import fs
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


class OnLoopFS(fs.RealFS):
    """The real file system, noting each call made on the event loop's thread (``_note``:
    no sync belongs there) and counting the syncs."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.on_loop: list[tuple[str, Any]] = []
        self.syncs = 0

    def _note(self, what: str, arg: Any) -> None:
        if threading.get_ident() == self.loop_thread:
            self.on_loop.append((what, arg))

    def _sync(self, what: str, arg: Any) -> None:
        self.syncs += 1
        self._note(what, arg)

    def fsync(self, fd: int) -> None:
        self._sync("fsync", fd)
        super().fsync(fd)

    def fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)
        super().fdatasync(fd)

    def sync_dir(self, path: Path) -> None:
        self._sync("sync_dir", path)
        super().sync_dir(path)
