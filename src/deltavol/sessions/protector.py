"""Copy-on-first-write: the hook above tracking that keeps a marked update's image.

This is the cofw filter of a session: ``Protector.hook`` is what the source's
``BeforeChange`` layer (``backend/hooks.py``) runs for it before every change.

Design notes
------------
* **Protect** (``protect``): while a marked update is protecting (``Phase.PROTECTING``),
  the first change to a block (4 KiB) of a chunk it still owes saves the block's old
  contents durably to the save area first. A chunk is owed while its bit is set in the
  transfer *or* in the last durable checkpoint (``Copier.owed``): one copied since would
  be copied again after a crash, so its old contents must stay recoverable until a
  checkpoint records it as done.
* **Save at once** (``_save_at_once``): with no chunk lock held, every old block in the
  page cache and room in the save area, the reads and records happen in one step of the
  loop without the chunk locks (the common case); else under the locks (``ChunkLocks``,
  shared with the copy), one deadline for the whole change.
* **Copy-before-write** (``_save_or_copy``): with the save area full, the chunk's old
  contents go to the target at once, its transfer bit is cleared, and a checkpoint makes
  that durable before the change goes down. A target that fails or does not answer
  within ``target_timeout`` costs the update its point in time, not the client its write
  (``Session._give_up_mark``). While a restore takes the update back (``target_writes``
  shut), the target is not touched at all: the mark is given up at once, and the
  restore's connection is left alone.
* **Records are not synced** (``copy/save_area.py``): a save writes its record into the
  page cache and the change goes down. A killed server finds every record; after a power
  loss an update whose records may be lost re-marks (``SessionFiles.load``). They are
  synced before a checkpoint or the update's end counts on what the copy read from them
  (``Copier.records_durable``).
* **A save implies its tracking bit**: the tracker leaves the bit of a chunk this change
  saves to the save record (``saving``), and the protector tells it once the record is
  written (``Tracker.saved``), unless a failed mark voided the records on disk
  (``records_void``): they keep protecting the copy in memory, but make no bit durable
  any more. What the save did not cover waits for a round (``Tracker.track_rest``).
  The bit needs no durable record: it is in the tracking file's page cache from the
  moment the change was tracked, and the chunk is owed, so the transfer file keeps it
  until a checkpoint clears it; a checkpoint makes the tracking file durable first
  (``Copier.checkpoint``), holding ``checkpointing``, and while it is held no bit is
  left to a save (``saving``): every bit left to one is in the file before that sync
  begins. A power loss then re-marks with the bit in the transfer or tracking file.
  "The transfer file keeps it" is tested on what the file holds for sure
  (``Copier.in_file``), not on what memory owes: after a failure memory owes the
  unflushed chunks again while a late checkpoint may clear them in the file, and a
  checkpoint write that failed half-way leaves the file unknown until one succeeds.
* **A record that reads back wrong** (``SaveRecordLost`` from ``pieces``: the kernel
  dropped it after a writeback error) gives up the mark in ``lay_saved``: the saved
  chunk is in tracking, and the re-mark copies it as of the new mark.
* ``lay_saved`` turns what the copy read from the source back into the mark's image, and
  says when the save area is the session's no more (the mark is over).

The protector uses only the tracker's public API; the update, its transfer and the copy
state it reads from the session and its copier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from deltavol.backend.hooks import Hook
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.engine import write_piece
from deltavol.copy.save_area import RECORD, SaveArea
from deltavol.errors import DeltavolError, SaveRecordLost, TargetError
from deltavol.sessions.copier import looked_at
from deltavol.sessions.records import UpdateRecord
from deltavol.sessions.states import Phase
from deltavol.store import fs

if TYPE_CHECKING:
    from deltavol.sessions.copier import Copier
    from deltavol.sessions.session import Session
    from deltavol.sessions.tracker import Tracker

SAVE_AT_ONCE_MAX = 128 * 1024  # bytes of old blocks a change may save without the locks
_PROTECTING = Phase.PROTECTING


class Held:
    """The chunks one ``ChunkLocks.hold`` has taken; see ``ChunkLocks.let_writes_through``."""

    __slots__ = ("chunks", "over", "passable", "taken")

    def __init__(self) -> None:
        self.chunks: list[int] = []
        self.passable = False  # let writes through (``ChunkLocks.let_writes_through``)
        self.taken: set[int] = set()  # chunks a protected write took over from this hold
        self.over = asyncio.Event()  # set once the hold is let go


class ChunkLocks:
    """Per-chunk mutual exclusion between copying a chunk and saving it before a write.

    A copy in the kernel holds its chunks while its thread writes them to the target, and
    a target's disk can stall for as long as it likes: so once its thread has started, it
    lets protected writes take its chunks over (``let_writes_through``) instead of holding
    them back. A write that takes one over saves the old blocks first, as always, and the
    copy, once its thread is over, copies that chunk again (from the source and the saved
    blocks: see ``Copier.copy_batch``); what its thread wrote there is not counted.
    """

    def __init__(self) -> None:
        self._held: dict[int, asyncio.Event] = {}
        self._passable: dict[int, Held] = {}  # held by a copy that lets protected writes through
        self._copying: dict[int, Held] = {}  # taken over from a copy whose hold is not over yet
        self._writers_waiting: dict[int, int] = {}  # protected writes that wait for a chunk

    def any_held(self, chunks: Iterable[int]) -> bool:
        held = self._held
        return bool(held) and any(c in held for c in chunks)

    def copying(self, chunk: int) -> Held | None:
        """The hold of a copy ``chunk`` was taken over from, while that copy may still write
        it to the target (its thread is not over): None if none."""
        return self._copying.get(chunk)

    def let_writes_through(self, held: Held) -> None:
        """From now on a protected write may take the chunks of ``held`` over (``hold`` with
        ``take_over``); those that wait for one are woken to do so."""
        held.passable = True
        self._passable.update(dict.fromkeys(held.chunks, held))
        for c in [c for c in self._writers_waiting if self._passable.get(c) is held]:
            self._held.pop(c).set()
            self._held[c] = asyncio.Event()

    @asynccontextmanager
    async def hold(self, chunks: Iterable[int], *, take_over: bool = False) -> AsyncIterator[Held]:
        """Hold ``chunks``, waiting for each in ascending order (no deadlock between
        multi-chunk holders). With ``take_over`` (a protected write), a chunk held by a copy
        that lets writes through is taken from it at once (recorded in its ``taken``)."""
        held = Held()
        try:
            for c in sorted(chunks):
                while (ev := self._held.get(c)) is not None:
                    owner = self._passable.pop(c, None) if take_over else None
                    if owner is not None:
                        owner.taken.add(c)
                        self._copying[c] = owner
                        self._held.pop(c).set()
                        continue
                    if not take_over:
                        await ev.wait()
                        continue
                    waiting = self._writers_waiting
                    waiting[c] = waiting.get(c, 0) + 1  # woken if its holder lets writes through
                    try:
                        await ev.wait()
                    finally:
                        if waiting[c] == 1:
                            del waiting[c]
                        else:
                            waiting[c] -= 1
                self._held[c] = asyncio.Event()
                held.chunks.append(c)
            yield held
        finally:
            for c in held.chunks:
                if c in held.taken:  # not ours any more
                    if self._copying.get(c) is held:
                        del self._copying[c]
                    continue
                if held.passable:
                    self._passable.pop(c, None)
                self._held.pop(c).set()
            held.over.set()


class Protector:
    def __init__(
        self, session: Session, tracker: Tracker, copier: Copier, save_dir: Path, save_limit: int
    ) -> None:
        self.session = session
        self.tracker = tracker
        self.copier = copier
        self.save_dir = save_dir
        self.save_limit = save_limit
        self.save: SaveArea | None = None
        # a failed mark voided the save area's records on disk: they keep protecting the
        # copy in memory, but no longer make a saved chunk's tracking bit durable
        self.records_void = False
        self._preparing: asyncio.Future[None] | None = None  # see prepare_save_area
        self.locks = ChunkLocks()
        self.hook = Hook(self.protect, self.protected, self.protect_now)

    # --- the save area ----------------------------------------------------------------------
    def save_area(self, update_id: int) -> SaveArea:
        s = self.session
        return SaveArea(
            self.save_dir / f"{s.name}.save", s.granularity, s.source.size, update_id, self.save_limit
        )

    async def prepare_save_area(self) -> None:
        """Write the save area's space ahead in a thread. A cancelled mark leaves that
        thread running, and it writes at fixed offsets: so the next mark waits for it
        before its ``create``, else it would zero the new update's records."""
        if self._preparing is None or self._preparing.done():
            self._preparing = asyncio.ensure_future(fs.to_thread(self.save_area(0).prepare))
        await asyncio.shield(self._preparing)

    def drop_save_area(self) -> None:
        """Done with this update's records; the file stays, its space written ahead for the
        next update's (a new header voids them)."""
        if self.save is not None:
            self.save.close()
            self.save = None
        self.records_void = False

    # --- what the tracker asks --------------------------------------------------------------
    def saves(self) -> Callable[[int], bool] | None:
        """``saving``, or None while there is no save area (nothing is protected)."""
        return self.saving if self.save is not None else None

    def saving(self, chunk: int) -> bool:
        """True if a change of ``chunk`` now must first save it (``protect`` saves it)."""
        s = self.session
        update, save = s.update, self.save
        return (
            save is not None
            and not self.records_void
            and update is not None
            and update.phase is _PROTECTING
            and s.transfer is not None
            and not self.copier.checkpointing.locked()  # a checkpoint syncs tracking (see the notes)
            and chunk not in save
            and self.copier.in_file(chunk)  # owed in the transfer FILE, not only in memory
        )

    # --- the hook ---------------------------------------------------------------------------
    async def protect(self, offset: int, length: int) -> None:
        """Save the old contents of the blocks a change overwrites in chunks the update
        still owes, before they change (see the notes above)."""
        session = self.session
        update, transfer, save = session.update, session.transfer, self.save
        tracker = self.tracker
        if update is None or transfer is None or save is None or update.phase is not _PROTECTING:
            # the mark was given up since this change's tracking left its bits to a save
            # here (``track_now``): a round makes them durable instead
            await tracker.track_rest(offset, length)
            return
        owed, part = self.copier.owed, self._part
        chunks = tracker.tracking.chunk_range(offset, length)
        todo = [c for c in chunks if owed(c) and save.missing(c, *part(c, offset, length))]
        if todo and not await self._save_at_once(todo, offset, length, update, save):
            async with self.locks.hold(todo, take_over=True):
                # one deadline for the change, not one per chunk: it holds the write gate
                deadline = asyncio.get_running_loop().time() + session.target_timeout
                for c in todo:
                    if update.phase is not _PROTECTING or update is not session.update or session.removed:
                        break  # the mark was given up meanwhile (``_give_up_mark``), or replaced
                    runs = save.missing(c, *part(c, offset, length)) if owed(c) else []
                    if runs:
                        await self._save_or_copy(c, runs, update, transfer, save, deadline)
        if not self.records_void:
            for c in todo:
                if c in save:
                    tracker.saved(c)  # the save record stands for the bit (see the notes)
        # what the bits of this change still wait for: a save that did not happen (the chunk
        # was copied meanwhile, or went to the target with the save area full), or the round
        # another change's protect started for them
        await tracker.track_rest(offset, length)

    def protect_now(self, offset: int, length: int) -> bool:
        """Do ``protect``'s work at once if that needs no waiting, and say whether it did
        (the ``now`` of the hook): the change then goes down inline, in the same step of
        the loop, with no task. What ``_save_at_once`` does, and the same conditions: no
        chunk held, every old block in the page cache, room in the save area, records
        not synced one by one. And every tracking bit of the change settled: a bit left
        to a save (``Tracker.track_now`` runs first, see ``rehook``) is settled by the
        save's record; one the save did not cover makes this False, and ``protect``'s
        round (``track_rest``) does it. False may leave records written: a later
        ``protect`` finds them saved."""
        session = self.session
        update, save = session.update, self.save
        if (
            update is None
            or session.transfer is None
            or save is None
            or update.phase is not _PROTECTING
            or save.synced_saves
        ):
            return False
        owed, part, tracker = self.copier.owed, self._part, self.tracker
        chunks = tracker.tracking.chunk_range(offset, length)
        todo = [c for c in chunks if owed(c) and save.missing(c, *part(c, offset, length))]
        done = self._save_now(todo, offset, length, update, save)
        if not self.records_void:
            for c in todo:
                if c in save:
                    tracker.saved(c)  # the save record stands for the bit (see the notes)
        if not done:
            return False
        unsynced = tracker.unsynced
        return not unsynced or not any(c in unsynced for c in chunks)

    def protected(self, offset: int, length: int) -> bool:
        """True if ``protect`` would have nothing to do: no block here owed and unsaved."""
        session = self.session
        update, save = session.update, self.save
        if update is None or session.transfer is None or save is None or update.phase is not _PROTECTING:
            return True
        owed, part = self.copier.owed, self._part
        return not any(
            owed(c) and save.missing(c, *part(c, offset, length))
            for c in self.tracker.tracking.chunk_range(offset, length)
        )

    def _save_now(
        self, todo: list[int], offset: int, length: int, update: UpdateRecord, save: SaveArea
    ) -> bool:
        """The records of ``_save_at_once``, written and indexed in this step of the loop;
        True if every run of ``todo`` is saved. Only for an area whose saves are not synced
        one by one (``SaveArea.synced_saves``): its rounds are done at once."""
        reads = self._old_blocks(todo, offset, length, save)
        if reads is None:
            return False
        for c, start, old in reads:
            if save.put(c, start, old) is None:
                return False  # full or failed: the locks take the rest (copy-before-write)
            update.cofw_saved_bytes += len(old)
        return True

    def _old_blocks(
        self, todo: list[int], offset: int, length: int, save: SaveArea
    ) -> list[tuple[int, int, bytes]] | None:
        """The old contents of the blocks of ``todo`` this change must save, as (chunk,
        offset in it, bytes), read from the page cache in this step of the loop; None when
        that cannot be done without waiting: a chunk held (by the copy, or by a save that
        waits), over ``SAVE_AT_ONCE_MAX`` (a large zero or trim reads and saves under the
        locks, off the loop; the walk stops at the bound), no room in the save area, or a
        block not cached."""
        if self.locks.any_held(todo):
            return None
        g, part = self.session.granularity, self._part
        runs: list[tuple[int, int, int]] = []
        size = 0
        for c in todo:
            for start, end in save.missing(c, *part(c, offset, length)):
                runs.append((c, start, end))
                size += end - start
                if size > SAVE_AT_ONCE_MAX:
                    return None
        if runs and not save.room(size + RECORD.size * len(runs)):
            return None
        cached, reads = self.session.source.backend.pread_cached, []
        for c, start, end in runs:
            old = cached(c * g + start, end - start)
            if old is None:
                return None
            reads.append((c, start, old))
        return reads

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
        reads = self._old_blocks(todo, offset, length, save)
        if reads is None:
            return False
        puts = [(len(old), save.put(c, start, old)) for c, start, old in reads]
        done = next((r for _, r in puts if r is not None), None)  # puts of one step share a round
        if done is not None and not done.done():  # an area that syncs its saves (version 4)
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
        session, copier = self.session, self.copier
        base = c * session.granularity
        for start, end in runs:
            old = await session.source.backend.pread(base + start, end - start)
            if not await save.save(c, start, old):
                break
            update.cofw_saved_bytes += end - start
        else:
            return
        if session.target_writes.shut:
            # a restore is taking the update back (target_writes.py): its target still holds
            # the point in time and must not be written, and the connection opening is the
            # restore's. The mark is given up, durably before the change goes down: if the
            # restore does not start after all, the update goes on as of a new mark
            session._give_up_mark(update, f"copy-before-write of chunk {c}: the update is being taken back")
            return
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + session.target_timeout
        try:
            if transfer.test(c):
                copying = self.locks.copying(c)
                if copying is not None:
                    # taken over from a copy in the kernel whose thread may still write the
                    # chunk, as the source is now, to the target: after this copy, never
                    async with asyncio.timeout_at(deadline):
                        await copying.over.wait()
                off, n = copier.chunk_span(c)
                data = bytearray(await session.source.backend.pread(off, n))
                if not await self.lay_saved(data, off, [c], save):
                    return  # its save area was dropped (the session removed): no mark to protect
                async with asyncio.timeout_at(deadline):
                    target = await copier.ensure_target()
                    sent = await write_piece(target, off, bytes(data), n, session.granularity)
                if copier.target is not target:  # dropped meanwhile: no flush of it will come
                    raise TargetError(msg=f"target {target.description}: connection closed during a copy")
                if transfer.test(c):
                    transfer.clear(c)
                    if session.progress is not None:
                        session.progress.done(n)
                        session.progress.bytes_sent += sent
            # make "c is done" durable before c changes; shielded, so that a checkpoint is
            # never cut between its snapshot and its file (it ends by itself if given up)
            checkpoint = asyncio.ensure_future(copier.checkpoint())
            checkpoint.add_done_callback(looked_at)  # its failure was reported to that write
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(checkpoint)
            if copier.owed(c):  # no flush covered it (the target went): c must not change as is
                raise TargetError(msg=f"session {session.name}: the copy of chunk {c} is not durable")
        except TimeoutError:
            why = f"target {session.target_spec} did not answer in {session.target_timeout:g} s"
            session._give_up_mark(update, f"copy-before-write of chunk {c}: {why}")
        except (DeltavolError, OSError) as exc:
            why = exc.message if isinstance(exc, DeltavolError) else str(exc)
            session._give_up_mark(update, f"copy-before-write of chunk {c}: {why}")

    async def lay_saved(self, data: bytearray, offset: int, chunks: list[int], save: SaveArea) -> bool:
        """Turn ``data`` (the source from ``offset``) back into its contents as of the mark
        whose save area is ``save``. False if that save area is the session's no more (a
        cancel, a new mark, the update's end or a removal dropped it meanwhile): ``data``
        is then not that mark's image, and must not be copied as such."""
        g = self.session.granularity
        for c in chunks:
            if save is not self.save:
                return False
            if c in save:
                try:
                    pieces = await save.pieces(c)
                except SaveRecordLost as exc:
                    # the kernel dropped the record (a writeback error) and it read back
                    # as the disk holds it: the mark's contents of c are gone
                    update = self.session.update
                    if save is self.save and update is not None:
                        self.session._give_up_mark(update, exc.message)
                    return False
                except OSError:
                    if save is not self.save:  # closed under the read
                        return False
                    raise
                if save is not self.save:  # dropped meanwhile: what was read may not be its own
                    return False
                base = c * g - offset
                for start, old in pieces:
                    data[base + start : base + start + len(old)] = old
        return True

    def _part(self, chunk: int, offset: int, length: int) -> tuple[int, int]:
        """What [offset, offset+length) covers of ``chunk``, as offsets within the chunk."""
        g = self.session.granularity
        base = chunk * g
        return max(offset, base) - base, min(offset + length, base + g) - base
