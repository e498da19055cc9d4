"""The regions of a volume its writes touched lately, with or without sessions.

Design notes
------------
Every change to a volume passes its write gate (``backend/gate.py``); the gate's layer
notes the 4 MiB regions (``persist.HOT_REGION``) it touches here, in a bounded record,
least recently written first: at most ``--hot-set`` bytes of them, as a tracking file's
hot set. Memory only, nothing on disk trusts it: it is a guess at where the next writes
go.

A tracking file written from scratch (a session created, a cancel, a restore's
take-back) carries these regions hot
(``Tracker.rewrite(..., carry=True)``), as a mark carries the regions written since the
last one: their hot bits are in the file, fsynced with it before it replaces the old one,
so the first write of the workload in each needs no group-commit round. What that costs is
what any hot region costs: after a power loss every chunk of it is copied again, within
the hot set's bound (``bitmap/persist.py``). Not at a start-up: sessions load before
any export serves, when the record is still empty; the file written anew then carries no
region, and the first write in each region waits for a round.

Cost on the data path: one dict lookup when a write lands in the region the last one did,
else two dict operations (and a third when the record is full).
"""

from __future__ import annotations

from deltavol.bitmap.persist import HOT_REGION, HOT_SET


class RecentWrites:
    __slots__ = ("_last", "_lru", "_shift", "bound", "region")

    def __init__(self, hot_set: int = HOT_SET, region: int = HOT_REGION) -> None:
        assert region > 0 and not region & (region - 1), "a region is a power of two"
        self.region = region
        self._shift = region.bit_length() - 1
        self.bound = max(1, hot_set // region)  # regions kept at most
        self._lru: dict[int, None] = {}  # region -> None, least recently written first
        self._last = -1  # the region written last (the most recent in ``_lru``)

    def note(self, offset: int, length: int) -> None:
        """A change of ``length`` bytes at ``offset`` is on its way down."""
        shift = self._shift
        r = offset >> shift
        if (offset + length - 1) >> shift != r:
            self._note_many(r, (offset + length - 1) >> shift)
            return
        if r == self._last:
            return
        self._last = r
        lru = self._lru
        lru.pop(r, None)
        lru[r] = None
        if len(lru) > self.bound:
            del lru[next(iter(lru))]

    def _note_many(self, first: int, last: int) -> None:
        lru = self._lru
        for r in range(max(first, last - self.bound + 1), last + 1):  # only the last ones stay
            lru.pop(r, None)
            lru[r] = None
        if last >= first:
            self._last = last
        while len(lru) > self.bound:
            del lru[next(iter(lru))]

    def regions(self, size: int) -> list[int]:
        """The regions written lately, of ``size`` bytes each (a tracking file's hot
        regions: a power of two), least recently written first."""
        rs = list(self._lru)
        if size == self.region:
            return rs
        if size > self.region:  # several of ours in one: the most recent write counts
            k = (size // self.region).bit_length() - 1
            out: dict[int, None] = {}
            for r in rs:
                out.pop(r >> k, None)
                out[r >> k] = None
            return list(out)
        k = (self.region // size).bit_length() - 1
        return [(r << k) + i for r in rs for i in range(1 << k)]

    def clear(self) -> None:
        self._lru.clear()
        self._last = -1
