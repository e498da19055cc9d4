"""A chunk is recorded as copied only once a target flush issued after its copy write
completed has succeeded (DESIGN section 3), and a mark flushes the source first.

The oracle is a target with a volatile write cache (``CacheTarget``): a write lands in its
cache, a FLUSH makes durable what had completed when the FLUSH was sent, and ``crash()``
loses the rest, as a remote server's host losing power does. A source with a page cache
(``CachedDisk``) does the same for the source. After each scenario, what a crash of the
target would leave is compared with the source as of the mark, or every chunk where they
may differ must be owed in a bitmap file (invariant 2).

Covers: a checkpoint snapshots the transfer before its flush; a checkpoint never lands on a
transfer a mark replaced, nor after a newer one, even when cancelled mid-write; a
checkpoint with no target writes nothing; a failed update, a pause whose checkpoint failed,
a re-mark and a cancel all owe again what the last checkpoint owes; the catch-up mark of a
full update starts from a flushed pass; cancel commits before it removes the transfer file;
copy-before-write gives up the mark when no flush can cover its copy; a mark flushes the
source before it commits; nothing after a mark's commit point undoes the mark.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import TargetError, os_error
from deltavol.sessions import copier as copier_module
from deltavol.sessions.session import RetryPolicy, Session, UpdateRecord
from deltavol.sessions.states import Phase, State
from tests.unit.sessions.test_save_implies_tracking import (
    OLD,
    SIZE,
    Disk,
    G,
    Target,
    chunks_of,
    new_session,
    until,
    wire,
)

N = SIZE // G
OWED = range(0, 16)  # changed since the last update: the next mark owes them
NEW = b"".join(bytes([(c * 7) % 250 + 3]) * G for c in range(N))  # the source at the mark


class CacheTarget(Target):
    """A target with a volatile write cache. ``completed`` lists the chunks whose writes
    completed, in order; ``covered`` what each FLUSH covered (the writes completed when it
    was sent). ``flush_go`` cleared holds FLUSHes; ``fail_after`` n: the n+1-th write finds
    the target dead (it crashes: the cache is lost). One chunk per request, one at a time."""

    request_size = G
    inflight = 1

    def __init__(self, image: bytes) -> None:
        super().__init__()
        self.data[:] = image
        self.durable = bytearray(image)
        self.completed: list[int] = []
        self.covered: list[list[int]] = []
        self.flush_go = asyncio.Event()
        self.flush_go.set()
        self.fail_after: int | None = None
        self.dead = False

    def _check(self) -> None:
        if self.dead:
            raise TargetError(msg="target: connection lost")

    async def pwrite(self, offset: int, data: bytes) -> None:
        self._check()
        if self.fail_after is not None and len(self.completed) >= self.fail_after:
            self.crash()
            self._check()
        await super().pwrite(offset, data)
        self._check()  # crashed while the write was in flight: never acknowledged
        self.completed.extend(range(offset // G, (offset + len(data) + G - 1) // G))

    async def zero(self, offset: int, length: int) -> bool:
        await self.pwrite(offset, bytes(length))
        return True

    async def flush(self) -> None:
        self._check()
        image, covered = bytes(self.data), list(self.completed)  # what it covers: as sent
        self.covered.append(covered)
        await asyncio.sleep(0)
        await self.flush_go.wait()
        self._check()
        self.durable[:] = image

    def crash(self) -> None:
        """The target's host loses power: what no flush covered is gone."""
        self.data[:] = self.durable
        self.dead = True

    def restart(self) -> None:
        self.dead, self.fail_after = False, None


class CachedDisk(Disk):
    """The source with a page cache: ``flush`` makes changes durable, ``power_loss`` loses
    the others."""

    def __init__(self, image: bytes) -> None:
        super().__init__(G)
        self.data[:] = image
        self.durable = bytearray(image)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    async def flush(self) -> None:
        await asyncio.sleep(0)
        self.durable[:] = self.data

    def power_loss(self) -> None:
        self.data[:] = self.durable


def differ(a: bytes | bytearray, b: bytes | bytearray) -> list[int]:
    return [c for c in range(N) if a[c * G : (c + 1) * G] != b[c * G : (c + 1) * G]]


def file_bits(path: Path, kind: int) -> set[int]:
    if not path.exists():
        return set()
    bm, _ = persist.load(path, kind, G, SIZE)
    return set(chunks_of(bm))


def owed_on_disk(s: Session) -> set[int]:
    """What a restart would copy: the tracking file's bits and the transfer file's."""
    return file_bits(s.files.tracking_path, persist.KIND_TRACKING) | file_bits(
        s.files.transfer_path, persist.KIND_TRANSFER
    )


Made = tuple[Session, CachedDisk, CacheTarget]


@pytest.fixture
def made(tmp_path: Path) -> Iterator[Callable[[], Made]]:
    """Builds an idle session, consistent with the target (``OLD``) as of an earlier
    update, with the ``OWED`` chunks changed since (the source is ``NEW`` there)."""
    sessions: list[Session] = []

    def make() -> Made:
        disk = CachedDisk(NEW[: OWED.stop * G] + OLD[OWED.stop * G :])
        target = CacheTarget(OLD)
        source: Any = SimpleNamespace(name="src", size=SIZE, backend=disk)
        s = new_session(tmp_path, source, target, G, 1 << 20)
        s.retry = RetryPolicy(limit=0)
        s.create_files()
        s.state, s.consistent, s.point_in_time, s.next_update_id = State.IDLE, True, "t0", 2
        s.tracking.set_range(OWED.start * G, len(OWED) * G)
        s._rewrite_tracking()
        sessions.append(s)
        return s, disk, target

    yield make
    for s in sessions:
        if s._task is not None:
            s._task.cancel()
        if s.tracking_file is not None:
            s.tracking_file.close()
        if s.save is not None:
            s.save.close()


@pytest.fixture
def slow_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """No periodic checkpoint during a test: each is driven by hand."""
    monkeypatch.setattr(copier_module, "CHECKPOINT_SECONDS", 3600.0)


async def marked(s: Session) -> None:
    """An incremental update marked by the real ``_mark``, its target connected, no copy task."""
    s.state = State.COPYING
    s.update = UpdateRecord(id=s.next_update_id, kind="incremental", started_at="x")
    s.next_update_id += 1
    await s._mark()
    await s.ensure_target()


class HeldWrites:
    """``persist.write_bits_in_place`` whose first ``n`` calls wait in their thread (as a
    write stalled in the kernel) until ``release`` is set; ``done`` once they wrote."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int = 1) -> None:
        self.entered, self.release, self.done = threading.Event(), threading.Event(), threading.Event()
        self.n, self.calls = n, 0
        real = persist.write_bits_in_place

        def write(path: Path, bm: Bitmap) -> None:
            self.calls += 1
            held = self.calls <= self.n
            if held:
                self.entered.set()
                self.release.wait(10)
            real(path, bm)
            if held:
                self.done.set()

        monkeypatch.setattr(persist, "write_bits_in_place", write)


class SeenLock(asyncio.Lock):
    """A lock that counts who waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def acquire(self) -> bool:
        self.waiting += 1
        try:
            return await super().acquire()
        finally:
            self.waiting -= 1


# --- the checkpoint -----------------------------------------------------------------------
async def test_a_chunk_whose_write_completes_during_the_flush_stays_owed(
    made: Callable[[], Made], slow_period: None
) -> None:
    s, _, t = made()
    await marked(s)
    c = OWED.start
    t.go.clear()
    copy = asyncio.create_task(s.copier.copy_run(t, c, 1))
    await until(lambda: t.waiting == 1)  # c's write is in flight
    t.flush_go.clear()
    checkpoint = asyncio.create_task(s.copier.checkpoint())
    await until(lambda: len(t.covered) == 1)  # FLUSH sent: it does not cover c
    t.go.set()
    await copy  # c's write completes after the FLUSH was sent
    t.flush_go.set()
    await checkpoint
    assert t.covered == [[]]
    assert c in file_bits(s.files.transfer_path, persist.KIND_TRANSFER), "c recorded done unflushed"
    assert s.copier.owed(c) and not s.protected(c * G, G), "c is no longer protected"
    await s.copier.checkpoint()  # the next one covers it
    assert c not in file_bits(s.files.transfer_path, persist.KIND_TRANSFER) and not s.copier.owed(c)


async def test_a_checkpoint_with_no_target_records_nothing(
    made: Callable[[], Made], slow_period: None
) -> None:
    """No target, no flush: a chunk copied on a connection since dropped is not durable."""
    s, _, _ = made()
    await marked(s)
    assert s.transfer is not None
    s.transfer.clear(OWED.start)  # copied on a connection that is gone
    s.target = None
    await s.copier.checkpoint()
    assert OWED.start in file_bits(s.files.transfer_path, persist.KIND_TRANSFER)
    assert s.copier.owed(OWED.start)


async def test_a_checkpoint_in_its_write_when_the_catch_up_mark_comes_does_not_undo_it(
    made: Callable[[], Made], slow_period: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full pass is done and checkpointing; chunks changed during it are marked."""
    s, _, _ = made()
    await marked(s)
    assert s.update is not None and s.transfer is not None
    s.update = replace(
        s.update, kind="full", protecting=False, phase=Phase.FULL_COPY
    )  # in its unprotected pass ...
    s.transfer.clear_all()  # ... which is over
    lock = s.copier.checkpointing = SeenLock()
    held = HeldWrites(monkeypatch)
    checkpoint = asyncio.create_task(s.copier.checkpoint())
    await until(held.entered.is_set)  # its thread has not opened the file yet
    c = 40
    s.tracking.set(c)  # changed during the full pass
    mark = asyncio.create_task(s._mark())  # the catch-up mark
    await until(lambda: mark.done() or lock.waiting > 0)
    held.release.set()
    await checkpoint
    await mark
    await until(held.done.is_set)
    assert s.transfer is not None and s.transfer.test(c)
    assert s.copier.durable is not None and s.copier.durable.test(c), "a stale checkpoint reset it"
    assert c in file_bits(s.files.transfer_path, persist.KIND_TRANSFER), "old bits over the new transfer file"


async def test_a_checkpoint_whose_flush_ends_after_a_mark_is_dropped(
    made: Callable[[], Made], slow_period: None
) -> None:
    s, _, t = made()
    await marked(s)
    assert s.update is not None and s.transfer is not None
    s.update = replace(s.update, kind="full", protecting=False, phase=Phase.FULL_COPY)
    s.transfer.clear_all()
    t.flush_go.clear()
    checkpoint = asyncio.create_task(s.copier.checkpoint())  # snapshot of the full pass's transfer
    await until(lambda: len(t.covered) == 1)
    c = 40
    s.tracking.set(c)
    await s._mark()
    t.flush_go.set()
    await checkpoint
    assert s.copier.durable is not None and s.copier.durable.test(c)
    assert c in file_bits(s.files.transfer_path, persist.KIND_TRANSFER)


async def test_a_cancelled_checkpoint_holds_the_lock_until_its_write_is_over(
    made: Callable[[], Made], slow_period: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its thread cannot be stopped: a newer checkpoint must not land before it."""
    s, _, _ = made()
    await marked(s)
    assert s.transfer is not None
    lock = s.copier.checkpointing = SeenLock()
    held = HeldWrites(monkeypatch)
    s.transfer.clear_run(0, 2)
    old = asyncio.create_task(s.copier.checkpoint())
    await until(held.entered.is_set)
    old.cancel()
    await asyncio.sleep(0)
    s.transfer.clear_run(2, 8)  # copied meanwhile
    new = asyncio.create_task(s.copier.checkpoint())
    await until(lambda: new.done() or lock.waiting > 0)
    held.release.set()
    await new
    with pytest.raises(asyncio.CancelledError):
        await old
    await until(held.done.is_set)
    on_file = file_bits(s.files.transfer_path, persist.KIND_TRANSFER)
    assert on_file == set(range(10, OWED.stop)), "the older checkpoint landed last"
    assert s.copier.durable is not None and set(chunks_of(s.copier.durable)) == on_file


async def test_pause_during_a_stalled_checkpoint_leaves_file_and_memory_alike(
    made: Callable[[], Made], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update's task is cancelled while its periodic checkpoint's thread still writes;
    pause's own checkpoint comes after it."""
    monkeypatch.setattr(copier_module, "CHECKPOINT_SECONDS", 0.01)
    s, _, t = made()
    go, later = asyncio.Event(), asyncio.Event()
    real = t.pwrite

    async def slow(offset: int, data: bytes) -> None:
        if len(t.completed) >= 10:
            await later.wait()
        elif len(t.completed) >= 2:
            await go.wait()
        await real(offset, data)

    t.pwrite = slow  # type: ignore[method-assign]
    held = HeldWrites(monkeypatch)
    await s.start_update(False)
    await until(held.entered.is_set)  # a periodic checkpoint is in its thread, 2 chunks copied
    go.set()
    await until(lambda: len(t.completed) >= 10)  # 8 more copied meanwhile
    pause = asyncio.create_task(s.pause())
    await asyncio.wait([pause], timeout=0.5)  # pause may wait for that thread: let it go later
    held.release.set()
    await pause
    await until(held.done.is_set)
    on_file = file_bits(s.files.transfer_path, persist.KIND_TRANSFER)
    assert s.copier.durable is not None and set(chunks_of(s.copier.durable)) == on_file
    assert all(s.copier.owed(c) for c in on_file), "a chunk the file owes is not protected"
    later.set()


# --- what the target never flushed is owed again -----------------------------------------
async def test_a_failed_update_retried_copies_again_what_the_dead_target_never_flushed(
    made: Callable[[], Made], slow_period: None
) -> None:
    s, disk, t = made()
    s.retry = RetryPolicy(limit=1, backoff=3600.0)
    t.fail_after = 8  # 8 chunks acknowledged, then its host dies before any FLUSH
    await s.start_update(False)
    await until(lambda: s.state is State.FAILED and not s.busy)
    assert s.transfer is not None and set(chunks_of(s.transfer)) == set(OWED)
    t.restart()  # it comes back: the retry policy's timer goes off
    assert s._retry_task is not None
    s._retry_task.cancel()
    await s._retry_later(0)
    await s.wait()
    assert s.state is State.IDLE
    assert s.consistent
    t.crash()
    assert differ(t.durable, disk.data) == [], "the target is not the image of the mark"


@pytest.mark.parametrize("then", ["resume", "update"])
async def test_after_a_pause_whose_checkpoint_failed_nothing_unflushed_is_taken_as_done(
    made: Callable[[], Made], slow_period: None, then: str
) -> None:
    s, disk, t = made()
    gate = asyncio.Event()
    real = t.pwrite

    async def slow(offset: int, data: bytes) -> None:
        if len(t.completed) >= 8:
            await gate.wait()
        await real(offset, data)

    t.pwrite = slow  # type: ignore[method-assign]
    await s.start_update(False)
    await until(lambda: len(t.completed) >= 8)
    t.crash()  # the 8 copied chunks were never flushed
    await s.pause()  # its checkpoint's flush fails
    assert s.state is State.PAUSED
    t.restart()
    gate.set()
    if then == "resume":
        await s.resume()
    else:
        await s.start_update(False)  # a re-mark of the unfinished update
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    t.crash()
    assert differ(t.durable, disk.data) == [], "a chunk the target lost was taken as copied"


@pytest.mark.parametrize("target", ["dead", "alive"])
async def test_a_cancel_puts_back_what_the_target_never_flushed(
    made: Callable[[], Made], slow_period: None, target: str
) -> None:
    """8 chunks copied, never flushed, then cancel. A live target is flushed first: only what
    is left goes back into tracking. A dead one lost the 8: they go back too."""
    s, disk, t = made()
    gate = asyncio.Event()
    real = t.pwrite

    async def slow(offset: int, data: bytes) -> None:
        if len(t.completed) >= 8:
            await gate.wait()
        await real(offset, data)

    t.pwrite = slow  # type: ignore[method-assign]
    await s.start_update(False)
    await until(lambda: len(t.completed) >= 8)
    if target == "dead":
        t.crash()
    await s.cancel()
    gate.set()
    t.crash()  # later, the target loses what it never flushed
    lost = differ(t.durable, disk.data)
    assert lost == (list(OWED) if target == "dead" else list(OWED)[8:])
    assert chunks_of(s.tracking) == lost, "tracked: not what the target may differ in"
    assert owed_on_disk(s) == set(lost)


async def test_a_cancel_commits_before_it_removes_the_transfer_file(
    made: Callable[[], Made], slow_period: None
) -> None:
    s, _, _ = made()
    await marked(s)
    at_commit: list[tuple[State, bool]] = []
    s._persist_row = lambda s: at_commit.append((s.state, s.files.transfer_path.exists()))
    await s.cancel()
    assert at_commit[-1] == (State.IDLE, True), "a crash before the commit finds the transfer gone"
    await s.files.transfer_gone()  # removed in a thread, after the commit
    assert not s.files.transfer_path.exists()


async def test_the_catch_up_mark_of_a_full_update_starts_from_a_flushed_pass(
    made: Callable[[], Made], slow_period: None
) -> None:
    """Right after the catch-up mark, a crash of the target must leave no chunk that differs
    from the source and is owed in no bitmap file."""
    s, disk, t = made()
    seen: dict[str, Any] = {}
    real_mark = s._mark

    async def mark() -> None:
        await real_mark()
        if s.update is not None and s.update.kind == "full" and not seen:
            seen["lost"] = differ(t.durable, disk.data)  # what a crash of the target leaves
            seen["owed"] = owed_on_disk(s)
            seen["flushes"] = len(t.covered)

    s._mark = mark  # type: ignore[method-assign]
    await s.start_update(True)
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert seen["flushes"] >= 1, "no target flush before the catch-up mark"
    assert set(seen["lost"]) <= seen["owed"], "the end of the full pass is recorded unflushed"


async def test_copy_before_write_whose_connection_goes_gives_up_the_mark(
    made: Callable[[], Made], slow_period: None
) -> None:
    """The save area is full: a change to an owed chunk copies it to the target first. If the
    connection is dropped while that write is in flight, no flush of it will come: the chunk
    stays owed, and the change may land only once the mark is given up (a re-mark copies the
    chunk as of a new mark)."""
    s, disk, t = made()
    s.save_limit = 0
    await marked(s)
    layer = wire(s, disk)
    c = OWED.start + 4
    t.go.clear()
    landed: list[bool] = []
    real = disk.pwrite

    async def pwrite(offset: int, data: bytes, fua: bool = False) -> None:
        assert s.update is not None
        landed.append(s.update.protecting)
        await real(offset, data, fua)

    disk.pwrite = pwrite  # type: ignore[method-assign]
    change = asyncio.create_task(layer.pwrite(c * G, b"w" * G))
    await until(lambda: t.waiting == 1)  # copying c's old contents
    await s.copier.drop_target()  # a resume reconnects, say
    t.go.set()
    await change
    assert landed == [False], "the change landed while the mark still promised c's old contents"
    assert s.update is not None and s.update.remark is not None
    assert s.copier.owed(c) and c in file_bits(s.files.transfer_path, persist.KIND_TRANSFER)


# --- the source is flushed by a mark ----------------------------------------------------------
@pytest.mark.parametrize("full", [False, True])
async def test_a_mark_flushes_the_source_before_it_commits(
    made: Callable[[], Made], slow_period: None, full: bool
) -> None:
    s, disk, t = made()
    layer = wire(s, disk)
    c = OWED.stop + 3
    await layer.pwrite(c * G, b"w" * G)  # acknowledged, not flushed by its client
    at_commit: list[list[int]] = []
    s._persist_row = lambda s: at_commit.append(differ(disk.durable, disk.data))
    await s.start_update(full)
    assert at_commit and at_commit[0] == [], "a mark committed over changes the source may lose"
    await s.wait()
    assert s.state is State.IDLE
    disk.power_loss()
    t.crash()
    lost = set(differ(t.durable, disk.data))
    assert lost <= owed_on_disk(s), "the target differs from the source where no bit says so"


# --- nothing after a mark's commit point undoes it ---------------------------------------------
@pytest.mark.parametrize("full", [False, True])
async def test_a_mark_whose_tracking_reset_fails_after_the_commit_still_copies_its_chunks(
    made: Callable[[], Made], slow_period: None, monkeypatch: pytest.MonkeyPatch, full: bool
) -> None:
    s, disk, t = made()
    real = persist.save_atomic
    full_disk = {"on": True}

    def save_atomic(path: Path, *args: Any, **kwargs: Any) -> None:
        if full_disk["on"] and path.name.endswith(".tracking"):
            raise os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f"bitmap {path}")
        real(path, *args, **kwargs)

    monkeypatch.setattr(persist, "save_atomic", save_atomic)
    await s.start_update(full)  # committed: it must not come back as refused
    assert s.state is State.COPYING and s.transfer is not None
    full_disk["on"] = False
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    t.crash()
    assert differ(t.durable, disk.data) == []
    await s.start_update(False)  # the next update finds nothing lost either
    await s.wait()
    t.crash()
    assert differ(t.durable, disk.data) == []


async def test_a_full_update_whose_catch_up_mark_failed_marks_again_when_resumed(
    made: Callable[[], Made], slow_period: None
) -> None:
    """The catch-up mark's commit fails: the update must still be in its unprotected pass,
    else a resume ends it as consistent without the chunks changed during the full pass."""
    s, disk, t = made()
    layer = wire(s, disk)
    refused: list[bool] = []

    def persist_row(s: Session) -> None:
        if s.update is not None and s.update.protecting and not refused:
            refused.append(True)
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # the catch-up mark's commit

    s._persist_row = persist_row  # type: ignore[method-assign]
    t.go.clear()
    await s.start_update(True)
    await until(lambda: t.waiting == 1)  # the full pass is copying
    c = N - 1
    await layer.pwrite(c * G, b"c" * G)  # changed during it: the catch-up pass owes it
    t.go.set()
    await s.wait()
    assert s.state is State.FAILED and s.update is not None and not s.update.protecting
    await s.resume()
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    t.crash()
    assert differ(t.durable, disk.data) == [], "consistent, but a chunk changed during the pass is old"
