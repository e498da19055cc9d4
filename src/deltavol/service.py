"""Operations shared by the control API and the NBD server; the one place they meet."""

from __future__ import annotations

from typing import Any

from deltavol.backend.export import Export
from deltavol.config import ServerConfig
from deltavol.errors import Protected
from deltavol.events import EventBus
from deltavol.sessions.manager import SessionManager
from deltavol.sessions.verify import verify
from deltavol.store.datadir import DataDir
from deltavol.store.db import Database
from deltavol.volumes import Volumes


class Service:
    def __init__(self, db: Database, datadir: DataDir, config: ServerConfig) -> None:
        self.db = db
        self.events = EventBus()
        self.volumes = Volumes(db, datadir.volumes)
        self.sessions = SessionManager(db, self.volumes, datadir.bitmaps, datadir.save, config, self.events)

    def load(self) -> None:
        self.volumes.load()
        self.sessions.load()

    async def start(self) -> None:
        await self.sessions.start()

    async def close(self) -> None:
        await self.sessions.shutdown()
        await self.volumes.close()

    # --- ExportDirectory for the NBD server ---------------------------------------------
    def export_names(self) -> list[str]:
        return [v.name for v in self.volumes.all()]

    def open_export(self, name: str) -> Export:
        vol = self.volumes.get(name)
        why = vol.open_guard()
        if why:
            raise Protected(name=name, why=why)
        vol.connections += 1
        return vol.export

    def close_export(self, name: str) -> None:
        vol = self.volumes.find(name)
        if vol is not None and vol.connections:
            vol.connections -= 1

    # --- volumes ----------------------------------------------------------------------------
    def create_volume(self, name: str, size: int) -> dict[str, Any]:
        info = self.volumes.create(name, size).info()
        self.events.publish("volume.created", name=name, size=info["size"])
        return info

    def import_volume(self, name: str, path: str) -> dict[str, Any]:
        info = self.volumes.import_(name, path).info()
        self.events.publish("volume.created", name=name, size=info["size"], path=info["path"])
        return info

    def list_volumes(self) -> list[dict[str, Any]]:
        return [v.info() for v in self.volumes.all()]

    def volume_info(self, name: str) -> dict[str, Any]:
        return self.volumes.get(name).info()

    async def remove_volume(self, name: str) -> None:
        await self.volumes.remove(name, self.sessions.volume_busy)
        self.events.publish("volume.removed", name=name)

    # --- sessions ---------------------------------------------------------------------------
    async def create_session(self, **params: Any) -> dict[str, Any]:
        return (await self.sessions.create(**params)).status()

    def list_sessions(self) -> list[dict[str, Any]]:
        return [s.status() for s in self.sessions.all()]

    def session_status(self, name: str) -> dict[str, Any]:
        return self.sessions.get(name).status()

    async def update_session(self, name: str, full: bool, max_rate: int | None) -> dict[str, Any]:
        return await self.sessions.get(name).start_update(full, max_rate)

    async def pause_session(self, name: str) -> dict[str, Any]:
        return await self.sessions.get(name).pause()

    async def resume_session(self, name: str) -> dict[str, Any]:
        return await self.sessions.get(name).resume()

    async def cancel_session(self, name: str) -> dict[str, Any]:
        return await self.sessions.get(name).cancel()

    async def remove_session(self, name: str) -> None:
        await self.sessions.remove(name)
        self.events.publish("session.removed", name=name)

    async def verify_session(self, name: str) -> dict[str, Any]:
        return await verify(self.sessions.get(name))
