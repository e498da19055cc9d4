"""A session's files and their life: create, load after a restart, set aside, delete.

Design notes
------------
A session owns three files: its tracking file and, while an update runs, its transfer
file (``bitmap/persist.py``) and save area (``copy/save_area.py``). The session row
(SQLite) says which update owns them; a file no committed row owns is garbage, never
evidence, except that its bits go back into tracking (a superset of the changes is safe,
a lost bit is not).

* ``create``: leftovers of a removed session of the same name go, durably, before a row
  that would adopt them commits; then a fresh tracking file.
* ``load``: every file is read first, then tracking is rewritten (the one step that needs
  space), and only then do the files no update owns go. A running update whose transfer
  file a later mark replaced (a row older than the file) takes that file and re-marks. A corrupt file raises
  ``CorruptFile``; any other error (a full disk, EIO) raises as it is: no file is taken
  for corrupt, and none is lost.
* ``set_aside``: corrupt files are kept for inspection under names of their own, after
  the row says "failed, needs a full update".
* ``delete``: the session is gone, and so are its files, durably.
* ``unlink_transfer``: after the commit that ends an update (done, cancelled, taken back
  by a restore) its transfer file is garbage; it is removed in a thread, not on the event
  loop (an unlink waits for the file system's journal: milliseconds on a busy disk). Every
  later user of the path waits for that first (``transfer_gone``): a mark's or a full
  update's new transfer file, the removal of the session and its stop. The pending removal
  is kept by path, not by session, so that a session created again under the same name
  waits for it too. Until it has happened a crash leaves the file: an orphan, whose bits go
  back into tracking at the next start (a superset), as after a crash before any unlink.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.save_area import SaveArea
from deltavol.errors import CorruptFile, os_error
from deltavol.sessions.states import Phase, State
from deltavol.store import fs
from deltavol.store.fs import sync_dir

if TYPE_CHECKING:
    from deltavol.sessions.session import Session

log = logging.getLogger("deltavol.session")

TRANSFER = persist.KIND_TRANSFER


class SessionFiles:
    # a transfer file's removal under way in a thread, by path (see ``unlink_transfer``)
    _unlinking: dict[Path, asyncio.Future[None]] = {}

    def __init__(self, session: Session, files: Path) -> None:
        self.session = session
        self.tracking_path = files / f"{session.name}.tracking"
        self.transfer_path = files / f"{session.name}.transfer"
        # a mark's new tracking file before it replaces the old one (TrackingFile.write_aside)
        self.tracking_aside = files / f"{session.name}.tracking.next"

    def create(self) -> None:
        """A fresh tracking file, and no transfer bitmap or save area: a removed session of
        the same name may have left its own (a crash before their unlinks were durable),
        and they must be gone, durably, before a row that would adopt them commits."""
        s = self.session
        save_dir = s.protector.save_dir
        try:
            for path in (self.transfer_path, self.tracking_aside, s.protector.save_area(0).path):
                fs.unlink(path, missing_ok=True)
            sync_dir(self.transfer_path.parent)
            sync_dir(save_dir)
        except OSError as exc:
            raise os_error(exc, f"removing old files of session {s.name}") from exc
        s.tracker.open_file()
        s._rewrite_tracking(carry=True)  # the regions the source wrote lately hot in it

    def load(self) -> None:
        """Reopen bitmaps and the save area after a restart. A corrupt file raises
        ``CorruptFile``; any other error (a full disk, EIO) raises as it is: no file is
        taken for corrupt, and none is lost.

        A transfer file that the session row does not own (an update that never
        committed, or one that finished just before the crash) goes back into tracking:
        a superset of the changes is safe, a lost bit is not. The file of a later update's
        mark that did not commit, under the row of an update still running, is that
        update's transfer, as of a new mark (``_later_mark``). An update under protection
        whose save area may have lost records (a power loss) gives up its mark and
        re-marks (``_give_up_lost_records``). Every file is read first;
        then tracking is rewritten (the one step that needs space), so what a reboot may
        have cost (the hot regions ``load`` added) is durable and the file is of this
        boot; only then do the files no update owns go. A failure at any step leaves the
        files as they were, or their bits in tracking as well: loading again is safe.
        """
        s = self.session
        tracker = s.tracker
        save: SaveArea | None = None
        try:
            tracking, _, recopy = persist.load_tracking(self.tracking_path, s.granularity, s.source.size)
            owned = s.update is not None and s.state in (State.COPYING, State.PAUSED, State.FAILED)
            transfer, orphan, later = None, False, 0
            if fs.exists(self.transfer_path):
                transfer, generation = persist.load(
                    self.transfer_path, TRANSFER, s.granularity, s.source.size
                )
                running = s.update.id if owned and s.update is not None and s.update.running else 0
                if running and generation < running:  # no mark writes that: not what the update owes
                    why = f"transfer bitmap is of update {generation}, not of the running update {running}"
                    raise CorruptFile(path=self.transfer_path, why=why)
                if running and generation > running:
                    later = generation  # a later mark that did not commit: see _later_mark
                elif not owned or s.update is None or generation != s.update.id:
                    tracking.or_(transfer)
                    transfer, orphan, owned = None, True, False
            elif owned:
                raise CorruptFile(
                    path=self.transfer_path, why="transfer bitmap of a running update is missing"
                )
            area = s.protector.save_area(s.update.id if s.update else 0)
            # a given-up mark keeps its records until the re-mark: they tell which chunks changed
            if owned and s.update is not None and s.update.phase in (Phase.PROTECTING, Phase.GIVEN_UP):
                save = self._records(area, later)
                for c in save.index if save is not None else ():
                    tracking.set(c)  # saved, so changed after the mark: their bits came with the saves
            s.recopy = recopy
            tracker.open_file()
            # in memory once in the file (``Tracker.rewrite``). No region carried hot: the
            # source's record of recent writes is empty until its export serves
            s._rewrite_tracking(tracking)
            if later:
                self._later_mark(later)
            if save is not None and not save.intact and s.update is not None:
                self._give_up_lost_records()
            if orphan:
                fs.unlink(self.transfer_path)
            fs.unlink(self.tracking_aside, missing_ok=True)  # a mark's that did not commit
            if save is None:  # no update owns it: a mark or the end of its update made its bits durable
                fs.unlink(area.path, missing_ok=True)
        except BaseException as exc:
            if save is not None:
                save.close()
            if tracker.file is not None:
                tracker.file.close()
                tracker.file = None
            if isinstance(exc, OSError):
                raise os_error(exc, f"files of session {s.name}") from exc
            raise
        s.transfer = transfer
        s.copier.durable = transfer.copy() if transfer is not None else None
        s.protector.save = save
        if recopy is not None:
            log.warning(
                "session %s: %s: the hot set's %d bytes are copied again",
                s.name,
                recopy.reason,
                recopy.bytes,
            )
        s._gate.changed()  # bitmaps replaced: what the write path cached is void

    def _records(self, area: SaveArea, later: int) -> SaveArea | None:
        """The save area of the update the row owns, reopened; with ``later`` (a later
        update's mark did not commit, ``_later_mark``), None if that mark's new header voided
        its records: the mark made the tracking file durable first, so no bit was left to
        them."""
        try:
            return area.open()
        except CorruptFile:
            if not later:
                raise
            try:  # the later mark's own header, and nothing else, says its records are void
                s = self.session
                s.protector.save_area(later).open().close()
            except CorruptFile:
                pass
            else:
                return None
            raise

    def _later_mark(self, later: int) -> None:
        """The row owns a running update, and its transfer file is of a later update, whose
        mark wrote it and then did not commit: the session row is older than the file. A
        mark that fails after its file is written (its save area or its commit fails) leaves
        the file behind while the update it replaced goes on (and may commit ``copying``
        again: a resume), and a crash before the commit does the same.

        That file holds all the update still owes (the mark ORed in what its transfer and
        its last checkpoint owed; a checkpoint since cleared only chunks copied and flushed),
        and may hold chunks changed since its mark (they are in tracking too): it becomes the
        update's transfer, so the session comes up as its row says and resumes. Not as of
        its own mark: a chunk changed since would be copied as it is now, and the later mark
        may have voided its save records. So an update under
        protection gives its mark up, in the row, before its copy can go on, and re-marks
        (``Session._remark``); one given up already re-marks anyway, and a full update's
        pass copies the file's chunks from the source, as it copies every other."""
        s = self.session
        assert s.update is not None
        why = f"the mark of update {later} did not commit, and its transfer file replaced this update's"
        log.warning("session %s: %s", s.name, why)
        if s.update.phase is Phase.PROTECTING:
            s._give_up_mark(s.update, why)

    def _give_up_lost_records(self) -> None:
        """The machine restarted since the save area's records were written, and they are
        not synced (``copy/save_area.py``): a power loss may have taken some whose overwrite
        reached the source, so the update cannot finish its own mark. It gives it up and
        re-marks when its copy goes on: what it owes (the transfer file), what changed
        since its mark (tracking, the hot set, the records that survived: in the tracking
        file just rewritten) as of a new mark.

        The row says so before anything else happens: the re-mark writes a new header over
        the area (this boot's, voiding the old records), and a crash before the re-mark
        commits must not find the old mark protecting with an area that looks intact."""
        s = self.session
        assert s.update is not None
        if s.update.phase is not Phase.PROTECTING:
            return  # given up already: it re-marks
        why = "the machine restarted since the save area's records were written (they may be lost)"
        before = s.last_error
        s.update.move("give_up", s.name)
        s.update.remark = why
        s.last_error = f"{why}; the update gives up its point in time and will copy as of a new mark"
        try:
            s._save_row()
        except BaseException:
            s.update.put_back(Phase.PROTECTING, s.name)
            s.update.remark, s.last_error = None, before
            raise
        log.warning("session %s: %s", s.name, s.last_error)

    def set_aside(self, why: str) -> None:
        """Corrupt files: keep them for inspection, fail the session, track afresh.

        Nothing is known of what changed, so the next update must be a full one. The row
        says so first: failed, not consistent, and no update (so the next start does not
        miss the transfer file of one). Then the files get names of their own (two starts
        in one second must not replace the earlier evidence) and a fresh tracking file is
        written; if that fails, the next start finds them missing and comes here again.
        The first cause stays in ``last_error`` until an update starts.
        """
        s = self.session
        if s.state is State.FAILED and s.update is None and s.last_error:
            log.error("session %s: %s", s.name, why)  # set aside before: the first cause stays
            why = s.last_error
        s.transfer = None
        s.copier.durable = None
        s.protector.drop_save_area()
        s.update = None
        s.state = State.FAILED
        s.consistent = False
        s.point_in_time = None
        s.last_error = why
        s._persist_row(s)  # the commit point
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        try:
            for path in (self.tracking_path, self.transfer_path, s.protector.save_area(0).path):
                if fs.exists(path):
                    fs.rename(path, _aside(path, stamp))
            sync_dir(self.tracking_path.parent)
            sync_dir(s.protector.save_dir)
        except OSError as exc:
            raise os_error(exc, f"setting aside files of session {s.name}") from exc
        s.tracker.tracking = Bitmap(s.source.size, s.granularity)
        s._gate.changed()  # every chunk is to be tracked again
        self.create()

    def delete(self) -> None:
        """The session is gone: so are its files, durably (a new session of the same name
        must not find them after a power loss; ``create`` removes such leftovers)."""
        s = self.session
        s.tracker.close_file()
        s.protector.drop_save_area()
        try:
            s.protector.save_area(0).delete()
            for path in (self.tracking_path, self.transfer_path, self.tracking_aside):
                fs.unlink(path, missing_ok=True)
            sync_dir(self.tracking_path.parent)
            sync_dir(s.protector.save_dir)
        except OSError as exc:  # the row is gone: a later session of this name removes them
            log.warning("session %s: files not removed: %s", s.name, exc.strerror or exc)

    def unlink_transfer(self) -> None:
        """Remove the transfer file in a thread (see the module notes); a failure is logged:
        the file left is an orphan, whose bits go back into tracking at the next start."""
        path = self.transfer_path
        before = self._pending()

        async def unlink() -> None:
            if before is not None:
                await asyncio.shield(before)
            try:
                await fs.to_thread(functools.partial(fs.unlink, path, missing_ok=True))
            except OSError as exc:
                log.warning("session %s: removing the transfer file failed: %s", self.session.name, exc)

        job = asyncio.ensure_future(unlink())
        self._unlinking[path] = job

        def done(fut: asyncio.Future[None]) -> None:
            if self._unlinking.get(path) is fut:
                del self._unlinking[path]
            if not fut.cancelled():
                fut.exception()  # (none: looked at, not left to the loop's handler)

        job.add_done_callback(done)

    async def transfer_gone(self) -> None:
        """Once a removal of the transfer file under way is over (a cancel of the caller
        leaves it running)."""
        job = self._pending()
        if job is not None:
            await asyncio.shield(job)

    def _pending(self) -> asyncio.Future[None] | None:
        """The removal under way of this path, if any; one of another event loop (a server
        stopped in this process, as tests do) is over as far as this one knows."""
        job = self._unlinking.get(self.transfer_path)
        if job is not None and job.get_loop() is not asyncio.get_running_loop():
            return None
        return job


def _aside(path: Path, stamp: str) -> Path:
    """A name of its own for a corrupt file kept for inspection."""
    aside, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while fs.exists(aside):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    return aside
