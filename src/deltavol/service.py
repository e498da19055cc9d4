"""Operations shared by the control API and the NBD server; the one place they meet."""

from __future__ import annotations

from typing import Any

from deltavol.backend.export import WRITE, ZERO, Export
from deltavol.config import ServerConfig
from deltavol.errors import NotFound, Protected, SessionUnavailable, UsageError
from deltavol.events import EventBus
from deltavol.metrics import bitmap_grid, session_extras
from deltavol.sessions import restore, reverse
from deltavol.sessions.manager import SessionManager
from deltavol.sessions.verify import verify
from deltavol.store.datadir import DataDir
from deltavol.store.db import Database
from deltavol.store.facts import Facts
from deltavol.volumes import Volumes


class Service:
    def __init__(self, db: Database, datadir: DataDir, config: ServerConfig) -> None:
        self.db = db
        self.events = EventBus()
        self.volumes = Volumes(db, datadir.volumes, config.hot_set)
        self.sessions = SessionManager(db, self.volumes, datadir.bitmaps, datadir.save, config, self.events)
        self.warnings = list(config.warnings)  # how the server is exposed, said by `volume list`
        self.facts = Facts(db, self._find_session)
        self.events.listen(self.facts.record)

    def _find_session(self, name: str) -> Any:
        try:
            return self.sessions.get(name)
        except (NotFound, SessionUnavailable):
            return None

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
        """``NAME``, or ``NAME@SECRET``: the writable way in for the copier of the session
        of another deltavol server whose target the volume is (its guard's secret)."""
        name, at, secret = name.partition("@")
        vol = self.volumes.get(name)
        why = vol.open_guard()
        if not why and not at and vol.peer_guard is not None:
            # this server cannot know when the peer's copy is consistent: no reader
            why = f"{vol.why_guarded()}, which may not have finished copying to it"
        if why:
            raise Protected(name=name, why=why)
        export = vol.holder_export(secret) if at else vol.export
        vol.connections += 1
        return export

    def close_export(self, name: str) -> None:
        """Undo ``open_export`` of ``NAME`` or ``NAME@SECRET`` (an NBD_OPT_INFO's name)."""
        vol = self.volumes.find(name.partition("@")[0])
        if vol is not None and vol.connections:
            vol.connections -= 1

    # --- volumes ----------------------------------------------------------------------------
    def create_volume(self, name: str, size: int, peer_target: bool = False) -> dict[str, Any]:
        info = self.volumes.create(name, size, peer_target).info()
        self.events.publish("volume.created", name=name, size=info["size"])
        return info

    async def create_volume_from_session(self, name: str, session: str) -> dict[str, Any]:
        """A new volume holding the point in time of ``session``'s target (a full copy)."""
        s = self.sessions.get(session)
        vol = await restore.new_volume(s, lambda fill: self.volumes.create_from(name, s.source.size, fill))
        info = vol.info()
        self.events.publish("volume.created", name=name, size=info["size"], session=session)
        return info

    def import_volume(self, name: str, path: str) -> dict[str, Any]:
        info = self.volumes.import_(name, path).info()
        self.events.publish("volume.created", name=name, size=info["size"], path=info["path"])
        return info

    def list_volumes(self) -> list[dict[str, Any]]:
        return [self._volume_json(v.info()) for v in self.volumes.all()]

    def volume_info(self, name: str) -> dict[str, Any]:
        return self._volume_json(self.volumes.get(name).info())

    def _volume_json(self, info: dict[str, Any]) -> dict[str, Any]:
        """A volume's JSON with the bytes its NBD clients wrote (and zeroed) since the start."""
        vol = self.volumes.get(info["name"])
        stats = vol.export.stats
        written = None if stats is None else stats.bytes[WRITE] + stats.bytes[ZERO]
        return {**info, "written_bytes": written}

    def set_peer_target(self, name: str, on: bool) -> dict[str, Any]:
        return self._volume_json(self.volumes.set_peer_target(name, on).info())

    async def remove_volume(self, name: str) -> None:
        await self.volumes.remove(name, self.sessions.volume_busy)
        self.events.publish("volume.removed", name=name)

    # --- sessions ---------------------------------------------------------------------------
    async def create_session(self, **params: Any) -> dict[str, Any]:
        return session_extras(self, (await self.sessions.create(**params)).status())

    def list_sessions(self) -> list[dict[str, Any]]:
        """Every session, those start-up could not load too (state ``unavailable``)."""
        infos = [s.status() for s in self.sessions.all()]
        infos += [u.status() for u in self.sessions.unavailable.values()]
        infos.sort(key=lambda info: info["name"])
        return [self._with_peer(session_extras(self, info)) for info in infos]

    def session_status(self, name: str) -> dict[str, Any]:
        u = self.sessions.unavailable.get(name)
        info = u.status() if u is not None else self.sessions.get(name).status()
        return self._with_peer(session_extras(self, info))

    def _with_peer(self, info: dict[str, Any]) -> dict[str, Any]:
        """A session with a target on another deltavol server says which (no secret), and
        whether a reverse to it is not settled yet."""
        peer = self.sessions.peers.get(info["name"])
        if peer is not None:
            info["peer"] = {**peer.shown(), "reverse_pending": info["name"] in self.sessions.pending}
        return info

    async def update_session(self, name: str, full: bool, max_rate: int | None) -> dict[str, Any]:
        if name in self.sessions.pending:
            await reverse.settle_now(self.sessions, name)  # it may be gone to its peer
        return session_extras(self, await self.sessions.get(name).start_update(full, max_rate))

    async def pause_session(self, name: str) -> dict[str, Any]:
        return session_extras(self, await self.sessions.get(name).pause())

    async def resume_session(self, name: str) -> dict[str, Any]:
        return session_extras(self, await self.sessions.get(name).resume())

    async def cancel_session(self, name: str) -> dict[str, Any]:
        return session_extras(self, await self.sessions.get(name).cancel())

    def session_bitmaps(self, name: str, cells: int) -> dict[str, Any]:
        """Each bitmap of the session as a grid of at most ``cells`` fractions (the heat map)."""
        if not 1 <= cells <= 65536:
            raise UsageError(msg=f"cells must be between 1 and 65536, not {cells}")
        s = self.sessions.get(name)
        nbits = s.tracking.nbits
        with s.tracking.view() as bits:
            tracking, per = bitmap_grid(bits, nbits, cells)
        transfer = None
        if s.transfer is not None:
            with s.transfer.view() as bits:
                transfer, _ = bitmap_grid(bits, nbits, cells)
        return {
            "name": name,
            "size": s.source.size,
            "granularity": s.granularity,
            "chunks": nbits,
            "chunks_per_cell": per,
            "tracking": [round(x, 4) for x in tracking],
            "transfer": None if transfer is None else [round(x, 4) for x in transfer],
        }

    async def remove_session(self, name: str) -> None:
        await self.sessions.remove(name)
        self.events.publish("session.removed", name=name)

    async def restore_session(self, name: str) -> dict[str, Any]:
        return await restore.restore(self.sessions.get(name))

    async def reverse_session(
        self, name: str, back_api: str | None = None, back_target: str | None = None
    ) -> dict[str, Any]:
        info = await reverse.reverse(self.sessions, name, back_api, back_target)
        return info if "reversed_to" in info else session_extras(self, info)

    def session_tracking(self, name: str) -> tuple[bytes, dict[str, str]]:
        """A session's tracking bits (one bit per chunk, chunk 0 the lowest bit of byte 0)."""
        s = self.sessions.get(name)
        headers = {
            "X-Deltavol-Size": str(s.source.size),
            "X-Deltavol-Granularity": str(s.granularity),
            "X-Deltavol-Point-In-Time": s.point_in_time or "",
        }
        return s.tracking.to_bytes(), headers

    # --- peers: another deltavol server's calls (sessions/reverse.py) ---------------------
    async def put_guard(
        self, volume: str, holder: str, secret: str, current: str | None = None
    ) -> dict[str, Any]:
        return await reverse.put_guard(self.sessions, volume, holder, secret, current)

    async def drop_guard(self, volume: str, secret: str) -> dict[str, Any]:
        return await reverse.drop_guard(self.sessions, volume, secret)

    def unguard(self, volume: str) -> dict[str, Any]:
        return reverse.unguard(self.sessions, volume)

    async def adopt_session(self, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        return await reverse.adopt(self.sessions, body)

    def settle_reversal(self, request: str) -> dict[str, Any]:
        return reverse.settle_request(self.sessions, request)

    async def verify_session(self, name: str) -> dict[str, Any]:
        return await verify(self.sessions.get(name))
