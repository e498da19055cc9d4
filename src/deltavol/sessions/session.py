"""One copy session: a source volume, a target, two bitmaps and at most one update.

This module is the session's state machine: its ``state`` (``states.State``), its update
and the update's ``phase`` (``states.Phase``, stored in ``records.UpdateRecord``), and the
operations that move them -- update (mark), pause, resume, cancel, the copy task's end
(unmark), failure and retries, shutdown. The work is done by its collaborators, each in a
module of its own with its design notes:

* ``tracker.Tracker`` -- the write-ahead tracking hook, the tracking file, group-commit
  rounds and the hot set;
* ``protector.Protector`` -- the copy-on-first-write hook and the save area (it uses only
  the tracker's public API);
* ``copier.Copier`` -- the target connection, the copy passes and the checkpoints;
* ``files.SessionFiles`` -- the files' life: create, load after a restart, set aside, delete;
* ``records`` -- the update record (versioned rows) and the retry policy.

Design notes
------------
* **Mark** (``_mark``): with the source flushed and its write gate closed (no change
  half-way through the stack), ``transfer |= tracking`` is saved atomically, then tracking
  is reset on disk. A crash between the two leaves the bits in both files: a superset,
  never a miss. The update's phase moves to ``PROTECTING`` in the commit. The reset
  carries the regions written since the last mark as hot into the new tracking file, so
  that a workload's first changes after the mark need no sync (``Tracker.reset_aside``). The
  new tracking file is written aside in a thread before the commit and put in place after
  it (``Tracker.reset_to``), the gate closed until then: no fsync on the event loop.
* **Give up a mark** (``_give_up_mark``): a copy-before-write whose target fails or does
  not answer within ``target_timeout`` costs the update its point in time, not the client
  its write: protection stops (``GIVEN_UP``), the session row records it before the write
  goes down, and the update goes on as of a new mark (``_remark``: what it still owes and
  what changed since its mark). The target's connections are reset then, so that a write
  it did not answer cannot land after the re-mark's copies, which go over a new
  connection. The residue: a request its server has already read cannot be recalled and
  may still land late (as after any NBD client gives up on a request); so may a local
  target's write already in a worker thread.
* **Unmark** (``_run``, ``_finish``): transfer empty -> flush target, make tracking
  durable, drop the save area, consistent as of the mark (``DONE``).
* **Commit points**: every step that changes the row writes it once (``_persist_row``),
  puts memory back if that fails, and runs what follows through ``_after_commit``, which
  never raises into a rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from deltavol.backend.gate import WriteGate
from deltavol.backend.hooks import Hook
from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.engine import Progress
from deltavol.copy.save_area import SaveArea
from deltavol.copy.targets import TARGET_TIMEOUT, CopyTarget
from deltavol.errors import (
    AlreadyCopying,
    DeltavolError,
    NotFound,
    NothingToResume,
    ShuttingDown,
    TargetClaimed,
    TargetError,
)
from deltavol.events import EventBus
from deltavol.sessions.copier import CHECKPOINT_SECONDS, Copier, looked_at, stop
from deltavol.sessions.files import SessionFiles
from deltavol.sessions.peers import fault
from deltavol.sessions.protector import ChunkLocks, Protector
from deltavol.sessions.records import RetryPolicy, UpdateRecord, now_iso
from deltavol.sessions.states import Phase, State, next_state
from deltavol.sessions.target_writes import TargetWrites
from deltavol.sessions.tracker import Tracker
from deltavol.store import fs
from deltavol.store.group_commit import GroupCommit
from deltavol.volumes import Volume

__all__ = ["CHECKPOINT_SECONDS", "ChunkLocks", "RetryPolicy", "Session", "UpdateRecord", "one_at_a_time"]

log = logging.getLogger("deltavol.session")

TRANSFER = persist.KIND_TRANSFER
_PROTECTING, _GIVEN_UP = Phase.PROTECTING, Phase.GIVEN_UP


_P = ParamSpec("_P")
_R = TypeVar("_R")


def one_at_a_time(
    op: Callable[Concatenate[Session, _P], Awaitable[_R]],
) -> Callable[Concatenate[Session, _P], Awaitable[_R]]:
    """An operation on a session (update, pause, resume, cancel, verify): it runs alone,
    under the session's operation lock, and is refused once the session is removed or shut
    down. See ``Session.operation``."""

    @functools.wraps(op)
    async def run(session: Session, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with session.operation():
            return await op(session, *args, **kwargs)

    return run


class Session:
    def __init__(
        self,
        *,
        name: str,
        source: Volume,
        target_spec: str,
        granularity: int,
        files: Path,
        save_dir: Path,
        gate: WriteGate,
        commit: GroupCommit,
        open_target: Any,
        persist_row: Any,
        max_rate: int | None = None,
        every: int | None = None,
        save_limit: int = 1 << 30,
        retry: RetryPolicy | None = None,
        hot_region: int = persist.HOT_REGION,
        hot_set: int = persist.HOT_SET,
        target_timeout: float = TARGET_TIMEOUT,
        events: EventBus | None = None,
    ) -> None:
        self.name = name
        self.events = events if events is not None else EventBus()
        self._state = State.NEW
        self.source = source
        self.target_spec = target_spec
        self.granularity = granularity
        self.max_rate = max_rate
        self.every = every
        self.consistent = False
        self.point_in_time: str | None = None
        self.last_error: str | None = None
        self.created_at = now_iso()
        self.update: UpdateRecord | None = None
        self.next_update_id = 1
        self.last_started = 0.0
        self._gate = gate
        self.target_writes = TargetWrites()  # see target_writes.py (a restore reads it)
        self._open_target = open_target
        self._persist_row = persist_row
        self._commit = commit
        self.transfer: Bitmap | None = None
        self.progress: Progress | None = None
        self._task: asyncio.Task[None] | None = None
        # what the last start added to tracking because the hot set's bits may be lost
        self.recopy: persist.Recopy | None = None
        self.tracker = Tracker(
            files / f"{name}.tracking", source.size, granularity, commit, hot_region, hot_set
        )
        self.copier = Copier(self)
        self.protector = Protector(self, self.tracker, self.copier, save_dir, save_limit)
        self.tracker.saves = self.protector.saves
        self.tracker.recent = gate.recent.regions  # (the source's gate: backend/recent.py)
        self.files = SessionFiles(self, files)
        self.retry = retry or RetryPolicy()
        self._retry_task: asyncio.Task[None] | None = None
        self.target_timeout = target_timeout  # what a client's write or a pause waits for the target
        self._ops = asyncio.Lock()  # see operation()
        self.closed = False  # shut down or removed: no operation any more
        self._verifying: asyncio.Future[None] | None = None  # a verify's comparison
        self._closing = 0  # removals and shutdowns waiting for the session (see closing())

    # --- what the collaborators hold ---------------------------------------------------------
    @property
    def _open_target(self) -> Callable[[Session], Awaitable[CopyTarget]]:
        """Opens a connection to the target whose writes ``target_writes`` sees first (of
        the opener set now: one that wraps what this returned does not recurse)."""
        raw, writes = self._open_raw, self.target_writes

        async def open_watched(s: Session) -> CopyTarget:
            target: CopyTarget = await raw(s)
            return writes.watch(target)

        return open_watched

    @_open_target.setter
    def _open_target(self, open_target: Callable[[Session], Awaitable[CopyTarget]]) -> None:
        self._open_raw = open_target

    @property
    def removed(self) -> bool:
        """Its row is deleted (``SessionManager.remove``): nothing may write it again, and a
        change still in its hooks must not touch its closed files."""
        return self.tracker.removed

    @removed.setter
    def removed(self, removed: bool) -> None:
        self.tracker.removed = removed

    @property
    def tracking(self) -> Bitmap:
        return self.tracker.tracking

    @tracking.setter
    def tracking(self, tracking: Bitmap) -> None:
        self.tracker.tracking = tracking

    @property
    def tracking_file(self) -> persist.TrackingFile | None:
        return self.tracker.file

    @property
    def save(self) -> SaveArea | None:
        return self.protector.save

    @property
    def save_limit(self) -> int:
        return self.protector.save_limit

    @save_limit.setter
    def save_limit(self, limit: int) -> None:
        self.protector.save_limit = limit

    @property
    def locks(self) -> ChunkLocks:
        return self.protector.locks

    @property
    def protect_hook(self) -> Hook:
        return self.protector.hook

    @property
    def target(self) -> CopyTarget | None:
        return self.copier.target

    @target.setter
    def target(self, target: CopyTarget | None) -> None:
        self.copier.target = target

    def track(self, offset: int, length: int) -> list[asyncio.Future[None]]:
        return self.tracker.track(offset, length)

    def track_now(self, offset: int, length: int) -> bool:
        return self.tracker.track_now(offset, length)

    def tracked(self, offset: int, length: int) -> bool:
        return self.tracker.tracked(offset, length)

    async def protect(self, offset: int, length: int) -> None:
        await self.protector.protect(offset, length)

    def protected(self, offset: int, length: int) -> bool:
        return self.protector.protected(offset, length)

    async def ensure_target(self) -> CopyTarget:
        return await self.copier.ensure_target()

    def create_files(self) -> None:
        self.files.create()

    def load_files(self) -> None:
        self.files.load()

    def set_aside_files(self, why: str) -> None:
        self.files.set_aside(why)

    def delete_files(self) -> None:
        self.files.delete()

    # --- operations ------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        """Every change of state, rollbacks included, is an event."""
        if state is not self._state:
            self._state = state
            self.events.publish("session.state", name=self.name, state=state.value)

    @asynccontextmanager
    async def operation(self) -> AsyncIterator[None]:
        """Hold the session for one operation's own steps: operations on one session are
        serialized. Every operation takes it -- the user's, the scheduler's, the retry
        policy's, ``remove`` and ``shutdown`` -- and checks the state only once it holds it,
        so no operation acts on a state that another one is half-way through changing: an
        update's mark awaits the save area and the write gate, and until it has committed
        and started its copy task, no pause, cancel, second update or removal comes between.
        The copy task itself runs outside the lock; pause, cancel, remove and shutdown stop
        it while holding it.
        """
        async with self._ops:
            if self.removed:
                raise NotFound(kind="session", name=self.name)
            if self.closed:
                raise ShuttingDown(name=self.name)
            yield

    @property
    def operating(self) -> bool:
        """True while an operation holds the session (the scheduler skips it then)."""
        return self._ops.locked()

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Around removal and shutdown, which do not wait for a verify: a running one is
        interrupted (it fails), and one that has not begun its comparison yet does not."""
        self._closing += 1
        try:
            if self._verifying is not None:
                self._verifying.cancel()
            yield
        finally:
            self._closing -= 1

    @property
    def verify_interrupted(self) -> bool:
        return self._closing > 0

    def _save_row(self) -> None:
        self._sync_progress()
        self._persist_row(self)

    def _sync_progress(self) -> None:
        if self.update is not None and self.progress is not None:
            self.update.bytes_total = self.progress.bytes_total
            self.update.bytes_done = self.progress.bytes_done
            self.update.bytes_sent = self.progress.bytes_sent

    def _give_up_mark(self, update: UpdateRecord, why: str) -> None:
        """Copy-before-write could not make a chunk's old contents safe: give up the update's
        point in time rather than the client's write (DESIGN: re-mark). Protection stops (a
        chunk changed from now on is not saved), and the session row says so durably before
        the write goes down, so that resume, a retry or a restart re-marks (``_remark``)
        instead of finishing a mark whose old contents are gone. Tracking goes on: what
        changes from now on is copied as of the new mark.
        """
        if update is not self.update or update.phase is not _PROTECTING or self.removed:
            return  # given up already, or the session is gone
        before = (update.remark, self.last_error)
        update.move("give_up", self.name)
        update.remark = why
        self.last_error = f"{why}; the update gives up its point in time and will copy as of a new mark"
        try:
            self._save_row()
        except BaseException:  # not durable: the write must not go down (it fails instead)
            # the mark holds, and with it its target and the bits left to saves
            update.put_back(_PROTECTING, self.name)
            update.remark, self.last_error = before
            raise
        if not self.target_writes.shut:
            self.copier.abort_target()
        # else a restore claimed the update before any write to its target began: there is
        # nothing to reset, and the connection is the restore's (target_writes.py)
        save = self.save
        # bits left to saves that will not happen now: the next change of the chunk writes its bit again
        self.tracker.saves_void(lambda c: save is not None and c in save)
        log.error("session %s: %s", self.name, self.last_error)

    async def _remark(self) -> None:
        """Take a new mark for an update whose mark was given up: what it still owes, what no
        checkpoint recorded as copied, and what changed since its mark are copied as of now.
        Protection starts again with the new mark's save area, in the mark's commit."""
        update, transfer = self.update, self.transfer
        assert update is not None and transfer is not None and update.remark is not None
        await self.copier.drain()  # the given-up target's writes land before the new mark's copies
        if self.copier.durable is not None:
            transfer.or_(self.copier.durable)  # copied, maybe not flushed: owed again
        marked_at, catchup = update.marked_at, update.catchup_bytes
        try:
            await self._mark()
        except BaseException:
            update.put_back(_GIVEN_UP, self.name)  # still given up (the mark put it back)
            update.marked_at = marked_at
            # the failed mark may have voided the save records on disk (a new header), and
            # with them what made the bits of saved chunks durable: they are owed now, so
            # that the transfer file keeps them whatever a checkpoint writes (no point in
            # time is promised: copied early, they are copied again if they change)
            owed = transfer.bytes_set()
            transfer.or_(self.tracking)
            if self.progress is not None:
                self.progress.bytes_total += transfer.bytes_set() - owed
            raise
        update.catchup_bytes = catchup  # the new mark is no catch-up pass
        self.last_error = None  # what it said is done: ``remark`` keeps why
        log.info("session %s: update %d re-marked at %s", self.name, update.id, update.marked_at)

    # --- updates -------------------------------------------------------------------------
    @property
    def image_now(self) -> bool:
        """The target is, right now, the source as of ``point_in_time``: the session is
        consistent and no update under way has begun writing the target (``consistent``
        alone stays true through an incremental update, which keeps the point in time to
        go back to until it ends; a restart cannot know whether the update wrote)."""
        if not self.consistent:
            return False
        update = self.update
        return update is None or not update.running or self.target_writes.untouched

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    @one_at_a_time
    async def start_update(self, full: bool, max_rate: int | None = None) -> dict[str, Any]:
        """Begin an update; returns once it is committed (marked, or for --full started)."""
        full = full or self.state is State.NEW or self._needs_full()
        if self.state is State.RESTORING:  # (restore.py) its task is no copy: say what it is
            next_state(self.name, self.state, "update")
        if self.busy:
            raise AlreadyCopying(name=self.name)
        new_state = next_state(self.name, self.state, "update")
        await self.copier.drain()  # whatever the state: no write of an earlier copy lands after the mark
        if self.state in (State.NEW, State.IDLE):
            # nothing uses the target between updates (no transfer: no copy-before-write), and
            # a connection kept since the last update or verify may have died with its server
            await self.copier.drop_target()
        before = (self.state, self.update, self.transfer, self.progress, self.consistent)
        remark = self.update.remark if self.update is not None else None
        self._cancel_retry()
        self.retry.attempts = 0
        # built aside, it becomes ``self.update`` only inside the closed write gate: a write
        # waiting in copy-before-write for the unfinished update must give up that update's
        # mark, not find a new one that is not marked yet (and may never be)
        update = UpdateRecord(
            id=self.next_update_id,
            kind="full" if full else "incremental",
            started_at=now_iso(),
            max_rate=max_rate if max_rate is not None else self.max_rate,
        )
        self.next_update_id += 1
        self.last_started = time.monotonic()
        if full or self.state is State.NEW:
            self.target_writes.started(untouched=False)
        elif self.state is State.IDLE:  # nothing writes the target before this mark
            self.target_writes.started(untouched=self.consistent and self.point_in_time is not None)
        # (an update that marks again, paused or failed, keeps what the unfinished one wrote)
        try:
            if full:
                await self._start_full(new_state, update)
            else:
                self.state = new_state  # meanwhile, another update or a resume is refused
                await self._mark((update, new_state))
        except BaseException:
            self.state, self.update, self.transfer, self.progress, self.consistent = before
            if self.update is not None and self.update.remark != remark:
                # a write gave up the unfinished update's mark meanwhile, and its row says
                # so with the state of this start: put the state back in the row too
                with contextlib.suppress(DeltavolError, OSError):
                    self._persist_row(self)
            raise
        assert self.update is not None
        self.events.publish(
            "update.marked",
            name=self.name,
            id=self.update.id,
            type=self.update.kind,
            marked_at=self.update.marked_at,
            bytes_total=self.progress.bytes_total if self.progress else 0,
        )
        log.info(
            "session %s: %s update %d started (%d bytes to copy)",
            self.name,
            self.update.kind,
            self.update.id,
            self.progress.bytes_total if self.progress else 0,
        )
        self._spawn()
        return self.status()

    def _needs_full(self) -> bool:
        return not self.consistent and self.transfer is None and self.point_in_time is None

    async def _start_full(self, new_state: State, update: UpdateRecord | None = None) -> None:
        """Commit 'inconsistent, copying everything' before the first byte goes out;
        ``update``, a new one, replaces the unfinished one under the closed gate."""
        update = update if update is not None else self.update
        assert update is not None
        transfer = Bitmap(self.source.size, self.granularity)
        transfer.set_all()
        await self._flush_source()
        async with self._gate.closed(), self.copier.checkpointing:
            await self._flush_source()
            await self.files.transfer_gone()  # the last update's file, removed in a thread
            persist.save_atomic(self.files.transfer_path, transfer, update.id, TRANSFER)
            phase = update.phase
            update.move("start_full", self.name)
            last_error, self.update, self.last_error = self.last_error, update, None
            self.transfer = transfer
            self.consistent = False
            self.state = new_state
            self.progress = Progress(bytes_total=self.transfer_bytes())
            try:
                self._save_row()  # the commit point: nothing below may raise (see _after_commit)
            except BaseException:
                update.put_back(phase, self.name)
                self.last_error = last_error  # the rest start_update puts back
                raise
            self.copier.durable = transfer.copy()
            self._after_commit("dropping the save area", self.protector.drop_save_area)
            await self._after_commit_wait("resetting tracking", self._reset_tracking)

    async def _mark(self, new: tuple[UpdateRecord, State] | None = None) -> None:
        """tracking -> transfer (OR-ed into any unfinished transfer), fresh tracking.

        Order for crash safety: the source is flushed, then the new transfer file and a new
        save area are durable before the session row commits the mark; tracking is reset
        only after that. An unfinished transfer counts with what its last checkpoint still
        owes: chunks copied since were never flushed on the target.

        ``new`` is a new update (and its state) that replaces the unfinished one at the
        commit, under the closed gate; without it, the update marks (again).
        """
        update = new[0] if new is not None else self.update
        assert update is not None
        if self.save is None:  # no update writes to the save area: write its space ahead,
            # beside the flush before the gate closes (both in threads; create waits for both)
            await asyncio.gather(self.protector.prepare_save_area(), self._flush_source())
        else:
            await self._flush_source()
        async with self._gate.closed(), self.copier.checkpointing:
            # (the flush inside the gate runs beside the files' syncs: _mark_syncs)
            # a new bitmap: if this mark fails, start_update puts back the unfinished
            # update's transfer, which must not have gained the chunks changed since its mark
            transfer = Bitmap(self.source.size, self.granularity)
            for owed in (self.transfer, self.copier.durable):
                if owed is not None:
                    transfer.or_(owed)
            before = self.transfer_bytes(transfer)
            transfer.or_(self.tracking)
            save = self.protector.save_area(update.id)
            # the new tracking file is written beside the old one meanwhile, and replaces
            # it only once the mark has committed (see _mark_syncs)
            aside = self.tracker.reset_aside(self.next_update_id)
            await self._mark_syncs(transfer, update.id, save, aside)
            kept = self.update, self.state, self.progress, self.last_error
            progress = self.progress if new is None else None
            was = (update.marked_at, update.phase, update.catchup_bytes)
            total_was = progress.bytes_total if progress is not None else 0
            try:
                if new is not None:
                    self.update, self.state, self.last_error = update, new[1], None
                update.marked_at = now_iso()
                update.move("mark", self.name)
                total = self.transfer_bytes(transfer)
                if progress is None:
                    self.progress = Progress(bytes_total=total)
                else:  # the catch-up pass of a full update
                    update.catchup_bytes = total - before
                    progress.bytes_total = progress.bytes_done + total
                fault("mark-before-commit")  # (tests: the new tracking file written aside)
                self._save_row()  # the commit point: nothing below may raise (see _after_commit)
            except BaseException:
                # the unfinished update keeps its save area: its records are void on disk
                # now, but so is it (the transfer file is this update's): a restart
                # ends it, and until then its records in memory still protect its copy
                save.close()
                self._drop_aside(aside)
                update.marked_at, update.catchup_bytes = was[0], was[2]
                update.put_back(was[1], self.name)
                if progress is not None:
                    progress.bytes_total = total_was
                self.update, self.state, self.progress, self.last_error = kept
                raise
            self._after_commit("dropping the old save area", self.protector.drop_save_area)
            self.protector.save, self.transfer, self.protector.records_void = save, transfer, False
            self.copier.durable = transfer.copy()
            fault("mark-after-commit")  # (tests: the old tracking file still in place)
            reset = functools.partial(self.tracker.reset_to, aside)
            await self._after_commit_wait("resetting tracking", reset)

    async def _mark_syncs(
        self, transfer: Bitmap, update_id: int, save: SaveArea, aside: persist.Aside
    ) -> None:
        """What a mark's commit depends on, made durable side by side, each sync in a
        thread of its own (none on the event loop): the source flushed (what is copied
        as of the mark is durable there), the new transfer file, and the save area's new
        header (``save`` is created).

        One order stays: when an update under way owns the save area (its records
        protect, ``PROTECTING`` or ``GIVEN_UP``), the new header voids its records. A
        restart finding that header must find this mark's transfer file in place
        (``SessionFiles._later_mark``), and the records' tracking bits durable: so the
        transfer file first, then the tracking file synced, then the header. With no
        such update nothing reads the old area after a crash (the start-up removes it),
        and the header goes beside the rest.

        Beside them too, the mark's new tracking file (empty, with the regions it carries
        as hot) is written and fsynced as ``aside``: under another name, so that a crash
        before the commit leaves the old tracking file in place (its bits are not in any
        committed transfer file yet). It replaces the old one after the commit
        (``Tracker.reset_to``). If it fails here, the reset writes it again then.

        Every thread is over before this returns or raises (a thread cannot be stopped:
        a mark that gave up must not leave a file being written under the next one); a
        failure raises the first error, with the save area closed."""
        current = self.update
        voids = self.save is not None or (current is not None and current.phase in (_PROTECTING, _GIVEN_UP))

        filing: set[str] = set()  # the jobs past their waits: a cancel waits for their files
        tf = self.tracking_file
        assert tf is not None

        async def transfer_file(*after: Awaitable[None]) -> None:
            for job in after:  # shielded: a cancel of this job leaves them running
                await asyncio.shield(job)
            await self.files.transfer_gone()  # the last update's file, removed in a thread
            filing.add("transfer")
            await fs.to_thread(persist.save_atomic, self.files.transfer_path, transfer, update_id, TRANSFER)

        async def header(*after: Awaitable[None]) -> None:
            for job in after:
                await asyncio.shield(job)
            filing.add("header")
            if self.save is not None:
                # the new header voids the unfinished update's records, and with them what
                # made the bits of its saved chunks durable: if this mark does not commit,
                # that update goes on and only the tracking file can keep those bits
                assert self.tracking_file is not None
                await self.tracking_file.durable()
                self.protector.records_void = True  # until this mark commits, or for good if it fails
            await fs.to_thread(save.create)

        flushing = asyncio.ensure_future(self._flush_source())
        # replacing the transfer file of an update under way, and voiding its records, wait
        # for the flush: a failed flush must leave that update as it was (a kill -9 then
        # finishes its own mark; its transfer file replaced, it would give its mark up)
        writing = asyncio.ensure_future(transfer_file(flushing) if voids else transfer_file())
        creating = asyncio.ensure_future(header(writing) if voids else header())
        setting_aside = asyncio.ensure_future(self._write_aside(tf, aside))
        jobs = [flushing, writing, creating, setting_aside]
        for j in jobs:  # each failure is looked at below, once all are over; and even if the
            j.add_done_callback(looked_at)  # process ends first, with one still running
        cancelled = False
        while not all(j.done() for j in jobs):
            try:
                await asyncio.wait(jobs)  # unlike gather, a cancel does not cancel them
            except asyncio.CancelledError:
                cancelled = True
                # a cancel waits only for the threads that write files (no file may be
                # written under the next mark); a flush writes none: a slow source disk
                # must not hold a pause, cancel or stop, nor the gate, for as long as it takes
                if "transfer" not in filing:
                    writing.cancel()
                if "header" not in filing:
                    creating.cancel()
                jobs = [writing, creating, setting_aside]  # (a thread from its start on)
        failed = [e for j in jobs if not j.cancelled() and (e := j.exception()) is not None]
        if cancelled or failed or any(j.cancelled() for j in jobs):
            if not creating.cancelled() and creating.exception() is None:
                save.close()
            self._drop_aside(aside)
            if failed and not cancelled:
                raise failed[0]
            raise asyncio.CancelledError

    async def _write_aside(self, tf: persist.TrackingFile, aside: persist.Aside) -> None:
        """A mark's new tracking file, written aside in a thread (see ``_mark_syncs``); a
        failure fails no mark: the reset after the commit writes it again."""
        try:
            await fs.to_thread(tf.write_aside, aside)
        except DeltavolError as exc:
            log.warning("session %s: new tracking file not written ahead: %s", self.name, exc.message)

    def _drop_aside(self, aside: persist.Aside) -> None:
        """A mark that does not commit: its new tracking file goes (the old one stays)."""
        if self.tracking_file is not None:
            self.tracking_file.drop_aside(aside)

    async def _flush_source(self) -> None:
        """What a mark copies must be durable on the source: a change acknowledged but not
        flushed may be lost by a power loss, and copied it would stay on the target with
        no bit left to say so. A mark flushes before the write gate closes (most of the
        dirty data, while writes go on) and again inside it (what came meanwhile)."""
        await self.source.backend.flush()

    def _after_commit(self, what: str, step: Any) -> None:
        """A step after a commit point must not undo it (start_update would roll back in
        memory a mark the row has). Each leaves a superset on disk if it fails: old bits in
        the tracking file (all in the transfer now), a save area file no update owns."""
        try:
            step()
        except (DeltavolError, OSError) as exc:
            log.warning("session %s: %s failed: %s", self.name, what, exc)

    async def _after_commit_wait(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """``_after_commit`` for a step that awaits threads (a file replaced, its directory
        synced). It runs to its end whatever cancels the caller meanwhile (a pause or a stop
        cancelling the copy task in a re-mark): the caller must not roll back a commit whose
        steps are half done. A cancel that came is delivered at the caller's next await
        that suspends, after this returns: the callers have none before their rollbacks
        are behind them (the closed gate's and the lock's exits do not suspend)."""
        job = asyncio.ensure_future(step())
        task = asyncio.current_task()
        cancelled = 0
        while not job.done():
            try:
                await asyncio.wait([job])  # unlike awaiting it, a cancel does not cancel it
            except asyncio.CancelledError:
                if task is not None:
                    task.uncancel()
                cancelled += 1
        if cancelled and task is not None:
            task.cancel()  # at the next await
        if job.cancelled():
            log.warning("session %s: %s was cancelled", self.name, what)
            return
        exc = job.exception()
        if isinstance(exc, DeltavolError | OSError):
            log.warning("session %s: %s failed: %s", self.name, what, exc)
        elif exc is not None:
            raise exc

    def _rewrite_tracking(self, tracking: Bitmap | None = None, carry: bool = False) -> None:
        """Replace the tracking file durably with the bitmap in memory, or with ``tracking``
        that becomes it once the file holds it (the write gate is closed, or nothing writes
        yet): every bit set is durable now (see ``Tracker.rewrite``). With ``carry``, the
        regions the source wrote lately are hot in it (``backend/recent.py``)."""
        self.tracker.rewrite(self.next_update_id, tracking, carry)

    async def _reset_tracking(self) -> None:
        """Empty tracking and replace its file durably, the regions written since the last
        mark carried as hot (the write gate is closed; see ``Tracker.reset_to``): the file
        written, renamed and its directory synced in threads."""
        await self.tracker.reset_to(self.tracker.reset_aside(self.next_update_id))

    async def _tracking_durable(self) -> None:
        """Make every bit set durable in the tracking file (the write gate is closed)."""
        await self.tracker.make_durable(self.next_update_id)

    def transfer_bytes(self, bitmap: Bitmap | None = None) -> int:
        bitmap = bitmap if bitmap is not None else self.transfer
        return 0 if bitmap is None else bitmap.bytes_set()

    def _spawn(self) -> None:
        if self.busy:  # never two copy tasks: each would stop only as far as it is known
            raise AlreadyCopying(name=self.name)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"session-{self.name}")

    async def _run(self) -> None:
        assert self.update is not None and self.transfer is not None
        checkpointer = asyncio.get_running_loop().create_task(self.copier.checkpoint_loop())
        failure: tuple[str, bool] | None = None
        try:
            if self.copier.flush_failed:
                await self.copier.drop_target()  # a new connection: see _flush
            target = await self.copier.ensure_target()
            if self.progress is None:
                self.progress = Progress(bytes_total=self.transfer_bytes())
            self.progress.bytes_done = self.progress.bytes_total - self.transfer_bytes()
            while True:
                if self.update.phase is _GIVEN_UP:
                    await self._remark()
                    # the give-up dropped the connection (``_abort_target``): a new one,
                    # once the mark has voided what a checkpoint of the old one could say
                    target = await self.copier.ensure_target()
                elif self.update.phase is not _PROTECTING:
                    await self.copier.copy_pass(target)
                    # the catch-up mark starts from the durable transfer: make the pass's
                    # chunks durable first, or it would copy them all again
                    await self.copier.checkpoint()
                    await self._mark()  # the catch-up pass of a full update
                try:
                    await self.copier.copy_pass(target)
                    await self.copier.flush(target)
                except TargetError:
                    if self.target is target or self.update.phase is not _GIVEN_UP:
                        raise
                    continue  # a give-up reset this connection under the copy: re-mark
                async with self._gate.closed(), self.copier.checkpointing:
                    if self.update.phase is not _PROTECTING:
                        continue  # copy-before-write gave the mark up meanwhile
                    # the save area goes: the bits its records made durable must be in the file
                    await self._tracking_durable()
                    # and what the copy read from its records must have been what they hold
                    if not await self.copier.records_durable():
                        continue  # they may be lost: the mark is given up, and re-marks
                    # no checkpoint runs (the lock is held): stopped now, the task ends in the
                    # turn that makes the session idle, not a turn later
                    await stop(checkpointer)
                    self._finish()
                break
        except asyncio.CancelledError:
            raise
        except TargetClaimed:
            # a restore claimed the update (restore.py) and is stopping this task: a request
            # that resumed in the same step as the claim met it; no failure, no retry
            log.info("session %s: update %d stopped for a restore", self.name, self.update.id)
        except TargetError as exc:
            failure = exc.message, True
        except (DeltavolError, OSError) as exc:
            failure = exc.message if isinstance(exc, DeltavolError) else str(exc), False
        except Exception as exc:  # a bug: the session fails, the server stays up
            log.exception("session %s: update crashed", self.name)
            failure = f"internal error: {exc!r}", False
        finally:
            await stop(checkpointer)  # its write must not outlive the update's task
        if failure is not None:
            await self._fail(*failure)

    def _finish(self) -> None:
        assert self.update is not None
        new_state = next_state(self.name, self.state, "done")  # before anything changes
        self._sync_progress()
        was = (
            self.transfer,
            self.copier.durable,
            self.consistent,
            self.retry.attempts,
            self.point_in_time,
            self.update.finished_at,
            self.state,
        )
        self.update.move("finish", self.name)
        self.transfer = None
        self.copier.durable = None
        self.consistent = True
        self.retry.attempts = 0
        self.point_in_time = self.update.marked_at
        self.update.finished_at = now_iso()
        self.state = new_state
        try:
            self._persist_row(self)  # the commit point; the files below are garbage after it
        except BaseException:
            # the row still has the update: so must memory (it protects and owes on), and
            # the update fails; resumed, it finishes again
            (
                self.transfer,
                self.copier.durable,
                self.consistent,
                self.retry.attempts,
                self.point_in_time,
                self.update.finished_at,
                self.state,
            ) = was
            self.update.put_back(_PROTECTING, self.name)
            raise
        self._after_commit("dropping the save area", self.protector.drop_save_area)
        self._after_commit("removing the transfer file", self.files.unlink_transfer)
        self.events.publish(
            "update.finished",
            name=self.name,
            id=self.update.id,
            type=self.update.kind,
            point_in_time=self.point_in_time,
            bytes_sent=self.update.bytes_sent,
            cofw_saved_bytes=self.update.cofw_saved_bytes,
        )
        log.info(
            "session %s: update %d done, consistent as of %s (%d bytes sent)",
            self.name,
            self.update.id,
            self.point_in_time,
            self.update.bytes_sent,
        )

    async def _fail(self, why: str, retryable: bool) -> None:
        self.last_error = why
        self.state = next_state(self.name, self.state, "fail")
        self.copier.forget_unflushed()  # the target may have lost what it did not flush
        try:
            self._save_row()  # the transfer file keeps its last durable checkpoint
        except DeltavolError as exc:
            log.error("session %s: cannot record the failure: %s", self.name, exc.message)
        log.error("session %s: update failed: %s", self.name, why)
        self.events.publish(
            "update.failed", name=self.name, id=self.update.id if self.update else None, error=why
        )
        await self.copier.drop_target()
        if retryable and self.retry.attempts < self.retry.limit:
            delay = self.retry.delay()
            self.retry.attempts += 1
            self.retry.next_at = time.time() + delay
            self.events.publish(
                "update.retry", name=self.name, attempt=self.retry.attempts, at_time=self.retry.next_at
            )
            log.info(
                "session %s: retry %d of %d in %.0fs", self.name, self.retry.attempts, self.retry.limit, delay
            )
            self._retry_task = asyncio.get_running_loop().create_task(self._retry_later(delay))

    async def _retry_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.retry.next_at = None
        async with self._ops:  # an operation, as a user's resume
            if self.closed or self.busy or self.state is not State.FAILED or self.transfer is None:
                return
            log.info("session %s: retrying (attempt %d)", self.name, self.retry.attempts)
            try:
                self._resume()
            except Exception as exc:  # nobody awaits this task: the session stays failed, resumable
                why = exc.message if isinstance(exc, DeltavolError) else repr(exc)
                log.error("session %s: retry failed: %s", self.name, why)
                self.last_error = f"retry failed: {why}"

    async def _stop_task(self) -> None:
        self._cancel_retry()
        if await self._stop_copy():
            self._cancel_retry()  # one its failure may have scheduled before it stopped

    async def _stop_copy(self) -> bool:
        """Stop the copy task, if one runs, and wait until it is over; a retry pending is
        left as it is (a restore that takes the update back cancels it only once it has).
        True if a task was stopped."""
        task, self._task = self._task, None
        if task is None or task.done():
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    @one_at_a_time
    async def pause(self) -> dict[str, Any]:
        self.state = next_state(self.name, self.state, "pause")
        await self._stop_task()
        await self.copier.drain()  # writes of the cancelled copy: see Copier.drain
        if await self.copier.target_answers():
            await self.copier.try_checkpoint()
        # paused must be durable even when that checkpoint failed or was skipped (its row
        # is not written then): with the row still copying, the next start would resume it
        self._save_row()
        return self.status()

    @one_at_a_time
    async def resume(self) -> dict[str, Any]:
        if self.state is State.COPYING:
            if self.busy or self.transfer is None:  # already going (the retry policy got there first)
                return self.status()
            # copying with no task: a step between the state and the spawn failed
            log.warning("session %s: copying with no copy task: starting it again", self.name)
            self._cancel_retry()
            async with self._gate.closed():  # as below: once a copy-before-write on it is over
                await self.copier.drop_target()
            last_error, self.last_error = self.last_error, None
            try:
                self._save_row()
            except BaseException:  # not committed: what went wrong still stands
                self.last_error = last_error
                raise
            self._spawn()
            return self.status()
        next_state(self.name, self.state, "resume")
        if self.transfer is None:
            raise NothingToResume(name=self.name)
        self._cancel_retry()
        self.retry.attempts = 0
        # reconnect: the old connection may be dead; once a copy-before-write on it is over
        # (it would take a connection dropped under it for a failed copy: the mark's end)
        async with self._gate.closed():
            await self.copier.drop_target()
        self._resume()
        return self.status()

    def _resume(self) -> None:
        before = self.state, self.last_error
        self.state = next_state(self.name, self.state, "resume")
        self.last_error = None
        try:
            self._save_row()
        except BaseException:  # not committed: still paused or failed, so resume can retry
            self.state, self.last_error = before
            raise
        self._spawn()

    def _cancel_retry(self) -> None:
        task, self._retry_task = self._retry_task, None
        if task is not None:
            task.cancel()
        self.retry.next_at = None

    @one_at_a_time
    async def cancel(self) -> dict[str, Any]:
        new_state = next_state(self.name, self.state, "cancel")
        await self._stop_task()
        if await self.copier.target_answers():  # what a flush covers now need not be copied again
            await self.copier.try_checkpoint()
        async with self._gate.closed(), self.copier.checkpointing:
            if self.transfer is not None:
                # back into tracking: what the update still owes, and what its last
                # checkpoint does (copied since, never flushed: the target may lose it)
                # (into a copy: memory has the bits only once the file does, or a
                # later change of such a chunk would be taken for tracked, in no file)
                self.copier.forget_unflushed()
                merged = self.tracking.copy()
                merged.or_(self.transfer)
                self._rewrite_tracking(merged, carry=True)
            was = self.transfer, self.copier.durable, self.consistent, self.state
            update = self.update if self.update is not None and self.update.running else None
            phase = update.phase if update is not None else None
            if update is not None:
                update.move("cancel", self.name)
            self.transfer = None
            self.copier.durable = None
            self.consistent = False
            self.state = new_state
            try:
                self._persist_row(self)  # the commit point; the files below are garbage after it
            except BaseException:
                self.transfer, self.copier.durable, self.consistent, self.state = was
                if update is not None and phase is not None:
                    update.put_back(phase, self.name)
                raise
            self._after_commit("dropping the save area", self.protector.drop_save_area)
            self._after_commit("removing the transfer file", self.files.unlink_transfer)
        await self.copier.drop_target()
        return self.status()

    async def wait(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def shutdown(self) -> None:
        """Server stopping: stop copying but keep every state for the next start. An
        operation under way ends first (a verify is interrupted); none runs after."""
        with self.closing():
            async with self._ops:
                if self.closed:
                    return
                self.closed = True
                await self._shutdown()

    async def note_error(self, why: str) -> None:
        """An error nobody awaits (a scheduled update's) goes to ``last_error``; into the
        row too when no update runs (a running one commits its own row)."""
        async with self._ops:
            if self.closed:
                return
            self.last_error = why
            if not self.busy and self.state in (State.NEW, State.IDLE):
                try:
                    self._persist_row(self)
                except DeltavolError as exc:
                    log.warning("session %s: cannot record %r: %s", self.name, why, exc.message)

    async def _shutdown(self) -> None:
        await self._stop_task()
        # the writes in flight finish first (a copy-before-write with the target still
        # open, a save with room), and none passes after: one would find the save area
        # sealed and open the target again for a copy-before-write, or give up the mark
        await self._gate.shut()
        if self.state is State.COPYING and await self.copier.target_answers():
            await self.copier.try_checkpoint()
        await self.copier.drop_target()
        await self.files.transfer_gone()  # a file left would be an orphan at the next start
        if self.save is not None:  # a clean stop seals the records: a reboot keeps the mark
            await self.save.seal()
        if self.tracking_file is not None:
            try:  # a clean stop leaves no hot region: a reboot then costs no extra copy
                await self.tracking_file.settle(everything=True)
            except DeltavolError as exc:
                log.warning("session %s: %s", self.name, exc.message)
            self.tracking_file.close()

    # --- verify ----------------------------------------------------------------------------
    # --- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        update = None
        if self.update is not None:
            self._sync_progress()
            u = self.update.status()
            running = self.busy and self.progress is not None
            u["rate"] = round(self.progress.rate) if running and self.progress else 0
            eta = self.progress.eta if running and self.progress else None
            u["eta"] = None if eta is None else round(eta, 1)
            update = u
        return {
            "name": self.name,
            "source": self.source.name,
            "target": self.target_spec,
            "granularity": self.granularity,
            "state": self.state.value,
            "consistent": self.image_now,
            "point_in_time": self.point_in_time,
            "tracked_bytes": self.transfer_bytes(self.tracking),
            "recopy_bytes": self.recopy.bytes if self.recopy else 0,
            "full_reason": self._full_reason(),
            "update": update,
            "last_error": self.last_error,
            "retry": self.retry.status(),
            "max_rate": self.max_rate,
            "every": self.every,
        }

    def _full_reason(self) -> str | None:
        """Why chunks nobody wrote are copied again (``recopy_bytes``), or would be
        after a power loss beyond the hot set now."""
        tf = self.tracking_file
        if tf is not None and tf.lost is not None:
            return tf.lost
        return self.recopy.reason if self.recopy else None
