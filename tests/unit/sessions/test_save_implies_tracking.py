"""A save implies its tracking bit: while an incremental update protects (copy-on-first-write),
the first change to a chunk the update still owes is made safe by the chunk's save record,
not by a tracking-file fdatasync of its own.

What this covers, and why:

* the write path (``BeforeChange`` running the wiring's ``track`` first, then every
  session's ``protect``, inline when nothing needs waiting) pays no fdatasync at all for
  such a change: the save record is written, not synced, and the chunk stays in the
  transfer file until a checkpoint, which makes the tracking file durable before it
  clears the chunk; a change to a chunk not owed
  still waits for a tracking round;
* a bit left to a save that does not happen (the chunk was copied and checkpointed while
  ``protect`` waited for its lock, or the save area is full and copy-before-write ran)
  still becomes durable in the tracking file before the change goes down;
* a failed save leaves the chunk to be saved (or tracked) by its next change;
* after a crash that lost the tracking bits of saved chunks, ``load_files`` puts them
  back from the save area, in memory and on disk;
* the end of an update makes those bits durable in the tracking file before it drops the
  save area.

The invariant behind all of it (DESIGN section 3): a change reaches the disk only after its
chunk's bit is durable -- in the tracking file as of an fdatasync -- or its save record is
written while the transfer file owes the chunk (a power loss then re-marks with it).
``Disk`` checks it for every change that lands, against ``SyncLog.durable``: the tracking
file's bits as they were when an fdatasync of that file (or the fsync of a rewrite) began,
recorded once the sync returned.

Chunks are one 4 KiB block (``G``) or several (``G4``): the save area may keep only the
blocks a change overwrites, and a chunk with any block saved has its bit implied.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.backend.gate import GateLayer, WriteGate
from deltavol.backend.hooks import BeforeChange
from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.save_area import SaveArea
from deltavol.errors import DeltavolError
from deltavol.sessions import protector as protector_module
from deltavol.sessions.manager import _SourceWiring
from deltavol.sessions.session import Session, UpdateRecord
from deltavol.sessions.states import Phase, State
from deltavol.sessions.tracker import Pending
from deltavol.store.group_commit import GroupCommit
from tests import fakes
from tests.fakes import until

BLOCK = 4096
G = BLOCK  # a chunk of one block
G4 = 4 * BLOCK  # a chunk of four blocks
SIZE = 128 * BLOCK
NAME = "s"
OWED = range(8, 16)  # the chunks the update marks: changed before the mark
UNOWED = 20  # a chunk the update does not owe

# the source at the mark: every block different, none all zeroes
OLD = b"".join(bytes([b % 250 + 1]) * BLOCK for b in range(SIZE // BLOCK))


# --- durability, as the disk would see it after a power loss -------------------------------
class SyncLog:
    """Records every fdatasync by the kind of file it syncs, and the tracking bits it made durable.

    ``hold`` cleared makes tracking-file syncs wait (in their worker thread) until it is set.
    """

    def __init__(self, tracking_path: Path) -> None:
        self.tracking_path = str(tracking_path)
        self.granularity = G
        self.calls: list[str] = []
        self.durable = Bitmap(SIZE, G)
        self.hold = threading.Event()
        self.hold.set()

    def count(self, kind: str) -> int:
        return self.calls.count(kind)

    def _bits(self, raw: bytes) -> Bitmap:
        """What a file's bits cover after a power loss: its chunk bits and its hot regions
        (one chunk each here: the sessions run with ``hot_region`` = the granularity)."""
        nbytes = (Bitmap(SIZE, self.granularity).nbits + 7) // 8
        bits = Bitmap.from_bytes(
            SIZE, self.granularity, raw[persist.HEADER_SIZE : persist.HEADER_SIZE + nbytes]
        )
        hot_at = persist._hot_at(bits.nbits)
        bits.or_(Bitmap.from_bytes(SIZE, self.granularity, raw[hot_at : hot_at + nbytes]))
        return bits

    @staticmethod
    def _path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")

    def fdatasync(self, real: Callable[[int], None], fd: int) -> None:
        path = self._path(fd)
        self.calls.append(Path(path).suffix.lstrip("."))  # tracking, save, transfer
        if path != self.tracking_path:
            real(fd)
            return
        self.hold.wait(timeout=30)
        bits = self._bits(os.pread(fd, 1 << 20, 0))  # a subset of what it syncs
        real(fd)
        self.durable = bits

    def fsync(self, real: Callable[[int], None], fd: int) -> None:
        path = self._path(fd)
        rewrite = path == self.tracking_path + ".tmp"  # opened write-only: read it by its name
        bits = self._bits(Path(path).read_bytes()) if rewrite else None
        real(fd)
        if bits is not None:
            self.durable = bits


@pytest.fixture
def syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncLog]:
    log = SyncLog(tmp_path / f"{NAME}.tracking")
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: log.fdatasync(real_fdatasync, fd))
    monkeypatch.setattr(os, "fsync", lambda fd: log.fsync(real_fsync, fd))
    yield log
    log.hold.set()  # never leave a worker thread waiting


# --- the source's bottom backend and the copy target ---------------------------------------
class Disk(fakes.Disk):
    """The source volume under the write path; checks each change lands only once it is safe.
    With ``cached``, reads come from the page cache: protect saves without locks."""

    def __init__(self, granularity: int, cached: bool = False) -> None:
        super().__init__(SIZE, OLD, cached=cached)
        self.granularity = granularity
        self.violations: list[str] = []
        self.is_safe: Callable[[int], bool] = lambda c: True

    def landing(self, offset: int, length: int) -> tuple[int, int]:
        g = self.granularity
        for c in range(offset // g, (offset + length - 1) // g + 1):
            if not self.is_safe(c):
                self.violations.append(f"chunk {c} changed before its bit was durable")
        return (offset, length)


class Target:
    """The copy target; ``go`` cleared holds its writes back (a slow or stalled peer)."""

    description = "fake target"
    size = SIZE
    request_size = 4 * 1024 * 1024
    inflight = 16

    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.go = asyncio.Event()
        self.go.set()
        self.waiting = 0

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.waiting += 1
        await asyncio.sleep(0)  # I/O: other tasks run meanwhile
        await self.go.wait()
        self.waiting -= 1
        self.data[offset : offset + len(data)] = data

    async def zero(self, offset: int, length: int) -> bool:
        self.data[offset : offset + length] = bytes(length)
        return True

    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


# --- a session wired into a write path, in an incremental update ---------------------------
@dataclass
class Rig:
    session: Session
    disk: Disk
    target: Target
    layer: BeforeChange
    log: SyncLog
    g: int
    sessions: list[Session] = field(default_factory=list)

    async def write(self, offset: int, data: bytes) -> None:
        """One change from a client, down the real filter (protect and track concurrently)."""
        await self.layer.pwrite(offset, data)

    def chunk(self, c: int, fill: bytes = b"N") -> tuple[int, bytes]:
        """A change covering all of chunk ``c``."""
        return c * self.g, fill * self.g

    def old(self, c: int) -> bytes:
        return OLD[c * self.g : (c + 1) * self.g]

    def owed_on_disk(self) -> list[int]:
        """The chunks set in the transfer file (a checkpoint clears them there)."""
        bm, _ = persist.load(self.session.files.transfer_path, persist.KIND_TRANSFER, self.g, SIZE)
        return chunks_of(bm)

    def on_disk(self) -> list[int]:
        """The chunks set in the tracking file (what a reopen reads, page cache included)."""
        bm, _ = persist.load(self.session.files.tracking_path, persist.KIND_TRACKING, self.g, SIZE)
        return chunks_of(bm)


MakeRig = Callable[..., Awaitable[Rig]]


def chunks_of(bm: Bitmap) -> list[int]:
    return [c for first, n in bm.runs() for c in range(first, first + n)]


def new_session(tmp_path: Path, source: Any, target: Target, granularity: int, save_limit: int) -> Session:
    async def open_target(_s: Session) -> Target:
        return target

    return Session(
        name=NAME,
        source=source,
        target_spec="dst",
        granularity=granularity,
        files=tmp_path,
        save_dir=tmp_path,
        gate=WriteGate(),
        commit=GroupCommit(),
        open_target=open_target,
        persist_row=lambda s: None,
        hot_region=G,  # one chunk per hot region: every first change waits for a round
        save_limit=save_limit,
    )


def wire(s: Session, disk: Disk) -> BeforeChange:
    """The source's filter as the session manager builds it: tracking, then every protect hook."""
    wiring = _SourceWiring(gate=s._gate, commit=s._commit, sessions=[s])
    wiring.rehook()
    return BeforeChange(disk, wiring.hooks, wiring.gate)  # type: ignore[arg-type]


@pytest.fixture(params=["locked", "at once"])
def rigs(tmp_path: Path, syncs: SyncLog, request: pytest.FixtureRequest) -> Iterator[MakeRig]:
    """Builds a Rig: a session whose incremental update 1 is marked (real ``_mark``) with the
    ``OWED`` chunks to copy, and protecting; fdatasync counts start at zero after the mark.
    Every test runs twice: with the source's reads from disk (protect takes the chunk locks)
    and from the page cache (protect saves at once, ``Session.protector._save_at_once``)."""
    made: list[Rig] = []

    async def make(save_limit: int = 1 << 20, granularity: int = G) -> Rig:
        syncs.granularity = granularity
        disk, target = Disk(granularity, cached=request.param == "at once"), Target()
        source: Any = SimpleNamespace(name="src", size=SIZE, backend=disk)
        s = new_session(tmp_path, source, target, granularity, save_limit)
        s.create_files()
        s.tracking.set_range(OWED.start * granularity, len(OWED) * granularity)  # changed before the mark
        s.state = State.COPYING
        s.update = UpdateRecord(id=1, kind="incremental", started_at="x")
        s.next_update_id = 2
        await s._mark()
        assert s.update.protecting and s.save is not None and s.tracking.is_empty()
        assert s.tracking_file is not None and s.tracking_file.covered(OWED), "the mark carries them"
        # the regions the mark carried as hot went idle: first changes need a save or a round
        await s.tracking_file.settle(everything=True)
        assert s.tracking_file.hot.is_empty()
        await s.ensure_target()  # connected, as the copy is: a checkpoint flushes it
        rig = Rig(s, disk, target, wire(s, disk), syncs, granularity, [s])

        def is_safe(c: int) -> bool:
            save = rig.session.save
            return syncs.durable.test(c) or (save is not None and c in save and c in rig.owed_on_disk())

        disk.is_safe = is_safe
        syncs.calls.clear()
        made.append(rig)
        return rig

    yield make
    for rig in made:
        for s in rig.sessions:
            if s.tracking_file is not None:
                s.tracking_file.close()
            if s.save is not None:
                s.save.close()


# --- 1, 2: no fsync per change -------------------------------------------------------------
@pytest.mark.parametrize("granularity", [G, G4])
async def test_a_first_change_to_an_owed_chunk_costs_no_fsync(rigs: MakeRig, granularity: int) -> None:
    rig = await rigs(granularity=granularity)
    s, c, g = rig.session, OWED.start + 2, granularity
    await rig.write(*rig.chunk(c))
    assert rig.log.count("save") == 0, "the save record was synced on the write path"
    assert rig.log.count("tracking") == 0, "the saved chunk's bit waited for a tracking round too"
    assert s.tracked(c * g, g) and s.tracker.unsynced == {}
    assert s.save is not None and sorted(s.save.index) == [c]
    assert rig.disk.violations == [] and rig.disk.landed == [(c * g, g)]
    before = rig.log.calls.copy()
    await rig.write(c * g + 10, b"x" * 10)  # saved and tracked: nothing to wait for
    assert rig.log.calls == before and rig.disk.violations == []


async def test_tracking_a_chunk_its_protect_will_save_needs_no_wait(rigs: MakeRig) -> None:
    """So a protected write awaits its protect alone (no second task for tracking)."""
    rig = await rigs()
    s, c = rig.session, OWED.start + 3
    assert s.track_now(c * G, G), "an owed, unsaved chunk: the save makes its bit durable"
    assert s.tracker.unsynced == {c: Pending.BY_SAVE} and s.tracking.test(c)
    assert not s.track_now(UNOWED * G, G), "a chunk not owed in a cold region needs a round"
    assert not s.tracking.test(UNOWED), "a refused track_now changed the bitmap"
    last = OWED.stop - 1
    assert not s.track_now(last * G, 2 * G), "all or nothing: a change half owed, half cold waits"
    assert not s.tracking.test(last)
    await rig.write(*rig.chunk(c))
    assert rig.log.calls == [] and s.tracker.unsynced == {} and s.tracked(c * G, G)
    assert rig.disk.violations == []


async def test_changes_to_blocks_of_an_owed_chunk_each_cost_no_fsync(rigs: MakeRig) -> None:
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start
    await rig.write(c * G4 + BLOCK, b"1" * BLOCK)
    assert rig.log.calls == []
    assert s.tracked(c * G4, G4) and s.tracker.unsynced == {}
    await rig.write(c * G4 + 2 * BLOCK, b"2" * 100)  # another block: saved, the bit already there
    assert rig.log.calls == [] and s.save is not None and len(s.save.index[c]) == 2
    assert s.tracked(c * G4, G4) and s.tracker.unsynced == {}
    assert rig.disk.violations == []


async def test_a_change_to_a_chunk_not_owed_waits_for_a_tracking_round(rigs: MakeRig) -> None:
    rig = await rigs()
    s = rig.session
    await rig.write(*rig.chunk(UNOWED))
    assert rig.log.count("tracking") == 1 and rig.log.count("save") == 0
    assert rig.on_disk() == [UNOWED] and rig.log.durable.test(UNOWED)
    assert s.tracked(UNOWED * G, G) and s.tracker.unsynced == {}
    assert rig.disk.violations == []


async def test_a_change_over_owed_and_unowed_chunks_saves_one_and_tracks_the_other(rigs: MakeRig) -> None:
    rig = await rigs()
    s, last = rig.session, OWED.stop - 1  # the last owed chunk, then one not owed
    await rig.write(last * G, b"M" * 2 * G)
    assert rig.log.count("save") == 0 and rig.log.count("tracking") == 1
    assert s.save is not None and sorted(s.save.index) == [last]
    assert rig.log.durable.test(last + 1)
    assert s.tracked(last * G, 2 * G) and s.tracker.unsynced == {}
    assert rig.disk.violations == []


# --- 3: bits left to a save that did not happen --------------------------------------------
async def test_a_chunk_copied_while_protect_waited_gets_its_bit_from_a_round(rigs: MakeRig) -> None:
    rig = await rigs()
    s, c = rig.session, OWED.start
    assert s.transfer is not None
    async with s.locks.hold([c]):  # as the copy of c holds it
        write = asyncio.create_task(rig.write(*rig.chunk(c)))
        await until(lambda: s.tracker.unsynced.get(c) is Pending.BY_SAVE)  # tracked: left to the save
        s.transfer.clear(c)  # copied ...
        await s.copier.checkpoint()  # ... and checkpointed: protect will not save it
        assert not write.done()
    await write
    assert s.save is not None and c not in s.save
    # the checkpoint's sync of the tracking file (before it cleared c), then c's round
    assert rig.log.count("tracking") == 2 and rig.log.count("save") == 0
    assert rig.log.durable.test(c) and rig.on_disk() == [c]
    assert s.tracked(c * G, G) and s.tracker.unsynced == {}
    assert rig.disk.violations == []


async def test_protect_called_after_its_chunk_was_checkpointed_makes_the_bit_durable(rigs: MakeRig) -> None:
    rig = await rigs()
    s, c = rig.session, OWED.start + 6
    assert s.transfer is not None
    assert s.track(c * G, G) == [] and s.tracker.unsynced[c] is Pending.BY_SAVE
    s.transfer.clear(c)
    await s.copier.checkpoint()
    await s.protect(c * G, G)
    assert rig.log.durable.test(c), "protect returned, but c's bit is not durable anywhere"
    assert s.tracked(c * G, G) and s.tracker.unsynced == {}


async def test_with_the_save_area_full_copy_before_write_then_a_round_makes_the_bit_durable(
    rigs: MakeRig,
) -> None:
    rig = await rigs(save_limit=0)
    s, c = rig.session, OWED.start + 1
    await rig.write(*rig.chunk(c))
    assert s.save is not None and c not in s.save
    assert rig.target.data[c * G : (c + 1) * G] == rig.old(c), "not copied before the write"
    transfer, _ = persist.load(s.files.transfer_path, persist.KIND_TRANSFER, G, SIZE)
    assert not transfer.test(c), "copy-before-write not checkpointed"
    # the checkpoint's sync of the tracking file (before it cleared c), then c's round
    assert rig.log.count("tracking") == 2 and rig.log.durable.test(c)
    assert s.tracked(c * G, G) and s.tracker.unsynced == {}
    assert rig.disk.violations == []


async def test_a_second_change_during_copy_before_write_waits_for_the_bit_too(rigs: MakeRig) -> None:
    rig = await rigs(save_limit=0)
    c = OWED.start + 3
    rig.target.go.clear()  # the target is slow
    first = asyncio.create_task(rig.write(*rig.chunk(c, b"A")))
    await until(lambda: rig.target.waiting == 1)  # first's protect: copying c to the target
    second = asyncio.create_task(rig.write(c * G + 100, b"B" * 100))
    await asyncio.sleep(0.01)  # second: tracked (c is left to the save), protect waits for c's lock
    rig.log.hold.clear()  # tracking rounds take their time
    rig.target.go.set()
    try:
        await asyncio.wait([second], timeout=0.3)  # the first change's round cannot end meanwhile
    finally:
        rig.log.hold.set()
    await asyncio.gather(first, second)
    assert rig.disk.violations == [], "the second change went down before c's bit was durable"


# --- 3b: saves without the chunk locks (Session.protector._save_at_once) -----------------------------
WAIT_S = 10.0


def held_saves(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The save area's rounds wait in their thread until the event is set (a slow disk)."""
    go, real = threading.Event(), SaveArea.sync

    def sync(self: SaveArea) -> None:
        assert go.wait(WAIT_S), "a held save round was never released"
        real(self)

    monkeypatch.setattr(SaveArea, "sync", sync)
    return go


async def test_a_change_whose_old_blocks_are_cached_saves_without_taking_a_lock(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start
    taken: list[list[int]] = []
    real = s.locks.hold
    monkeypatch.setattr(
        s.locks, "hold", lambda chunks, **kw: (taken.append(list(chunks)), real(chunks, **kw))[1]
    )
    await rig.write(c * G4 + BLOCK, b"1" * 2 * BLOCK)
    assert (taken == []) is rig.disk.cached, f"chunk locks taken: {taken}"
    assert s.save is not None and await s.save.pieces(c) == [(BLOCK, rig.old(c)[BLOCK : 3 * BLOCK])]
    assert s.update is not None and s.update.cofw_saved_bytes == 2 * BLOCK
    assert rig.log.calls == [] and s.tracker.unsynced == {} and rig.disk.violations == []


async def test_a_large_change_saves_under_the_locks_and_reads_nothing_on_the_loop(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zero or trim may span GiBs: reading its old blocks from the cache on the loop, and
    maybe finding no room for them after, would stall every other client."""
    rig = await rigs(granularity=G4)
    s = rig.session
    monkeypatch.setattr(protector_module, "SAVE_AT_ONCE_MAX", 2 * G4)
    inline: list[int] = []
    real = rig.disk.pread_cached

    def pread_cached(offset: int, length: int) -> bytes | None:
        got = real(offset, length)
        if got is not None:
            inline.append(length)
        return got

    monkeypatch.setattr(rig.disk, "pread_cached", pread_cached)
    first = OWED.start
    await rig.write(first * G4, b"Z" * 3 * G4)  # three owed chunks: over the bound
    assert inline == [], "old blocks of a large change were read on the loop"
    assert s.save is not None and sorted(s.save.index) == [first, first + 1, first + 2]
    await rig.write((first + 3) * G4, b"z" * BLOCK)  # a small one still saves at once
    assert inline == ([BLOCK] if rig.disk.cached else [])
    assert rig.disk.violations == []


async def test_two_changes_racing_to_one_block_keep_its_contents_as_of_the_mark(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second change reads the block after the first one went down (a read from disk,
    while the first was saved from the page cache): its record holds the new contents, and
    only the first record may count, at once as after a reopen."""
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start + 1
    go = held_saves(monkeypatch)
    first = asyncio.ensure_future(rig.write(c * G4, b"A" * BLOCK))
    try:
        await until(lambda: s.save is not None and s.save.used > 0)  # its record waits for its round
    finally:
        go.set()
    if not rig.disk.cached:  # the locked path: the second change waits for the first's lock
        await first
    rig.disk.cached = False  # the second reads from disk ...
    read_go = asyncio.Event()
    real_pread = rig.disk.pread

    async def slow_pread(offset: int, length: int) -> bytes:
        await read_go.wait()  # ... and only once the first change has gone down
        return await real_pread(offset, length)

    monkeypatch.setattr(rig.disk, "pread", slow_pread)
    second = asyncio.ensure_future(rig.write(c * G4, b"B" * BLOCK))
    await first
    assert rig.disk.data[c * G4 : c * G4 + BLOCK] == b"A" * BLOCK
    read_go.set()
    await second
    assert s.save is not None
    assert await s.save.pieces(c) == [(0, rig.old(c)[:BLOCK])], "a later record replaced the first"
    s.save.close()
    again = SaveArea(s.save.path, G4, SIZE, s.save.update_id, s.save.limit).open()
    assert await again.pieces(c) == [(0, rig.old(c)[:BLOCK])]
    again.close()
    assert rig.disk.violations == []


async def test_a_copy_of_a_chunk_during_a_save_without_locks_sends_its_contents_as_of_the_mark(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start + 2
    go = held_saves(monkeypatch)
    gated = GateLayer(rig.layer, s._gate)  # as the source's stack has it: the update ends after the write
    write = asyncio.ensure_future(gated.pwrite(c * G4 + BLOCK, b"W" * BLOCK))
    try:
        await until(lambda: s.save is not None and s.save.used > 0)
        copy = asyncio.ensure_future(s._run())  # the whole update, c among its chunks
        await asyncio.sleep(0.01)
    finally:
        go.set()
    await asyncio.gather(write, copy)
    assert s.state is State.IDLE and s.consistent
    for o in OWED:
        assert rig.target.data[o * G4 : (o + 1) * G4] == rig.old(o), f"chunk {o} is not as of the mark"
    assert rig.disk.violations == []


# --- 4: a failed save ----------------------------------------------------------------------
@pytest.fixture
def failing_saves(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """While ``on``, the save area's record writes fail with EIO."""
    state = {"on": False}
    real = SaveArea._put

    def write(self: SaveArea, record: bytes, pos: int) -> None:
        if state["on"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, record, pos)

    monkeypatch.setattr(SaveArea, "_put", write)
    return state


async def test_a_failed_record_write_ends_saving_and_the_change_copies_before_writing(
    rigs: MakeRig, failing_saves: dict[str, bool]
) -> None:
    """As a failed fdatasync: the record may be lost, so no save counts from then on and
    changes to owed chunks copy their old contents to the target first."""
    rig = await rigs()
    s, c = rig.session, OWED.start + 4
    failing_saves["on"] = True
    await rig.write(*rig.chunk(c, b"A"))
    failing_saves["on"] = False
    assert s.save is not None and s.save.failed and c not in s.save
    assert rig.target.data[c * G : (c + 1) * G] == rig.old(c), "not copied before the write"
    assert c not in rig.owed_on_disk(), "copy-before-write not checkpointed"
    await rig.write(*rig.chunk(c + 1, b"B"))  # the next owed chunk: no save any more
    assert c + 1 not in s.save and rig.target.data[(c + 1) * G : (c + 2) * G] == rig.old(c + 1)
    assert rig.log.durable.test(c) and rig.log.durable.test(c + 1)
    assert s.tracker.unsynced == {} and s.tracked(c * G, 2 * G)
    assert rig.disk.violations == [] and rig.disk.landed == [(c * G, G), ((c + 1) * G, G)]


async def test_after_a_failed_save_cancel_leaves_the_chunk_tracked_and_durable(
    rigs: MakeRig, failing_saves: dict[str, bool]
) -> None:
    rig = await rigs()
    s, c = rig.session, OWED.start + 2
    failing_saves["on"] = True
    await rig.write(*rig.chunk(c, b"A"))
    failing_saves["on"] = False
    await s.cancel()  # tracking |= transfer, rewritten: every bit in memory is durable
    assert s.save is None and rig.on_disk() == list(OWED)
    assert rig.log.durable.test(c)
    assert s.tracker.unsynced == {} and s.tracked(c * G, G), "a rewritten bit still waits for a save"
    assert rig.disk.violations == []


# --- 4b: a checkpoint and the bits left to saves ---------------------------------------------
async def test_a_checkpoint_makes_the_bits_left_to_saves_durable_before_it_clears_their_chunks(
    rigs: MakeRig,
) -> None:
    """The save record is not synced: once the transfer file no longer owes the chunk, only
    the tracking file can say that it changed after the mark."""
    rig = await rigs()
    s, c = rig.session, OWED.start + 1
    await rig.write(*rig.chunk(c))
    assert s.save is not None and c in s.save and not rig.log.durable.test(c)
    assert s.transfer is not None
    s.transfer.clear(c)  # copied
    at_write: list[bool] = []
    real = persist.write_bits_in_place

    def write_bits_in_place(path: Path, bitmap: Bitmap) -> None:
        at_write.append(rig.log.durable.test(c))
        real(path, bitmap)

    persist.write_bits_in_place = write_bits_in_place  # type: ignore[assignment]
    try:
        await s.copier.checkpoint()
    finally:
        persist.write_bits_in_place = real  # type: ignore[assignment]
    assert c not in rig.owed_on_disk()
    assert at_write == [True], "the checkpoint cleared c while its bit was durable nowhere"


async def test_a_change_during_a_checkpoint_leaves_no_bit_to_its_save(rigs: MakeRig) -> None:
    """While a checkpoint holds ``checkpointing`` its sync of the tracking file may have
    begun: a bit left to a save now would not be in it, so the change takes a round."""
    rig = await rigs()
    s, c = rig.session, OWED.start + 6
    async with s.copier.checkpointing:
        assert s.track(c * G, G) != [], "a bit left to a save while a checkpoint runs"
        assert s.tracker.unsynced.get(c) is not Pending.BY_SAVE
    await rig.write(*rig.chunk(c))
    assert rig.log.durable.test(c) and s.save is not None and c in s.save
    assert rig.disk.violations == []


async def test_a_bit_whose_file_write_failed_reaches_the_file_before_the_save_area_goes(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change whose tracking bit could not be written fails; the next change of the chunk
    is saved, and its record makes the bit durable only while the save area lives. The bit
    must be in the file by the time the update ends and drops the save area."""
    rig = await rigs()
    s, c = rig.session, OWED.start + 3
    real = persist.TrackingFile.write_bits

    def eio(self: persist.TrackingFile, bitmap: Bitmap, chunks: list[int]) -> None:
        raise DeltavolError(msg="tracking bitmap: Input/output error")

    monkeypatch.setattr(persist.TrackingFile, "write_bits", eio)
    with pytest.raises(DeltavolError):
        await rig.write(*rig.chunk(c, b"A"))
    monkeypatch.setattr(persist.TrackingFile, "write_bits", real)
    assert rig.disk.landed == [] and s.tracking.test(c) and c not in rig.on_disk()
    await rig.write(*rig.chunk(c, b"B"))
    assert s.save is not None and c in s.save
    await s._run()  # the update ends: the save area goes
    assert s.state is State.IDLE and s.save is None
    assert c in rig.on_disk() and rig.log.durable.test(c), "the changed chunk's bit is only in memory"
    assert rig.disk.violations == []


# --- 5: recovery ---------------------------------------------------------------------------
@pytest.mark.parametrize("state", [State.COPYING, State.PAUSED, State.FAILED])
@pytest.mark.parametrize("granularity", [G, G4])
async def test_reopening_puts_the_bits_of_saved_chunks_back_into_tracking(
    rigs: MakeRig, tmp_path: Path, state: State, granularity: int
) -> None:
    rig = await rigs(granularity=granularity)
    s, g, saved = rig.session, granularity, [OWED.start, OWED.start + 7]
    await rig.write(*rig.chunk(UNOWED))  # tracked by a round (first: a later one would sync the rest)
    for c in saved:
        await rig.write(c * g + g - BLOCK, b"S" * BLOCK)  # the chunk's last block
    assert rig.log.count("save") == 0 and rig.log.count("tracking") == 1
    # a killed server: the tracking file keeps only what an fdatasync made durable (a
    # harsher loss than a kill's), the save area all that was written (the page cache)
    assert s.tracking_file is not None and s.save is not None
    s.tracking_file.close()
    s.save.close()
    persist.save_atomic(s.files.tracking_path, rig.log.durable, 2, persist.KIND_TRACKING, Bitmap(SIZE, g))
    assert rig.on_disk() == [UNOWED], "the crash did not lose the saved chunks' bits"

    again = new_session(tmp_path, s.source, rig.target, g, s.save_limit)
    rig.sessions.append(again)
    again.state = state
    again.update = UpdateRecord(
        id=1, kind="incremental", started_at="x", protecting=True, phase=Phase.PROTECTING
    )
    again.next_update_id = 2
    again.load_files()
    assert again.save is not None and sorted(again.save.index) == saved
    assert chunks_of(again.tracking) == [*saved, UNOWED]
    assert rig.on_disk() == [*saved, UNOWED]
    assert again.tracker.unsynced == {} and again.tracked(OWED.start * g, g)


# --- 6: the end of the update --------------------------------------------------------------
@pytest.mark.parametrize("granularity", [G, G4])
async def test_the_end_of_an_update_makes_saved_bits_durable_before_dropping_the_save_area(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch, granularity: int
) -> None:
    rig = await rigs(granularity=granularity)
    s, c, g = rig.session, OWED.start + 1, granularity
    await rig.write(c * g, b"E" * BLOCK)  # the chunk's first block
    assert rig.log.count("tracking") == 0 and not rig.log.durable.test(c)
    at_close: list[bool] = []
    real_close = SaveArea.close

    def close(self: SaveArea) -> None:
        at_close.append(rig.log.durable.test(c))
        real_close(self)

    monkeypatch.setattr(SaveArea, "close", close)
    await s._run()
    assert s.state is State.IDLE and s.consistent and s.last_error is None
    assert at_close == [True], "the save area went while c's bit was durable only there"
    assert s.save is None and (s.protector.save_dir / f"{NAME}.save").exists()  # its space kept for the next
    assert rig.on_disk() == [c]
    for o in OWED:  # the copy is the image at the mark: c's old contents came from the save area
        assert rig.target.data[o * g : (o + 1) * g] == rig.old(o)


# --- 6: a re-mark that fails --------------------------------------------------------------
def db_down(_: Session) -> None:
    """The session row cannot be committed."""
    raise OSError(errno.EIO, os.strerror(errno.EIO))


async def test_a_failed_re_mark_leaves_the_unfinished_transfer_as_it_was(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_update puts the unfinished update back when a new mark fails; its transfer must
    not have gained the chunks changed since its mark (copied now, they would carry
    contents newer than its point in time)."""
    rig = await rigs()
    s, c = rig.session, OWED.stop + 3  # not owed: changed after the mark, tracked only
    await rig.write(*rig.chunk(c, b"A"))
    old = s.transfer
    assert old is not None and s.tracking.test(c) and not old.test(c)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persist, "save_atomic", full)
    s.update = UpdateRecord(id=2, kind="incremental", started_at="y")
    with pytest.raises(OSError):
        await s._mark()
    assert chunks_of(old) == list(OWED), "the unfinished update's transfer changed"


async def test_after_a_re_mark_whose_commit_failed_the_unfinished_update_still_protects(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs()
    s, c1, c2 = rig.session, OWED.start, OWED.start + 1
    rig.disk.data[c1 * G : (c1 + 1) * G] = b"1" * G  # the contents as of the mark
    rig.disk.data[c2 * G : (c2 + 1) * G] = b"2" * G
    await rig.write(*rig.chunk(c1, b"A"))
    old_save, old_update, old_transfer = s.save, s.update, s.transfer
    assert old_save is not None and c1 in old_save
    monkeypatch.setattr(s, "_persist_row", db_down)
    s.update = UpdateRecord(id=2, kind="incremental", started_at="y")
    with pytest.raises(OSError):
        await s._mark()
    monkeypatch.undo()
    s.update, s.transfer = old_update, old_transfer  # what start_update puts back
    assert s.save is old_save, "the unfinished update lost its save area"
    assert await old_save.pieces(c1) == [(0, b"1" * G)]
    await rig.write(*rig.chunk(c2, b"B"))  # still protected: saved before it lands
    assert c2 in old_save and await old_save.pieces(c2) == [(0, b"2" * G)]
    assert rig.disk.violations == []


async def test_a_full_update_whose_commit_failed_leaves_the_unfinished_save_area(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rigs()
    s, c = rig.session, OWED.start
    await rig.write(*rig.chunk(c, b"A"))
    old_save = s.save
    assert old_save is not None and c in old_save
    monkeypatch.setattr(s, "_persist_row", db_down)
    s.update = UpdateRecord(id=2, kind="full", started_at="y")
    with pytest.raises(OSError):
        await s._start_full(State.COPYING)
    assert s.save is old_save and c in old_save, "the unfinished update lost its save area"


# --- 3c: protected changes that go down at once (Protector.protect_now) ------------------------
def pieces_in_file(s: Session, c: int) -> list[tuple[int, bytes]]:
    """Chunk ``c``'s saved blocks as the save area's file holds them now (checked records)."""
    save = s.save
    assert save is not None
    return save._read_pieces(save.index.get(c, []), c)


async def test_a_protected_change_goes_down_at_once_after_its_record(
    rigs: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its old blocks in the page cache, a first change to an owed chunk is tracked,
    saved and written in one call (``pwrite_now``: the connection does it inline, with no
    task): its record is in the save area's file as the change lands, and its bit is left to
    that record (tracking runs first: ``_SourceWiring.rehook``), so no sync is paid. From
    disk, the call does nothing but track, and the write takes the task path."""
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start + 2
    at_landing: list[list[tuple[int, bytes]]] = []
    real = rig.disk.landing

    def landing(offset: int, length: int) -> tuple[int, int]:
        at_landing.append(pieces_in_file(s, c))
        return real(offset, length)

    monkeypatch.setattr(rig.disk, "landing", landing)
    done = rig.layer.pwrite_now(c * G4 + BLOCK, b"1" * BLOCK)
    assert done is rig.disk.cached, "a protected change with its old blocks cached did not go down at once"
    if not done:
        assert rig.disk.landed == [] and s.save is not None and s.save.used == 0
        await rig.write(c * G4 + BLOCK, b"1" * BLOCK)
    assert at_landing == [[(BLOCK, rig.old(c)[BLOCK : 2 * BLOCK])]], "the change landed before its record"
    assert rig.log.calls == [], "a protected change paid a sync"
    assert s.tracker.unsynced == {} and s.tracked(c * G4, G4) and rig.disk.violations == []
    assert s.update is not None and s.update.cofw_saved_bytes == BLOCK


async def test_a_second_change_at_once_does_not_save_the_first_changes_data(rigs: MakeRig) -> None:
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start + 1
    for fill in (b"A", b"B", b"C"):  # the same block, then one more beside it
        if not rig.layer.pwrite_now(c * G4, fill * BLOCK):
            await rig.write(c * G4, fill * BLOCK)
    if not rig.layer.pwrite_now(c * G4 + BLOCK, b"D" * BLOCK):
        await rig.write(c * G4 + BLOCK, b"D" * BLOCK)
    assert rig.disk.data[c * G4 : c * G4 + 2 * BLOCK] == b"C" * BLOCK + b"D" * BLOCK
    assert s.save is not None and len(s.save.index[c]) == 2, "a block was saved twice"
    assert sorted(await s.save.pieces(c)) == [(0, rig.old(c)[:BLOCK]), (BLOCK, rig.old(c)[BLOCK : 2 * BLOCK])]
    assert rig.log.calls == [] and rig.disk.violations == []


async def test_a_change_to_a_chunk_the_copy_holds_waits_for_it(rigs: MakeRig) -> None:
    """The copy holds the chunk's lock while it reads it and lays its records over what it
    read: a change may not save (nor go down) at once meanwhile."""
    rig = await rigs(granularity=G4)
    s, c = rig.session, OWED.start
    async with s.locks.hold([c]):
        assert not rig.layer.pwrite_now(c * G4, b"x" * BLOCK)
        assert s.save is not None and s.save.used == 0 and rig.disk.landed == []
        assert s.update is not None and s.update.cofw_saved_bytes == 0
    await rig.write(c * G4, b"x" * BLOCK)
    assert await s.save.pieces(c) == [(0, rig.old(c)[:BLOCK])]
    assert rig.disk.violations == []


async def test_a_change_with_no_room_to_save_does_not_go_down_at_once(rigs: MakeRig) -> None:
    """The save area is full: copy-before-write, which waits for the target, takes it."""
    rig = await rigs(granularity=G4, save_limit=0)
    s, c = rig.session, OWED.start + 4
    assert not rig.layer.pwrite_now(c * G4, b"y" * BLOCK)
    assert rig.disk.landed == [] and s.save is not None and s.save.used == 0
    await rig.write(c * G4, b"y" * BLOCK)
    assert rig.target.data[c * G4 : (c + 1) * G4] == rig.old(c), "copy-before-write did not copy the chunk"
    assert rig.disk.violations == []
