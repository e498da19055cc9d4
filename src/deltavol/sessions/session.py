"""One copy session: a source volume, a target, two bitmaps and at most one update.

Design notes
------------
* **Tracking** (``track``, a hook under every change to the source): the chunk's bit is
  set in memory and made durable in the tracking file before the change goes down. A
  change to a chunk whose bit is set but not yet durable waits for that same fsync.
* **Mark** (``_mark``): with the source flushed and its write gate closed (no change
  half-way through the stack), ``transfer |= tracking`` is saved atomically, then tracking
  is reset on disk. A crash between the two leaves the bits in both files: a superset,
  never a miss.
* **A save implies its tracking bit**: a change that copy-on-first-write saves first has
  its chunk's bit made durable by the save record, not by a tracking fsync of its own
  (one fsync per such write, not two competing for the disk). Reopening ORs the save
  area's chunks into tracking, and the save area is dropped only after a mark or a
  tracking fsync has made those bits durable in a bitmap file.
* **Protect** (``protect``, a hook above tracking): while an incremental pass runs, the
  first change to a block (4 KiB) of a chunk still in transfer saves the block's old
  contents durably to the save area first; if the save area is full, the chunk's old
  contents are copied to the target at once (copy-before-write) and its transfer bit
  cleared. A target that fails that, or does not answer within ``target_timeout``, costs
  the update its point in time, not the client its write (``_give_up_mark``): protection
  stops, the session row records it before the write goes down, and the update goes on
  as of a new mark (``_remark``: what it still owes and what changed since its mark).
  The target's connections are reset then, so that a write it did not answer cannot
  land after the re-mark's copies, which go over a new connection. The residue: a
  request its server has already read cannot be recalled and may still land late (as
  after any NBD client gives up on a request); so may a local target's write already
  in a worker thread.
* **Copy** (``_copy_run``): under the chunks' locks, read the source and lay the saved
  blocks over it, write it to the target zero-aware, clear the bits. A full pass reads by
  extents, writes holes as zeroes, and has no protection: what changes under it is
  tracked and copied by the catch-up incremental pass that ends every full update.
* **Checkpoint** (``_checkpoint``): a chunk is done for good only once a target flush
  sent after its copy completed has succeeded: the transfer is snapshotted, the target
  flushed, the snapshot written. Until then the chunk stays owed (and protected), and a
  failed target, a new connection, a re-mark or a cancel owe it again.
* **Unmark**: transfer empty -> flush target, drop the save area, consistent as of the mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from deltavol.backend.gate import WriteGate
from deltavol.backend.hooks import Hook
from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.engine import (
    Progress,
    requests,
    run_pipeline,
    split_at_holes,
    write_piece,
)
from deltavol.copy.save_area import RECORD, SaveArea
from deltavol.copy.targets import TARGET_TIMEOUT, CopyTarget
from deltavol.copy.throttle import Throttle
from deltavol.errors import (
    AlreadyCopying,
    CorruptFile,
    DeltavolError,
    NotFound,
    NothingToResume,
    ShuttingDown,
    TargetError,
    os_error,
)
from deltavol.events import EventBus
from deltavol.nbd.constants import STATE_HOLE
from deltavol.sessions.states import State, next_state
from deltavol.store import fs
from deltavol.store.fs import sync_dir
from deltavol.store.group_commit import GroupCommit
from deltavol.volumes import Volume

log = logging.getLogger("deltavol.session")

# In ``Session._unsynced``: the bit becomes durable with the chunk's save record
_BY_SAVE: Any = object()

TRACKING, TRANSFER = persist.KIND_TRACKING, persist.KIND_TRANSFER
CHECKPOINT_SECONDS = 2.0
SAVE_AT_ONCE_MAX = 128 * 1024  # bytes of old blocks a change may save without the locks


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it is over (the checkpointer: see _checkpoint)."""
    task.cancel()
    await _over(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("checkpointer failed", exc_info=task.exception())


async def _over(fut: asyncio.Future[Any]) -> None:
    """Wait until ``fut`` (a thread's) is over, even if cancelled meanwhile: a thread
    cannot be stopped, so what waits for it must not go on as if it had. A cancellation
    is raised once it is over; ``fut``'s outcome is left to the caller."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.wait([fut])  # unlike awaiting it, does not cancel it
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


@dataclass
class UpdateRecord:
    """The running (or last) update, as persisted and as shown in status."""

    id: int
    kind: str  # "full" | "incremental"
    # False during a full update's unprotected pass, and once its mark is given up (remark)
    protecting: bool = False
    marked_at: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_sent: int = 0
    cofw_saved_bytes: int = 0
    catchup_bytes: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    max_rate: int | None = None  # bytes/s for this update (--max-rate, else the session's)
    # why copy-before-write gave up this update's point in time; it goes on as of a new mark
    remark: str | None = None


@dataclass
class RetryPolicy:
    """Automatic resume of an update whose target failed: exponential backoff, bounded."""

    limit: int = 5
    backoff: float = 2.0
    max_backoff: float = 60.0
    attempts: int = 0
    next_at: float | None = None

    def delay(self) -> float:
        return min(self.max_backoff, self.backoff * 2**self.attempts)

    def status(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "limit": self.limit,
            "next_in": None if self.next_at is None else max(0.0, round(self.next_at - time.time(), 1)),
        }


class ChunkLocks:
    """Per-chunk mutual exclusion between copying a chunk and saving it before a write."""

    def __init__(self) -> None:
        self._held: dict[int, asyncio.Event] = {}

    def any_held(self, chunks: Iterable[int]) -> bool:
        held = self._held
        return bool(held) and any(c in held for c in chunks)

    @asynccontextmanager
    async def hold(self, chunks: Iterable[int]) -> AsyncIterator[None]:
        taken: list[int] = []
        try:
            for c in sorted(chunks):  # ascending: no deadlock between multi-chunk holders
                while (ev := self._held.get(c)) is not None:
                    await ev.wait()
                self._held[c] = asyncio.Event()
                taken.append(c)
            yield
        finally:
            for c in taken:
                self._held.pop(c).set()


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
        self.save_limit = save_limit
        self.consistent = False
        self.point_in_time: str | None = None
        self.last_error: str | None = None
        self.created_at = now_iso()
        self.update: UpdateRecord | None = None
        self.next_update_id = 1
        self.last_started = 0.0
        self._gate = gate
        self._open_target = open_target
        self._persist_row = persist_row
        self._tracking_path = files / f"{name}.tracking"
        self._transfer_path = files / f"{name}.transfer"
        self._save_dir = save_dir
        self.tracking = Bitmap(source.size, granularity)
        self.tracking_file: persist.TrackingFile | None = None
        self.transfer: Bitmap | None = None
        self._durable_transfer: Bitmap | None = None  # transfer as of the last checkpoint
        self.save: SaveArea | None = None
        # a failed mark voided the save area's records on disk: they keep protecting the
        # copy in memory, but no longer make a saved chunk's tracking bit durable
        self._records_void = False
        self._preparing: asyncio.Future[None] | None = None  # see _prepare_save_area
        self.locks = ChunkLocks()
        self._checkpointing = asyncio.Lock()  # see _checkpoint
        self._checkpoints = 0  # checkpoints taken (a snapshot's number)
        self._landed = 0  # the number of the last checkpoint written
        self._flush_failed: CopyTarget | None = None  # see _flush
        self.progress: Progress | None = None
        self.target: CopyTarget | None = None
        self._opening: asyncio.Future[CopyTarget] | None = None  # see ensure_target
        self._closing_targets: set[asyncio.Future[None]] = set()  # superseded connections
        self._task: asyncio.Task[None] | None = None
        self._commit = commit
        self._hot_region = hot_region
        self._hot_set = hot_set
        # what the last start added to tracking because the hot set's bits may be lost
        self.recopy: persist.Recopy | None = None
        # chunk -> the round making its bit durable, _BY_SAVE, or None (failed: write it again)
        self._unsynced: dict[int, Any] = {}
        self._round_chunks: dict[asyncio.Future[None], list[int]] = {}
        self.protect_hook = Hook(self.protect, self.protected)
        self.retry = retry or RetryPolicy()
        self._retry_task: asyncio.Task[None] | None = None
        self.target_timeout = target_timeout  # what a client's write or a pause waits for the target
        self._ops = asyncio.Lock()  # see operation()
        self.closed = False  # shut down or removed: no operation any more
        # its row is deleted (``SessionManager.remove``): nothing may write it again, and a
        # change still in its hooks must not touch its closed files
        self.removed = False
        self._verifying: asyncio.Future[None] | None = None  # a verify's comparison
        self._closing = 0  # removals and shutdowns waiting for the session (see closing())

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

    # --- files ----------------------------------------------------------------------------
    def create_files(self) -> None:
        """A fresh tracking file, and no transfer bitmap or save area: a removed session of
        the same name may have left its own (a crash before their unlinks were durable),
        and they must be gone, durably, before a row that would adopt them commits."""
        try:
            for path in (self._transfer_path, self._save_area(0).path):
                fs.unlink(path, missing_ok=True)
            sync_dir(self._transfer_path.parent)
            sync_dir(self._save_dir)
        except OSError as exc:
            raise os_error(exc, f"removing old files of session {self.name}") from exc
        self._open_tracking_file()
        self._rewrite_tracking()

    def _open_tracking_file(self) -> None:
        if self.tracking_file is not None:
            self.tracking_file.close()
        self.tracking_file = persist.TrackingFile(
            self._tracking_path,
            self.source.size,
            self.granularity,
            self._commit,
            self._hot_region,
            self._hot_set,
        )

    def load_files(self) -> None:
        """Reopen bitmaps and the save area after a restart. A corrupt file raises
        ``CorruptFile``; any other error (a full disk, EIO) raises as it is: no file is
        taken for corrupt, and none is lost.

        A transfer file that the session row does not own (an update that never
        committed, or one that finished just before the crash) goes back into tracking:
        a superset of the changes is safe, a lost bit is not. Every file is read first;
        then tracking is rewritten (the one step that needs space), so what a reboot may
        have cost (the hot regions ``load`` added) is durable and the file is of this
        boot; only then do the files no update owns go. A failure at any step leaves the
        files as they were, or their bits in tracking as well: loading again is safe.
        """
        save: SaveArea | None = None
        try:
            tracking, _, recopy = persist.load_tracking(
                self._tracking_path, self.granularity, self.source.size
            )
            owned = self.update is not None and self.state in (State.COPYING, State.PAUSED, State.FAILED)
            transfer, orphan = None, False
            if fs.exists(self._transfer_path):
                transfer, generation = persist.load(
                    self._transfer_path, TRANSFER, self.granularity, self.source.size
                )
                if not owned or self.update is None or generation != self.update.id:
                    tracking.or_(transfer)
                    transfer, orphan, owned = None, True, False
            elif owned:
                raise CorruptFile(
                    path=self._transfer_path, why="transfer bitmap of a running update is missing"
                )
            area = self._save_area(self.update.id if self.update else 0)
            # a given-up mark keeps its records until the re-mark: they tell which chunks changed
            if owned and self.update is not None and (self.update.protecting or self.update.remark):
                save = area.open()
                for c in save.index:  # saved, so changed after the mark: their bits came with the saves
                    tracking.set(c)
            self.tracking, self.recopy = tracking, recopy
            self._open_tracking_file()
            self._rewrite_tracking()
            if orphan:
                fs.unlink(self._transfer_path)
            if save is None:  # no update owns it: a mark or the end of its update made its bits durable
                fs.unlink(area.path, missing_ok=True)
        except BaseException as exc:
            if save is not None:
                save.close()
            if self.tracking_file is not None:
                self.tracking_file.close()
                self.tracking_file = None
            if isinstance(exc, OSError):
                raise os_error(exc, f"files of session {self.name}") from exc
            raise
        self.transfer = transfer
        self._durable_transfer = transfer.copy() if transfer is not None else None
        self.save = save
        if recopy is not None:
            log.warning(
                "session %s: %s: the hot set's %d bytes are copied again",
                self.name,
                recopy.reason,
                recopy.bytes,
            )
        self._gate.changed()  # bitmaps replaced: what the write path cached is void

    def set_aside_files(self, why: str) -> None:
        """Corrupt files: keep them for inspection, fail the session, track afresh.

        Nothing is known of what changed, so the next update must be a full one. The row
        says so first: failed, not consistent, and no update (so the next start does not
        miss the transfer file of one). Then the files get names of their own (two starts
        in one second must not replace the earlier evidence) and a fresh tracking file is
        written; if that fails, the next start finds them missing and comes here again.
        The first cause stays in ``last_error`` until an update starts.
        """
        if self.state is State.FAILED and self.update is None and self.last_error:
            log.error("session %s: %s", self.name, why)  # set aside before: the first cause stays
            why = self.last_error
        self.transfer = None
        self._durable_transfer = None
        self._drop_save_area()
        self.update = None
        self.state = State.FAILED
        self.consistent = False
        self.point_in_time = None
        self.last_error = why
        self._persist_row(self)  # the commit point
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        try:
            for path in (self._tracking_path, self._transfer_path, self._save_area(0).path):
                if fs.exists(path):
                    fs.rename(path, _aside(path, stamp))
            sync_dir(self._tracking_path.parent)
            sync_dir(self._save_dir)
        except OSError as exc:
            raise os_error(exc, f"setting aside files of session {self.name}") from exc
        self.tracking = Bitmap(self.source.size, self.granularity)
        self._gate.changed()  # every chunk is to be tracked again
        self.create_files()

    def delete_files(self) -> None:
        """The session is gone: so are its files, durably (a new session of the same name
        must not find them after a power loss; ``create_files`` removes such leftovers)."""
        if self.tracking_file is not None:
            self.tracking_file.close()
        self._drop_save_area()
        try:
            self._save_area(0).delete()
            for path in (self._tracking_path, self._transfer_path):
                fs.unlink(path, missing_ok=True)
            sync_dir(self._tracking_path.parent)
            sync_dir(self._save_dir)
        except OSError as exc:  # the row is gone: a later session of this name removes them
            log.warning("session %s: files not removed: %s", self.name, exc.strerror or exc)

    def _save_area(self, update_id: int) -> SaveArea:
        return SaveArea(
            self._save_dir / f"{self.name}.save",
            self.granularity,
            self.source.size,
            update_id,
            self.save_limit,
        )

    async def _prepare_save_area(self) -> None:
        """Write the save area's space ahead in a thread. A cancelled mark leaves that
        thread running, and it writes at fixed offsets: so the next mark waits for it
        before its ``create``, else it would zero the new update's records."""
        if self._preparing is None or self._preparing.done():
            self._preparing = asyncio.ensure_future(fs.to_thread(self._save_area(0).prepare))
        await asyncio.shield(self._preparing)

    def _drop_save_area(self) -> None:
        """Done with this update's records; the file stays, its space written ahead for the
        next update's (a new header voids them)."""
        if self.save is not None:
            self.save.close()
            self.save = None
        self._records_void = False

    async def _checkpoint(self) -> None:
        """Make copy progress durable: snapshot the transfer, flush the target, then write
        the snapshot's bits over the file.

        A chunk's bit is cleared once its write to the target has completed, and a flush
        covers the writes completed when it is sent: so every chunk done in a snapshot
        taken *before* the flush is durable on the target after it. A chunk copied while
        the flush runs stays owed (and protected) until the next checkpoint. With no
        target there is no flush, so nothing new is known to be durable: nothing is
        written.

        A checkpoint lands only on the transfer it was taken of and only if no newer one
        landed: a mark, a cancel or the end of the update replaces the transfer under
        ``_checkpointing``, which a checkpoint holds from its staleness check until its
        write is over (even when cancelled: the thread cannot be stopped).

        Bits only go from set to clear here, so they are written in place (no new space
        needed on a full disk; a torn write leaves each byte old or new, both safe).
        """
        transfer, target = self.transfer, self.target
        if transfer is None or self.update is None or target is None:
            return
        self._checkpoints += 1
        seq, snapshot = self._checkpoints, transfer.copy()  # before the flush: see above
        await self._flush(target)
        async with self._checkpointing:
            if self.transfer is not transfer or seq < self._landed:
                return  # a mark replaced the transfer, or a newer checkpoint landed
            write = asyncio.ensure_future(
                fs.to_thread(persist.write_bits_in_place, self._transfer_path, snapshot)
            )
            try:
                await _over(write)
            finally:  # the thread is over: the file holds the snapshot, or bytes of each
                if write.exception() is None:
                    self._durable_transfer, self._landed = snapshot, seq
                elif self._durable_transfer is not None:
                    self._durable_transfer = self._durable_transfer.copy()
                    self._durable_transfer.or_(snapshot)
            write.result()  # a failed write raises

    async def _flush(self, target: CopyTarget) -> None:
        """Flush the target. Once a flush of it failed, it is not trusted again: what it
        acknowledged before may be lost for good (a failed fsync drops the dirty pages, and
        the next one succeeds without them), so only a new connection and a copy again of
        what the last checkpoint owes can make those chunks durable."""
        if target is self._flush_failed:
            raise TargetError(msg=f"target {target.description}: an earlier flush failed")
        try:
            await target.flush()
        except Exception:
            self._flush_failed = target
            raise

    def _forget_unflushed(self) -> None:
        """Owe again what the last checkpoint owes: the chunks copied since were acknowledged
        by the target, never flushed, and it may have lost them (it failed, or the
        connection goes). Only while no copy runs."""
        transfer, durable = self.transfer, self._durable_transfer
        if transfer is None or durable is None:
            return
        transfer.or_(durable)
        if self.progress is not None:
            self.progress.bytes_done = self.progress.bytes_total - self.transfer_bytes()

    async def _try_checkpoint(self) -> None:
        try:
            await self._checkpoint()
            self._save_row()
        except (DeltavolError, OSError) as exc:  # the last durable checkpoint still holds
            log.warning("session %s: checkpoint skipped: %s", self.name, exc)

    def _save_row(self) -> None:
        self._sync_progress()
        self._persist_row(self)

    def _sync_progress(self) -> None:
        if self.update is not None and self.progress is not None:
            self.update.bytes_total = self.progress.bytes_total
            self.update.bytes_done = self.progress.bytes_done
            self.update.bytes_sent = self.progress.bytes_sent

    # --- hooks on the source's write path ---------------------------------------------
    def track(self, offset: int, length: int) -> list[asyncio.Future[None]]:
        """Set the tracking bits of a change; returns the group-commit rounds the change
        must wait for before it goes down (none when its bits are already durable).

        New bits go into the file at once; a chunk is in ``_unsynced`` until the round
        that makes its hot region durable is done (see ``bitmap/persist.py``). If that
        round failed, it stays there with no round, and the next change of the chunk
        writes it and asks for a round again.
        """
        if length == 0 or self.removed:
            return []
        tracking, unsynced = self.tracking, self._unsynced
        new = tracking.set_range(offset, length)
        waits: list[asyncio.Future[None]] = []
        if unsynced:
            retry = []
            for c in tracking.chunk_range(offset, length):
                if c in unsynced:
                    fut = unsynced[c]
                    if fut is _BY_SAVE:
                        if not self._saving(c):  # the save failed, then the chunk was copied
                            retry.append(c)
                    elif fut is None:
                        retry.append(c)
                    elif fut not in waits:
                        waits.append(fut)
            if retry:
                new = sorted(set(new).union(retry))
        if not new:
            return waits
        self._write_bits(new)
        assert self.tracking_file is not None
        cover, saving = self.tracking_file.cover, self._saving if self.save is not None else None
        for c in new:
            if saving is not None and saving(c):  # this change's protect saves it: no round
                unsynced[c] = _BY_SAVE
                continue
            fut = cover(c)
            if fut is None:  # its region is durably hot: the bit in the file is enough
                unsynced.pop(c, None)
                continue
            unsynced[c] = fut
            chunks = self._round_chunks.get(fut)
            if chunks is None:
                chunks = self._round_chunks[fut] = []
                fut.add_done_callback(self._round_done)
            chunks.append(c)
            if fut not in waits:
                waits.append(fut)
        return waits

    def track_now(self, offset: int, length: int) -> bool:
        """Track a change at once if that needs no waiting: its chunks' hot regions are
        durable, or this change's ``protect`` saves them all (a save record makes the bit
        durable). False leaves it all to ``track`` and changes nothing."""
        tf, chunks, unsynced = self.tracking_file, self.tracking.chunk_range(offset, length), self._unsynced
        if tf is None or (unsynced and any(c in unsynced for c in chunks)):
            return False
        if not tf.covered(chunks) and not (self.save is not None and all(map(self._saving, chunks))):
            return False
        return not self.track(offset, length)  # each new bit is covered or saved: no round

    def _write_bits(self, new: list[int]) -> None:
        assert self.tracking_file is not None
        try:
            self.tracking_file.write_bits(self.tracking, new)
        except DeltavolError:
            for c in new:  # set in memory, maybe not in the file: the next change writes them
                self._unsynced[c] = None
            raise

    def _saving(self, chunk: int) -> bool:
        """True if a change of ``chunk`` now must first save it (``protect`` saves it)."""
        update, save = self.update, self.save
        return (
            save is not None
            and not self._records_void
            and update is not None
            and update.protecting
            and self.transfer is not None
            and chunk not in save
            and self._owed(chunk)
        )

    def tracked(self, offset: int, length: int) -> bool:
        """True if ``track`` would have nothing to do: every bit set and durable."""
        tracking, unsynced = self.tracking, self._unsynced
        if not tracking.all_set(offset, length):
            return False
        return not unsynced or not any(c in unsynced for c in tracking.chunk_range(offset, length))

    def _round_done(self, fut: asyncio.Future[None]) -> None:
        failed = fut.cancelled() or fut.exception() is not None
        unsynced = self._unsynced
        for c in self._round_chunks.pop(fut, ()):
            if unsynced.get(c) is fut:
                if failed:
                    unsynced[c] = None
                else:
                    del unsynced[c]

    async def protect(self, offset: int, length: int) -> None:
        """Save the old contents of the blocks a change overwrites in chunks the update
        still owes, before they change.

        A chunk is owed while its bit is set in memory *or* in the last durable
        checkpoint: a chunk copied since that checkpoint would be copied again after a
        crash, so until the checkpoint records it as done its old contents must stay
        recoverable from the save area.
        """
        update, transfer, save = self.update, self.transfer, self.save
        if update is None or transfer is None or save is None or not update.protecting:
            # the mark was given up since this change's tracking left its bits to a save
            # here (``track_now``): a round makes them durable instead
            await self._track_rest(offset, length)
            return
        owed, part = self._owed, self._part
        chunks = self.tracking.chunk_range(offset, length)
        todo = [c for c in chunks if owed(c) and save.missing(c, *part(c, offset, length))]
        if todo and not await self._save_at_once(todo, offset, length, update, save):
            async with self.locks.hold(todo):
                # one deadline for the change, not one per chunk: it holds the write gate
                deadline = asyncio.get_running_loop().time() + self.target_timeout
                for c in todo:
                    if not update.protecting or update is not self.update or self.removed:
                        break  # the mark was given up meanwhile (``_give_up_mark``), or replaced
                    runs = save.missing(c, *part(c, offset, length)) if owed(c) else []
                    if runs:
                        await self._save_or_copy(c, runs, update, transfer, save, deadline)
        unsynced = self._unsynced
        for c in todo:
            if c in save and c in unsynced and unsynced[c] in (_BY_SAVE, None) and not self._records_void:
                del unsynced[c]  # the save record makes the bit durable
        # what the bits of this change still wait for: a save that did not happen (the chunk
        # was copied meanwhile, or went to the target with the save area full), or the round
        # another change's protect started for them
        await self._track_rest(offset, length)

    async def _track_rest(self, offset: int, length: int) -> None:
        for r in self.track(offset, length):
            await self._commit.wait(r)

    async def _save_at_once(
        self, todo: list[int], offset: int, length: int, update: UpdateRecord, save: SaveArea
    ) -> bool:
        """Save what ``protect`` must without the chunk locks, when that needs no waiting
        but for the round: no chunk held (by the copy, or by a save that waits), every old
        block in the page cache, room in the save area. False leaves it to the locks.

        The common case of a protected write, and the locks' machinery is a good part of
        its time on the loop (without it, 13 % more IOPS at iodepth 32 here). It is safe
        without them because the reads and records happen in one step of the loop, before
        this change can go down: a change that races to the same blocks reads them before
        this one goes down and saves them again, or after, when this record is indexed; if
        it read them from disk meanwhile, its record may hold the new contents, and the
        first record to settle counts (``SaveArea._settle``). A copy that takes the lock
        meanwhile reads the source before this change goes down, or lays this record over
        what it read (indexed before the change goes down).
        """
        if self.locks.any_held(todo):
            return False
        g, part = self.granularity, self._part
        runs = [(c, start, end) for c in todo for start, end in save.missing(c, *part(c, offset, length))]
        size = sum(end - start for _, start, end in runs)
        if size > SAVE_AT_ONCE_MAX or not save.room(size + RECORD.size * len(runs)):
            return False  # a large zero or trim reads and saves under the locks, off the loop
        cached, reads = self.source.backend.pread_cached, []
        for c, start, end in runs:
            old = cached(c * g + start, end - start)
            if old is None:
                return False
            reads.append((c, start, old))
        puts = [(len(old), save.put(c, start, old)) for c, start, old in reads]
        done = next((r for _, r in puts if r is not None), None)  # puts of one step share a round
        if done is not None:
            with contextlib.suppress(Exception):  # the save area has seen it
                await save.wait(done)
        if save.failed:
            return False  # the locks take it from here: copy-before-write
        update.cofw_saved_bytes += sum(n for n, r in puts if r is not None)
        return all(r is not None for _, r in puts)  # else the data dir is full: the locks take the rest

    async def _save_or_copy(
        self,
        c: int,
        runs: list[tuple[int, int]],
        update: UpdateRecord,
        transfer: Bitmap,
        save: SaveArea,
        deadline: float | None = None,
    ) -> None:
        """Save these runs of chunk ``c`` before they change; with the save area full, copy
        the chunk's old contents to the target instead (copy-before-write).

        The client's write waits for that at most ``target_timeout`` in all, until
        ``deadline`` (it holds the source's write gate, so a mark, and every write after it,
        would wait too): a target that fails or stays silent makes the update give up its
        point in time instead.
        """
        base = c * self.granularity
        for start, end in runs:
            old = await self.source.backend.pread(base + start, end - start)
            if not await save.save(c, start, old):
                break
            update.cofw_saved_bytes += end - start
        else:
            return
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.target_timeout
        try:
            if transfer.test(c):
                off, n = self._chunk_span(c)
                data = bytearray(await self.source.backend.pread(off, n))
                if not await self._lay_saved(data, off, [c], save):
                    return  # its save area was dropped (the session removed): no mark to protect
                async with asyncio.timeout_at(deadline):
                    target = await self.ensure_target()
                    sent = await write_piece(target, off, bytes(data), n, self.granularity)
                if self.target is not target:  # dropped meanwhile: no flush of it will come
                    raise TargetError(msg=f"target {target.description}: connection closed during a copy")
                if transfer.test(c):
                    transfer.clear(c)
                    if self.progress is not None:
                        self.progress.done(n)
                        self.progress.bytes_sent += sent
            # make "c is done" durable before c changes; shielded, so that a checkpoint is
            # never cut between its snapshot and its file (it ends by itself if given up)
            checkpoint = asyncio.ensure_future(self._checkpoint())
            checkpoint.add_done_callback(_seen)
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(checkpoint)
            if self._owed(c):  # no flush covered it (the target went): c must not change as is
                raise TargetError(msg=f"session {self.name}: the copy of chunk {c} is not durable")
        except TimeoutError:
            why = f"target {self.target_spec} did not answer in {self.target_timeout:g} s"
            self._give_up_mark(update, f"copy-before-write of chunk {c}: {why}")
        except (DeltavolError, OSError) as exc:
            why = exc.message if isinstance(exc, DeltavolError) else str(exc)
            self._give_up_mark(update, f"copy-before-write of chunk {c}: {why}")

    def _give_up_mark(self, update: UpdateRecord, why: str) -> None:
        """Copy-before-write could not make a chunk's old contents safe: give up the update's
        point in time rather than the client's write (DESIGN: re-mark). Protection stops (a
        chunk changed from now on is not saved), and the session row says so durably before
        the write goes down, so that resume, a retry or a restart re-marks (``_remark``)
        instead of finishing a mark whose old contents are gone. Tracking goes on: what
        changes from now on is copied as of the new mark.
        """
        if update is not self.update or not update.protecting or self.removed:
            return  # given up already, or the session is gone
        before = (update.protecting, update.remark, self.last_error)
        update.protecting, update.remark = False, why
        self.last_error = f"{why}; the update gives up its point in time and will copy as of a new mark"
        try:
            self._save_row()
        except BaseException:  # not durable: the write must not go down (it fails instead)
            # the mark holds, and with it its target and the bits left to saves
            update.protecting, update.remark, self.last_error = before
            raise
        self._abort_target()
        save, unsynced = self.save, self._unsynced
        for c, fut in unsynced.items():  # bits left to saves that will not happen now
            if fut is _BY_SAVE and (save is None or c not in save):
                unsynced[c] = None  # the next change of the chunk writes its bit again
        log.error("session %s: %s", self.name, self.last_error)

    def _abort_target(self) -> None:
        """Drop the target at once and reset its connections: a copy-before-write it did
        not answer in time must not land after what the re-mark copies over a new one.
        (What its server has already read cannot be recalled: a request read but not yet
        executed may still land, as with any NBD client that gives up on a request.)"""
        self._forget_unflushed()
        self._supersede_open()
        target, self.target = self.target, None
        self._flush_failed = None
        if target is not None:
            target.abort()

    async def _remark(self) -> None:
        """Take a new mark for an update whose mark was given up: what it still owes, what no
        checkpoint recorded as copied, and what changed since its mark are copied as of now.
        Protection starts again with the new mark's save area, in the mark's commit."""
        update, transfer = self.update, self.transfer
        assert update is not None and transfer is not None and update.remark is not None
        if self._durable_transfer is not None:
            transfer.or_(self._durable_transfer)  # copied, maybe not flushed: owed again
        marked_at, catchup = update.marked_at, update.catchup_bytes
        try:
            await self._mark()
        except BaseException:
            update.protecting, update.marked_at = False, marked_at  # still given up
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

    async def _lay_saved(self, data: bytearray, offset: int, chunks: list[int], save: SaveArea) -> bool:
        """Turn ``data`` (the source from ``offset``) back into its contents as of the mark
        whose save area is ``save``. False if that save area is the session's no more (a
        cancel, a new mark, the update's end or a removal dropped it meanwhile): ``data``
        is then not that mark's image, and must not be copied as such."""
        for c in chunks:
            if save is not self.save:
                return False
            if c in save:
                try:
                    pieces = await save.pieces(c)
                except OSError:
                    if save is not self.save:  # closed under the read
                        return False
                    raise
                if save is not self.save:  # dropped meanwhile: what was read may not be its own
                    return False
                base = c * self.granularity - offset
                for start, old in pieces:
                    data[base + start : base + start + len(old)] = old
        return True

    def protected(self, offset: int, length: int) -> bool:
        """True if ``protect`` would have nothing to do: no block here owed and unsaved."""
        update, save = self.update, self.save
        if update is None or self.transfer is None or save is None or not update.protecting:
            return True
        owed, part = self._owed, self._part
        return not any(
            owed(c) and save.missing(c, *part(c, offset, length))
            for c in self.tracking.chunk_range(offset, length)
        )

    def _part(self, chunk: int, offset: int, length: int) -> tuple[int, int]:
        """What [offset, offset+length) covers of ``chunk``, as offsets within the chunk."""
        base = chunk * self.granularity
        return max(offset, base) - base, min(offset + length, base + self.granularity) - base

    def _owed(self, chunk: int) -> bool:
        assert self.transfer is not None
        durable = self._durable_transfer
        return self.transfer.test(chunk) or (durable is not None and durable.test(chunk))

    def _chunk_span(self, chunk: int) -> tuple[int, int]:
        off = chunk * self.granularity
        return off, min(self.granularity, self.source.size - off)

    # --- updates -------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    @one_at_a_time
    async def start_update(self, full: bool, max_rate: int | None = None) -> dict[str, Any]:
        """Begin an update; returns once it is committed (marked, or for --full started)."""
        full = full or self.state is State.NEW or self._needs_full()
        if self.busy:
            raise AlreadyCopying(name=self.name)
        new_state = next_state(self.name, self.state, "update")
        if self.state in (State.NEW, State.IDLE):
            # nothing uses the target between updates (no transfer: no copy-before-write), and
            # a connection kept since the last update or verify may have died with its server
            await self._drop_target()
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
        async with self._gate.closed(), self._checkpointing:
            await self._flush_source()
            persist.save_atomic(self._transfer_path, transfer, update.id, TRANSFER)
            last_error, self.update, self.last_error = self.last_error, update, None
            self.transfer = transfer
            self.consistent = False
            self.state = new_state
            self.progress = Progress(bytes_total=self.transfer_bytes())
            try:
                self._save_row()  # the commit point: nothing below may raise (see _after_commit)
            except BaseException:
                self.last_error = last_error  # the rest start_update puts back
                raise
            self._durable_transfer = transfer.copy()
            self._after_commit("dropping the save area", self._drop_save_area)
            self.tracking.clear_all()
            self._after_commit("resetting tracking", self._rewrite_tracking)

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
        if self.save is None:  # no update writes to the save area: write its space ahead
            await self._prepare_save_area()
        await self._flush_source()
        async with self._gate.closed(), self._checkpointing:
            await self._flush_source()
            # a new bitmap: if this mark fails, start_update puts back the unfinished
            # update's transfer, which must not have gained the chunks changed since its mark
            transfer = Bitmap(self.source.size, self.granularity)
            for owed in (self.transfer, self._durable_transfer):
                if owed is not None:
                    transfer.or_(owed)
            before = self.transfer_bytes(transfer)
            transfer.or_(self.tracking)
            persist.save_atomic(self._transfer_path, transfer, update.id, TRANSFER)
            if self.save is not None:
                # the new header voids the unfinished update's records, and with them what
                # made the bits of its saved chunks durable: if this mark does not commit,
                # that update goes on and only the tracking file can keep those bits
                assert self.tracking_file is not None
                await self.tracking_file.durable()
                self._records_void = True  # until this mark commits, or for good if it fails
            save = self._save_area(update.id).create()
            kept = self.update, self.state, self.progress, self.last_error
            progress = self.progress if new is None else None
            was = (update.marked_at, update.protecting, update.catchup_bytes)
            total_was = progress.bytes_total if progress is not None else 0
            try:
                if new is not None:
                    self.update, self.state, self.last_error = update, new[1], None
                update.marked_at = now_iso()
                update.protecting = True
                total = self.transfer_bytes(transfer)
                if progress is None:
                    self.progress = Progress(bytes_total=total)
                else:  # the catch-up pass of a full update
                    update.catchup_bytes = total - before
                    progress.bytes_total = progress.bytes_done + total
                self._save_row()  # the commit point: nothing below may raise (see _after_commit)
            except BaseException:
                # the unfinished update keeps its save area: its records are void on disk
                # now, but so is it (the transfer file is this update's): a restart
                # ends it, and until then its records in memory still protect its copy
                save.close()
                update.marked_at, update.protecting, update.catchup_bytes = was
                if progress is not None:
                    progress.bytes_total = total_was
                self.update, self.state, self.progress, self.last_error = kept
                raise
            self._after_commit("dropping the old save area", self._drop_save_area)
            self.save, self.transfer, self._records_void = save, transfer, False
            self._durable_transfer = transfer.copy()
            self.tracking.clear_all()
            self._after_commit("resetting tracking", self._rewrite_tracking)

    async def _flush_source(self) -> None:
        """What a mark copies must be durable on the source: a change acknowledged but not
        flushed may be lost by a power loss, and copied it would stay on the target with
        no bit left to say so. A mark flushes before the write gate closes (most of the
        dirty data, while writes go on) and again inside it (what came meanwhile)."""
        await self.source.backend.flush()

    def _unlink_transfer(self) -> None:
        fs.unlink(self._transfer_path, missing_ok=True)

    def _after_commit(self, what: str, step: Any) -> None:
        """A step after a commit point must not undo it (start_update would roll back in
        memory a mark the row has). Each leaves a superset on disk if it fails: old bits in
        the tracking file (all in the transfer now), a save area file no update owns."""
        try:
            step()
        except (DeltavolError, OSError) as exc:
            log.warning("session %s: %s failed: %s", self.name, what, exc)

    def _rewrite_tracking(self) -> None:
        """Replace the tracking file durably with the bitmap in memory (the write gate is
        closed, or nothing writes yet): every bit set is durable now."""
        assert self.tracking_file is not None
        self.tracking_file.rewrite(self.tracking, self.next_update_id)
        self._unsynced.clear()

    async def _tracking_durable(self) -> None:
        """Make every bit set durable in the tracking file (the write gate is closed)."""
        assert self.tracking_file is not None
        await self.tracking_file.durable()
        if self.tracking_file.lost is not None:
            # a failed sync may have dropped pages that no round writes again: a round
            # proves nothing, only a file written anew holds every bit set
            self._rewrite_tracking()
        self._unsynced.clear()

    def transfer_bytes(self, bitmap: Bitmap | None = None) -> int:
        bitmap = bitmap if bitmap is not None else self.transfer
        return 0 if bitmap is None else bitmap.bytes_set()

    def _spawn(self) -> None:
        if self.busy:  # never two copy tasks: each would stop only as far as it is known
            raise AlreadyCopying(name=self.name)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"session-{self.name}")

    async def ensure_target(self) -> CopyTarget:
        """The target's connection, opened once for all who ask at the same time (the copy
        and copy-before-writes): two opens would leave two connections, and a checkpoint
        would flush the one the copy did not write on. A caller that stops waiting does
        not stop the open; a drop meanwhile supersedes it (it is aborted once open)."""
        if self.target is not None:
            return self.target
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.ensure_future(self._open_target(self))
            opening.add_done_callback(self._opened)  # when every caller stopped waiting
        target = await asyncio.shield(opening)
        self._opened(opening)  # a future already done is returned before its callbacks ran
        if self.target is not target:  # dropped while it opened: no copy may go over it
            raise TargetError(msg=f"target {self.target_spec}: connection dropped while it opened")
        return target

    def _opened(self, opening: asyncio.Future[CopyTarget]) -> None:
        """The first to see ``opening`` done makes it the target, unless it was superseded."""
        if self._opening is not opening:
            return
        self._opening = None
        if opening.cancelled() or opening.exception() is not None:
            return
        if self.target is None:
            self.target = opening.result()
        else:  # a connection was set meanwhile by other means: this one is not used
            self._discard(opening)

    def _supersede_open(self) -> None:
        """The target is dropped: a connection still opening is not to be used; it is
        aborted and closed once open (nothing was written on it)."""
        opening, self._opening = self._opening, None
        if opening is None:
            return
        if opening.done():
            self._discard(opening)
        else:
            opening.add_done_callback(self._discard)

    def _discard(self, opening: asyncio.Future[CopyTarget]) -> None:
        if opening.cancelled() or opening.exception() is not None:
            return
        target = opening.result()
        target.abort()
        closing = asyncio.ensure_future(target.close())
        self._closing_targets.add(closing)
        closing.add_done_callback(self._closed)

    def _closed(self, closing: asyncio.Future[None]) -> None:
        self._closing_targets.discard(closing)
        if not closing.cancelled() and closing.exception() is not None:
            log.warning("session %s: closing a superseded connection: %r", self.name, closing.exception())

    async def _run(self) -> None:
        assert self.update is not None and self.transfer is not None
        checkpointer = asyncio.get_running_loop().create_task(self._checkpoint_loop())
        failure: tuple[str, bool] | None = None
        try:
            if self.target is not None and self.target is self._flush_failed:
                await self._drop_target()  # a new connection: see _flush
            target = await self.ensure_target()
            if self.progress is None:
                self.progress = Progress(bytes_total=self.transfer_bytes())
            self.progress.bytes_done = self.progress.bytes_total - self.transfer_bytes()
            while True:
                if not self.update.protecting and self.update.remark is not None:
                    await self._remark()
                    # the give-up dropped the connection (``_abort_target``): a new one,
                    # once the mark has voided what a checkpoint of the old one could say
                    target = await self.ensure_target()
                elif not self.update.protecting:
                    await self._copy_pass(target)
                    # the catch-up mark starts from the durable transfer: make the pass's
                    # chunks durable first, or it would copy them all again
                    await self._checkpoint()
                    await self._mark()  # the catch-up pass of a full update
                try:
                    await self._copy_pass(target)
                    await self._flush(target)
                except TargetError:
                    if self.target is target or self.update.protecting or self.update.remark is None:
                        raise
                    continue  # a give-up reset this connection under the copy: re-mark
                async with self._gate.closed(), self._checkpointing:
                    if not self.update.protecting:
                        continue  # copy-before-write gave the mark up meanwhile
                    # the save area goes: the bits its records made durable must be in the file
                    await self._tracking_durable()
                    self._finish()
                break
        except asyncio.CancelledError:
            raise
        except TargetError as exc:
            failure = exc.message, True
        except (DeltavolError, OSError) as exc:
            failure = exc.message if isinstance(exc, DeltavolError) else str(exc), False
        except Exception as exc:  # a bug: the session fails, the server stays up
            log.exception("session %s: update crashed", self.name)
            failure = f"internal error: {exc!r}", False
        finally:
            await _stop(checkpointer)  # its write must not outlive the update's task
        if failure is not None:
            await self._fail(*failure)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            await self._try_checkpoint()

    async def _copy_pass(self, target: CopyTarget) -> None:
        assert self.transfer is not None and self.update is not None
        rate = self.update.max_rate
        # throttled: requests of about a quarter second each, so progress stays smooth
        request = target.request_size
        if rate:
            request = min(request, max(self.granularity, rate // 4))
        max_chunks = max(1, request // self.granularity)
        runs, g = self.transfer.runs(), self.granularity
        # a full pass is cut at the source's holes, so it goes as fast as its data
        work = (
            requests(runs, max_chunks)
            if self.update.protecting
            else split_at_holes(runs, self.source.backend.extents, g, self.source.size, max_chunks)
        )
        await run_pipeline(
            work,
            lambda first, count, hole=False: self._copy_run(target, first, count, hole),
            throttle=Throttle(rate),
            request_bytes=lambda first, count, hole=False: g if hole else count * g,  # a hole costs a request
            inflight=target.inflight if not rate else 2,
        )

    async def _copy_run(self, target: CopyTarget, first: int, count: int, hole: bool = False) -> None:
        transfer, update, progress, save = self.transfer, self.update, self.progress, self.save
        assert transfer is not None and update is not None and progress is not None
        g = self.granularity
        offset = first * g
        length = min(count * g, self.source.size - offset)
        chunks = range(first, first + count)
        if hole:
            pieces: list[tuple[int, bytes | int]] = [(offset, length)]
        elif not update.protecting:
            pieces = await self._read_by_extents(offset, length)
        else:
            async with self.locks.hold(chunks):
                live = [c for c in chunks if transfer.test(c)]
                if not live:
                    return
                data = bytearray(await self.source.backend.pread(offset, length))
                if self.save is not save or (
                    save is not None and not await self._lay_saved(data, offset, live, save)
                ):
                    return  # the mark this run copies for is over: nothing copied, its bits stay
            pieces = _live_pieces(data, offset, live, self._chunk_span)
        for off, piece in pieces:
            n = piece if isinstance(piece, int) else len(piece)
            sent = await write_piece(target, off, None if isinstance(piece, int) else piece, n, g)
            progress.bytes_sent += sent  # not `+= await`: that would read a stale total
        if self.target is not target:  # dropped meanwhile: no flush of it will come
            raise TargetError(msg=f"target {target.description}: connection closed during a copy")
        progress.done(transfer.clear_run(first, count))
        self.events.progress(
            self.name,
            id=update.id,
            bytes_total=progress.bytes_total,
            bytes_done=progress.bytes_done,
            bytes_sent=progress.bytes_sent,
        )

    async def _read_by_extents(self, offset: int, length: int) -> list[tuple[int, bytes | int]]:
        """Pieces of [offset, offset+length): data as bytes, holes as their length."""
        pieces: list[tuple[int, bytes | int]] = []
        pos = offset
        for n, flags in await self.source.backend.extents(offset, length):
            pieces.append((pos, n if flags & STATE_HOLE else await self.source.backend.pread(pos, n)))
            pos += n
        return pieces

    def _finish(self) -> None:
        assert self.update is not None
        self._sync_progress()
        was = (
            self.transfer,
            self._durable_transfer,
            self.consistent,
            self.retry.attempts,
            self.point_in_time,
            self.update.finished_at,
            self.state,
        )
        self.transfer = None
        self._durable_transfer = None
        self.consistent = True
        self.retry.attempts = 0
        self.point_in_time = self.update.marked_at
        self.update.finished_at = now_iso()
        self.state = next_state(self.name, self.state, "done")
        try:
            self._persist_row(self)  # the commit point; the files below are garbage after it
        except BaseException:
            # the row still has the update: so must memory (it protects and owes on), and
            # the update fails; resumed, it finishes again
            (
                self.transfer,
                self._durable_transfer,
                self.consistent,
                self.retry.attempts,
                self.point_in_time,
                self.update.finished_at,
                self.state,
            ) = was
            raise
        self._after_commit("dropping the save area", self._drop_save_area)
        self._after_commit("removing the transfer file", self._unlink_transfer)
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
        self._forget_unflushed()  # the target may have lost what it did not flush
        try:
            self._save_row()  # the transfer file keeps its last durable checkpoint
        except DeltavolError as exc:
            log.error("session %s: cannot record the failure: %s", self.name, exc.message)
        log.error("session %s: update failed: %s", self.name, why)
        self.events.publish(
            "update.failed", name=self.name, id=self.update.id if self.update else None, error=why
        )
        await self._drop_target()
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

    async def _drop_target(self) -> None:
        """Close the target; a next one is a new connection, whose flushes cover none of
        this one's writes."""
        self._forget_unflushed()
        self._supersede_open()
        target, self.target = self.target, None
        self._flush_failed = None
        if target is not None:
            await target.close()

    async def _stop_task(self) -> None:
        self._cancel_retry()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._cancel_retry()  # one its failure may have scheduled before it stopped

    @one_at_a_time
    async def pause(self) -> dict[str, Any]:
        self.state = next_state(self.name, self.state, "pause")
        await self._stop_task()
        if await self._target_answers():
            await self._try_checkpoint()
        # paused must be durable even when that checkpoint failed or was skipped (its row
        # is not written then): with the row still copying, the next start would resume it
        self._save_row()
        return self.status()

    async def _target_answers(self) -> bool:
        """Flush the target, waiting at most ``target_timeout``: a pause or a stop must not
        hang on a silent target. False if it failed: the last durable checkpoint stands."""
        target = self.target
        if target is None:
            return True
        try:
            async with asyncio.timeout(self.target_timeout):
                await target.flush()
        except (TimeoutError, DeltavolError, OSError) as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else exc
            log.warning("session %s: checkpoint skipped: target flush: %s", self.name, why)
            self._flush_failed = target  # see _flush
            return False
        return True

    @one_at_a_time
    async def resume(self) -> dict[str, Any]:
        if self.state is State.COPYING:
            if self.busy or self.transfer is None:  # already going (the retry policy got there first)
                return self.status()
            # copying with no task: a step between the state and the spawn failed
            log.warning("session %s: copying with no copy task: starting it again", self.name)
            self._cancel_retry()
            async with self._gate.closed():  # as below: once a copy-before-write on it is over
                await self._drop_target()
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
            await self._drop_target()
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
        if await self._target_answers():  # what a flush covers now need not be copied again
            await self._try_checkpoint()
        async with self._gate.closed(), self._checkpointing:
            if self.transfer is not None:
                # back into tracking: what the update still owes, and what its last
                # checkpoint does (copied since, never flushed: the target may lose it)
                self._forget_unflushed()
                self.tracking.or_(self.transfer)
                self._rewrite_tracking()
            was = self.transfer, self._durable_transfer, self.consistent, self.state
            self.transfer = None
            self._durable_transfer = None
            self.consistent = False
            self.state = new_state
            try:
                self._persist_row(self)  # the commit point; the files below are garbage after it
            except BaseException:
                self.transfer, self._durable_transfer, self.consistent, self.state = was
                raise
            self._after_commit("dropping the save area", self._drop_save_area)
            self._after_commit("removing the transfer file", self._unlink_transfer)
        await self._drop_target()
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
        if self.state is State.COPYING and await self._target_answers():
            await self._try_checkpoint()
        await self._drop_target()
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
            u = asdict(self.update)
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
            "consistent": self.consistent,
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


def _aside(path: Path, stamp: str) -> Path:
    """A name of its own for a corrupt file kept for inspection."""
    aside, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while fs.exists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return aside


def _seen(task: asyncio.Future[None]) -> None:
    """A checkpoint a write stopped waiting for: its failure was reported to that write."""
    if not task.cancelled():
        task.exception()


def _live_pieces(data: bytearray, offset: int, live: list[int], span: Any) -> list[tuple[int, bytes | int]]:
    """The parts of ``data`` (read at ``offset``) that cover the ``live`` chunks, merged
    where chunks are adjacent."""
    pieces: list[tuple[int, bytes | int]] = []
    start = end = -1
    for c in live:
        off, n = span(c)
        if off != end:
            if start >= 0:
                pieces.append((start, bytes(data[start - offset : end - offset])))
            start = off
        end = off + n
    if start >= 0:
        pieces.append((start, bytes(data[start - offset : end - offset])))
    return pieces
