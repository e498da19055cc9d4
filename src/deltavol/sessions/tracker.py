"""A session's change tracking: the write-ahead hook under every change to its source.

Design notes
------------
* **Write-ahead** (``track``): the chunk's bit is set in memory and written into the
  tracking file before the change goes down; the change waits for the group-commit round
  (``store/group_commit.py``) that makes the bit's hot region durable (``bitmap/persist.py``),
  unless that region is durably hot already. A change to a chunk whose bit is set but not
  yet durable waits for that same round.
* **What a bit still waits for** is ``unsynced[chunk]``: the round making it durable, or a
  ``Pending``: ``BY_SAVE`` (the chunk's save record makes it durable: the change's
  copy-on-first-write saves it first; see ``Protector``'s notes for why the record need
  not be durable), ``RETRY`` (its round failed, or its write into the
  file did: the next change of the chunk writes it again and asks for a round). A chunk
  not in ``unsynced`` has its bit durable (or unset).
* **A save implies its tracking bit**: the tracker does not know the save area. Its owner
  tells it which chunks a change's protection saves (``saves``, a callable returning the
  predicate, or None while nothing is protected), and the protector tells it when a save
  record made a bit durable (``saved``) or will not be written after all (``saves_void``).
* ``rewrite`` (the write gate closed, or nothing writes yet) replaces the file with the
  bitmap in memory: every bit set is durable then and nothing waits. A mark or a full
  update's start empties tracking (``reset_aside``, ``reset_to``): the new file, with the
  regions written since the last mark carried as hot (``persist.TrackingFile.recent``),
  is written aside in a thread and put in place with the gate closed; the first changes
  after a mark in the regions the workload writes need no round.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from pathlib import Path

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import DeltavolError
from deltavol.store.group_commit import GroupCommit


class Pending(enum.Enum):
    """What a chunk's tracking bit waits for, when it is no group-commit round."""

    BY_SAVE = "by-save"  # the save record of this change's protection makes it durable
    RETRY = "retry"  # not durable, and nothing makes it so: the next change writes it again


_BY_SAVE, _RETRY = Pending.BY_SAVE, Pending.RETRY


class Tracker:
    def __init__(
        self,
        path: Path,
        size: int,
        granularity: int,
        commit: GroupCommit,
        hot_region: int = persist.HOT_REGION,
        hot_set: int = persist.HOT_SET,
    ) -> None:
        self.path = path
        self.size = size
        self.granularity = granularity
        self.commit = commit
        self.hot_region = hot_region
        self.hot_set = hot_set
        self.tracking = Bitmap(size, granularity)
        self.file: persist.TrackingFile | None = None
        # chunk -> the round making its bit durable, or a Pending (see the notes above)
        self.unsynced: dict[int, asyncio.Future[None] | Pending] = {}
        self._round_chunks: dict[asyncio.Future[None], list[int]] = {}
        # the protector's predicate "this change's protect saves the chunk", or None
        self.saves: Callable[[], Callable[[int], bool] | None] = lambda: None
        # the regions (of the size given) the source's writes touched lately, least
        # recently first (``backend/recent.py``): what a file written from scratch carries
        self.recent: Callable[[int], list[int]] = lambda size: []
        self.removed = False  # the session's row is gone: its closed files are not touched

    # --- the file -------------------------------------------------------------------------
    def open_file(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = persist.TrackingFile(
            self.path, self.size, self.granularity, self.commit, self.hot_region, self.hot_set
        )

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()

    def rewrite(self, generation: int, tracking: Bitmap | None = None, carry: bool = False) -> None:
        """Replace the tracking file durably with the bitmap in memory, or with ``tracking``
        (the write gate is closed, or nothing writes yet): every bit set is durable now.
        With ``carry``, the file also holds hot the regions the source wrote lately
        (``recent``, at most the hot set's bound): the first changes there need no round.

        ``tracking`` (the bitmap in memory with more bits set) becomes the bitmap in memory
        only once the file holds it: if the rewrite fails, memory keeps the bitmap the file
        does, or a subset of it. A bit set in memory is taken for durable by ``track``: one
        in no file would let a later change of its chunk go down unrecorded."""
        assert self.file is not None
        new = self.tracking if tracking is None else tracking
        self.file.rewrite(new, generation, self._carried() if carry else None)
        self.tracking = new
        self.unsynced.clear()

    def _carried(self) -> list[int]:
        """The hot regions a file written from scratch carries: those the source wrote
        lately, the most recent ``capacity`` of them (in the file's bounds)."""
        assert self.file is not None
        hot = self.file.hot
        regions = [r for r in self.recent(hot.granularity) if r < hot.nbits]
        return regions[-self.file.capacity :]

    def reset_aside(self, generation: int, carry: bool = True) -> persist.Aside:
        """Empty tracking, off the event loop: its first part (memory only), the empty file to be,
        with the regions it carries as hot (``carry``: a mark's; a restore's end carries
        none). A thread writes it (``TrackingFile.write_aside``) while the loop goes on;
        ``reset_to`` puts it in place."""
        assert self.file is not None
        hot = self.file.recent(self.tracking) if carry else []
        return persist.Aside(Bitmap(self.size, self.granularity), generation, hot)

    async def reset_to(self, aside: persist.Aside) -> None:
        """Empty tracking with the file ``aside`` (written now if it is not yet), renamed into
        place and its directory synced in threads (the write gate is closed until this is
        over). Tracking is empty in memory even if the file is not replaced: the old file
        is a superset then."""
        assert self.file is not None
        self.tracking.clear_all()
        try:
            await self.file.put_in_place(aside, self.tracking)
        finally:  # its chunks' bits are cleared in memory: nothing of theirs waits any more
            self.unsynced.clear()

    async def make_durable(self, generation: int) -> None:
        """Make every bit set durable in the tracking file (the write gate is closed)."""
        assert self.file is not None
        await self.file.durable()
        if self.file.lost is not None or _RETRY in self.unsynced.values():
            # a failed sync may have dropped pages that no round writes again, and a bit
            # to retry may never have been written: a round proves nothing for them, only
            # a file written anew holds every bit set
            self.rewrite(generation)
        self.unsynced.clear()

    # --- the hook -------------------------------------------------------------------------
    def track(self, offset: int, length: int) -> list[asyncio.Future[None]]:
        """Set the tracking bits of a change; returns the group-commit rounds the change
        must wait for before it goes down (none when its bits are already durable).

        New bits go into the file at once; a chunk is in ``unsynced`` until the round
        that makes its hot region durable is done (see ``bitmap/persist.py``). If that
        round failed, it stays there as ``RETRY``, and the next change of the chunk
        writes it and asks for a round again.
        """
        if length == 0 or self.removed:
            return []
        tracking, unsynced = self.tracking, self.unsynced
        new = tracking.set_range(offset, length)
        waits: list[asyncio.Future[None]] = []
        if unsynced:
            saving = self.saves()
            retry = []
            for c in tracking.chunk_range(offset, length):
                if c in unsynced:
                    pending = unsynced[c]
                    if pending is _BY_SAVE:
                        if saving is None or not saving(c):  # the save failed, then the chunk was copied
                            retry.append(c)
                    elif pending is _RETRY:
                        retry.append(c)
                    elif isinstance(pending, asyncio.Future) and pending not in waits:
                        waits.append(pending)
            if retry:
                new = sorted(set(new).union(retry))
        if not new:
            return waits
        self._write_bits(new)
        assert self.file is not None
        cover, saving = self.file.cover, self.saves()
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
        tf, tracking, unsynced, g = self.file, self.tracking, self.unsynced, self.granularity
        if tf is None:
            return False
        c = offset // g
        if (
            length > 0
            and (offset + length - 1) // g == c < tracking.nbits
            and c not in unsynced
            and not self.removed
            and self.saves() is None
        ):  # one chunk, nothing protected: if its region is durably hot, what ``track`` does then
            try:
                return tf.write_hot_bit(tracking, c)
            except DeltavolError:  # set in memory, maybe not in the file: the next change writes it
                unsynced[c] = _RETRY
                raise
        chunks = tracking.chunk_range(offset, length)
        if unsynced and any(c in unsynced for c in chunks):
            return False
        if not tf.covered(chunks):
            saving = self.saves()
            if saving is None or not all(map(saving, chunks)):
                return False
        return not self.track(offset, length)  # each new bit is covered or saved: no round

    def tracked(self, offset: int, length: int) -> bool:
        """True if ``track`` would have nothing to do: every bit set and durable."""
        tracking, unsynced = self.tracking, self.unsynced
        if not tracking.all_set(offset, length):
            return False
        return not unsynced or not any(c in unsynced for c in tracking.chunk_range(offset, length))

    async def track_rest(self, offset: int, length: int) -> None:
        """Track a change and wait for the rounds its bits need."""
        for r in self.track(offset, length):
            await self.commit.wait(r)

    # --- what the protector says of its saves ---------------------------------------------
    def saved(self, chunk: int) -> None:
        """The chunk's save record is written: it stands for a bit left to it (the bit is
        in the file, see ``Protector``'s notes). A bit to retry may not be in the file:
        the next change writes it again."""
        unsynced = self.unsynced
        if unsynced.get(chunk) is _BY_SAVE:
            del unsynced[chunk]

    def saves_void(self, kept: Callable[[int], bool]) -> None:
        """Saves will not happen now (the mark is given up): a bit left to one whose chunk
        is not ``kept`` (saved already) is written again by the chunk's next change."""
        unsynced = self.unsynced
        for c, fut in unsynced.items():
            if fut is _BY_SAVE and not kept(c):
                unsynced[c] = _RETRY

    # --- internals ------------------------------------------------------------------------
    def _write_bits(self, new: list[int]) -> None:
        assert self.file is not None
        try:
            self.file.write_bits(self.tracking, new)
        except DeltavolError:
            for c in new:  # set in memory, maybe not in the file: the next change writes them
                self.unsynced[c] = _RETRY
            raise

    def _round_done(self, fut: asyncio.Future[None]) -> None:
        failed = fut.cancelled() or fut.exception() is not None
        unsynced = self.unsynced
        for c in self._round_chunks.pop(fut, ()):
            if unsynced.get(c) is fut:
                if failed:
                    unsynced[c] = _RETRY
                else:
                    del unsynced[c]
