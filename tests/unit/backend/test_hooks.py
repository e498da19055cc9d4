"""BeforeChange: hooks run before a change goes down; the cache of idle cells never hides work."""

from __future__ import annotations

import asyncio
import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavol.backend.gate import GateLayer, WriteGate
from deltavol.backend.hooks import MIN_CELL, BeforeChange, Hook
from deltavol.bitmap.bitmap import Bitmap
from tests.fakes import Disk

G = 4096
SIZE = 8 * MIN_CELL + 3 * G  # a short last cell


class Tracker:
    """A hook with work wherever its bitmap is clear; ``before`` does the work."""

    def __init__(self) -> None:
        self.done = Bitmap(SIZE, G)
        self.hook = Hook(self.before, self.ready)

    async def before(self, offset: int, length: int) -> None:
        self.done.set_range(offset, length)

    def ready(self, offset: int, length: int) -> bool:
        return self.done.all_set(offset, length)


def layer() -> tuple[BeforeChange, Tracker, WriteGate, Disk]:
    disk, tracker, gate = Disk(SIZE), Tracker(), WriteGate()
    return BeforeChange(disk, [tracker.hook], gate), tracker, gate, disk


def test_a_write_with_work_to_do_is_not_done_inline() -> None:
    f, tracker, _, disk = layer()
    assert not f.pwrite_now(0, bytes(G))
    assert disk.landed == []
    tracker.done.set_range(0, G)
    assert f.pwrite_now(0, bytes(G))
    assert disk.landed == [(0, G)]


def test_a_write_for_the_lane_is_agreed_to_only_once_no_hook_has_work() -> None:
    f, tracker, _, disk = layer()
    now: list[tuple[int, int]] = []

    def at_once(offset: int, length: int) -> bool:  # tracking's bit put in its file at once
        now.append((offset, length))
        return offset >= 2 * G

    f.hooks = [tracker.hook, Hook(tracker.before, lambda o, n: False, at_once)]
    assert f.pwrite_soon(0, bytes(G)) is None  # both hooks have work, one must wait
    tracker.done.set_range(0, SIZE)
    assert f.pwrite_soon(0, bytes(G)) is None  # the second still must wait there
    job = f.pwrite_soon(2 * G, bytes(G))
    assert job is not None and now[-1] == (2 * G, G)  # done before the job exists
    assert disk.landed == []  # nothing written until the job runs
    job.run()
    assert disk.landed == [(2 * G, G)]


def test_the_cache_is_dropped_when_the_gate_says_work_came_back() -> None:
    f, tracker, gate, _ = layer()
    tracker.done.set_range(0, SIZE)
    assert f.pwrite_now(0, bytes(G))  # learns cell 0
    tracker.done.clear_all()  # a mark, say: every chunk has work again
    gate.changed()
    assert not f.pwrite_now(G, bytes(G)), "the cached idle cell hid the hook's work"


async def test_closing_the_gate_drops_the_cache() -> None:
    f, tracker, gate, _ = layer()
    tracker.done.set_range(0, SIZE)
    assert f.pwrite_now(0, bytes(G))
    async with gate.closed():
        tracker.done.clear_all()
    assert not f.pwrite_now(0, bytes(G))


def test_a_cell_is_cached_only_if_the_hook_is_idle_on_all_of_it() -> None:
    f, tracker, _, _ = layer()
    tracker.done.set_range(0, G)  # only the first chunk of cell 0
    assert f.pwrite_now(0, bytes(G))
    assert not f.pwrite_now(G, bytes(G)), "cell 0 was cached from one idle chunk"


def test_a_write_whose_hook_worked_at_once_does_not_ask_for_the_whole_cell() -> None:
    """A protected write saves its block at once, and the chunk's other blocks still have
    work: asking the hooks over the whole cell after it costs every such write. The next
    write that finds every hook ready learns the cell."""
    f, tracker, _, disk = layer()
    asked: list[tuple[int, int]] = []

    def ready(offset: int, length: int) -> bool:
        asked.append((offset, length))
        return tracker.ready(offset, length)

    def at_once(offset: int, length: int) -> bool:
        tracker.done.set_range(offset, length)
        return True

    f.hooks = [Hook(tracker.before, ready, at_once)]
    tracker.done.set_range(G, MIN_CELL - G)  # all of cell 0 but its first block
    assert f.pwrite_now(0, bytes(G))
    assert asked == [(0, G)], "the cell was asked for after the hook's work at once"
    assert f.pwrite_now(G, bytes(G))  # every hook ready: the cell is learned
    assert asked[1:] == [(G, G), (0, MIN_CELL)]
    assert f.pwrite_now(2 * G, bytes(G)) and len(asked) == 3, "the learned cell was asked again"
    assert disk.landed == [(0, G), (G, G), (2 * G, G)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "work", "idle", "changed"]), st.integers(0, SIZE - 1))))
def test_inline_writes_only_where_the_hook_is_idle(ops: list[tuple[str, int]]) -> None:
    """Against a model: whatever the order of writes, new work and learning, a write goes
    down inline only if the hook has nothing to do on it at that moment."""
    f, tracker, gate, _ = layer()
    for op, pos in ops:
        offset, length = pos - pos % G, min(2 * G, SIZE - (pos - pos % G))
        if op == "write":
            expected = tracker.ready(offset, length)
            assert f.pwrite_now(offset, bytes(length)) == expected
        elif op == "idle":
            tracker.done.set_range(offset, length)
        else:  # new work is always announced through the gate
            if op == "work":
                for c in tracker.done.chunk_range(offset, length):
                    tracker.done.clear(c)
            gate.changed()


async def test_a_failed_hook_cancels_its_sibling_and_awaits_it_before_the_write_fails() -> None:
    """Hooks run concurrently; when one fails, the change fails, and it leaves the write gate
    then: a sibling still running would work outside the gate (after a mark, say)."""
    events: list[str] = []
    saving = asyncio.Event()

    async def failing(offset: int, length: int) -> None:
        await saving.wait()
        raise OSError(errno.EIO, "tracking file")

    async def slow(offset: int, length: int) -> None:
        saving.set()
        try:
            await asyncio.Event().wait()  # copy-before-write to a slow target
            events.append("slow finished its work")
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # its clean-up takes a step of the loop
            events.append("slow cancelled")
            raise

    disk, gate = Disk(SIZE), WriteGate()
    busy = Hook(slow, lambda o, n: False)
    f = GateLayer(BeforeChange(disk, [Hook(failing, lambda o, n: False), busy], gate), gate)
    with pytest.raises(OSError, match="tracking file"):
        await f.pwrite(0, bytes(G))
    assert events == ["slow cancelled"], "the write failed while a hook still ran"
    assert disk.landed == []
    async with asyncio.timeout(1):
        async with gate.closed():  # nothing is left inside the gate
            pass
