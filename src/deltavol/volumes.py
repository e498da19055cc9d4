"""Volumes: named block devices owned by the server, each with its layer stack.

A volume's row in SQLite is the commit point: ``create`` makes the sparse image first,
syncs it and its directory, and inserts the row last (an image with no row is garbage,
removed on the next open); ``remove`` deletes the row first and the image after.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltavol.backend.base import Backend
from deltavol.backend.export import Export
from deltavol.backend.file import FileBackend, device_size
from deltavol.backend.gate import GateLayer, WriteGate
from deltavol.backend.recent import RecentWrites
from deltavol.bitmap.persist import HOT_SET
from deltavol.errors import (
    AlreadyExists,
    DeltavolError,
    ImportFailed,
    ImportPathNotFound,
    InUse,
    InvalidName,
    InvalidSize,
    NotFound,
    Protected,
    os_error,
)
from deltavol.store import fs
from deltavol.store.db import Database

log = logging.getLogger("deltavol.volumes")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
MAX_NAME = 64
SECTOR = 512


def check_name(name: str, kind: str = "volume") -> str:
    if not name:
        raise InvalidName(name=name, why=f"a {kind} name must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidName(name=name, why=f"longer than {MAX_NAME} characters")
    if "/" in name:
        raise InvalidName(name=name, why="must not contain '/'")
    if not NAME_RE.match(name):
        raise InvalidName(name=name, why="use letters, digits and . _ : + - (not first), no spaces")
    return name


def check_size(size: int) -> int:
    if size <= 0:
        raise InvalidSize(size=size, why="must be positive")
    if size % SECTOR:
        raise InvalidSize(size=size, why=f"must be a multiple of {SECTOR} bytes")
    return size


@dataclass(frozen=True)
class PeerGuard:
    """The volume is the target of a session of another deltavol server (``holder``): only
    NBD connections that open it as ``NAME@SECRET`` with the guard's secret may change it.
    Only the secret's sha256 is kept."""

    holder: str
    secret_sha256: str

    def admits(self, secret: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), self.secret_sha256)


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Volume:
    name: str
    path: str
    size: int
    imported: bool
    created_at: str
    backend: FileBackend
    export: Export = field(init=False)
    connections: int = 0
    # Filters (guard, cofw, tracker) are stacked on ``backend`` by whoever needs them;
    # ``restack`` rebuilds the stack below the write gate from this list, bottom first.
    filters: list[Callable[[Backend], Backend]] = field(default_factory=list)
    # Every change passes it, filters or not, so whoever adds a filter can close it and
    # know no change is still on its way down the stack as it was before.
    gate: WriteGate = field(default_factory=WriteGate)
    _gated: GateLayer = field(init=False)
    # Why the volume may not be written or opened right now (set by sessions).
    write_guard: Callable[[], str | None] = lambda: None
    open_guard: Callable[[], str | None] = lambda: None
    # The session restoring this volume (sessions/restore.py), taken before the restore's
    # first await so that no second restore of it starts, and its source writes under way:
    # each runs in a task of its own, which a cancel of the restore does not stop.
    restoring_by: str | None = None
    restore_writes: set[asyncio.Task[int]] = field(default_factory=set)
    # The target of a session of another deltavol server (sessions/peers.py), or None.
    peer_guard: PeerGuard | None = None
    # The administrator let another deltavol server guard it (``volume create --peer-target``,
    # ``volume peer-target``): the peer token can put a guard on no other volume.
    peer_target: bool = False
    # The write path of that session's copier, by the guard's secret_sha256: one export per
    # guard, writable only while that very guard stands (a guard dropped or replaced makes
    # the connections opened with its secret read-only).
    _holder: tuple[str, Export, GateLayer] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._gated = GateLayer(self.backend, self.gate, check=self._check_guard)
        self.export = Export(
            self._gated,
            read_only=lambda: self.why_guarded() is not None,
            why_read_only=lambda: self.why_guarded(),
        )

    def why_guarded(self) -> str | None:
        """Why a client may not change the volume: a local session's guard, or a peer's."""
        why = self.write_guard()
        if why is None and self.peer_guard is not None:
            why = f"it is the target of {self.peer_guard.holder}"
        return why

    def _check_guard(self) -> None:
        why = self.why_guarded()
        if why is not None:
            raise Protected(name=self.name, why=why)

    def holder_export(self, secret: str) -> Export:
        """The export for the guard holder's copier (opened as ``NAME@SECRET``)."""
        guard = self.peer_guard
        if guard is None or not guard.admits(secret):
            raise Protected(name=self.name, why="no guard of this volume has that secret")
        if self._holder is None or self._holder[0] != guard.secret_sha256:
            sha = guard.secret_sha256

            def why() -> str | None:
                local = self.write_guard()
                if local is not None:
                    return local
                now = self.peer_guard
                if now is None or now.secret_sha256 != sha:
                    return "the guard this connection was opened with is gone"
                return None

            def check() -> None:
                reason = why()
                if reason is not None:
                    raise Protected(name=self.name, why=reason)

            gated = GateLayer(self._gated.next, self.gate, check=check)
            export = Export(gated, read_only=lambda: why() is not None, why_read_only=why)
            self._holder = (sha, export, gated)
        return self._holder[1]

    @property
    def below_gate(self) -> Backend:
        """The stack under the write gate (the sessions' hooks, then the file): for a writer
        that holds the gate closed itself and must not wait at it (a restore)."""
        return self._gated.next

    def restack(self) -> None:
        """A change waiting at the gate goes down the new stack once it passes."""
        top: Backend = self.backend
        for make in self.filters:
            top = make(top)
        self._gated.next = top
        if self._holder is not None:
            self._holder[2].next = top

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "path": self.path,
            "imported": self.imported,
            "created_at": self.created_at,
            "connections": self.connections,
            "read_only": self.export.read_only,
            "guarded_by": self.peer_guard.holder if self.peer_guard is not None else None,
            "peer_target": self.peer_target,
            "allocated": _allocated(self.path),
        }


def _allocated(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return None if stat.S_ISBLK(st.st_mode) else st.st_blocks * 512


class Volumes:
    def __init__(self, db: Database, images: Path, hot_set: int = HOT_SET) -> None:
        self.db = db
        self.images = images
        self.hot_set = hot_set  # bytes of regions each volume's write gate keeps as written lately
        self._by_name: dict[str, Volume] = {}
        self._filling: set[str] = set()  # names of volumes being made by ``create_from``
        # volumes being removed, by name: their name and image stay theirs until it is unlinked
        self._removing: dict[str, str] = {}

    def load(self) -> None:
        rows = self.db.conn.execute("SELECT * FROM volumes ORDER BY name").fetchall()
        known = set()
        for row in rows:
            try:
                self._open(row["name"], row["path"], bool(row["imported"]), row["created_at"])
            except (OSError, DeltavolError) as exc:
                log.error("volume %s: cannot open %s: %s", row["name"], row["path"], exc)
            known.add(row["path"])
        for row in self.db.conn.execute("SELECT volume FROM peer_targets").fetchall():
            vol = self._by_name.get(row["volume"])
            if vol is not None:
                vol.peer_target = True
        for leftover in self.images.glob("*.img"):
            if str(leftover) not in known:  # created but never committed
                log.warning("removing uncommitted volume image %s", leftover)
                leftover.unlink(missing_ok=True)

    def _open(self, name: str, path: str, imported: bool, created_at: str) -> Volume:
        backend = FileBackend(name, path)
        gate = WriteGate(RecentWrites(self.hot_set))
        vol = Volume(name, path, backend.size, imported, created_at, backend, gate=gate)
        self._by_name[name] = vol
        return vol

    def get(self, name: str) -> Volume:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(kind="volume", name=name) from None

    def find(self, name: str) -> Volume | None:
        return self._by_name.get(name)

    def all(self) -> list[Volume]:
        return sorted(self._by_name.values(), key=lambda v: v.name)

    def _check_new(self, name: str) -> None:
        check_name(name)
        if name in self._by_name or name in self._filling:
            raise AlreadyExists(kind="volume", name=name)
        if name in self._removing:
            raise InUse(kind="volume", name=name, why="it is being removed: try again when that is done")

    def create(self, name: str, size: int, peer_target: bool = False) -> Volume:
        self._check_new(name)
        check_size(size)
        path = self._make_image(name, size)
        return self._commit(name, str(path), imported=False, peer_target=peer_target)

    def set_peer_target(self, name: str, on: bool) -> Volume:
        """Whether another deltavol server may guard the volume (and so write it through
        its guard). Turning it off keeps a guard that stands: it ends as guards do."""
        vol = self.get(name)
        with self.db.transaction() as conn:
            if on:
                conn.execute("INSERT OR IGNORE INTO peer_targets VALUES (?)", (name,))
            else:
                conn.execute("DELETE FROM peer_targets WHERE volume = ?", (name,))
        vol.peer_target = on
        log.info("volume %s: %s a peer target", name, "now" if on else "no longer")
        return vol

    async def create_from(
        self, name: str, size: int, fill: Callable[[FileBackend], Awaitable[None]]
    ) -> Volume:
        """A new volume whose contents ``fill`` writes before it exists: the image is made,
        filled, fsynced, and only then does its row commit. A crash or a failure before
        that leaves an image with no row (removed at the next start, or here), never a
        volume holding half of what it should. The name is held meanwhile."""
        self._check_new(name)
        check_size(size)
        self._filling.add(name)
        try:
            path = self._make_image(name, size)
            try:
                backend = FileBackend(name, str(path))
                try:
                    await fill(backend)
                    await backend.flush()
                finally:
                    await backend.close()
            except BaseException:
                fs.unlink(path, missing_ok=True)
                raise
            return self._commit(name, str(path), imported=False)
        finally:
            self._filling.discard(name)

    def _make_image(self, name: str, size: int) -> Path:
        """A sparse image of ``size`` bytes, durable with its name, and no row yet."""
        path = self.images / f"{name}.img"
        try:
            fd = fs.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            owner = self._owner_of(path)
            if owner is not None:  # never a file a volume (live or being removed) still owns
                raise InUse(kind="file", name=str(path), why=f"it is the image of volume {owner!r}") from None
            fs.unlink(path)  # an uncommitted leftover of a crashed create
            fd = fs.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fs.ftruncate(fd, size)
            fs.fsync(fd)
            fs.sync_dir(self.images)  # the image's name too must survive a power cut before the row
        except OSError as exc:
            fs.close(fd)
            fs.unlink(path, missing_ok=True)
            if exc.errno == errno.EFBIG:
                why = f"larger than the file system of {self.images} allows"
                raise InvalidSize(size=size, why=why) from exc
            raise os_error(exc, f"creating {path}") from exc
        fs.close(fd)
        return path

    def _owner_of(self, path: Path) -> str | None:
        """The name of the volume, live or being removed, whose image ``path`` is."""
        real = os.path.realpath(path)
        owned = [(v.name, v.path) for v in self._by_name.values()] + list(self._removing.items())
        for name, vpath in owned:
            if os.path.realpath(vpath) == real:
                return name
        return None

    def import_(self, name: str, path: str) -> Volume:
        self._check_new(name)
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except FileNotFoundError as exc:
            raise ImportPathNotFound(path=path, why=exc.strerror) from exc
        except OSError as exc:
            raise ImportFailed(path=path, why=exc.strerror) from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ImportFailed(path=path, why="not a regular file or block device")
        for vol in self._by_name.values():
            if os.path.realpath(vol.path) == real:
                raise InUse(kind="file", name=path, why=f"already volume {vol.name!r}")
        try:
            fd = os.open(real, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise ImportFailed(path=path, why=exc.strerror) from exc
        try:
            size = device_size(fd)
        finally:
            os.close(fd)
        check_size(size)
        return self._commit(name, real, imported=True)

    def _commit(self, name: str, path: str, imported: bool, peer_target: bool = False) -> Volume:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        vol = self._open(name, path, imported, now)
        vol.peer_target = peer_target
        try:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO volumes VALUES (?, ?, ?, ?, ?)",
                    (name, path, vol.size, int(imported), now),
                )
                if peer_target:
                    conn.execute("INSERT INTO peer_targets VALUES (?)", (name,))
        except BaseException:
            self._by_name.pop(name, None)
            raise
        log.info(
            "volume %s: %s %s (%d bytes)",
            name,
            "imported" if imported else "created",
            path,
            vol.size,
        )
        return vol

    async def remove(self, name: str, busy: Callable[[Volume], str | None]) -> None:
        vol = self.get(name)
        why = busy(vol)
        if why is None and vol.connections:
            why = f"{vol.connections} NBD connection(s) open"
        if why:
            raise InUse(kind="volume", name=name, why=why)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM peer_targets WHERE volume = ?", (name,))
            conn.execute("DELETE FROM volumes WHERE name = ?", (name,))
        # the name stays reserved until the image is gone: a create of it meanwhile would
        # make images/NAME.img anew, and the unlink below would take the new volume's image
        self._removing[name] = vol.path
        del self._by_name[name]
        try:
            await vol.backend.close()
            if not vol.imported:
                fs.unlink(vol.path, missing_ok=True)
        finally:
            del self._removing[name]
        log.info("volume %s: removed", name)

    async def close(self) -> None:
        for vol in self._by_name.values():
            await vol.backend.close()
