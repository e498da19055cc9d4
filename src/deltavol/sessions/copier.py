"""A session's copy: the target connection, the copy passes and the checkpoints.

Design notes
------------
* **Copy** (``copy_run``): under the chunks' locks, read the source and lay the saved
  blocks over it (``Protector.lay_saved``), write it to the target zero-aware, clear the
  bits. A full pass (``Phase.FULL_COPY``) reads by extents, writes holes as zeroes, and
  has no protection: what changes under it is tracked and copied by the catch-up
  incremental pass that ends every full update.
* **In the kernel** (``copy_batch``, ``LocalTarget.copy_spans``): to a local volume, a
  pool thread copies the source with ``copy_file_range`` (holes as zero requests), many
  scattered runs to a request. While protecting, only chunks with no saved block, and
  only while their locks hold every write to them back: the source is then the mark's
  image. A batch with a saved block goes run by run through ``copy_run``, and so does
  every batch with a save area of an older version (``synced_saves``: a save is indexed
  only once synced, after the write's lock is let go, so "not saved" proves nothing).
  The locks hold until the thread is over, even when the copy is cancelled (``over``):
  it reads the source as long as it runs. But the thread also writes the target, whose
  disk may stall: so once it has started, a protected write does not wait for it, it
  takes its chunk over (``ChunkLocks.let_writes_through``) and saves the old blocks
  first, as for any owed chunk. What the thread wrote of a chunk taken over does not
  count (it may have read it while or after it changed): once the thread is over, that
  chunk is copied again, under its lock, from the source and the saved blocks
  (``_taken_over``), and only the others are done. A copy-before-write of a chunk taken
  over waits for the thread first (within its deadline), so that the thread cannot land
  the changed chunk after it. The source's holes are zeroed, and the writeback started,
  once the locks are let go: a write does not wait on the target's disk for them (they
  are the mark's zeroes whatever the source gets meanwhile, but in chunks taken over,
  which are left to their copy again).
* **Cancelled writes** (``drain``): a write to a local volume runs on in its thread when
  the copy that waits for it is cancelled; a pause, a new update and a re-mark wait for
  them all (those to a target given up too), so none lands after a later copy. A write
  to a server is sent, or queued to be, and runs there all the same: a pause waits for
  the replies of all (``NbdTarget.drain``), and so does a close (cancel, remove, resume),
  bounded by the connection's watchdog, which resets a connection that does not answer.
* **Checkpoint** (``checkpoint``): a chunk is done for good only once a target flush
  sent after its copy completed has succeeded: the transfer is snapshotted, the target
  flushed, the snapshot written. Until then the chunk stays owed (``owed``: in the
  transfer or in ``durable``, the transfer as of the last checkpoint) and protected, and
  a failed target, a new connection, a re-mark or a cancel owe it again
  (``forget_unflushed``). Checkpoints carry a sequence number and land in order; a mark,
  a cancel or the update's end replace the transfer under ``checkpointing``. Before it
  clears a chunk whose copy read save records, and before the update's end, the save
  area is synced (``records_durable``): a failure gives up the mark.
* **Flush before done**: ``Session._run`` flushes the target (``flush``) after the last
  pass and before the update's end commits. Once a flush of a connection failed, that
  connection is not trusted again.
* **One connection** (``ensure_target``): opened once for all who ask at the same time
  (the copy and copy-before-writes); dropping it (``drop_target``, ``abort_target``)
  supersedes one still opening, which is aborted and closed once open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.engine import Progress, batches, requests, run_pipeline, split_at_holes, write_piece
from deltavol.copy.targets import CopyTarget, LocalTarget, NbdTarget
from deltavol.copy.throttle import Throttle
from deltavol.errors import DeltavolError, IoFailure, TargetError
from deltavol.nbd.constants import STATE_HOLE
from deltavol.sessions.states import Phase
from deltavol.store import fs

if TYPE_CHECKING:
    from deltavol.copy.save_area import SaveArea
    from deltavol.sessions.records import UpdateRecord
    from deltavol.sessions.session import Session

log = logging.getLogger("deltavol.session")
T = TypeVar("T")
BATCH_RUNS = 64  # runs of chunks one request to a local target copies at most

CHECKPOINT_SECONDS = 2.0
_PROTECTING = Phase.PROTECTING


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it is over (the checkpointer: see checkpoint)."""
    task.cancel()
    await over(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("checkpointer failed", exc_info=task.exception())


async def over(fut: asyncio.Future[Any]) -> None:
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


class Copier:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.durable: Bitmap | None = None  # the transfer as of the last checkpoint
        # the ``durable`` whose checkpoint write failed: the file may have bits of it
        # cleared, so no bit is left to a save until a write succeeds (``in_file``)
        self._unsure: Bitmap | None = None
        self.checkpointing = asyncio.Lock()  # see checkpoint
        self._checkpoints = 0  # checkpoints taken (a snapshot's number)
        self._landed = 0  # the number of the last checkpoint written
        self._flush_failed: CopyTarget | None = None  # see flush
        self.target: CopyTarget | None = None
        self._opening: asyncio.Future[CopyTarget] | None = None  # see ensure_target
        self._closing_targets: set[asyncio.Future[None]] = set()  # superseded connections
        self._aborted: list[LocalTarget] = []  # given up with writes maybe still running: see drain

    # --- what is owed -----------------------------------------------------------------------
    def owed(self, chunk: int) -> bool:
        transfer = self.session.transfer
        assert transfer is not None
        durable = self.durable
        return transfer.test(chunk) or (durable is not None and durable.test(chunk))

    def in_file(self, chunk: int) -> bool:
        """True if ``chunk``'s bit is set in the transfer FILE for sure: ``durable`` (what
        the last checkpoint wrote, or the mark), unless a checkpoint write failed since
        (it may have cleared some of its bits and not others). Memory may owe more (a
        failed target owes its unflushed chunks again): those are not in the file."""
        durable = self.durable
        return durable is not None and durable is not self._unsure and durable.test(chunk)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        g = self.session.granularity
        off = chunk * g
        return off, min(g, self.session.source.size - off)

    def forget_unflushed(self) -> None:
        """Owe again what the last checkpoint owes: the chunks copied since were acknowledged
        by the target, never flushed, and it may have lost them (it failed, or the
        connection goes). Only while no copy runs."""
        s = self.session
        transfer, durable = s.transfer, self.durable
        if transfer is None or durable is None:
            return
        transfer.or_(durable)
        if s.progress is not None:
            s.progress.bytes_done = s.progress.bytes_total - s.transfer_bytes()

    # --- checkpoints ------------------------------------------------------------------------
    async def checkpoint(self) -> None:
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
        ``checkpointing``, which a checkpoint holds from its staleness check until its
        write is over (even when cancelled: the thread cannot be stopped).

        Before the write, the tracking bits left to save records are made durable (see
        ``_bits_left_to_saves_durable``): a chunk cleared in the file must not lose both.
        And the save records its copies read are synced (``_sync_records``), beside the
        flush and not under ``checkpointing`` (while that is held, protected writes pay a
        tracking round): a failure gives up the mark, and the checkpoint does not land.

        Bits only go from set to clear here, so they are written in place (no new space
        needed on a full disk; a torn write leaves each byte old or new, both safe).
        """
        s = self.session
        transfer, target = s.transfer, self.target
        if transfer is None or s.update is None or target is None:
            return
        self._checkpoints += 1
        seq, snapshot = self._checkpoints, transfer.copy()  # before the flush: see above
        save, old = s.protector.save, self.durable

        def anew(c: int) -> bool:  # cleared anew: its copy (done before the snapshot) may have read records
            return not snapshot.test(c) and (old is None or old.test(c))

        syncing = asyncio.ensure_future(self._sync_records(save, anew))
        try:
            await self.flush(target)
        finally:
            lost = await syncing  # never raises
        async with self.checkpointing:
            if s.transfer is not transfer or seq < self._landed:
                return  # a mark replaced the transfer, or a newer checkpoint landed
            update = s.update
            if lost is not None and save is s.protector.save and update is not None:
                s._give_up_mark(update, f"save records may be lost: {lost}")
            if lost is not None:
                raise IoFailure(what=f"session {s.name}: checkpoint", why=f"save records may be lost: {lost}")
            await self._bits_left_to_saves_durable()
            write = asyncio.ensure_future(
                fs.to_thread(persist.write_bits_in_place, s.files.transfer_path, snapshot)
            )
            try:
                await over(write)
            finally:  # the thread is over: the file holds the snapshot, or bytes of each
                if write.exception() is None:
                    self.durable, self._landed = snapshot, seq
                elif self.durable is not None:
                    self.durable = self._unsure = self.durable.copy()
                    self.durable.or_(snapshot)
            write.result()  # a failed write raises

    async def _bits_left_to_saves_durable(self) -> None:
        """Before a checkpoint clears chunks in the transfer file: the tracking bits left to
        save records (``Protector``'s notes), which are not synced, must be durable in the
        tracking file. ``checkpointing`` is held, so no bit is left to a save meanwhile."""
        s = self.session
        tf = s.tracker.file
        if s.protector.save is None or tf is None:
            return  # nothing protected: no bit was left to a save
        await tf.durable()
        if tf.lost is not None:  # a round proves nothing then (``persist``): the file holds the chunks
            raise IoFailure(what=f"session {s.name}: checkpoint", why=f"tracking file: {tf.lost}")

    async def records_durable(self) -> bool:
        """Before the update's end commits (the gate closed, ``checkpointing`` held): the
        save records its copy read must be durable (``_sync_records``). A failure gives up
        the mark (False): the saved chunks are in tracking, so the re-mark copies them
        again."""
        s = self.session
        update = s.update
        lost = await self._sync_records(s.protector.save, None)
        if lost is None or update is None:
            return True
        s._give_up_mark(update, f"save records may be lost: {lost}")
        return False

    async def _sync_records(self, save: SaveArea | None, cleared: Callable[[int], bool] | None) -> str | None:
        """Sync the save records before chunks copied from them are recorded as done (those
        ``cleared`` marks, or all): nothing syncs them as they are written
        (``copy/save_area.py``), so a background writeback error is reported to no one but
        this sync, and the kernel may have dropped a page: the copy then read back what
        the disk held. Why it failed, or None. A mark given up needs none: its re-mark
        copies the saved chunks again."""
        update = self.session.update
        if save is None or update is None or update.phase is not _PROTECTING or not save.unsynced:
            return None
        if cleared is not None and not any(map(cleared, save.index)):
            return None  # no chunk copied from records is recorded as done
        try:
            await save.durable()
        except (DeltavolError, OSError) as exc:
            return exc.message if isinstance(exc, DeltavolError) else str(exc)
        return None

    async def try_checkpoint(self) -> None:
        s = self.session
        try:
            await self.checkpoint()
            s._save_row()
        except (DeltavolError, OSError) as exc:  # the last durable checkpoint still holds
            log.warning("session %s: checkpoint skipped: %s", s.name, exc)

    async def checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            await self.try_checkpoint()

    # --- the target connection --------------------------------------------------------------
    async def flush(self, target: CopyTarget) -> None:
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

    @property
    def flush_failed(self) -> bool:
        """True if the connection kept is one whose flush failed (see ``flush``)."""
        return self.target is not None and self.target is self._flush_failed

    async def target_answers(self) -> bool:
        """Flush the target, waiting at most ``target_timeout``: a pause or a stop must not
        hang on a silent target. False if it failed: the last durable checkpoint stands."""
        s = self.session
        target = self.target
        if target is None:
            return True
        try:
            async with asyncio.timeout(s.target_timeout):
                await target.flush()
        except (TimeoutError, DeltavolError, OSError) as exc:
            why = "no answer" if isinstance(exc, TimeoutError) else exc
            log.warning("session %s: checkpoint skipped: target flush: %s", s.name, why)
            self._flush_failed = target  # see flush
            return False
        return True

    async def ensure_target(self) -> CopyTarget:
        """The target's connection, opened once for all who ask at the same time (the copy
        and copy-before-writes): two opens would leave two connections, and a checkpoint
        would flush the one the copy did not write on. A caller that stops waiting does
        not stop the open; a drop meanwhile supersedes it (it is aborted once open)."""
        if self.target is not None:
            return self.target
        opening = self._opening
        if opening is None:
            s = self.session
            opening = self._opening = asyncio.ensure_future(s._open_target(s))
            opening.add_done_callback(self._opened)  # when every caller stopped waiting
        target: CopyTarget = await asyncio.shield(opening)
        self._opened(opening)  # a future already done is returned before its callbacks ran
        if self.target is not target:  # dropped while it opened: no copy may go over it
            raise TargetError(msg=f"target {self.session.target_spec}: connection dropped while it opened")
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
            log.warning(
                "session %s: closing a superseded connection: %r", self.session.name, closing.exception()
            )

    def abort_target(self) -> None:
        """Drop the target at once and reset its connections: a copy-before-write it did
        not answer in time must not land after what the re-mark copies over a new one.
        (What its server has already read cannot be recalled: a request read but not yet
        executed may still land, as with any NBD client that gives up on a request.)"""
        self.forget_unflushed()
        self._supersede_open()
        target, self.target = self.target, None
        self._flush_failed = None
        if target is not None:
            target.abort()
            if isinstance(target, LocalTarget):
                self._aborted.append(target)

    async def drain(self) -> None:
        """Wait until no write to a local volume, the kept one or one given up, runs any
        more. A write to it cannot be stopped: one a pause or a give-up cancelled goes on
        in its thread, and must land before what a next copy (a next mark) writes there.
        The kept connection to a server is drained too: the writes a cancelled copy left
        in flight are answered (or the connection reset) before a checkpoint's flush and
        before a next copy. (A connection given up is reset: see ``abort_target``.)"""
        while self._aborted:
            await self._aborted[0].drain()
            self._aborted.pop(0)
        target = self.target
        if isinstance(target, LocalTarget):
            await target.drain()
        elif isinstance(target, NbdTarget):
            try:
                await target.drain()
            except BaseException:  # cancelled: its connections were reset, it is no use now
                if self.target is target:
                    self.abort_target()
                raise

    async def drop_target(self) -> None:
        """Close the target; a next one is a new connection, whose flushes cover none of
        this one's writes."""
        self.forget_unflushed()
        self._supersede_open()
        target, self.target = self.target, None
        self._flush_failed = None
        if target is not None:
            await target.close()

    # --- the copy ---------------------------------------------------------------------------
    async def copy_pass(self, target: CopyTarget) -> None:
        s = self.session
        assert s.transfer is not None and s.update is not None
        rate = s.update.max_rate
        # throttled: requests of about a quarter second each, so progress stays smooth
        request = target.request_size
        if rate:
            request = min(request, max(s.granularity, rate // 4))
        max_chunks = max(1, request // s.granularity)
        runs, g = s.transfer.runs(), s.granularity
        if s.update.phase is _PROTECTING and isinstance(target, LocalTarget) and not rate:
            # scattered chunks, many to a request: one thread hand-over copies them all
            await run_pipeline(
                batches(runs, max_chunks, BATCH_RUNS),
                lambda runs: self.copy_batch(target, runs),
                throttle=Throttle(rate),
                request_bytes=lambda runs: sum(n for _, n in runs) * g,
                inflight=target.inflight,
            )
            return
        # a full pass is cut at the source's holes, so it goes as fast as its data
        work = (
            requests(runs, max_chunks)
            if s.update.phase is _PROTECTING
            else split_at_holes(runs, s.source.backend.extents, g, s.source.size, max_chunks)
        )
        await run_pipeline(
            work,
            lambda first, count, hole=False: self.copy_run(target, first, count, hole),
            throttle=Throttle(rate),
            request_bytes=lambda first, count, hole=False: g if hole else count * g,  # a hole costs a request
            inflight=target.inflight if not rate else 2,
        )

    async def copy_run(
        self, target: CopyTarget, first: int, count: int, hole: bool = False, *, counted: bool = True
    ) -> None:
        """Copy the run of chunks ``first``.. (``hole``: a hole of the source, sent as
        zeroes); ``counted``: its bytes count as sent (not when copied again after a copy
        in the kernel that counted them, ``_taken_over``)."""
        s = self.session
        transfer, update, progress, save = s.transfer, s.update, s.progress, s.protector.save
        assert transfer is not None and update is not None and progress is not None
        g = s.granularity
        offset = first * g
        length = min(count * g, s.source.size - offset)
        chunks = range(first, first + count)
        local = target if isinstance(target, LocalTarget) else None
        pieces: list[tuple[int, bytes | int]] = []
        if hole:
            pieces = [(offset, length)]
        elif update.phase is not _PROTECTING:
            if local is not None:  # nothing to hold still: what changes is copied by the catch-up
                sent = await local.copy_spans(s.source.backend, [(offset, length)], None, g)
                if counted:
                    progress.bytes_sent += sent  # not `+= await`: see below
                await local.written(length)
            else:
                pieces = await self._read_by_extents(offset, length)
        else:
            protector = s.protector
            kernel = False
            async with protector.locks.hold(chunks) as held:
                live = [c for c in chunks if transfer.test(c)]
                if not live:
                    return
                if local is not None and not _maybe_saved(save, live):
                    # no block saved: the source under the locks is the mark's image, and
                    # the kernel copies it; a write that takes a chunk over meanwhile saves
                    # it first, and it is copied again (``_taken_over``)
                    kernel = True
                    zeroes: list[tuple[int, int]] = []
                    spans = _live_spans(live, self.chunk_span)
                    protector.locks.let_writes_through(held)
                    sent = await _in_thread(local.copy_spans(s.source.backend, spans, zeroes, g))
                    if counted:
                        progress.bytes_sent += sent
                else:
                    data = bytearray(await s.source.backend.pread(offset, length))
                    if protector.save is not save or (
                        save is not None and not await protector.lay_saved(data, offset, live, save)
                    ):
                        return  # the mark this run copies for is over: nothing copied, its bits stay
                    pieces = _live_pieces(data, offset, live, self.chunk_span)
            if kernel:
                assert local is not None
                if protector.save is not save:
                    return  # the mark ended under the copy: its bits stay (copied again)
                # the locks are let go: the mark's zeroes stay zeroes, and a write no longer
                # waits for the punches nor the writeback start on the target's disk
                await local.zero_spans(_outside(zeroes, held.taken, g))
                await local.written(sum(n for _, n in spans))
                if held.taken:
                    await self._taken_over(local, [(first, count)], held.taken)
                    return
        for off, piece in pieces:
            n = piece if isinstance(piece, int) else len(piece)
            sent = await write_piece(target, off, None if isinstance(piece, int) else piece, n, g)
            if counted:
                progress.bytes_sent += sent  # not `+= await`: that would read a stale total
        if self.target is not target:  # dropped meanwhile: no flush of it will come
            raise TargetError(msg=f"target {target.description}: connection closed during a copy")
        progress.done(transfer.clear_run(first, count))
        self._progressed(update, progress)

    async def copy_batch(self, target: LocalTarget, runs: tuple[tuple[int, int], ...]) -> None:
        """Copy the runs of chunks ``runs`` (ascending) under copy-on-first-write to a local
        target, in the kernel and in one thread hand-over, while their locks hold the
        source still; a batch with a saved block goes run by run through ``copy_run``."""
        s = self.session
        transfer, update, progress, protector = s.transfer, s.update, s.progress, s.protector
        assert transfer is not None and update is not None and progress is not None
        save = protector.save
        chunks = [c for first, count in runs for c in range(first, first + count)]
        zeroes: list[tuple[int, int]] = []
        async with protector.locks.hold(chunks) as held:
            live = [c for c in chunks if transfer.test(c)]
            if not live or protector.save is not save:
                return  # copied by copy-before-write; or the mark is over: its bits stay
            saved = _maybe_saved(save, live)
            if not saved:
                spans = _live_spans(live, self.chunk_span)
                protector.locks.let_writes_through(held)  # see ``_taken_over``
                sent = await _in_thread(target.copy_spans(s.source.backend, spans, zeroes, s.granularity))
                progress.bytes_sent += sent
        if saved:  # the old way, each run under its own locks again
            for first, count in runs:
                await self.copy_run(target, first, count)
            return
        if protector.save is not save:
            return  # the mark ended under the copy: its bits stay (copied again)
        # the locks are let go: the mark's zeroes stay zeroes, and a write no longer waits
        # for the punches nor the writeback start on the target's disk
        await target.zero_spans(_outside(zeroes, held.taken, s.granularity))
        await target.written(sum(n for _, n in spans))
        if held.taken:
            await self._taken_over(target, runs, held.taken)
            return
        if self.target is not target:  # dropped meanwhile: no flush of it will come
            raise TargetError(msg=f"target {target.description}: connection closed during a copy")
        progress.done(sum(transfer.clear_run(first, count) for first, count in runs))
        self._progressed(update, progress)

    def _progressed(self, update: UpdateRecord, progress: Progress) -> None:
        s = self.session
        s.events.progress(
            s.name,
            id=update.id,
            bytes_total=progress.bytes_total,
            bytes_done=progress.bytes_done,
            bytes_sent=progress.bytes_sent,
        )

    async def _taken_over(
        self, target: LocalTarget, runs: Iterable[tuple[int, int]], taken: set[int]
    ) -> None:
        """After a copy in the kernel of ``runs`` whose chunks ``taken`` protected writes
        took over (``ChunkLocks.let_writes_through``): the thread may have read them while
        or after they changed, so what it wrote there does not count. The others are done;
        those are copied again, under their locks, from the source and the blocks the
        writes saved (``copy_run``), over what the thread wrote (it is over). Their bytes
        were counted as sent once, by the thread's copy: not again."""
        s = self.session
        transfer, update, progress = s.transfer, s.update, s.progress
        assert transfer is not None and update is not None and progress is not None
        if self.target is not target:  # dropped meanwhile: no flush of it will come
            raise TargetError(msg=f"target {target.description}: connection closed during a copy")
        done = 0
        again: list[tuple[int, int]] = []
        for first, count in runs:
            for c in range(first, first + count):
                if c not in taken:
                    done += transfer.clear_run(c, 1)
                elif again and again[-1][0] + again[-1][1] == c:
                    again[-1] = (again[-1][0], again[-1][1] + 1)
                else:
                    again.append((c, 1))
        progress.done(done)
        self._progressed(update, progress)
        for first, count in again:
            await self.copy_run(target, first, count, counted=False)

    async def _read_by_extents(self, offset: int, length: int) -> list[tuple[int, bytes | int]]:
        """Pieces of [offset, offset+length): data as bytes, holes as their length."""
        source = self.session.source
        pieces: list[tuple[int, bytes | int]] = []
        pos = offset
        for n, flags in await source.backend.extents(offset, length):
            pieces.append((pos, n if flags & STATE_HOLE else await source.backend.pread(pos, n)))
            pos += n
        return pieces


async def _in_thread(work: Awaitable[T]) -> T:
    """Await ``work`` (a thread's) until it is over, even if cancelled meanwhile (``over``):
    a copy in the kernel reads the source for as long as its thread runs, so the locks
    that hold the source still are let go only then."""
    fut = asyncio.ensure_future(work)
    fut.add_done_callback(looked_at)  # a failure a cancelled copy no longer waits for is no warning
    await over(fut)
    return fut.result()


def looked_at(fut: asyncio.Future[Any]) -> None:
    """A done callback that retrieves a failure (its owner handles it, or has died)."""
    if not fut.cancelled():
        fut.exception()


def _maybe_saved(save: SaveArea | None, live: list[int]) -> bool:
    """Whether a block of the ``live`` chunks may be saved, so the source is not the mark's
    image there (or nothing is protected). An area that syncs its saves (one of an older
    version) indexes a record only once its sync is over, after the write's lock is let
    go: a chunk not in it yet may be saved already."""
    return save is None or save.synced_saves or any(c in save for c in live)


def _outside(spans: list[tuple[int, int]], chunks: set[int], g: int) -> list[tuple[int, int]]:
    """The parts of ``spans`` (offset, length) outside the ``g``-byte ``chunks``."""
    if not chunks:
        return spans
    out: list[tuple[int, int]] = []
    for offset, length in spans:
        pos, end = offset, offset + length
        while pos < end:
            stop = min(end, pos // g * g + g)
            if pos // g not in chunks:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], stop - out[-1][0])
                else:
                    out.append((pos, stop - pos))
            pos = stop
    return out


def _live_spans(live: list[int], span: Any) -> list[tuple[int, int]]:
    """(offset, length) of the runs of adjacent chunks among ``live``."""
    spans: list[tuple[int, int]] = []
    for c in live:
        off, n = span(c)
        if spans and spans[-1][0] + spans[-1][1] == off:
            spans[-1] = (spans[-1][0], spans[-1][1] + n)
        else:
            spans.append((off, n))
    return spans


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
