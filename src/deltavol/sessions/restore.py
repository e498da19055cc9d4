"""``session restore``: roll the source back to the target's point in time, copying back only
what may differ.

Design notes
------------
* **What is copied back.** Where the source may differ from a consistent target is exactly
  where tracking has a bit (invariant 2): every change since the point in time, and after
  a power loss the hot set's chunks, which ``load_tracking`` folded into tracking at
  start-up. A session that is not consistent has no point in time to go back to: its
  restore is refused, changing nothing.
* **An update under way** (copying, paused or failed) has put part of its new mark on the
  target once it has begun writing there: the old point in time is gone, and the restore
  is refused (a full update always is: it made the session inconsistent). One that has
  not begun (``target_writes``: still waiting for its connection, or for its first
  request's turn; a write in flight counts as begun) is taken back: its target writes are
  claimed in the same step as the check (none begins from then on), its copy task is
  stopped, the target must answer, then ``_take_back`` commits it cancelled with the
  session still consistent as of its point in time -- what it owed goes back into
  tracking durably before the row forgets it -- and says so (``update.cancelled``, the
  reply's ``notice``). Then the restore starts as from ``idle``. If the target does not
  answer, the claim is given back and the update's copy starts again: nothing changed.
* **Refused, changing nothing.** The checks, and the opening of the target, come before the
  commit point (the row says ``restoring``): an unknown session, an inconsistent one or
  an unreachable target leaves every file and row as it was.
* **One restore per source.** ``Volume.restoring_by`` names the session restoring it. It
  is taken before the restore's first await (a second restore of the source is refused),
  given back if the restore fails before its commit, and the guard is lifted only by the
  session that holds it. A start-up that finds two sessions of one source ``restoring``
  resumes the first; the other waits, says why, and starts over from tracking later.
* **No client changes the source meanwhile.** From the commit on, the source's export is
  read-only and says why (its ``write_guard``); the gate re-checks the guard, so a change
  that passed the export's check just before it is refused at the gate. The restore closes
  the source's write gate only to take its work: a change already past the gate then went
  down before (it is in tracking, and copied back). Its own writes pass the gate one at a
  time, past the guard (``Restorer._write_back``), through the sessions' hooks: the other
  sessions of the source track (and protect) what it writes as any change, and their marks
  wait for one write, not for the whole restore.
* **Writes left by a cancel.** Each source write runs in a task of its own
  (``Volume.restore_writes``), shielded: a removal cancels the restore, then waits for them
  (``settle``) before it lifts the guard, so none lands over a client's acknowledged write.
* **The set still to copy back** is taken from tracking when the restore takes its work
  (tracking is durable and a superset of it: see below), and is checkpointed as copy
  progress is: snapshot it, fsync the source, write the snapshot over the restore's bitmap
  file (``NAME.restore``; the first checkpoint creates it atomically, later ones write its
  bits in place). A chunk leaves it only once the source write that restored it is
  durable. Bits only go from set to clear; a late or torn checkpoint leaves a superset.
  With no file yet, a restart takes tracking again: a restore that ends before its first
  checkpoint (most do) writes no bitmap file at all.
* **The end.** The source is flushed, tracking is reset durably (``rewrite``), then the row
  commits ``idle``, consistent, with the same ``point_in_time``; only then does the guard
  go and the gate open. A crash before the row leaves ``restoring``: the start-up resumes
  it with what the file still owes (or with tracking: a superset either way) and ends the
  same way.
* **Writes at once.** A run read back from the target is written into the source's page
  cache in the same step of the loop when it can (``pwrite_now``: the gate open, nothing of
  the file in the thread pool): no task, no thread hop. A small zeroed piece is written as
  zeroes, not punched: on ext4 a hole punched waits for the range's dirty pages to reach
  the disk and holds the file's lock meanwhile (1 % of 4 GiB restored: 0.3-0.4 s of
  punches and writes in the pool, against 65-100 ms inline here). A piece whose range is
  a hole of the source already (``SEEK_DATA``: the change it undoes was a punch) is not
  written at all, so a sparse source stays sparse; and a full file system (``ENOSPC``)
  gets the piece punched instead. What cannot go at once takes the task path.
* **Tracking is left alone until the end.** The restore writes only chunks whose tracking
  bits are set already (its work came from tracking), and no other change reaches the
  source: so tracking still holds every chunk the restore set out to copy back, a
  superset of what its file owes. A restore file found corrupt is replaced from tracking
  (the restore starts over), never taken for an empty one.
* **A failure** (the target stops answering, a full disk) leaves the session ``restoring``
  with ``last_error`` and the source guarded; ``session restore`` again (or a restart, or
  for a target that failed the retry policy, as for updates) goes on with what the file
  owes. Removing the session lifts the guard once its writes under way have landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from deltavol.backend.file import INLINE_WRITE_MAX, FileBackend
from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.engine import Progress, requests, run_pipeline, split_zeroes
from deltavol.copy.targets import CopyTarget
from deltavol.copy.throttle import Throttle
from deltavol.errors import (
    CorruptFile,
    DeltavolError,
    NoSpace,
    NotRestorable,
    RestoreNotStarted,
    TargetError,
    os_error,
)
from deltavol.nbd.constants import STATE_HOLE
from deltavol.sessions.records import UpdateRecord, now_iso
from deltavol.sessions.session import CHECKPOINT_SECONDS, Session, one_at_a_time
from deltavol.sessions.states import State, next_state
from deltavol.store import fs
from deltavol.store.fs import sync_dir

log = logging.getLogger("deltavol.session")

T = TypeVar("T")
Fill = Callable[[FileBackend], Awaitable[None]]
KIND = "restore"  # the ``update.kind`` of a restore in the session's status
INLINE_ZEROES = INLINE_WRITE_MAX  # zeroed pieces up to this are written as zeroes (see _write_back)
_ZEROES = bytes(INLINE_ZEROES)


def restore_path(s: Session) -> Path:
    return s.tracker.path.with_name(f"{s.name}.restore")


def guard_source(s: Session) -> None:
    """The source refuses clients' changes while the session restores it."""
    pit = s.point_in_time
    s.source.restoring_by = s.name
    s.source.write_guard = lambda: f"session {s.name!r} is restoring it to {pit}"


def restored_by_other(s: Session) -> str | None:
    """The other session restoring ``s``'s source, if there is one."""
    other = s.source.restoring_by
    return other if other is not None and other != s.name else None


def _unguard(s: Session) -> None:
    """Lift the guard, only if it is still this session's (another restore may hold it)."""
    if s.source.restoring_by == s.name:
        s.source.restoring_by = None
        s.source.write_guard = lambda: None


async def settle(s: Session) -> None:
    """Wait for the restore's source writes still under way (a cancel leaves them running
    in their threads): none may land once the guard is lifted, over a client's write."""
    while s.source.restore_writes:
        await asyncio.gather(*s.source.restore_writes, return_exceptions=True)


async def forget(s: Session) -> None:
    """The session is gone: its restore's writes land, then its guard and file go too
    (called on removal, once its task is stopped)."""
    if s.source.restoring_by == s.name:
        await settle(s)
    _unguard(s)
    with contextlib.suppress(OSError):
        fs.unlink(restore_path(s), missing_ok=True)


def _refusal(s: Session) -> tuple[str | None, bool]:
    """Why ``s`` cannot be restored now (None if it can), and whether an update under way
    must be taken back first (it has not begun writing its target: ``target_writes``)."""
    u = s.update
    take_back = False
    if s.busy or (s.state in (State.COPYING, State.PAUSED, State.FAILED) and s.transfer is not None):
        what = f"update {u.id}" if u is not None else "an update"
        if u is None or u.kind != "incremental":
            why = (
                f"{what} is a full copy ({s.state.value}): its target holds no point in time until "
                "it ends (wait for it, or cancel it)"
            )
            return why, False
        if not s.target_writes.untouched:
            why = (
                f"{what} is {s.state.value} and has begun writing its target (or may have, before "
                "a restart): its target already holds part of its new mark, so no point in time is "
                "left to go back to until it ends (resume it, or wait for it: the point in time "
                "becomes its mark)"
            )
            return why, False
        take_back = True
    if not s.consistent or s.point_in_time is None:
        return "it is not consistent: its target holds no point in time to go back to", False
    if s.state is not State.IDLE and not take_back:
        return f"it is {s.state.value}", False
    if restored_by_other(s) is not None:
        why = f"its source volume {s.source.name!r} is being restored by session {restored_by_other(s)!r}"
        return why, False
    other = s.source.write_guard()
    if other is not None:
        return f"its source volume {s.source.name!r} is protected: {other}", False
    return None, take_back


async def _take_back(s: Session) -> str:
    """Cancel the update under way, whose target writes are claimed (none began, none will):
    the target is still the point in time, so the session stays consistent as of it. What
    the update owes and what changed since its mark go back into tracking, durably, before
    the row forgets the update (the commit point). Returns what the user is told."""
    u, transfer = s.update, s.transfer
    assert u is not None and transfer is not None
    async with s._gate.closed(), s.copier.checkpointing:  # no change half-way down the stack
        merged = s.tracking.copy()  # in memory once in the file (see ``Tracker.rewrite``)
        merged.or_(transfer)
        if s.copier.durable is not None:
            merged.or_(s.copier.durable)
        s._rewrite_tracking(merged, carry=True)
        new_state = next_state(s.name, s.state, "cancel")  # before the row's fields change
        was = s.transfer, s.copier.durable, s.state, u.phase
        u.move("cancel", s.name)
        s.transfer = s.copier.durable = None
        s.state = new_state
        try:
            s._persist_row(s)  # the commit point; the files below are garbage after it
        except BaseException:
            s.transfer, s.copier.durable, s.state = was[:3]
            u.put_back(was[3], s.name)
            raise
        s._after_commit("dropping the save area", s.protector.drop_save_area)
        s._after_commit("removing the transfer file", s.files.unlink_transfer)
    notice = (
        f"update {u.id} was cancelled first: it had not written to the target yet, which still "
        f"holds {s.point_in_time}; what it was to copy is tracked again"
    )
    s.events.publish("update.cancelled", name=s.name, id=u.id, reason="restore", message=notice)
    log.info("session %s: %s", s.name, notice)
    return notice


@one_at_a_time
async def restore(s: Session, by_retry: bool = False) -> dict[str, Any]:
    """Start (or, after a failure or a restart, go on with) a restore; returns once it has
    committed and its copy task runs."""
    if by_retry and s.state is not State.RESTORING:
        return s.status()  # it ended meanwhile: a retry never starts a restore
    resuming = s.state is State.RESTORING
    if resuming and s.busy:
        return s.status()  # already going
    take_back = False
    if not resuming:
        why, take_back = _refusal(s)
        if why is not None:
            raise NotRestorable(name=s.name, action="restore", why=why)
    elif restored_by_other(s) is not None:
        raise NotRestorable(
            name=s.name,
            action="go on restoring",
            why=f"its source volume {s.source.name!r} is being restored by session {restored_by_other(s)!r}",
        )
    # no await above: the source is this restore's from here (a second restore of it is
    # refused), and again free if the restore fails before its commit; and an update
    # under way is claimed with its check: no write to its target begins from here on
    s.source.restoring_by = s.name
    copying = take_back and s.state is State.COPYING
    if take_back:
        claimed = s.target_writes.claim()
        assert claimed, "checked with no await between"
    else:  # (an update's retry pending is cancelled only once it is taken back: see below)
        s._cancel_retry()
        if not by_retry:
            s.retry.attempts = 0
    notice: str | None = None
    try:
        if take_back:
            # its copy stops before its first target write; a retry pending (a failed
            # update's) stays armed until the update is taken back: given back, it goes on
            await s._stop_copy()
        # the target must answer before anything changes
        await s.copier.drop_target()
        target = await s.ensure_target()
        if target.size < s.source.size:
            await s.copier.drop_target()
            raise TargetError(msg=f"target {s.target_spec} is smaller than the source {s.source.name!r}")
        if take_back:
            notice = await _take_back(s)
    except BaseException:
        if not resuming and s.source.restoring_by == s.name:
            s.source.restoring_by = None
        if take_back and notice is None:  # not taken back: the update goes on as it was
            s.target_writes.release()
            # (its copy, if it was copying and still is: a real failure met meanwhile left
            # it failed, with its retry)
            if copying and s.state is State.COPYING and not s.closed and not s.busy:
                s._spawn()
        raise
    if take_back:  # taken back: the update's retry has nothing left to retry
        s._cancel_retry()
        s.retry.attempts = 0
    new_state = next_state(s.name, s.state, "restore")
    before = s.state, s.update, s.last_error, s.next_update_id, s.progress
    try:
        if not resuming:
            try:  # a file left by an earlier restore that ended (or a removed namesake) is void
                if fs.exists(restore_path(s)):
                    fs.unlink(restore_path(s))
                    sync_dir(restore_path(s).parent)
            except OSError as exc:
                raise os_error(exc, f"removing an old restore file of session {s.name}") from exc
            s.update = UpdateRecord(id=s.next_update_id, kind=KIND, started_at=now_iso())
            s.update.move("restore", s.name)
            s.next_update_id += 1
        s.state, s.last_error = new_state, None
        u = s.update
        assert u is not None
        # the progress shown (and saved with the row) is the restore's from now on
        s.progress = Progress(bytes_total=u.bytes_total, bytes_done=u.bytes_done, bytes_sent=u.bytes_sent)
        s._persist_row(s)  # the commit point
    except BaseException as exc:
        s.state, s.update, s.last_error, s.next_update_id, s.progress = before
        if not resuming and s.source.restoring_by == s.name:
            s.source.restoring_by = None
        await s.copier.drop_target()
        if notice is not None and isinstance(exc, DeltavolError):  # the take-back stands
            raise RestoreNotStarted(name=s.name, done=notice, why=exc.message) from exc
        raise
    guard_source(s)
    assert s.update is not None
    s.events.publish("restore.started", name=s.name, id=s.update.id, point_in_time=s.point_in_time)
    log.info("session %s: restoring %s to %s", s.name, s.source.name, s.point_in_time)
    s._task = asyncio.get_running_loop().create_task(Restorer(s, target).run(), name=f"restore-{s.name}")
    return {**s.status(), "notice": notice} if notice is not None else s.status()


async def resume_at_start(s: Session, by_retry: bool = False) -> None:
    """Start-up (and the retry policy): an interrupted restore goes on by itself. Nobody
    awaits this: an error stays in ``last_error``, the source guarded, and the session
    ``restoring``; a target that does not answer is tried again with the retry policy's
    backoff, then it waits for ``session restore``."""
    try:
        await restore(s, by_retry=by_retry)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if s.closed:  # removed, or the server is stopping
            return
        why = exc.message if isinstance(exc, DeltavolError) else repr(exc)
        log.error("session %s: the interrupted restore cannot go on: %s", s.name, why)
        with contextlib.suppress(DeltavolError, OSError):
            s.last_error = f"restore: {why}"
            s._persist_row(s)
        if isinstance(exc, TargetError):
            _retry_later(s)


def _retry_later(s: Session) -> None:
    """A restore whose target failed is tried again as an update is: exponential backoff,
    at most ``retry.limit`` times in a row."""
    if s.closed or s.retry.attempts >= s.retry.limit:
        return
    delay = s.retry.delay()
    s.retry.attempts += 1
    s.retry.next_at = time.time() + delay
    s.events.publish("update.retry", name=s.name, attempt=s.retry.attempts, at_time=s.retry.next_at)
    log.info("session %s: restore retry %d of %d in %.1fs", s.name, s.retry.attempts, s.retry.limit, delay)
    s._retry_task = asyncio.get_running_loop().create_task(_retry(s, delay))


async def _retry(s: Session, delay: float) -> None:
    await asyncio.sleep(delay)
    s.retry.next_at = None
    s._retry_task = None  # this task: the restore it starts must not cancel it
    await resume_at_start(s, by_retry=True)


class Restorer:
    """One run of a restore: the copy back, its checkpoints and its end."""

    def __init__(self, s: Session, target: CopyTarget) -> None:
        self.s = s
        self.target = target
        self.path = restore_path(s)
        self.todo = Bitmap(s.source.size, s.granularity)
        self.progress = Progress()
        self._checkpointing = asyncio.Lock()
        self._file = False  # the restore's bitmap file exists (see _checkpoint)
        self._left = False  # a file was there when the work was taken (maybe not this one's)

    async def run(self) -> None:
        s = self.s
        try:
            await self._copy_back()
            async with s._gate.closed():  # tracking is reset as a mark resets it
                await self._finish()
        except asyncio.CancelledError:
            raise  # a removal lifts the guard once the writes left under way have landed
        except Exception as exc:
            if isinstance(exc, DeltavolError | OSError):
                why = exc.message if isinstance(exc, DeltavolError) else str(exc)
            else:  # a bug: the session fails, the server stays up
                log.exception("session %s: restore crashed", s.name)
                why = f"internal error: {exc!r}"
            await self._fail(why)
            if isinstance(exc, TargetError):
                _retry_later(s)

    def _take_work(self) -> None:
        """What is still to copy back: the file of this restore, or (at its first run, or if
        it never got written) tracking as it is now, with the gate closed."""
        s, update = self.s, self.s.update
        assert update is not None
        todo: Bitmap | None = None
        if fs.exists(self.path):
            self._left = True
            try:
                todo, generation = persist.load(self.path, persist.KIND_RESTORE, s.granularity, s.source.size)
            except CorruptFile as exc:  # tracking still holds all of it (see the module notes)
                log.error("session %s: %s: the restore starts over from tracking", s.name, exc.message)
                todo, generation = None, update.id
            if generation != update.id:
                todo = None  # not this restore's
        if todo is None:
            todo = s.tracking.copy()
            update.bytes_total = todo.bytes_set()
        else:
            self._file = True
        self.todo = todo
        total = update.bytes_total or todo.bytes_set()
        self.progress = s.progress = Progress(bytes_total=total)
        self.progress.bytes_done = total - todo.bytes_set()
        self.progress.bytes_sent = update.bytes_sent

    async def _copy_back(self) -> None:
        s, target = self.s, self.target
        async with s._gate.closed():  # no client change is half-way down the stack
            self._take_work()
        log.info("session %s: %d bytes to copy back", s.name, self.todo.bytes_set())
        g = s.granularity
        checkpointer = asyncio.get_running_loop().create_task(self._checkpoint_loop())
        try:
            await run_pipeline(
                requests(self.todo.runs(), max(1, target.request_size // g)),
                self._copy_run,
                throttle=Throttle(None),
                request_bytes=lambda first, count: count * g,
                inflight=target.inflight,
            )
        finally:
            checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpointer
        async with self._checkpointing:  # once a checkpoint under way is over
            await s.source.backend.flush()  # every run written back is durable: _finish may go

    async def _copy_run(self, first: int, count: int) -> None:
        s, g = self.s, self.s.granularity
        offset = first * g
        length = min(count * g, s.source.size - offset)
        data = await self.target.pread(offset, length)
        pieces = split_zeroes(offset, data, g)
        done, sent = self._write_now(pieces)
        if done < len(pieces):
            write = asyncio.get_running_loop().create_task(self._write_back(pieces[done:]))
            writes = s.source.restore_writes
            writes.add(write)
            write.add_done_callback(writes.discard)
            sent += await asyncio.shield(write)  # a cancel leaves it to land; ``settle`` waits for it
        self.todo.clear_run(first, count)
        self.progress.bytes_sent += sent
        self.progress.done(length)
        assert s.update is not None
        s.events.progress(
            s.name,
            id=s.update.id,
            bytes_total=self.progress.bytes_total,
            bytes_done=self.progress.bytes_done,
            bytes_sent=self.progress.bytes_sent,
        )

    def _write_now(self, pieces: list[tuple[int, bytes | int]]) -> tuple[int, int]:
        """Write what of a run's pieces can go into the page cache in this step of the loop
        (``pwrite_now`` through the hooks below the gate; synchronous, so no mark can fall
        in the middle and it needs not enter the gate). Returns how many pieces were
        written, and their bytes of data (zeroes are not counted)."""
        s = self.s
        gate, stack = s.source.gate, s.source.below_gate
        done = sent = 0
        for at, part in pieces:
            if not gate.open or s.closed or s.source.restoring_by != s.name:
                break  # the task path waits for the gate, or stops
            if isinstance(part, int):
                if part > INLINE_ZEROES:
                    break
                if not self._hole(at, part):
                    try:
                        if not stack.pwrite_now(at, _ZEROES[:part]):
                            break
                    except NoSpace:
                        break  # the task path punches it instead
            else:
                if not stack.pwrite_now(at, part):
                    break
                sent += len(part)
            done += 1
        return done, sent

    async def _write_back(self, pieces: list[tuple[int, bytes | int]]) -> int:
        """Write pieces of a run back to the source, through its write gate (so that another
        session's mark waits for them, and only for them) but past the guard, which refuses
        clients only. Returns the bytes of data written (zeroes are not)."""
        s = self.s
        gate, stack = s.source.gate, s.source.below_gate
        await gate.enter()
        try:
            if s.source.restoring_by != s.name:  # removed meanwhile: the source is the clients' again
                raise asyncio.CancelledError
            sent = 0
            for at, part in pieces:
                if s.closed:  # removed, or the server stops: the file still owes this run
                    raise asyncio.CancelledError
                if isinstance(part, int) and part > INLINE_ZEROES:
                    await stack.zero(at, part, may_trim=True)
                elif isinstance(part, int) and not self._hole(at, part):
                    try:  # as zeroes, not punched (see the module notes)
                        await stack.pwrite(at, _ZEROES[:part])
                    except NoSpace:  # a full file system: the zeroes would take room, a hole none
                        await stack.zero(at, part, may_trim=True)
                elif not isinstance(part, int):
                    await stack.pwrite(at, part)
                    sent += len(part)
            return sent
        finally:
            gate.leave()

    def _hole(self, offset: int, length: int) -> bool:
        """True if the source has a hole there already: it reads zeroes, so a zeroed piece
        needs no write (zeroes written there would allocate room on a sparse file)."""
        try:
            extents = self.s.source.backend.extents_now(offset, length)
        except (DeltavolError, OSError):
            return False  # written, then: zeroes are right either way
        return len(extents) == 1 and extents[0][0] >= length and bool(extents[0][1] & STATE_HOLE)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            try:
                await self._checkpoint()
            except (DeltavolError, OSError) as exc:  # the last durable checkpoint still holds
                log.warning("session %s: restore checkpoint skipped: %s", self.s.name, exc)

    async def _checkpoint(self) -> None:
        """Snapshot what is left, fsync the source, then write the snapshot over the file: a
        chunk cleared in the snapshot was written before the fsync began, so it is durable.
        The first one creates the file atomically (until then a restart takes tracking, a
        superset). (A checkpoint cut short leaves its write to land later: an older
        snapshot, a superset.)"""
        async with self._checkpointing:
            snapshot = self.todo.copy()
            await self.s.source.backend.flush()
            if self._file:
                await asyncio.shield(fs.to_thread(persist.write_bits_in_place, self.path, snapshot))
            else:
                update = self.s.update
                assert update is not None
                save = persist.save_atomic
                await asyncio.shield(fs.to_thread(save, self.path, snapshot, update.id, persist.KIND_RESTORE))
                self._file = True
            self._save_row()

    def _save_row(self) -> None:
        s, update = self.s, self.s.update
        assert update is not None
        update.bytes_total = self.progress.bytes_total
        update.bytes_done = self.progress.bytes_done
        update.bytes_sent = self.progress.bytes_sent
        s._persist_row(s)

    async def _finish(self) -> None:
        """Tracking empty (durably), then the row: idle, consistent, the same point in time.
        The empty file is written, renamed and its directory synced in threads, strictly
        after the source's last flush (``_copy_back``): an empty tracking file durable
        before the restored bytes would leave a resumed restore nothing to do. A cancel (a
        removal) meanwhile waits for those threads, and leaves the row ``restoring``."""
        s, update = self.s, self.s.update
        assert update is not None
        await _rewrite_empty(s)
        before = s.state, update.phase, update.finished_at, s.last_error
        s.state = next_state(s.name, s.state, "restored")
        update.move("restored", s.name)
        s.retry.attempts = 0
        update.finished_at, s.last_error = now_iso(), None
        try:
            self._save_row()  # the commit point
        except BaseException:
            s.state, _, update.finished_at, s.last_error = before
            update.put_back(before[1], s.name)
            raise
        _unguard(s)
        if self._file or self._left:  # (most restores find and write none)
            with contextlib.suppress(OSError):
                fs.unlink(self.path, missing_ok=True)
        s.events.publish(
            "restore.finished",
            name=s.name,
            id=update.id,
            point_in_time=s.point_in_time,
            bytes_done=update.bytes_done,
        )
        log.info(
            "session %s: restored %s to %s (%d bytes copied back)",
            s.name,
            s.source.name,
            s.point_in_time,
            update.bytes_done,
        )

    async def _fail(self, why: str) -> None:
        s = self.s
        s.last_error = f"restore: {why}"
        log.error("session %s: restore failed: %s", s.name, why)
        try:
            self._save_row()
        except DeltavolError as exc:
            log.error("session %s: cannot record the failure: %s", s.name, exc.message)
        s.events.publish("restore.failed", name=s.name, error=why)
        await s.copier.drop_target()


async def _rewrite_empty(s: Session) -> None:
    """Tracking emptied and its file replaced durably, off the event loop; a cancel waits
    until the threads are over (no file is written under a later step), then raises."""
    job = asyncio.ensure_future(s.tracker.reset_to(s.tracker.reset_aside(s.next_update_id, carry=False)))
    cancelled = False
    while not job.done():
        try:
            await asyncio.wait([job])  # unlike awaiting it, a cancel does not cancel it
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    job.result()


@one_at_a_time
async def new_volume(s: Session, make: Callable[[Fill], Awaitable[T]]) -> T:
    """``volume create NAME --from-session S``: ``make`` creates the volume with a ``fill``
    that copies the target's point in time into it (a full copy, holes left as holes).

    The session is held for the whole copy, as a verify holds it: no update may start
    writing the target meanwhile, so what is read is one point in time."""
    if s.busy or s.state is not State.IDLE or not s.consistent:
        state = s.state.value + ("" if s.consistent else ", not consistent")
        raise NotRestorable(
            name=s.name, action="be copied", why=f"it is {state}: its target holds no point in time now"
        )
    await s.copier.drop_target()  # idle: nothing else uses it, and a kept connection may be dead
    target = await s.ensure_target()
    size, g = s.source.size, s.granularity

    async def fill(backend: FileBackend) -> None:
        async def copy(first: int, count: int) -> None:
            offset = first * g
            data = await target.pread(offset, min(count * g, size - offset))
            for at, part in split_zeroes(offset, data, g):
                if not isinstance(part, int):  # the new image reads zeroes where nothing is written
                    await backend.pwrite(at, part)

        nbits = Bitmap(size, g).nbits
        await run_pipeline(
            requests(iter([(0, nbits)]), max(1, target.request_size // g)),
            copy,
            throttle=Throttle(None),
            request_bytes=lambda first, count: count * g,
            inflight=target.inflight,
        )

    try:
        return await make(fill)
    finally:
        await s.copier.drop_target()
