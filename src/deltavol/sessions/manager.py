"""All sessions of a server: creating and removing them, wiring them into their source's
write path and their target's guards, reloading them at start-up, and the scheduler.

A source volume with sessions gets, below its write gate (every volume has one), one
filter that runs the copy-on-first-write hooks and the tracking hooks. A local target volume is exported
read-only while its session exists and cannot be opened while the copy is inconsistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltavol.backend.base import Backend
from deltavol.backend.gate import WriteGate
from deltavol.backend.hooks import BeforeChange, Hook
from deltavol.bitmap import persist
from deltavol.config import ServerConfig
from deltavol.copy.targets import CopyTarget, LocalTarget, NbdTarget, is_uri
from deltavol.errors import (
    AlreadyExists,
    CorruptFile,
    DeltavolError,
    InUse,
    NotFound,
    SessionLoadFailed,
    SessionUnavailable,
    TargetError,
    UnknownRecord,
    UsageError,
)
from deltavol.events import EventBus
from deltavol.server.nbd_client import parse_uri
from deltavol.sessions import peers, restore
from deltavol.sessions.peers import Peer, PeerFiles
from deltavol.sessions.records import RetryPolicy, update_from_row, update_to_row
from deltavol.sessions.session import Session
from deltavol.sessions.states import IllegalTransition, State
from deltavol.store import fs
from deltavol.store.db import Database
from deltavol.store.group_commit import GroupCommit
from deltavol.volumes import PeerGuard, Volume, Volumes, check_name

log = logging.getLogger("deltavol.sessions")

DEFAULT_GRANULARITY = 64 * 1024
MIN_GRANULARITY = 4 * 1024
MAX_GRANULARITY = 16 * 1024 * 1024
SCHEDULER_TICK = 1.0  # seconds between the scheduler's looks at the sessions


def check_granularity(value: int) -> int:
    if value < MIN_GRANULARITY or value > MAX_GRANULARITY or value & (value - 1):
        raise UsageError(msg=f"invalid granularity {value}: must be a power of two from 4KiB to 16MiB")
    return value


@dataclass
class _SourceWiring:
    """What the sessions of one source share: the write gate, one group commit for their
    tracking files, and the hooks its ``BeforeChange`` filter runs (a live list, rebuilt
    as sessions come and go, so no write pays for finding them)."""

    gate: WriteGate = field(default_factory=WriteGate)
    commit: GroupCommit = field(default_factory=GroupCommit)
    sessions: list[Session] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)

    async def track(self, offset: int, length: int) -> None:
        """Every session's tracking of one change; the rounds they share are awaited once."""
        rounds = set()
        for s in self.sessions:
            rounds.update(s.tracker.track(offset, length))
        for r in rounds:
            await self.commit.wait(r)

    def tracked(self, offset: int, length: int) -> bool:
        # asked on every write outside BeforeChange's idle cells: a loop, no generator
        for s in self.sessions:  # noqa: SIM110
            if not s.tracker.tracked(offset, length):
                return False
        return True

    def track_now(self, offset: int, length: int) -> bool:
        for s in self.sessions:  # noqa: SIM110
            if not s.tracker.track_now(offset, length):
                return False
        return True

    def rehook(self) -> None:
        protect = [s.protector.hook for s in self.sessions]
        # tracking first: its ``track_now`` leaves a bit to the save of this change only
        # while the chunk is not saved yet, so before a protector's ``protect_now`` saves it
        self.hooks[:] = [Hook(self.track, self.tracked, self.track_now), *protect]
        self.gate.changed()  # a session came or went: what BeforeChange cached is void


@dataclass
class Unavailable:
    """A session start-up could not load (its source volume is missing, or its row's
    update record cannot be read): its row and files stay, and so do its name and its
    target. It is listed, with ``reason``; removing it is the one action it takes."""

    name: str
    source: str
    target: str
    reason: str
    row: dict[str, Any]

    def status(self) -> dict[str, Any]:
        r = self.row
        return {
            "name": self.name,
            "source": self.source,
            "target": self.target,
            "granularity": r["granularity"],
            "state": "unavailable",
            "stored_state": r["state"],
            # as a loaded session after a restart: an update under way may have written
            "consistent": bool(r["consistent"]) and r["state"] in ("idle", "restoring"),
            "point_in_time": r["point_in_time"],
            "tracked_bytes": None,
            "recopy_bytes": None,
            "full_reason": None,
            "update": None,
            "last_error": self.reason,
            "retry": None,
            "max_rate": r["max_rate"],
            "every": r["every"],
        }


class SessionManager:
    def __init__(
        self,
        db: Database,
        volumes: Volumes,
        bitmaps: Path,
        save: Path,
        config: ServerConfig,
        events: EventBus | None = None,
    ) -> None:
        self.db = db
        self.events = events if events is not None else EventBus()
        self.volumes = volumes
        self.bitmaps = bitmaps
        self.save = save
        self.config = config
        self._sessions: dict[str, Session] = {}
        self._wiring: dict[str, _SourceWiring] = {}  # by source volume name
        self._scheduler: asyncio.Task[None] | None = None
        self._scheduled: dict[str, asyncio.Task[None]] = {}  # by session name: updates it started
        # sessions being created, by name: (source, target). ``create`` awaits the target's
        # probe between its checks and the session's coming in: these hold the name and
        # the target meanwhile, so that no other create passes the same checks
        self._creating: dict[str, tuple[str, str]] = {}
        # sessions start-up could not load (``Unavailable``), by name: (source, target).
        # Their rows and files stay, so their names and targets stay theirs
        self._unloaded: dict[str, tuple[str, str]] = {}
        self.unavailable: dict[str, Unavailable] = {}
        # sessions being reversed (reverse.py), by name: (new source, new target), held from
        # the reverse's checks to its commit so that no create takes either volume meanwhile
        self._reversing: dict[str, tuple[str, str]] = {}
        # sessions being removed: (name, (source, target)), from the row's deletion until their
        # hooks and guards are gone (``remove``), so no create takes either volume meanwhile.
        # Not by name: a create may reuse the name at once, but not the volumes
        self._removing: list[tuple[str, tuple[str, str]]] = []
        self._resuming: set[asyncio.Task[None]] = set()  # restores going on after a restart
        # sessions whose target is a volume of another deltavol server (peers.py), by name
        self.peer_files = PeerFiles(bitmaps.parent)
        self.peers: dict[str, Peer] = {}
        # reverses to a peer not settled yet (reverse.py), by session name: the request id
        self.pending: dict[str, str] = {}

    # --- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Session:
        try:
            return self._sessions[name]
        except KeyError:
            u = self.unavailable.get(name)
            if u is not None:
                raise SessionUnavailable(name=name, why=u.reason) from None
            raise NotFound(kind="session", name=name) from None

    def all(self) -> list[Session]:
        return sorted(self._sessions.values(), key=lambda s: s.name)

    def of_source(self, volume: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.source.name == volume]  # on every write: no sort

    def of_target(self, volume: str) -> Session | None:
        return next((s for s in self._sessions.values() if s.target_spec == volume), None)

    def holds(self, but_created: str | None = None) -> list[tuple[str, tuple[str, str]]]:
        """The (source, target) pairs held by sessions that are not in (being created,
        reversed or removed, or not loaded), by session name; without the create of
        ``but_created`` (a create's own hold)."""
        creating = [(n, pair) for n, pair in self._creating.items() if n != but_created]
        return [*creating, *self._reversing.items(), *self._unloaded.items(), *self._removing]

    def volume_busy(self, vol: Volume) -> str | None:
        users = [s.name for s in self.all() if vol.name in (s.source.name, s.target_spec)]
        users += [name for name, pair in self.holds() if vol.name in pair]
        users = list(dict.fromkeys(users))  # a session being reversed is in both
        if users:
            return f"used by session(s) {', '.join(users)}"
        return vol.why_guarded() if vol.peer_guard is not None else None

    # --- wiring -----------------------------------------------------------------------------
    def _wiring_for(self, source: Volume) -> _SourceWiring:
        """The wiring of ``source``: of this volume, not of a removed one of the same name
        (its gate is the one every write to this volume passes)."""
        wiring = self._wiring.get(source.name)
        if wiring is None or wiring.gate is not source.gate:
            wiring = self._wiring[source.name] = _SourceWiring(gate=source.gate)
        return wiring

    def _drop_unused_wiring(self, source: Volume) -> None:
        """Forget the wiring a session made but never joined (its creation failed)."""
        wiring = self._wiring.get(source.name)
        if wiring is not None and not wiring.sessions:
            del self._wiring[source.name]

    def _attach(self, session: Session) -> None:
        source = session.source
        wiring = self._wiring_for(source)
        wiring.sessions.append(session)
        if not source.filters:

            def before_change(b: Backend) -> Backend:
                return BeforeChange(b, wiring.hooks, wiring.gate)

            source.filters = [before_change]  # below the volume's own write gate
            source.restack()
        wiring.rehook()
        target = self.volumes.find(session.target_spec)
        if target is not None:
            target.write_guard = lambda: f"it is the target of session {session.name!r}"
            target.open_guard = lambda: (
                None
                if session.consistent
                else f"session {session.name!r} has not finished copying to it (inconsistent)"
            )

    def _detach(self, session: Session) -> None:
        source = session.source
        wiring = self._wiring_for(source)
        if session in wiring.sessions:
            wiring.sessions.remove(session)
        wiring.rehook()
        if not wiring.sessions:
            source.filters = []
            source.restack()
            del self._wiring[source.name]
        target = self.volumes.find(session.target_spec)
        if target is not None:
            target.write_guard = lambda: None
            target.open_guard = lambda: None

    def nbd_target(self, spec: str, peer: Peer | None) -> NbdTarget:
        """The target as this server opens it: a peer's volume through its guard's export."""
        if peer is None or not peer.guard:
            return NbdTarget(spec, self.config.target_timeout)
        return NbdTarget(spec, self.config.target_timeout, export=f"{parse_uri(spec).export}@{peer.guard}")

    async def _open_target(self, session: Session) -> CopyTarget:
        spec = session.target_spec
        if is_uri(spec):
            return await self.nbd_target(spec, self.peers.get(session.name)).open()
        vol = self.volumes.find(spec)
        if vol is None:
            raise TargetError(msg=f"target volume {spec!r} does not exist")
        return LocalTarget(vol.backend)

    # --- persistence ------------------------------------------------------------------------
    def _persist(self, s: Session) -> None:
        if s.removed:  # INSERT OR REPLACE would bring the deleted row back
            log.warning("session %s: removed, its row is not written again", s.name)
            return
        with self.db.transaction() as conn:
            self.write_row(conn, s)

    @staticmethod
    def write_row(conn: Any, s: Session) -> None:
        """The session's row, inside the caller's transaction."""
        conn.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                s.name,
                s.source.name,
                s.target_spec,
                s.granularity,
                s.max_rate,
                s.every,
                s.state.value,
                int(s.consistent),
                s.point_in_time,
                s.last_error,
                s.created_at,
                s.next_update_id,
                update_to_row(s.update, s.name) if s.update else None,
            ),
        )

    def _new(self, name: str, source: Volume, target: str, granularity: int, **kw: Any) -> Session:
        return Session(
            name=name,
            source=source,
            target_spec=target,
            granularity=granularity,
            files=self.bitmaps,
            save_dir=self.save,
            gate=self._wiring_for(source).gate,
            commit=self._wiring_for(source).commit,
            open_target=self._open_target,
            persist_row=self._persist,
            save_limit=self.config.save_limit,
            hot_set=self.config.hot_set,
            retry=RetryPolicy(limit=self.config.retry_limit, backoff=self.config.retry_backoff),
            target_timeout=self.config.target_timeout,
            events=self.events,
            **kw,
        )

    def load(self) -> None:
        """Reopen every session; one whose files are corrupt comes back ``failed``, its
        files set aside. Any other error loading them (a full disk, EIO) is no corruption:
        the files stay as they are and the start-up fails, naming the session and the cause.
        """
        for row in self.db.conn.execute("SELECT * FROM sessions ORDER BY name").fetchall():
            source = self.volumes.find(row["source"])
            if source is None:
                why = (
                    f"its source volume {row['source']!r} is missing (its file or device could not "
                    "be opened at start-up); restart the server once it is back"
                )
                self._hold_unloaded(row, why)
                continue
            try:
                state = State(row["state"])
            except ValueError:
                why = f"its row in the sessions table has an unknown state {row['state']!r}"
                self._hold_unloaded(row, why)
                continue
            update = None
            if row["update_json"]:
                try:
                    update = update_from_row(row["update_json"], row["name"], state)
                except UnknownRecord as exc:
                    self._hold_unloaded(row, f"its row in the sessions table cannot be read: {exc.message}")
                    continue
            s = self._new(
                row["name"],
                source,
                row["target"],
                row["granularity"],
                max_rate=row["max_rate"],
                every=row["every"],
            )
            s.state = state
            s.consistent = bool(row["consistent"])
            s.point_in_time = row["point_in_time"]
            s.last_error = row["last_error"]
            s.created_at = row["created_at"]
            s.next_update_id = row["next_update_id"]
            s.update = update
            self._attach(s)
            self._sessions[s.name] = s
            try:
                s.load_files()
            except CorruptFile as exc:
                try:
                    s.set_aside_files(f"{exc.message}; run 'deltavol session update {s.name} --full'")
                except DeltavolError as err:
                    self._unload(s)
                    raise SessionLoadFailed(
                        name=s.name, why=f"{exc.message}; setting its files aside failed: {err.message}"
                    ) from err
                log.error("session %s: %s", s.name, s.last_error)
            except DeltavolError as exc:
                self._unload(s)
                raise SessionLoadFailed(
                    name=s.name, why=f"cannot load its files, they are kept as they are: {exc.message}"
                ) from exc
            self._track_all_if_untracked(s)
            if s.state is State.RESTORING:  # restore.py: the source stays guarded until it ends
                self._load_restoring(s)
        self._load_peers()

    def _track_all_if_untracked(self, s: Session) -> None:
        """A session that was unavailable while its source was served (``_hold_unloaded``)
        missed what was written meanwhile: every chunk is tracked, so the next update
        copies all of it (``recopy_bytes`` and ``full_reason`` say why)."""
        key = f"untracked:{s.name}"
        row = self.db.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return
        before = s.tracking.bytes_set()
        s.tracking.set_all()
        reason = f"its source was written while the session was unavailable ({row[0]})"
        s.recopy = persist.Recopy(bytes=s.tracking.bytes_set() - before, reason=reason)
        try:
            s._rewrite_tracking()  # durable before the mark that says so goes
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        except (OSError, DeltavolError) as exc:
            self._unload(s)
            why = exc.message if isinstance(exc, DeltavolError) else str(exc)
            raise SessionLoadFailed(name=s.name, why=f"tracking every chunk failed: {why}") from exc
        log.warning("session %s: every chunk is tracked: %s", s.name, reason)

    def _load_peers(self) -> None:
        """Guards a peer holds on volumes here, what sessions know of their peers, and
        reverses not settled yet (settled by ``start``)."""
        for row in self.db.conn.execute("SELECT * FROM guards").fetchall():
            vol = self.volumes.find(row["volume"])
            if vol is not None:
                vol.peer_guard = PeerGuard(row["holder"], row["secret_sha256"])
        for name in list(self._sessions) + list(self._unloaded):
            peer = self.peer_files.load(name)
            if peer is not None:
                self.peers[name] = peer
        for row in self.db.conn.execute("SELECT * FROM reversals").fetchall():
            self.pending[row["session"]] = row["request"]

    def _load_restoring(self, s: Session) -> None:
        """A restoring session guards its source, unless another one (loaded first) restores
        it already: two restores of one source never run at once. The second one stays
        ``restoring``, says why, and its file goes: ``session restore`` starts it over from
        tracking once the other ends (tracking holds all it owes, and what the other wrote)."""
        other = restore.restored_by_other(s)
        if other is None:
            restore.guard_source(s)
            return
        s.last_error = (
            f"restore: its source volume {s.source.name!r} is being restored by session {other!r}; "
            f"run 'deltavol session restore {s.name}' once that one ends (it starts over)"
        )
        log.error("session %s: %s", s.name, s.last_error)
        try:
            fs.unlink(restore.restore_path(s), missing_ok=True)
            self._persist(s)
        except (OSError, DeltavolError) as exc:
            self._unload(s)
            why = exc.message if isinstance(exc, DeltavolError) else str(exc)
            raise SessionLoadFailed(name=s.name, why=f"{s.last_error}; recording it failed: {why}") from exc

    def _hold_unloaded(self, row: Any, reason: str) -> None:
        """Keep what a session not loaded owns: its name, its row and files, and its
        target, which no one may write or open (its copy may be inconsistent)."""
        name, source, target = row["name"], row["source"], row["target"]
        log.error("session %s: unavailable: %s", name, reason)
        if self.volumes.find(source) is not None:
            # its source is served, untracked by it: once it loads again it copies all of it
            try:
                with self.db.transaction() as conn:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"untracked:{name}", reason))
            except DeltavolError as exc:
                why = f"{reason}; recording it failed: {exc.message}"
                raise SessionLoadFailed(name=name, why=why) from exc
        self._unloaded[name] = (source, target)
        self.unavailable[name] = Unavailable(name, source, target, reason, dict(row))
        vol = self.volumes.find(target)
        if vol is not None:
            why = f"it is the target of session {name!r}, which is unavailable: {reason}"
            vol.write_guard = lambda: why
            vol.open_guard = lambda: why

    async def _remove_unavailable(self, name: str) -> None:
        """Remove a session start-up could not load: its row (the commit point), then the
        guards on its target, its files and its peer's guard."""
        u = self.unavailable[name]
        if name in self.pending:
            raise SessionUnavailable(
                name=name, why=f"{u.reason}; and its reverse is not settled: bring it back to settle it first"
            )
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE name = ?", (name,))
            conn.execute("DELETE FROM meta WHERE key = ?", (f"untracked:{name}",))
        del self.unavailable[name]
        del self._unloaded[name]
        # its peer file goes with the row, before any await: a create of this name may come
        # in meanwhile and write its own (the secret stays in memory for the peer's DELETE)
        peer = self.peers.pop(name, None)
        self.peer_files.delete(name)
        vol = self.volumes.find(u.target)
        if vol is not None:
            vol.write_guard = lambda: None
            vol.open_guard = lambda: None
        kinds = ("tracking", "transfer", "restore", "tracking.next")  # (.next: a mark's, not committed)
        paths = [self.bitmaps / f"{name}.{kind}" for kind in kinds]
        paths.append(self.save / f"{name}.save")
        try:
            for path in paths:
                fs.unlink(path, missing_ok=True)
            fs.sync_dir(self.bitmaps)
            fs.sync_dir(self.save)
        except OSError as exc:  # the row is gone: a later session of this name removes them
            log.warning("session %s: files not removed: %s", name, exc.strerror or exc)
        if peer is not None:  # the target goes back to the peer's clients
            await self.drop_peer_guard(name, u.target, peer)
        log.info("session %s: removed (it was unavailable)", name)

    def _unload(self, s: Session) -> None:
        """Forget a session whose files could not be loaded (they stay on disk)."""
        del self._sessions[s.name]
        self._detach(s)
        s.tracker.close_file()

    async def start(self) -> None:
        """Resume updates interrupted by a stop or crash, then run the scheduler."""
        for s in self.all():
            if s.state is State.COPYING and s.transfer is not None:
                log.info("session %s: resuming interrupted update %s", s.name, s.update and s.update.id)
                s._spawn()
            elif s.state is State.RESTORING and restore.restored_by_other(s) is None:  # restore.py
                log.info("session %s: resuming interrupted restore", s.name)
                task = asyncio.get_running_loop().create_task(restore.resume_at_start(s))
                self._resuming.add(task)
                task.add_done_callback(self._resuming.discard)
        for name in list(self.pending):  # reverse.py: ask the peer how the exchange ended
            from deltavol.sessions import reverse

            task = asyncio.get_running_loop().create_task(reverse.settle_at_start(self, name))
            self._resuming.add(task)
            task.add_done_callback(self._resuming.discard)
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    async def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
        for s in self.all():
            await s.shutdown()
            await restore.settle(s)  # a restore's source write left running in its thread

    async def _schedule(self) -> None:
        while True:
            await asyncio.sleep(SCHEDULER_TICK)
            try:
                self._schedule_due(time.monotonic())
            except Exception:  # a bug: log it, and go on scheduling
                log.exception("scheduler: tick failed")

    def _schedule_due(self, now: float) -> None:
        """Start the updates that are due, each in a task of its own, so that one session's
        slow mark or failure holds back no other. A session that an operation holds (a
        mark, a verify, a removal) or whose last scheduled update has not returned yet is
        left for a later tick: scheduled updates never queue behind an operation."""
        for s in self.all():
            if not s.every or s.busy or s.operating or s.state not in (State.IDLE, State.NEW):
                continue
            if s.name in self.pending:  # a reverse not settled: the session may be gone
                continue
            pending = self._scheduled.get(s.name)
            if pending is not None and not pending.done():
                continue
            if s.last_started and now - s.last_started < s.every:
                continue
            if not s.last_started:
                s.last_started = now  # the first run is one interval after start-up
                continue
            self._scheduled[s.name] = asyncio.get_running_loop().create_task(
                self._scheduled_update(s), name=f"scheduled-{s.name}"
            )

    async def _scheduled_update(self, s: Session) -> None:
        """One scheduled update. Nobody awaits it: every error ends here, in the log and in
        the session's ``last_error``."""
        log.info("session %s: scheduled update", s.name)
        try:
            await s.start_update(full=False)
        except IllegalTransition as exc:  # another operation changed the state meanwhile
            log.info("session %s: scheduled update skipped: %s", s.name, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if s.closed:  # removed, or the server is stopping
                return
            if isinstance(exc, DeltavolError):
                why = exc.message
                log.error("session %s: scheduled update failed: %s", s.name, why)
            else:  # an I/O error not turned into ours, or a bug: keep the traceback
                why = str(exc) if isinstance(exc, OSError) else f"internal error: {exc!r}"
                log.exception("session %s: scheduled update failed", s.name)
            await s.note_error(f"scheduled update failed: {why}")

    # --- operations ---------------------------------------------------------------------------
    async def create(
        self,
        name: str,
        source: str,
        target: str,
        granularity: int = DEFAULT_GRANULARITY,
        max_rate: int | None = None,
        every: int | None = None,
        peer: Peer | None = None,
    ) -> Session:
        check_name(name, "session")
        if name in self._sessions or name in self._creating or name in self._unloaded:
            raise AlreadyExists(kind="session", name=name)
        self.check_not_removing(name)
        check_granularity(granularity)
        src = self.volumes.get(source)
        if target == source:
            raise UsageError(msg=f"session {name!r}: the target is the source volume {source!r}")
        self._check_roles(name, source, target)
        # no await above: from here until the session is in (or the create failed), the
        # name and the target are this create's
        self._creating[name] = (source, target)
        try:
            if peer is None:
                return await self._create(name, src, target, granularity, max_rate, every)
            return await self._create_with_peer(name, src, target, granularity, max_rate, every, peer)
        finally:
            del self._creating[name]

    def check_not_removing(self, name: str) -> None:
        """A session of this name whose removal is still under way has files of this name
        to delete by path: a new one would have them deleted under it."""
        if any(n == name for n, _ in self._removing):
            raise InUse(kind="session", name=name, why="a session of this name is being removed; try again")

    def holder(self, name: str) -> str:
        """How a peer names this server's session ``name`` as its guard's holder."""
        return f"session {name!r} of the deltavol server {self.server_id()}"

    def server_id(self) -> str:
        row = self.db.conn.execute("SELECT value FROM meta WHERE key = 'server_id'").fetchone()
        if row is not None:
            return str(row[0])
        sid = peers.new_secret()[:12]
        with self.db.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('server_id', ?)", (sid,))
        return self.server_id()

    async def _create_with_peer(
        self,
        name: str,
        src: Volume,
        target: str,
        granularity: int,
        max_rate: int | None,
        every: int | None,
        peer: Peer,
    ) -> Session:
        """A session whose target is a volume of another deltavol server: the peer guards
        it first (idempotent: a create retried after a crash replaces the guard of the
        same holder), then the session commits as any other. The peer file is written
        before the row; if the create fails, the guard is dropped again."""
        if not is_uri(target):
            raise UsageError(msg=f"session {name!r}: --peer-api needs a target on that server (nbd[s]://...)")
        volume = parse_uri(target).export
        # a peer file no session owns is a create that died after its guard went up:
        # its secret is what the peer asks to replace that guard
        try:
            earlier = self.peer_files.load(name)
        except DeltavolError:
            earlier = None
        peer.guard = peers.new_secret()
        self.peer_files.save(name, peer)
        guard_body = {"holder": self.holder(name), "secret": peer.guard}
        if earlier is not None and earlier.guard and earlier.api == peer.api:
            guard_body["current"] = earlier.guard
        try:
            await peers.call(peer, "PUT", f"/v1/peer/guards/{volume}", guard_body)
            self.peers[name] = peer
            return await self._create(name, src, target, granularity, max_rate, every)
        except BaseException:
            self.peers.pop(name, None)
            if name not in self._sessions:
                self.peer_files.delete(name)
                await self.drop_peer_guard(name, target, peer)
            raise

    async def drop_peer_guard(self, name: str, target: str, peer: Peer) -> bool:
        """Ask the peer to drop its guard on the target; False (logged) when it does not answer."""
        try:
            await peers.call(
                peer, "DELETE", f"/v1/peer/guards/{parse_uri(target).export}", {"secret": peer.guard}
            )
        except DeltavolError as exc:
            log.warning("session %s: the peer's guard on %s is not dropped: %s", name, target, exc.message)
            return False
        return True

    def _check_roles(self, name: str, source: str, target: str) -> None:
        """A target is one session's only, and no volume is both a source and a target:
        among the sessions in, those being created or reversed, and those not loaded."""
        other = self.of_target(target)
        if other is not None:
            raise InUse(kind="target", name=target, why=f"session {other.name!r} writes to it")
        if self.of_source(target):
            raise InUse(kind="volume", name=target, why="it is the source of a session")
        if self.of_target(source):
            raise InUse(kind="volume", name=source, why="it is the target of a session")
        for vname in (source, target):
            vol = self.volumes.find(vname)
            if vol is not None and vol.peer_guard is not None:
                raise InUse(kind="volume", name=vname, why=str(vol.why_guarded()))
        for pname, (psource, ptarget) in self.holds(but_created=name):
            if target == ptarget:
                raise InUse(kind="target", name=target, why=f"session {pname!r} writes to it")
            if target == psource:
                raise InUse(kind="volume", name=target, why=f"session {pname!r} reads it")
            if source == ptarget:
                raise InUse(kind="volume", name=source, why=f"session {pname!r} writes to it")

    async def _create(
        self, name: str, src: Volume, target: str, granularity: int, max_rate: int | None, every: int | None
    ) -> Session:
        source = src.name
        if name not in self.peers:
            # a peer file left by a session of this name whose removal died before deleting
            # it: gone durably before this session's row, or it would be this session's peer
            self.peer_files.discard(name)
        tvol: Volume | None = None
        if is_uri(target):
            probe: CopyTarget = await self.nbd_target(target, self.peers.get(name)).open()
            size = probe.size
            await probe.close()
        else:
            tvol = self.volumes.get(target)
            if tvol.connections:
                raise InUse(kind="volume", name=target, why=f"{tvol.connections} NBD connection(s) open")
            size = tvol.size
        if size < src.size:
            raise UsageError(
                msg=f"target {target} ({size} bytes) is smaller than source {source} ({src.size} bytes)"
            )
        # A write in flight on the source may have passed its hooks before this session's
        # tracking hook existed: wired in with the gate closed, every write either went
        # down before (and the first update, a full one, copies it) or is tracked. So on a
        # local target: a client that opened it while this waited may have writes queued
        # (agreed to before its guard existed); they land before the guard is up, and that
        # client refuses the create, as one still connected.
        target_gate: contextlib.AbstractAsyncContextManager[None] = (
            tvol.gate.closed() if tvol is not None else contextlib.nullcontext()
        )
        async with src.gate.closed(), target_gate:
            if name in self._sessions:  # created by another request while this one waited
                raise AlreadyExists(kind="session", name=name)
            if self.volumes.find(source) is not src:  # removed meanwhile
                raise NotFound(kind="volume", name=source)
            # a reverse may have committed while this one waited: the source a target now
            self._check_roles(name, source, target)
            if tvol is not None and tvol.connections:  # one came while the gates closed
                raise InUse(kind="volume", name=target, why=f"{tvol.connections} NBD connection(s) open")
            # made in the turn it is wired in: the source's wiring (and the group commit its
            # tracking shares) may have gone with its last session while this one waited
            s = self._new(name, src, target, granularity, max_rate=max_rate, every=every)
            try:
                s.create_files()
            except BaseException:
                s.delete_files()  # its tracking file closed: nothing of it writes again
                self._drop_unused_wiring(src)
                raise
            self._attach(s)
            self._sessions[name] = s
        try:
            self._persist(s)
        except BaseException:
            del self._sessions[name]
            self._detach(s)
            s.delete_files()
            raise
        log.info("session %s: created %s -> %s (granularity %d)", name, source, target, granularity)
        self.events.publish("session.created", name=name, source=source, target=target)
        return s

    async def remove(self, name: str) -> None:
        """Delete the session and release its target.

        An operation (``Session.operation``): an update half-way through its mark commits
        and starts its copy first, then this goes on. In this order: the row is deleted (the
        commit point); the session is flagged removed, so every later operation is refused
        and nothing writes its row again; its copy task and retries stop, and the writes
        they left under way land; the writes in flight through its hooks (a
        copy-before-write may write to the target) finish before the hooks go; then the
        target is released and the files deleted.
        """
        if name in self.unavailable:
            await self._remove_unavailable(name)
            return
        if name in self.pending:  # a reverse not settled: settle it first (it may be gone)
            from deltavol.sessions import reverse

            await reverse.settle_now(self, name)
        s = self.get(name)
        with s.closing():  # a verify does not hold the removal up: it is interrupted
            async with s.operation():
                with self.db.transaction() as conn:
                    conn.execute("DELETE FROM sessions WHERE name = ?", (name,))
                s.removed = s.closed = True
                del self._sessions[name]
                hold = (name, (s.source.name, s.target_spec))
                self._removing.append(hold)  # its volumes stay its own until its guards are gone
                try:
                    # its peer file goes with the row, before any await: a create of this name
                    # may come in meanwhile and write its own (the secret stays in memory)
                    peer = self.peers.pop(name, None)
                    self.peer_files.delete(name)
                    try:
                        await s._stop_task()
                        await s.copier.drop_target()  # the writes its cancel left in a thread
                    except Exception:  # the row is gone: the removal goes on
                        log.exception("session %s: stopping its update", name)
                    async with s._gate.closed():  # a copy-before-write in flight ends before its hook goes
                        self._detach(s)
                    await s.copier.drop_target()  # such a write may have opened it again
                    await restore.forget(s)  # a restore's guard on the source and its file
                    await s.files.transfer_gone()  # (a thread): before the directory sync
                    s.delete_files()
                    if peer is not None:  # the target goes back to the peer's clients
                        await self.drop_peer_guard(name, s.target_spec, peer)
                finally:
                    self._removing.remove(hold)
        log.info("session %s: removed", name)
