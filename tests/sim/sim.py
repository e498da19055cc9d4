"""Deterministic simulation of a deltavol server: the real service, sessions, tracking,
save area and copy code on a simulated disk, loop and targets (``simfs.py``).

Design notes
------------
One seed is one world: two source volumes, sessions created and removed as it goes,
to remote targets or (a share of them the seed picks, ``Sim.local_share``) to one of
three local volumes on the simulated disk, copied with the kernel's copy_file_range
(``LocalTarget``), and a series of server lives. In each life the real ``Service``
loads the data dir from the simulated disk, client tasks write, zero, trim, flush and
write with FUA through the volumes' exports (the NBD server's path, inline writes
included), and an operator task issues, concurrently, the session operations (create,
full and incremental update, pause, resume, cancel, verify, remove, wait), makes
targets crash, stall, go silent or down, and opens windows where the data dir's bitmap
and save-area files get ENOSPC, EIO or EMFILE. A life ends with a clean stop, a kill -9
or a power cut, either at a time or at a random I/O of the process (``SimFS.crash_at``).
A last life stops the faults and the clients and runs updates until every session is
consistent.

SQLite metadata is trusted: it is a real file in a temporary directory, durable at
commit (``synchronous=FULL``); a commit is a crash point of the process like any I/O,
and a process that died commits nothing after.

The checks use an independent model, never the server's own view:

* the source: per 512-byte sector, every value written to it in issue order, and the
  index of the last one a completed FLUSH (or FUA) covers. After a power cut each sector
  must hold that value or a later one (invariant 1). Clients never write overlapping
  ranges concurrently, so the order is known.
* the image of every source at each moment the server stamps a time (``now_iso``: the
  mark's time is stamped with the write gate closed), keyed by the stamp, so a session's
  ``point_in_time`` names the image its target must equal (invariants 3 and 4).
* the target hosts' caches and durable contents (for a local volume: its file's page
  cache, and what a power cut would leave of it now), against the source, and the session's
  bitmaps: wherever they may differ, the chunk must be set (invariant 2). Checked after
  every restart on what was loaded from disk, and while running on sessions that are not
  copying (a copying session's "done" bits are its files', checked at the next restart).
* no update is full unless asked for, or the session is new, never consistent, or a file
  was reported corrupt (invariant 5); operations are serialized: ``pause``/``cancel``
  return with no copy running, and never two copy tasks (DESIGN §3).
* liveness: a client request waits at most ``HANG_S`` virtual seconds; the last life must
  make every session consistent.

A violation raises ``Violation``; ``run_seed`` prints the seed, the check, and the last
events, and the same seed replays the same run (everything random comes from one
``Random(seed)``, time is virtual, and I/O completes when the simulation says). A seed
names a run of this code: a change of the server or of the simulation makes it another.

Running it: ``python -m tests.sim 1-50`` (or ``pytest tests/sim``, see ``test_sim.py``).
``DELTAVOL_SIM_OFF`` takes a comma-separated subset of ``KNOBS`` to leave out (concurrent
operations on one session and the scheduler, sessions created while writes are in flight
on their source, data-dir faults, target trouble, power cuts, crashes at an I/O, full
updates, sessions to local volumes), to look at one class of defect at a time;
``DELTAVOL_SIM_STALLS`` sets how often a thread hand-off stalls (default 0.03).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import struct
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from deltavol.backend import file as file_module
from deltavol.bitmap import persist
from deltavol.config import ServerConfig
from deltavol.copy import throttle as throttle_module
from deltavol.errors import DeltavolError
from deltavol.sessions import manager as manager_module
from deltavol.sessions import records as records_module
from deltavol.sessions import session as session_module
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from deltavol.store import db as db_module
from deltavol.store import fs
from deltavol.store.datadir import DataDir
from tests.sim.simfs import (
    SECTOR,
    Clock,
    Deadlock,
    Halt,
    SimFS,
    SimLoop,
    SimTarget,
    TargetHost,
    VirtualTime,
)

G = 8192  # granularity: two 4 KiB blocks per chunk
CHUNKS = 24
SIZE = CHUNKS * G
HOT = 4 * G  # hot region of the tracking files
SECTORS = SIZE // SECTOR
SOURCES = ("src0", "src1")
MAX_SESSIONS = 3
TARGETS = tuple(f"tgt{i}" for i in range(MAX_SESSIONS))  # local volumes a session may copy to
HANG_S = 120.0
LIFE_S = (20.0, 90.0)
META = ("/bitmaps/", "/save/")


class Violation(AssertionError):
    pass


@dataclass
class Sector:
    values: list[bytes] = field(default_factory=list)
    acked: list[int | None] = field(default_factory=list)  # event number of the ack
    floor: int = 0  # values[floor] (or a later one) must survive a power cut


class SourceModel:
    """What clients wrote to one source volume, and what must survive a power cut."""

    def __init__(self, data: bytes) -> None:
        self.sectors = [Sector([data[i * SECTOR : (i + 1) * SECTOR]], [0]) for i in range(SECTORS)]

    def issue(self, first: int, values: list[bytes]) -> list[int]:
        idx = []
        for i, v in enumerate(values):
            s = self.sectors[first + i]
            s.values.append(v)
            s.acked.append(None)
            idx.append(len(s.values) - 1)
        return idx

    def ack(self, first: int, idx: list[int], when: int, durable: bool) -> None:
        for i, k in enumerate(idx):
            s = self.sectors[first + i]
            s.acked[k] = when
            if durable:
                s.floor = max(s.floor, k)

    def flushed(self, issued: int) -> None:
        """A FLUSH sent at event ``issued`` completed: every write acked before it is durable."""
        for s in self.sectors:
            for k in range(len(s.values) - 1, s.floor, -1):
                a = s.acked[k]
                if a is not None and a < issued:
                    s.floor = k
                    break

    def check_after_power_loss(self, name: str, data: bytes) -> None:
        for i, s in enumerate(self.sectors):
            got = data[i * SECTOR : (i + 1) * SECTOR]
            if got not in s.values[s.floor :]:
                raise Violation(
                    f"invariant 1: {name} sector {i} (chunk {i * SECTOR // G}) lost a write "
                    f"acknowledged before a completed FLUSH/FUA"
                )

    def reset(self, data: bytes) -> None:
        self.__init__(data)  # type: ignore[misc]


def pattern(op: int, first: int, n: int) -> list[bytes]:
    return [struct.pack(">II", op, first + i) * (SECTOR // 8) for i in range(n)]


# What a seed may do; ``off`` (DELTAVOL_SIM_OFF=a,b) leaves some out, to look at one
# class of defect at a time.
KNOBS = ("concurrent_ops", "create_race", "faults", "targets", "power", "crash_io", "full", "local")


class LocalHost:
    """A local volume as a session's target: the checks read its file on the simulated
    disk, as the page cache has it (``cache``) and as a power cut would leave it if
    nothing more were synced (``durable``, the log left out). It has no trouble of its
    own (``_op_target`` leaves it alone): its writes fail and get lost with the disk's."""

    def __init__(self, name: str, fs: SimFS, path: Path) -> None:
        self.name = name
        self.fs = fs
        self.path = str(path)
        self.down_until = self.silent_until = self.slow_until = 0.0

    def _get(self, durable: bool) -> bytes:
        inode = self.fs.names.get(self.path)
        if inode is None:
            return bytes(SIZE)
        data = inode.durable if durable else inode.data
        return bytes(data[:SIZE]).ljust(SIZE, b"\0")

    @property
    def cache(self) -> bytes:
        return self._get(False)

    @property
    def durable(self) -> bytes:
        return self._get(True)


class Sim:
    def __init__(self, seed: int, lives: int = 6, off: frozenset[str] = frozenset()) -> None:
        unknown = off - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}: the knobs are {KNOBS}")
        self.on = set(KNOBS) - off
        self.seed = seed
        # how often a thread hand-off stalls (a slow disk); more finds races around them sooner
        self.stalls = float(os.environ.get("DELTAVOL_SIM_STALLS", "0.03"))
        self.rng = Random(seed)
        self.lives = lives
        self.clock = Clock()
        self.fs = SimFS(Random(self.rng.random()), self.clock)
        self.fs.io_delay = self._io_delay
        self.fs.trace = self.event
        self.tmp = Path(tempfile.mkdtemp(prefix=f"deltavol-sim-{seed}-"))
        self.root = self.tmp / "data"
        self.config = ServerConfig(
            data_dir=self.root,
            save_limit=self.rng.choice((32 << 10, 256 << 10, 4 << 20)),
            retry_limit=self.rng.choice((0, 2, 5)),
            retry_backoff=self.rng.choice((0.5, 2.0)),
        )
        self.events: list[str] = []
        self.hosts: dict[str, TargetHost | LocalHost] = {}
        self.models: dict[str, SourceModel] = {}
        self.images: dict[str, dict[str, bytes]] = {}
        self.stamps = 0
        self.event_no = 0
        self.ops = 0  # client operations issued
        self.busy_ranges: dict[str, set[int]] = {s: set() for s in SOURCES}
        self.inflight: dict[int, tuple[str, float]] = {}
        self.created = 0
        self.asked_full: dict[str, bool] = {}
        self.fault_until = 0.0
        self.fault_p = 0.0
        self.graveyard: list[asyncio.Task[Any]] = []
        self.stopping = False
        self.service: Any = None
        self.background_errors: list[str] = []
        self.final = False
        self.op_running: dict[str, int] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.quiet = {v: 0 for v in SOURCES}
        self.removed: set[str] = set()
        # the share of sessions whose target is a local volume (the kernel copy's path)
        self.local_share = self.rng.choice((0.0, 0.3, 0.6, 1.0)) if "local" in self.on else 0.0

    # --- bookkeeping ---------------------------------------------------------------------
    def event(self, what: str) -> None:
        what = what.replace(str(self.root), "D")  # the same text in every replay
        self.events.append(f"[{self.clock.now:9.4f}] {what}")

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.events).encode()).hexdigest()[:16]

    def _io_delay(self) -> float:
        r = self.rng.random()
        if r < 0.4:
            return 0.0
        if r < 1.0 - self.stalls:
            return self.rng.choice((0.00005, 0.0005, 0.002, 0.01))
        return self.rng.uniform(0.2, 2.5)  # a stalled disk

    def _fault(self, op: str, path: str) -> int | None:
        if self.clock.now >= self.fault_until or not any(m in path for m in META):
            return None
        if self.rng.random() >= self.fault_p:
            return None
        if op in ("fsync", "fdatasync", "sync_dir"):
            return errno.EIO
        if op == "open":
            return errno.EMFILE
        if op in ("pwrite", "ftruncate", "fallocate"):
            return self.rng.choice((errno.ENOSPC, errno.ENOSPC, errno.EIO))
        return None

    def _now_iso(self) -> str:
        self.stamps += 1
        stamp = f"T{self.stamps:06d}@{self.clock.now:.4f}"
        self.images[stamp] = {v: self.src_view(v) for v in SOURCES}
        return stamp

    def src_view(self, vol: str) -> bytes:
        data = self.fs.view(self.root / "volumes" / f"{vol}.img")
        return data[:SIZE].ljust(SIZE, b"\0")

    # --- one seed -------------------------------------------------------------------------
    def run(self) -> None:
        saved = self._install()
        try:
            for life in range(self.lives + 1):
                self.final = life == self.lives
                self._life(life)
        finally:
            self._uninstall(saved)

    def _install(self) -> list[tuple[Any, str, Any]]:
        vt = VirtualTime(self.clock)
        saved = []
        for obj, attr, value in (
            (file_module, "time", vt),
            (throttle_module, "time", vt),
            (session_module, "time", vt),
            (records_module, "time", vt),
            (manager_module, "time", vt),
            (session_module, "now_iso", self._now_iso),
            (manager_module, "NbdTarget", self._nbd_target),
            (db_module.Database, "transaction", self._transaction(db_module.Database.transaction)),
        ):
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        kw = Session.__init__.__kwdefaults__
        assert kw is not None
        saved.append((kw, "hot_region", kw["hot_region"]))
        kw["hot_region"] = HOT
        self._old_fs = fs.use(self.fs)  # type: ignore[arg-type]
        self.fs.fault = self._fault
        return saved

    def _uninstall(self, saved: list[tuple[Any, str, Any]]) -> None:
        self._bury()
        self.fs.close_workers()
        fs.use(self._old_fs)
        for obj, attr, value in reversed(saved):
            if isinstance(obj, dict):
                obj[attr] = value
            else:
                setattr(obj, attr, value)

    def _transaction(self, real: Any) -> Any:
        sim = self

        @contextlib.contextmanager
        def transaction(db: Any) -> Any:
            sim.fs.tick("commit", db.path)  # a crash point; a dead process commits nothing
            with real(db) as conn:
                yield conn

        return transaction

    def _nbd_target(self, uri: str, timeout: float = 30.0) -> SimTarget:
        return SimTarget(self.hosts[uri], self.clock, self.rng.choice((G, 4 * G, 16 * G)), timeout)

    def _bury(self) -> None:
        """Close the coroutines of a dead process now, while the disk refuses its I/O."""
        self.fs.dead = True
        for task in self.graveyard:
            with contextlib.suppress(BaseException):
                task.get_coro().close()
        self.graveyard.clear()
        self.fs.dead = False

    def _life(self, life: int) -> None:
        loop = SimLoop(self.clock)
        loop.set_exception_handler(self._on_loop_error)
        tasks: list[asyncio.Task[Any]] = []

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            task = asyncio.Task(coro, loop=loop, **kw)
            tasks.append(task)
            return task

        loop.set_task_factory(factory)  # type: ignore[arg-type]
        self.fault_until = 0.0
        self.locks, self.op_running = {}, {}
        end = self.rng.choice(("clean", "kill", "power", "power"))
        if end == "power" and "power" not in self.on:
            end = "kill"
        if not self.final and self.rng.random() < 0.6 and "crash_io" in self.on:
            self.fs.crash_at = self.fs.ops + self.rng.randint(1, 3000)
        duration = self.rng.uniform(*LIFE_S)
        self.event(f"life {life}: {duration:.1f}s, end {end}, crash at I/O {self.fs.crash_at}")
        datadir = DataDir(self.root)
        halted = False
        try:
            loop.run_until_complete(self._run_life(datadir, duration, end))
        except Halt as exc:
            halted = True
            self.event(f"process died: {exc}")
        except Deadlock as exc:
            raise Violation(f"liveness: {exc} (a hang)") from None
        finally:
            died, excused = unheard(loop, tasks, self.fs, halted)
            for t, exc, to in excused:  # its listeners were due to run: the process died first
                self.event(f"task {t.get_name()} failed as the process died: {exc!r}, heard by {to}")
            for t, exc in died:  # a task that died with nobody to hear it: a defect, or a lost copy
                self.background_errors.append(f"{t.get_name()}: {exc!r}")
                self.event(f"background task {t.get_name()} died: {exc!r}")
            self.graveyard.extend(t for t in tasks if not t.done())
            if not halted and end == "clean":
                self.fs.end_workers(finish=True)  # a clean exit waits for its threads
            if halted or end != "clean":
                self._bury()
            loop.close()
            with contextlib.suppress(Exception):
                datadir.close()
        if self.background_errors:
            raise Violation("a background task died: " + self.background_errors[0])
        if halted or end != "clean":
            if end == "power" or (halted and self.rng.random() < 0.5 and "power" in self.on):
                self.event("power cut")
                self.fs.power_loss()
                for h in self.hosts.values():
                    if isinstance(h, TargetHost) and self.rng.random() < 0.3:  # on the same power
                        self.event(f"target {h.name} loses power too")
                        h.crash()
                self._power_checked = False
            else:
                self.event("kill -9")
                self.fs.restart()
        self.fs.crash_at = None

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        msg = ctx.get("message", "")
        if "destroyed but it is pending" in msg or "never retrieved" in msg or isinstance(exc, Halt):
            return
        self.background_errors.append(f"{msg}: {exc!r}")

    async def _run_life(self, datadir: DataDir, duration: float, end: str) -> None:
        from deltavol.service import Service

        db = datadir.open()
        service = self.service = Service(db, datadir, self.config)
        if not self.models:  # the first life: make the volumes, with no crash among them
            # (a created volume surviving a power cut is tests/unit/store/test_volumes.py's)
            crash_at, self.fs.crash_at = self.fs.crash_at, None
            before = self.fs.ops
            for v in SOURCES:
                service.create_volume(v, SIZE)
                self.models[v] = SourceModel(bytes(SIZE))
            for v in TARGETS:
                service.create_volume(v, SIZE)
            if crash_at is not None:
                self.fs.crash_at = crash_at + self.fs.ops - before
        try:
            service.load()
        except (Halt, Violation):
            raise
        except Exception as exc:
            raise Violation(f"start-up failed: {exc!r}") from exc
        self.check_after_load(service)
        await service.start()
        if self.final:
            await self._finish_all(service)
            await service.close()
            return
        stop_at = self.clock.now + duration
        tasks = [asyncio.create_task(self._client(service, v, stop_at)) for v in SOURCES]
        tasks.append(asyncio.create_task(self._operator(service, stop_at)))
        work = asyncio.gather(*tasks)
        checker = asyncio.create_task(self._checker(service, work))
        await asyncio.wait([work, checker], return_when=asyncio.FIRST_COMPLETED)
        for t in (checker, work):
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await work
        checker.cancel()
        if end == "clean":
            self.event("clean stop")
            await service.close()

    # --- checks ---------------------------------------------------------------------------------
    def check_after_load(self, service: Any) -> None:
        for v in SOURCES:
            if v in self.models and not getattr(self, "_power_checked", True):
                data = self.src_view(v)
                self.models[v].check_after_power_loss(v, data)
                self.models[v].reset(data)  # (after a kill -9 every value written may still land)
        self._power_checked = True
        for s in service.sessions.all():
            if s.name in self.removed:
                raise Violation(f"remove: session {s.name} is back after a restart")
            if self._exempt(s):
                continue
            owed = _chunks(s.tracking) | (_chunks(s.transfer) if s.transfer is not None else set())
            self._check_covered(s, owed, "after restart, in the loaded tracking, transfer and hot set")
        self.event("checked after load")

    def _exempt(self, s: Session) -> bool:
        corrupt = "corrupt" in (s.last_error or "")
        return s.state is State.NEW or corrupt or s.target_spec not in self.hosts

    def _differ(self, s: Session) -> set[int]:
        host, src = self.hosts[s.target_spec], self.src_view(s.source.name)
        out = set()
        for c in range(CHUNKS):
            a, b = c * G, (c + 1) * G
            if host.durable[a:b] != src[a:b] or host.cache[a:b] != src[a:b]:
                out.add(c)
        return out

    def _check_covered(self, s: Session, owed: set[int], where: str) -> None:
        missing = sorted(self._differ(s) - owed)
        if missing:
            raise Violation(
                f"invariant 2: session {s.name} ({s.state.value}): target may differ from the source "
                f"at chunks {missing}, set in no bitmap ({where})"
            )

    def check_live(self, service: Any) -> None:
        running = [t.get_name() for t in asyncio.all_tasks() if not t.done()]  # (once: it costs)
        for s in service.sessions.all():
            copies = [n for n in running if n == f"session-{s.name}"]
            if len(copies) > 1:
                raise Violation(f"serialization: {len(copies)} copy tasks run for session {s.name}")
            if s.busy and s.state is not State.COPYING and not self.op_running.get(s.name):
                raise Violation(f"serialization: a copy runs while session {s.name} is {s.state.value}")
            if isinstance(self.hosts.get(s.target_spec), LocalHost) and s.name not in self.removed:
                vol = service.volumes.find(s.target_spec)
                if vol is None or vol.write_guard() is None:
                    raise Violation(
                        f"guard: the target volume {s.target_spec} of session {s.name} "
                        f"({s.state.value}) takes clients' writes"
                    )
            if self._exempt(s) or s.busy:
                continue
            if s.state is State.IDLE:
                self._check_covered(s, _chunks(s.tracking), "idle, in tracking")
                if s.consistent:
                    self._check_image(s)
            elif s.state in (State.PAUSED, State.FAILED) and s.transfer is not None:
                # a stopped update may keep what it still owes in its transfer file until it
                # goes on (a resume then has to copy it): memory or file, either will do
                owed = _chunks(s.tracking) | _chunks(s.transfer) | self._transfer_file(s)
                self._check_covered(s, owed, f"{s.state.value}, in tracking or transfer")
                if s.image_now:  # status calls it consistent: its target is still the old image
                    self._check_image(s)

    def _transfer_file(self, s: Session) -> set[int]:
        try:
            path = self.root / "bitmaps" / f"{s.name}.transfer"
            bits, _ = persist.load(path, persist.KIND_TRANSFER, G, SIZE)
        except DeltavolError:
            return set()
        return _chunks(bits)

    def _check_image(self, s: Session) -> None:
        host = self.hosts[s.target_spec]
        image = self.images.get(s.point_in_time or "", {}).get(s.source.name)
        if image is None:
            raise Violation(f"invariant 3: session {s.name} consistent with unknown point in time")
        for what, data in (("durable", host.durable), ("cached", host.cache)):
            bad = [c for c in range(CHUNKS) if data[c * G : (c + 1) * G] != image[c * G : (c + 1) * G]]
            if bad:
                raise Violation(
                    f"invariant 3/4: session {s.name} is consistent as of {s.point_in_time} but its "
                    f"target ({what}) differs from that image at chunks {bad}"
                )

    async def _checker(self, service: Any, work: asyncio.Future[Any]) -> None:
        while not work.done():
            await asyncio.sleep(self.rng.uniform(0.05, 1.0))
            self.check_live(service)
            for _, (what, since) in list(self.inflight.items()):
                if self.clock.now - since > HANG_S:
                    raise Violation(f"liveness: {what} waits for {self.clock.now - since:.0f}s (a hang)")

    # --- clients ----------------------------------------------------------------------------------
    async def _client(self, service: Any, vol: str, stop_at: float) -> None:
        running: set[asyncio.Task[None]] = set()
        while self.clock.now < stop_at:
            await asyncio.sleep(self.rng.expovariate(20.0))
            if len(running) >= 4 or self.quiet[vol]:
                continue
            t = asyncio.create_task(self._client_op(service, vol))
            running.add(t)
            t.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)

    async def _client_op(self, service: Any, vol: str) -> None:
        rng, model = self.rng, self.models[vol]
        export = service.volumes.get(vol).export
        kind = rng.choices(("write", "fua", "zero", "trim", "flush"), (60, 6, 6, 6, 8))[0]
        self.ops += 1
        op = self.ops
        if kind == "flush":
            issued = self._next_event()
            self.inflight[op] = (f"flush of {vol}", self.clock.now)
            try:
                await export.flush()
            except DeltavolError as exc:
                self.event(f"client {vol} flush failed: {exc.message}")
                return
            finally:
                self.inflight.pop(op, None)
            model.flushed(issued)
            return
        hot = rng.random() < 0.7
        base = rng.randrange(0, 6 if hot else CHUNKS) * G
        first = base // SECTOR + rng.randrange(0, G // SECTOR)
        n = rng.choice((1, 8, 8, 16, 16, 24, 40))
        n = min(n, SECTORS - first)
        chunks = set(range(first * SECTOR // G, ((first + n) * SECTOR - 1) // G + 1))
        busy = self.busy_ranges[vol]
        if chunks & busy:
            return
        busy |= chunks
        values = pattern(op, first, n) if kind in ("write", "fua") else [bytes(SECTOR)] * n
        idx = model.issue(first, values)
        offset, length = first * SECTOR, n * SECTOR
        self.inflight[op] = (f"{kind} of {vol} at {offset}+{length}", self.clock.now)
        try:
            if kind in ("write", "fua"):
                data = b"".join(values)
                if kind == "fua" or not export.pwrite_now(offset, data):
                    await export.pwrite(offset, data, kind == "fua")
            elif kind == "zero":
                await export.zero(offset, length, False, rng.random() < 0.3)
            else:
                await export.trim(offset, length, rng.random() < 0.3)
        except DeltavolError as exc:
            self.event(f"client {kind} {vol} {offset}+{length} failed: {exc.message}")
            return
        except (Halt, asyncio.CancelledError, Violation):
            raise
        except Exception as exc:
            raise Violation(f"typed errors: a client {kind} raised {exc!r}") from exc
        finally:
            busy -= chunks
            self.inflight.pop(op, None)
        fua = kind == "fua"
        model.ack(first, idx, self._next_event(), fua)

    def _next_event(self) -> int:
        self.event_no += 1
        return self.event_no

    # --- operator -----------------------------------------------------------------------------------
    async def _operator(self, service: Any, stop_at: float) -> None:
        running: set[asyncio.Task[None]] = set()
        while self.clock.now < stop_at:
            await asyncio.sleep(self.rng.expovariate(0.7))
            t = asyncio.create_task(self._operation(service))
            running.add(t)
            t.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)

    async def _operation(self, service: Any) -> None:
        rng = self.rng
        sessions = service.sessions.all()
        what = rng.choices(
            ("create", "update", "pause", "resume", "cancel", "verify", "remove", "target", "faults"),
            (
                8 if len(sessions) < MAX_SESSIONS else 0,
                30,
                8,
                8,
                5,
                4,
                2,
                8,
                3,
            ),
        )[0]
        if what == "create":
            await self._op_create(service)
            return
        if what == "faults":
            if "faults" not in self.on:
                return
            self.fault_until = self.clock.now + rng.uniform(0.5, 10.0)
            self.fault_p = rng.choice((0.05, 0.3, 1.0))
            self.event(f"faults on the data dir's files, p={self.fault_p}, until {self.fault_until:.1f}")
            return
        if not sessions:
            return
        s = rng.choice(sessions)
        if what == "target":
            if "targets" in self.on:
                self._op_target(s)
            return
        if "concurrent_ops" in self.on:
            await self._op_session(service, s, what)
            return
        lock = self.locks.setdefault(s.name, asyncio.Lock())
        async with lock:  # the operator waits for one operation before the next
            await self._op_session(service, s, what)

    async def _op_create(self, service: Any) -> None:
        self.created += 1
        name = f"s{self.created}"
        used = {s.target_spec for s in service.sessions.all()}
        free = [t for t in TARGETS if t not in used]
        if free and self.rng.random() < self.local_share:
            uri = self.rng.choice(free)
            self.hosts[uri] = LocalHost(uri, self.fs, self.root / "volumes" / f"{uri}.img")
        else:
            uri = f"nbd+unix:///{name}?socket=sim"
            self.hosts[uri] = TargetHost(name, SIZE, Random(self.rng.random()), self.fs)
        src = self.rng.choice(SOURCES)
        if "create_race" not in self.on:  # no client write in flight on the source meanwhile
            self.quiet[src] += 1
            while any(what.split()[2] == src for what, _ in self.inflight.values() if " of " in what):
                await asyncio.sleep(0.01)
        try:
            await self._create(service, name, src, uri)
        finally:
            if "create_race" not in self.on:
                self.quiet[src] -= 1

    async def _create(self, service: Any, name: str, src: str, uri: str) -> None:
        every = self.rng.choice((None, None, 5, 20)) if "concurrent_ops" in self.on else None
        try:
            await service.create_session(name=name, source=src, target=uri, granularity=G, every=every)
            self.event(f"created {name}: {src} -> {uri}, every {every}")
        except DeltavolError as exc:
            self.event(f"create {name} refused: {exc.message}")

    def _op_target(self, s: Session) -> None:
        host, rng, now = self.hosts[s.target_spec], self.rng, self.clock.now
        if not isinstance(host, TargetHost):
            return  # a local volume: its trouble is the disk's (faults, crashes, power)
        kind = rng.choice(("crash", "down", "slow", "silent"))
        if kind == "crash":
            host.crash()
            host.down_until = now + rng.choice((0.0, 1.0, 10.0))
        elif kind == "down":
            host.epoch += 1
            host.down_until = now + rng.uniform(1.0, 30.0)
        elif kind == "slow":
            host.slow_until = now + rng.uniform(1.0, 20.0)
        else:
            host.silent_until = now + rng.uniform(1.0, 60.0)  # past the client's deadline, sometimes
        self.event(f"target of {s.name}: {kind}")

    async def _op_session(self, service: Any, s: Session, what: str) -> None:
        name = s.name
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "pause": lambda: service.pause_session(name),
            "resume": lambda: service.resume_session(name),
            "cancel": lambda: service.cancel_session(name),
            "verify": lambda: service.verify_session(name),
            "remove": lambda: service.remove_session(name),
        }
        before = (s.state, s.consistent, s.point_in_time, s.transfer is not None)
        host = self.hosts.get(s.target_spec)  # (a local volume may get a new session meanwhile)
        self.op_running[name] = self.op_running.get(name, 0) + 1
        try:
            if what == "update":
                full = self.rng.random() < 0.15 and "full" in self.on
                self.event(f"{name}: update{' --full' if full else ''} ({s.state.value})")
                st = await service.update_session(name, full, self.rng.choice((None, None, 64 << 10)))
                self._check_not_full(s, full, before, st)
            else:
                self.event(f"{name}: {what} ({s.state.value})")
                st = await calls[what]()
            if isinstance(st, dict):
                same = "same" if st.get("ok") else f"{st.get('mismatches')} mismatches"
                outcome = st.get("state") or same
            else:
                outcome = "done"
            self.event(f"{name}: {what} -> {outcome}")
        except DeltavolError as exc:
            self.event(f"{name}: {what} refused: {exc.message}")
            return
        except (Halt, asyncio.CancelledError, Violation):
            raise
        except Exception as exc:
            raise Violation(f"typed errors: {what} of {name} raised {exc!r}") from exc
        finally:
            self.op_running[name] -= 1
        if what in ("pause", "cancel") and s.busy:
            raise Violation(f"serialization: {what} of {name} returned while its copy still runs")
        self.check_live(service)  # right after the operation, before anything else runs
        if what == "remove" and self.hosts.get(s.target_spec) is host:
            self.hosts.pop(s.target_spec, None)
            self.removed.add(name)

    def _check_not_full(self, s: Session, full: bool, before: tuple[Any, ...], st: dict[str, Any]) -> None:
        state, consistent, pit, _ = before
        kind = (st.get("update") or {}).get("kind")
        if full or kind != "full" or state is State.NEW:
            return
        if pit is None and not consistent:
            return  # never consistent: a full copy is a fair way
        if "corrupt" in (s.last_error or ""):
            return
        raise Violation(f"invariant 5: an incremental update of {s.name} ({state.value}) became a full copy")

    # --- the last life: no faults, every session made consistent --------------------------------
    async def _finish_all(self, service: Any) -> None:
        self.fault_until = 0.0
        for h in self.hosts.values():
            h.down_until = h.silent_until = h.slow_until = 0.0
        for _ in range(3):
            for s in service.sessions.all():
                await self._settle(service, s)
            self.check_live(service)
        for s in service.sessions.all():
            if s.name in self.removed or s.target_spec not in self.hosts:
                raise Violation(f"remove: session {s.name} was removed, and is back")
            if s.state is not State.IDLE or not s.consistent:
                raise Violation(
                    f"liveness: session {s.name} is {s.state.value}, consistent {s.consistent}, "
                    f"after the faults stopped: {s.last_error}"
                )
            self._check_image(s)
            host, src = self.hosts[s.target_spec], self.src_view(s.source.name)
            if s.tracking.is_empty() and bytes(host.durable) != src:
                bad = self._differ(s)
                raise Violation(f"invariant 4: {s.name}: the last update left the target != source at {bad}")

    async def _settle(self, service: Any, s: Session) -> None:
        if s.target_spec not in self.hosts:
            return  # a removed session that came back: reported after
        deadline = self.clock.now + 3600
        while self.clock.now < deadline:
            await s.wait()
            if s.state is State.IDLE and s.tracking.is_empty():
                return
            try:
                if s.state in (State.PAUSED, State.FAILED) and s.transfer is not None:
                    await service.resume_session(s.name)
                elif not s.busy:
                    await service.update_session(s.name, False, None)
            except DeltavolError as exc:
                self.event(f"{s.name}: settling: {exc.message}")
                await asyncio.sleep(5.0)
        raise Violation(f"liveness: session {s.name} never finished ({s.state.value}: {s.last_error})")


AnyTask = asyncio.Task[Any]


def unheard(
    loop: asyncio.AbstractEventLoop, tasks: list[AnyTask], fs: SimFS, halted: bool
) -> tuple[list[tuple[AnyTask, BaseException]], list[tuple[AnyTask, BaseException, str]]]:
    """The tasks of a life that failed with nobody to retrieve their exception: (task,
    exception) each; and those a crash kept from being heard: (task, exception, by what).

    A task that fails hands its exception to its done callbacks (the task awaiting it, or
    an ``add_done_callback``) by scheduling them on the loop. A process that dies (``Halt``
    out of a callback) stops the loop between the two: a task may have failed in the turn
    of the crash and its callbacks not have run yet, though they would have in the next
    turn. Only then (``halted``), and only if those callbacks would retrieve the exception
    (``hear_out``), was the task heard; a callback that never retrieves it (``set.discard``,
    a ``lambda _t: None``) leaves it unheard, as does a task with no callback or whose
    callbacks already ran. A life that ended otherwise excuses nothing.
    """
    failed = [
        t
        for t in tasks
        if t.done()
        and not t.cancelled()
        and getattr(t, "_log_traceback", False)
        and not isinstance(t._exception, Halt | Violation)  # type: ignore[attr-defined]
    ]
    heard = hear_out(loop, failed, fs) if halted and failed else {}
    died, excused = [], []
    for t in failed:
        t._log_traceback = False  # type: ignore[attr-defined]
        exc = t.exception()
        assert exc is not None
        if id(t) in heard:
            excused.append((t, exc, heard[id(t)]))
        else:
            died.append((t, exc))
    return died, excused


def hear_out(
    loop: asyncio.AbstractEventLoop, failed: list[AnyTask], fs: SimFS, waves: int = 3
) -> dict[int, str]:
    """Run what the failed tasks of a dead process were on their way to; id -> the
    callback that retrieved the exception, for each task whose exception one did.

    This is the next turn, cut down to the failures: their done callbacks still in the
    loop's ready queue run, then the done callbacks those completed (``asyncio.wait``'s
    waiter wakes the task that waits, which may then look at what failed), up to
    ``waves`` deep; nothing else of the next turn runs (no timer, no other task's step).
    The disk is dead meanwhile: a callback's I/O ends it (``Halt``) and changes nothing.
    Whether the exception was retrieved is then the task's own flag (``_log_traceback``),
    whatever the callback is: an awaiting task's wake-up, ``gather``, ``shield`` or a
    callback of the server's that looks at ``exception()`` retrieve it; ``set.discard``
    does not.
    """
    ready: Any = getattr(loop, "_ready", None)
    if ready is None:
        return {}
    left = {id(t): t for t in failed}
    heard: dict[int, str] = {}
    wave = [h for h in ready if not h.cancelled() and any(id(a) in left for a in h._args or ())]
    was_dead, fs.dead = fs.dead, True
    running = asyncio.events._get_running_loop()
    asyncio.events._set_running_loop(loop)  # as in the turn it stands for
    try:
        for _ in range(waves):
            if not wave or not left:
                break
            before = {id(h) for h in ready}
            for handle in wave:
                if handle.cancelled():
                    continue
                with contextlib.suppress(Halt):  # its I/O met the dead disk
                    handle._run()
                for key, t in list(left.items()):
                    if not getattr(t, "_log_traceback", False):
                        del left[key]
                        heard[key] = getattr(handle._callback, "__qualname__", repr(handle._callback))
                handle.cancel()  # (run: not again)
            wave = [  # the done callbacks of the futures those completed
                h
                for h in ready
                if id(h) not in before
                and not h.cancelled()
                and any(isinstance(a, asyncio.Future) and a.done() for a in h._args or ())
            ]
    finally:
        asyncio.events._set_running_loop(running)
        fs.dead = was_dead
    return heard


def _chunks(bm: Any) -> set[int]:
    return {c for first, n in bm.runs() for c in range(first, first + n)}


@dataclass
class Result:
    seed: int
    ok: bool
    message: str
    events: list[str]
    digest: str


def run_seed(seed: int, lives: int = 6, quiet: bool = True, off: frozenset[str] = frozenset()) -> Result:
    """Run one seed; a violation comes back as a result, printed with its replay line."""
    sim = Sim(seed, lives, off)
    logger = logging.getLogger("deltavol")
    level = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        sim.run()
        return Result(seed, True, "ok", sim.events, sim.digest())
    except Violation as exc:
        return Result(seed, False, str(exc), sim.events, sim.digest())
    except Exception:  # the seed must still name itself, whatever raised
        return Result(seed, False, traceback.format_exc(limit=-6), sim.events, sim.digest())
    finally:
        logger.setLevel(level)


def off_from_env() -> frozenset[str]:
    return frozenset(k for k in os.environ.get("DELTAVOL_SIM_OFF", "").split(",") if k)


def report(r: Result, off: frozenset[str] = frozenset(), tail: int = 30) -> str:
    env = f"DELTAVOL_SIM_OFF={','.join(sorted(off))} " if off else ""
    if os.environ.get("DELTAVOL_SIM_STALLS"):
        env += f"DELTAVOL_SIM_STALLS={os.environ['DELTAVOL_SIM_STALLS']} "
    lines = [f"SIM seed {r.seed}: {r.message}"]
    lines += ["  " + e for e in r.events[-tail:]]
    lines.append(
        f"  replay: {env}DELTAVOL_SIM_SEED={r.seed} pytest tests/sim -k replay"
        f"   (or: {env}python -m tests.sim {r.seed})"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """``python -m tests.sim [SEED | FIRST-LAST]...``"""
    seeds: list[int] = []
    for a in argv or ["0"]:
        lo, _, hi = a.partition("-")
        seeds += range(int(lo), int(hi or lo) + 1)
    off, bad = off_from_env(), 0
    for seed in seeds:
        r = run_seed(seed, off=off)
        print(report(r, off) if not r.ok else f"SIM seed {seed}: ok ({len(r.events)} events, {r.digest})")
        bad += not r.ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
