"""The metrics' pieces without a server: the heat map grid, the export counters, the facts
kept across a restart."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltavol.backend.export import BUCKETS, OPS, READ, WRITE, Export, ExportStats
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import OutOfRange
from deltavol.events import EventBus
from deltavol.metrics import bitmap_grid, rpo_seconds
from deltavol.store.db import Database
from deltavol.store.facts import Facts


@given(
    nbits=st.integers(1, 5000),
    cells=st.integers(1, 700),
    chunks=st.lists(st.integers(0, 4999), max_size=300),
)
def test_the_grid_is_the_fraction_of_set_chunks_in_each_cell(
    nbits: int, cells: int, chunks: list[int]
) -> None:
    bm = Bitmap(nbits * 4096, 4096)
    for c in chunks:
        if c < nbits:
            bm.set(c)
    grid, per = bitmap_grid(bm.to_bytes(), nbits, cells)
    assert len(grid) <= cells and per * len(grid) >= nbits > per * (len(grid) - 1)
    for i, frac in enumerate(grid):
        span = range(i * per, min(nbits, (i + 1) * per))
        assert frac == sum(bm.test(c) for c in span) / len(span)


def test_latency_buckets_and_counts() -> None:
    stats = ExportStats()
    stats.done(WRITE, 4096, 0.00003)  # below the first bound
    stats.done(WRITE, 4096, BUCKETS[0])  # on a bound: that bucket (le)
    stats.done(WRITE, 8192, 99.0)  # past the last: +Inf
    stats.failed(WRITE)
    assert stats.requests[WRITE] == 3 and stats.bytes[WRITE] == 16384 and stats.errors[WRITE] == 1
    assert stats.buckets[WRITE][0] == 2 and stats.buckets[WRITE][-1] == 1
    assert sum(stats.requests) == 3 and len(stats.requests) == len(OPS)


class _AtOnce:
    """A layer that takes every write and serves every read at once (the page cache)."""

    name, size = "vol", 1 << 20

    def pwrite_now(self, offset: int, data: bytes) -> bool:
        return True

    def pread_cached(self, offset: int, length: int) -> bytes | None:
        return bytes(length)


@given(writes=st.lists(st.integers(1, 8192), max_size=40), reads=st.lists(st.integers(1, 8192), max_size=40))
def test_requests_served_at_once_are_counted_exactly(writes: list[int], reads: list[int]) -> None:
    export = Export(_AtOnce())  # type: ignore[arg-type]
    stats = export.stats
    assert stats is not None
    stats.done(WRITE, 100, 99.0)  # one that waited, in the +Inf bucket
    for n in writes:
        assert export.pwrite_now(0, bytes(n))
    for n in reads:
        assert export.pread_cached(0, n) is not None
    with pytest.raises(OutOfRange):  # past the end: an error, not a request served
        export.pwrite_now(1 << 20, b"x")
    assert stats.requests[WRITE] == len(writes) + 1 and stats.requests[READ] == len(reads)
    assert stats.bytes[WRITE] == sum(writes) + 100 and stats.bytes[READ] == sum(reads)
    assert stats.buckets[WRITE][0] == len(writes) and stats.buckets[WRITE][-1] == 1
    assert stats.buckets[READ][0] == len(reads) and sum(stats.buckets[READ]) == len(reads)
    assert stats.errors[WRITE] == 1 and sum(stats.requests) == len(writes) + len(reads) + 1


def test_rpo_is_the_age_of_the_point_in_time() -> None:
    assert rpo_seconds(None) is None
    assert rpo_seconds("2026-01-01T00:00:00.000+00:00", now=1767225600.0 + 90) == 90.0


def _session(update_id: int, sent: int, finished: bool = False) -> SimpleNamespace:
    update = SimpleNamespace(id=update_id, kind="incremental", bytes_sent=sent, cofw_saved_bytes=0)
    update.finished_at = "done" if finished else None
    return SimpleNamespace(update=update, progress=None)


def test_facts_count_each_update_once_and_survive_a_reopen(tmp_path: Path) -> None:
    db = Database(str(tmp_path / "meta.db"))
    live: dict[str, SimpleNamespace] = {}
    facts = Facts(db, live.get)
    bus = EventBus()
    bus.listen(facts.record)
    bus.publish("session.created", name="s")
    bus.publish("update.marked", name="s", id=1, type="full")
    bus.publish("update.finished", name="s", id=1, type="full", bytes_sent=100, cofw_saved_bytes=0)
    # update 2 fails after 30 bytes, is resumed, and finishes with 50 sent in all
    bus.publish("update.marked", name="s", id=2, type="incremental")
    live["s"] = _session(2, 30)
    bus.publish("update.failed", name="s", id=2, error="target gone")
    bus.publish("update.finished", name="s", id=2, type="incremental", bytes_sent=50, cofw_saved_bytes=7)
    # update 3 is cancelled after 5 bytes
    bus.publish("update.marked", name="s", id=3, type="incremental")
    live["s"] = _session(3, 5)
    bus.publish("session.state", name="s", state="idle")
    # a full update asked for later is "requested"
    bus.publish("update.marked", name="s", id=4, type="full")
    want = {
        "full:initial": 1,
        "full:requested": 1,
        "updates:full:success": 1,
        "updates:incremental:success": 1,
        "updates:incremental:failure": 1,
        "updates:incremental:cancelled": 1,
        "sent_bytes": 155,
        "cofw_saved_bytes": 7,
    }
    got = facts.of("s")
    assert {k: got.get(k) for k in want} == want
    assert got["last_success_at"] >= got["last_failure_at"] > 0
    db.close()
    again = Facts(Database(str(tmp_path / "meta.db")), live.get)
    assert again.of("s") == got
    # the running update's bytes not counted yet are added at scrape time, once
    assert again.sent_bytes("s", {"id": 3, "bytes_sent": 5, "cofw_saved_bytes": 0}) == (155, 7)
    assert again.sent_bytes("s", {"id": 4, "bytes_sent": 10, "cofw_saved_bytes": 0}) == (165, 7)
    again.record(bus.publish("session.removed", name="s"))
    assert again.of("s") == {}
