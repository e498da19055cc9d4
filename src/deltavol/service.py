"""Operations shared by the control API and the NBD server; the one place they meet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltavol.backend.export import Export
from deltavol.errors import Protected
from deltavol.store.db import Database
from deltavol.volumes import Volume, Volumes


class Service:
    def __init__(self, db: Database, images: Path) -> None:
        self.db = db
        self.volumes = Volumes(db, images)

    def load(self) -> None:
        self.volumes.load()

    async def close(self) -> None:
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
        return self.volumes.create(name, size).info()

    def import_volume(self, name: str, path: str) -> dict[str, Any]:
        return self.volumes.import_(name, path).info()

    def list_volumes(self) -> list[dict[str, Any]]:
        return [v.info() for v in self.volumes.all()]

    def volume_info(self, name: str) -> dict[str, Any]:
        return self.volumes.get(name).info()

    async def remove_volume(self, name: str) -> None:
        await self.volumes.remove(name, self._volume_busy)

    def _volume_busy(self, vol: Volume) -> str | None:
        return None
