"""The copy pipeline's pieces: request cutting, zero detection, zero-aware writes,
concurrency bounds and error propagation, against a recording target."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavol.bitmap.bitmap import Bitmap
from deltavol.copy.engine import (
    Progress,
    batches,
    is_zero,
    requests,
    run_pipeline,
    split_at_holes,
    split_zeroes,
    write_piece,
)
from deltavol.copy.throttle import Throttle
from deltavol.nbd.constants import STATE_HOLE


class RecordingTarget:
    def __init__(self, size: int, can_zero: bool = True) -> None:
        self.description = "recording"
        self.size = size
        self.request_size = 4 * 1024 * 1024
        self.inflight = 16
        self.can_zero = can_zero
        self.ops: list[tuple[str, int, int]] = []
        self.data = bytearray(size)

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.ops.append(("write", offset, len(data)))
        self.data[offset : offset + len(data)] = data

    async def zero(self, offset: int, length: int) -> bool:
        if not self.can_zero:
            return False
        self.ops.append(("zero", offset, length))
        self.data[offset : offset + length] = bytes(length)
        return True

    async def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    async def flush(self) -> None:
        self.ops.append(("flush", 0, 0))

    async def close(self) -> None:
        pass


def test_requests_cut_runs_at_max_chunks() -> None:
    assert list(requests(iter([(0, 5), (10, 2)]), 2)) == [(0, 2), (2, 2), (4, 1), (10, 2)]


@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), max_size=30),
    max_chunks=st.integers(1, 33),
    max_runs=st.integers(1, 6),
)
def test_batches_cover_the_runs_in_order_within_both_bounds(
    runs: list[tuple[int, int]], max_chunks: int, max_runs: int
) -> None:
    """Disjoint ascending runs (gaps given) come back as the same chunks, in order, each
    request at most ``max_chunks`` chunks in at most ``max_runs`` runs, none empty."""
    absolute, at = [], 0
    for gap, count in runs:
        absolute.append((at + gap, count))
        at += gap + count + 1
    got = list(batches(iter(absolute), max_chunks, max_runs))
    flat = [c for (batch,) in got for first, n in batch for c in range(first, first + n)]
    assert flat == [c for first, n in absolute for c in range(first, first + n)]
    for (batch,) in got:
        assert batch and len(batch) <= max_runs and all(n > 0 for _, n in batch)
        assert sum(n for _, n in batch) <= max_chunks
    # a request ends only when it is full: all but the last reach one of the bounds
    for (batch,) in got[:-1]:
        assert sum(n for _, n in batch) == max_chunks or len(batch) == max_runs


def test_requests_of_empty_runs_is_empty() -> None:
    assert list(requests(iter([]), 4)) == []


@pytest.mark.parametrize("n", [1, 4096, 4 * 1024 * 1024, 4 * 1024 * 1024 + 1])
def test_is_zero(n: int) -> None:
    assert is_zero(bytes(n))
    data = bytearray(n)
    data[-1] = 1
    assert not is_zero(bytes(data))


async def test_write_piece_sends_zeroes_as_zero_requests() -> None:
    t = RecordingTarget(1 << 20)
    assert await write_piece(t, 4096, bytes(8192), 8192, 4096) == 0
    assert await write_piece(t, 65536, None, 4096, 4096) == 0
    assert t.ops == [("zero", 4096, 8192), ("zero", 65536, 4096)]


async def test_write_piece_falls_back_to_zero_buffers() -> None:
    t = RecordingTarget(1 << 20, can_zero=False)
    t.data[:] = b"\xff" * (1 << 20)
    assert await write_piece(t, 0, None, 8192, 4096) == 8192
    assert t.ops == [("write", 0, 8192)]
    assert t.data[:8192] == bytes(8192)


async def test_write_piece_writes_data() -> None:
    t = RecordingTarget(1 << 20)
    assert await write_piece(t, 512, b"x" * 1000, 1000, 4096) == 1000
    assert t.data[512:1512] == b"x" * 1000


async def test_pipeline_runs_every_request_once_with_bounded_concurrency() -> None:
    seen: list[tuple[int, int]] = []
    active = peak = 0

    async def job(first: int, count: int) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.001)
        seen.append((first, count))
        active -= 1

    work = requests(iter([(i * 10, 3) for i in range(100)]), 2)
    await run_pipeline(work, job, throttle=Throttle(None), request_bytes=lambda f, c: c, inflight=8)
    assert sorted(seen) == sorted(requests(iter([(i * 10, 3) for i in range(100)]), 2))
    assert 1 < peak <= 8


async def test_pipeline_stops_on_first_error() -> None:
    done = 0

    async def job(first: int, count: int) -> None:
        nonlocal done
        if first == 5:
            raise OSError("target went away")
        await asyncio.sleep(0.001)
        done += 1

    with pytest.raises(OSError, match="target went away"):
        await run_pipeline(
            iter([(i, 1) for i in range(1000)]), job, throttle=Throttle(None), request_bytes=lambda f, c: c
        )
    assert done < 999


async def test_throttle_limits_rate() -> None:
    throttle = Throttle(1 << 20)  # 1 MiB/s
    start = time.monotonic()
    for _ in range(6):
        await throttle.take(128 * 1024)  # 768 KiB in all: at least ~0.5 s past the burst
    assert time.monotonic() - start >= 0.4


def test_progress_rate_and_eta() -> None:
    p = Progress(bytes_total=100)
    assert p.eta is None or p.eta >= 0
    p.done(100)
    assert p.bytes_done == 100
    assert p.eta == 0.0


def _model_extents(holes: set[int], unit: int, size: int):  # type: ignore[no-untyped-def]
    """An extents() over a source whose ``unit``-sized blocks in ``holes`` are holes."""

    async def extents(offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        at = offset
        while at < offset + length:
            n = min(unit - at % unit, offset + length - at)
            flags = STATE_HOLE if at // unit in holes else 0
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
            at += n
        return out

    return extents


@settings(max_examples=150, deadline=None)
@given(
    holes=st.sets(st.integers(0, 63)),
    runs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30)), max_size=4),
    unit_shift=st.integers(-2, 2),
    tail=st.integers(0, 3),
    max_chunks=st.integers(1, 5),
)
async def test_split_at_holes_covers_the_runs_and_sends_whole_holes(
    holes: set[int], runs: list[tuple[int, int]], unit_shift: int, tail: int, max_chunks: int
) -> None:
    g = 4096
    unit = g << unit_shift if unit_shift >= 0 else g >> -unit_shift
    nbits = 64
    size = nbits * g - tail * 512
    # disjoint, ascending runs inside the volume
    chunks = sorted({c for first, n in runs for c in range(first, min(first + n, nbits))})
    bm = Bitmap(size, g)
    for c in chunks:
        bm.set(c)
    extents = _model_extents(holes, unit, size)
    # small scan windows, so holes must merge across them
    out = [r async for r in split_at_holes(bm.runs(), extents, g, size, max_chunks, scan_window=8 * g)]
    covered = [c for first, n, _ in out for c in range(first, first + n)]
    assert covered == chunks
    for first, n, hole in out:
        blocks = {
            b
            for c in range(first, first + n)
            for b in range(c * g // unit, -(-min((c + 1) * g, size) // unit))
        }
        if hole:
            assert blocks <= holes
        else:
            assert n <= max_chunks
    # no two hole requests that touch: they would have been one
    ends = {(first + n) for first, n, hole in out if hole}
    assert not any(hole and first in ends for first, n, hole in out)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 5),  # the piece starts this many chunks in
    st.lists(st.sampled_from(["zero", "data", "late"]), min_size=1, max_size=12),
    st.integers(1, 4096),  # the last chunk's length (the volume's end)
)
def test_split_zeroes_cuts_zeroed_chunks_out_of_data(first: int, kinds: list[str], tail: int) -> None:
    g = 4096
    blocks = {"zero": bytes(g), "data": b"\x01" + bytes(g - 1), "late": bytes(g - 1) + b"\x02"}
    data = b"".join(blocks[k] for k in kinds)[: (len(kinds) - 1) * g + tail]
    offset = first * g
    pieces = split_zeroes(offset, data, g)
    # the pieces tile the data, alternate between zeroes and data, and say what is there
    pos, last_zero = offset, None
    for at, piece in pieces:
        assert at == pos
        zero = isinstance(piece, int)
        n = piece if zero else len(piece)
        assert last_zero is None or zero != last_zero, "two runs of one kind side by side"
        assert data[at - offset : at - offset + n] == (bytes(n) if zero else piece)
        if not zero:  # no zeroed chunk left inside a data run
            assert not any(is_zero(piece[i : i + g]) for i in range(0, n, g)), "a zeroed chunk sent as data"
        pos, last_zero = at + n, zero
    assert pos == offset + len(data)
    if "zero" not in kinds[:-1] and not is_zero(data[-tail:]) and set(kinds) != {"zero"}:
        assert pieces == [(offset, data)], "all data came back cut up"
