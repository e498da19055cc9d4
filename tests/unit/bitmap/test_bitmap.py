"""Bitmap operations against a model (a set of set chunk numbers), at word and byte edges."""

from __future__ import annotations

import itertools
import mmap
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavol.bitmap import bitmap as bitmap_module
from deltavol.bitmap.bitmap import Bitmap

G = 4096
EDGES = [0, 1, 6, 7, 8, 9, 15, 16, 62, 63, 64, 65, 127, 128, 129, 191, 192, 255, 256]
# Bit counts around byte and 64-bit word boundaries, and sizes whose last chunk is short.
NBITS = st.sampled_from([1, 2, 7, 8, 9, 63, 64, 65, 127, 128, 129, 200, 257]) | st.integers(1, 300)
TAILS = st.sampled_from([0, 1, 512, G - 1])


@st.composite
def sizes(draw: st.DrawFn) -> int:
    return draw(NBITS) * G - draw(TAILS)


def chunk() -> st.SearchStrategy[int]:
    """A chunk number biased to edges; callers reduce it modulo ``nbits`` (-1: the last one)."""
    return st.sampled_from([*EDGES, -1, -2]) | st.integers(0, 300)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), chunk()),
        st.tuples(st.just("clear"), chunk()),
        st.tuples(st.just("set_range"), chunk(), st.sampled_from([0, 1, 511, G - 1]), st.integers(0, 70 * G)),
        st.tuples(st.just("clear_run"), chunk(), st.integers(0, 130)),
        st.tuples(st.just("set_run"), chunk(), st.integers(0, 130)),
        st.tuples(st.just("or"), st.sets(chunk(), max_size=20)),
        st.tuples(st.just("set_all")),
        st.tuples(st.just("clear_all")),
    ),
    max_size=25,
)


def model_runs(bits: set[int], start: int = 0) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for c in sorted(b for b in bits if b >= start):
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


def chunk_bytes(size: int, c: int) -> int:
    return min(G, size - c * G)


def apply(bm: Bitmap, model: set[int], op: tuple) -> None:  # type: ignore[type-arg]
    """Apply ``op`` to both; check what the operation itself returns."""
    n = bm.nbits
    name = op[0]
    if name in ("set", "clear"):
        c = op[1] % n
        bm.set(c) if name == "set" else bm.clear(c)
        model.add(c) if name == "set" else model.discard(c)
    elif name == "set_range":
        offset, length = (op[1] % n) * G + op[2], op[3]
        touched = (
            {c for c in range(n) if c * G < offset + length and offset < (c + 1) * G} if length else set()
        )
        assert bm.set_range(offset, length) == sorted(touched - model)
        model |= touched
    elif name == "clear_run":
        first, count = op[1] % n, op[2]
        gone = {c for c in model if first <= c < first + count}
        assert bm.clear_run(first, count) == sum(chunk_bytes(bm.size, c) for c in gone)
        model -= gone
    elif name == "set_run":
        first, count = op[1] % n, op[2]
        bm.set_run(first, count)
        model |= set(range(first, min(first + count, n)))
    elif name == "or":
        other = Bitmap(bm.size, G)
        extra = {c % n for c in op[1]}
        for c in extra:
            other.set(c)
        bm.or_(other)
        model |= extra
        assert {c for c in range(n) if other.test(c)} == extra  # the argument is left alone
    elif name == "set_all":
        bm.set_all()
        model |= set(range(n))
    else:
        bm.clear_all()
        model.clear()


def check(bm: Bitmap, model: set[int]) -> None:
    n = bm.nbits
    assert {c for c in range(n) if bm.test(c)} == model
    assert bm.count() == len(model)
    assert bm.bytes_set() == sum(chunk_bytes(bm.size, c) for c in model)
    assert bm.is_empty() == (not model)
    runs = list(bm.runs())
    assert runs == model_runs(model)
    # maximal, disjoint, sorted, inside the bitmap
    for (a, la), (b, _) in itertools.pairwise(runs):
        assert la > 0 and a + la < b
    assert all(a >= 0 and a + k <= n for a, k in runs)
    for start in {0, 1, 7, 8, 63, 64, 65, n // 2, n - 1, n}:
        if start > n:
            continue
        assert bm.first_set(start) == min((c for c in model if c >= start), default=None)
        assert bm.first_clear(start) == min((c for c in range(start, n) if c not in model), default=n)
        assert list(bm.runs(start)) == model_runs(model, start)
    # bits past the end are never set: they would count in count() and in the file
    raw = bm.to_bytes()
    assert len(raw) == (n + 7) // 8
    if n % 8:
        assert raw[-1] >> (n % 8) == 0


@settings(max_examples=250, deadline=None)
@given(size=sizes(), ops=OPS)
def test_bitmap_agrees_with_a_set(size: int, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    bm = Bitmap(size, G)
    assert bm.nbits == -(-size // G)
    model: set[int] = set()
    for op in ops:
        apply(bm, model, op)
    check(bm, model)


@settings(max_examples=60, deadline=None)
@given(size=sizes(), bits=st.sets(chunk(), max_size=40))
def test_copy_and_bytes_round_trip_and_are_independent(size: int, bits: set[int]) -> None:
    bm = Bitmap(size, G)
    model = {c % bm.nbits for c in bits}
    for c in model:
        bm.set(c)
    twin = Bitmap.from_bytes(size, G, bm.to_bytes())
    copy = bm.copy()
    bm.clear_all()
    check(twin, model)
    check(copy, model)
    check(bm, set())


def test_runs_see_bits_cleared_while_iterating() -> None:
    bm = Bitmap(300 * G, G)
    for first, count in [(0, 3), (63, 3), (128, 1), (200, 100)]:
        bm.set_range(first * G, count * G)
    seen = []
    for first, count in bm.runs():
        seen.append((first, count))
        bm.clear_run(first, count)
        bm.clear_run(128, 1)  # ahead of the iterator: never yielded
    assert seen == [(0, 3), (63, 3), (200, 100)]
    assert bm.is_empty()


@pytest.mark.parametrize("nbits", [1, 7, 8, 9, 63, 64, 65, 129])
@pytest.mark.parametrize("tail", [0, 1, G - 1])
def test_set_all_stays_inside_the_volume(nbits: int, tail: int) -> None:
    bm = Bitmap(nbits * G - tail, G)
    bm.set_all()
    assert bm.count() == nbits and bm.bytes_set() == nbits * G - tail
    assert list(bm.runs()) == [(0, nbits)]
    assert bm.first_clear(0) == nbits and bm.first_set(nbits - 1) == nbits - 1
    assert bm.clear_run(0, nbits + 100) == nbits * G - tail
    assert bm.is_empty() and bm.first_set(0) is None


def test_set_range_edges() -> None:
    bm = Bitmap(10 * G - 100, G)
    assert bm.set_range(0, 0) == []  # empty range
    assert bm.set_range(G - 1, 2) == [0, 1]  # two bytes straddling a chunk boundary
    assert bm.set_range(9 * G, 1 << 40) == [9]  # clipped at the end
    assert bm.set_range(10 * G, G) == []  # entirely past the end
    assert bm.set_range(0, 10 * G) == [2, 3, 4, 5, 6, 7, 8]  # only the new ones
    assert bm.bytes_set() == 10 * G - 100


def test_empty_volume_has_no_bits() -> None:
    bm = Bitmap(0, G)
    assert bm.nbits == 0 and bm.count() == 0 and bm.bytes_set() == 0
    assert list(bm.runs()) == [] and bm.first_set(0) is None and bm.first_clear(0) == 0
    bm.set_all()
    assert bm.is_empty()


def test_or_refuses_other_geometry() -> None:
    with pytest.raises(ValueError, match="geometry"):
        Bitmap(64 * G, G).or_(Bitmap(65 * G, G))
    with pytest.raises(ValueError, match="geometry"):
        Bitmap(64 * G, G).or_(Bitmap(64 * G, 2 * G))


def test_from_bytes_refuses_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        Bitmap.from_bytes(9 * G, G, b"\0")


@pytest.mark.parametrize("bad", [0, 2048, 3000, 4096 * 3, 32 << 20])
def test_granularity_must_be_a_power_of_two_from_4k_to_16m(bad: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Bitmap(1 << 20, bad)


@pytest.mark.parametrize("good", [4096, 65536, 16 << 20])
def test_granularity_limits_are_accepted(good: int) -> None:
    assert Bitmap(1 << 30, good).nbits == -(-(1 << 30) // good)


def test_a_big_sparse_bitmap_is_scanned_without_looping_over_bits() -> None:
    bm = Bitmap(16 << 40, 64 * 1024)  # 16 TiB at 64 KiB: 256 Mi bits, 32 MiB
    last = bm.nbits - 1
    bm.set(last)
    bm.set(5)
    assert list(bm.runs()) == [(5, 1), (last, 1)]
    assert bm.count() == 2 and bm.first_clear(0) == 0
    bm.or_(bm.copy())
    assert bm.clear_run(0, bm.nbits) == 2 * 64 * 1024


@given(st.data(), NBITS, TAILS)
def test_all_set_agrees_with_testing_each_chunk(data: st.DataObject, nbits: int, tail: int) -> None:
    size = nbits * G - (tail if nbits > 1 or tail == 0 else 0)
    bm = Bitmap(size, G)
    for c in data.draw(st.sets(st.integers(0, bm.nbits - 1))):
        bm.set(c)
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(0, size - offset))
    assert bm.all_set(offset, length) == all(bm.test(c) for c in bm.chunk_range(offset, length))


@settings(max_examples=150, deadline=None)
@given(size=sizes(), ops=OPS)
def test_a_bitmap_in_a_memory_mapping_agrees_with_a_set(size: int, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    with mock.patch.object(bitmap_module, "MAPPED", 1):  # every bitmap mapped, however small
        bm = Bitmap(size, G)
        assert isinstance(bm._bits, mmap.mmap)
        model: set[int] = set()
        for op in ops:
            apply(bm, model, op)
        check(bm, model)
        twin, copy = Bitmap.from_bytes(size, G, bm.to_bytes()), bm.copy()
        assert isinstance(twin._bits, mmap.mmap) and isinstance(copy._bits, mmap.mmap)
        bm.clear_all()
        check(twin, model)
        check(copy, model)
        check(bm, set())


def _anon_rss() -> int:
    """Resident bytes of private and shared anonymous memory (a shared mapping is shmem)."""
    status = Path("/proc/self/status").read_text()
    return sum(int(status.split(f"{field}:")[1].split()[0]) * 1024 for field in ("RssAnon", "RssShmem"))


def test_the_untouched_pages_of_a_big_bitmap_and_of_its_copies_are_not_resident() -> None:
    """A sparse 16 TiB volume's bitmaps (32 MiB each) cost the pages that hold set bits."""
    before = _anon_rss()
    bm = Bitmap(16 << 40, 64 * 1024)
    for c in (0, 5, 1 << 20, bm.nbits - 1):
        bm.set(c)
    copies = [bm.copy() for _ in range(3)]
    with bm.view() as bits:
        loaded = Bitmap.from_bytes(bm.size, bm.granularity, bits)
    copies[0].or_(loaded)
    copies[1].clear_all()
    assert list(loaded.runs()) == list(copies[0].runs()) == [(0, 1), (5, 1), (1 << 20, 1), (bm.nbits - 1, 1)]
    assert copies[1].is_empty() and copies[2].count() == 4
    grown = _anon_rss() - before
    assert grown < 8 << 20, f"five 32 MiB bitmaps took {grown >> 20} MiB"


def test_scattered_bits_ored_into_a_big_bitmap_make_only_their_windows_resident() -> None:
    """A mark ORs tracking into a fresh transfer bitmap: one bit in every MiB of a 32 MiB
    tracking bitmap must not make the whole transfer bitmap resident."""
    tracking = Bitmap(16 << 40, 64 * 1024)
    spread = range(0, tracking.nbits, 8 << 20)  # one bit per MiB of bitmap: 32 bits
    for c in spread:
        tracking.set(c)
    before = _anon_rss()
    transfer = Bitmap(tracking.size, tracking.granularity)
    transfer.or_(tracking)
    transfer.or_(tracking)  # nothing changes: nothing written
    transfer.clear_run(0, transfer.nbits)
    transfer.clear_run(0, transfer.nbits)  # already clear: nothing written
    grown = _anon_rss() - before
    assert transfer.is_empty()
    assert grown < 8 << 20, f"ORing 32 scattered bits made {grown >> 20} MiB resident"


def test_set_new_gives_the_page_of_a_new_bit_and_nothing_for_a_set_one() -> None:
    bm = Bitmap(3 * 8 * 4096 * 4096 + 4096, 4096)  # three pages of bits and one byte
    last = bm.nbits - 1
    page = bm.set_new(8 * 4096 + 9, 4096)
    assert page is not None and len(page) == 4096, "not the page of the bit"
    assert page[1] == 0b10 and page.count(0) == 4095
    assert bm.test(8 * 4096 + 9) and bm.set_new(8 * 4096 + 9, 4096) is None
    end = bm.set_new(last, 4096)
    assert end is not None and bytes(end) == b"\x01", "the last page is the one byte left"
    assert bm.bytes_set() == 2 * 4096
