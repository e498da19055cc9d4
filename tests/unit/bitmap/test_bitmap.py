"""Bitmap operations against a model (a set of chunk numbers), at word and byte edges."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import CorruptFile

G = 4096

sizes = st.integers(1, 700).map(lambda n: n * G) | st.integers(1, 700).map(lambda n: n * G - 512)
ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "clear", "set_range", "clear_run"]), st.integers(0, 720), st.integers(0, 200)
    ),
    max_size=30,
)


def model_runs(bits: set[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for c in sorted(bits):
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


@settings(max_examples=300, deadline=None)
@given(size=sizes, ops=ops)
def test_bitmap_agrees_with_a_set(size: int, ops: list[tuple[str, int, int]]) -> None:
    bm = Bitmap(size, G)
    model: set[int] = set()
    for op, a, n in ops:
        a %= bm.nbits
        if op == "set":
            bm.set(a)
            model.add(a)
        elif op == "clear":
            bm.clear(a)
            model.discard(a)
        elif op == "set_range":
            offset, length = a * G + 100, n * 1000
            new = bm.set_range(offset, length)
            touched = set(bm.chunk_range(offset, min(length, size - offset)))
            assert sorted(touched - model) == new
            model |= touched
        else:
            before = model & set(range(a, a + n))
            assert bm.clear_run(a, n) == sum(bm.chunk_bytes(c) for c in before)
            model -= before
    assert bm.count() == len(model)
    assert bm.bytes_set() == sum(bm.chunk_bytes(c) for c in model)
    assert list(bm.runs()) == model_runs(model)
    assert bm.first_set(0) == (min(model) if model else None)
    start = ops[0][1] % bm.nbits if ops else 0
    assert bm.first_set(start) == min((c for c in model if c >= start), default=None)
    assert bm.first_clear(start) == min(
        (c for c in range(start, bm.nbits) if c not in model), default=bm.nbits
    )
    assert bm.is_empty() == (not model)


@settings(max_examples=100, deadline=None)
@given(size=sizes, a=st.sets(st.integers(0, 700)), b=st.sets(st.integers(0, 700)))
def test_or_and_copy(size: int, a: set[int], b: set[int]) -> None:
    x, y = Bitmap(size, G), Bitmap(size, G)
    a, b = {c for c in a if c < x.nbits}, {c for c in b if c < x.nbits}
    for c in a:
        x.set(c)
    for c in b:
        y.set(c)
    z = x.copy()
    x.or_(y)
    assert {c for c in range(x.nbits) if x.test(c)} == a | b
    assert {c for c in range(z.nbits) if z.test(c)} == a  # the copy is independent
    with pytest.raises(ValueError):
        x.or_(Bitmap(size + G, G))


def test_set_all_and_clear_all_respect_the_last_partial_byte() -> None:
    bm = Bitmap(13 * G - 1, G)
    bm.set_all()
    assert bm.count() == 13 and bm.bytes_set() == 13 * G - 1
    assert list(bm.runs()) == [(0, 13)]
    bm.clear_all()
    assert bm.is_empty()


@pytest.mark.parametrize("bad", [3000, 4096 * 3, 32 << 20, 0])
def test_granularity_must_be_a_power_of_two_in_range(bad: int) -> None:
    with pytest.raises(ValueError):
        Bitmap(1 << 20, bad)


@settings(max_examples=50, deadline=None)
@given(size=sizes, bits=st.sets(st.integers(0, 700)), generation=st.integers(0, 2**40))
def test_files_round_trip(
    tmp_path_factory: pytest.TempPathFactory, size: int, bits: set[int], generation: int
) -> None:
    path = tmp_path_factory.mktemp("bm") / "t.bitmap"
    bm = Bitmap(size, G)
    for c in bits:
        if c < bm.nbits:
            bm.set(c)
    persist.save_atomic(path, bm, generation, persist.KIND_TRANSFER)
    back, gen = persist.load(path, persist.KIND_TRANSFER, G, size)
    assert gen == generation and back.to_bytes() == bm.to_bytes()


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "t.bitmap"
    bm = Bitmap(1 << 20, G)
    bm.set(3)
    persist.save_atomic(path, bm, 7, persist.KIND_TRACKING)
    return path


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda raw: b"XXXX" + raw[4:], "magic"),
        (lambda raw: raw[:12] + bytes([raw[12] ^ 1]) + raw[13:], "checksum"),
        (lambda raw: raw[:100], "truncated"),
        (lambda raw: b"", "truncated"),
        (lambda raw: raw[:-1], "length"),
        (lambda raw: raw + b"\0", "length"),
    ],
)
def test_damaged_files_are_refused_by_name(tmp_path: Path, damage, words: str) -> None:  # type: ignore[no-untyped-def]
    path = _saved(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptFile) as err:
        persist.load(path, persist.KIND_TRACKING, G, 1 << 20)
    assert str(path) in str(err.value) and words in str(err.value)


def test_wrong_kind_or_geometry_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(CorruptFile, match="transfer"):
        persist.load(path, persist.KIND_TRANSFER, G, 1 << 20)
    with pytest.raises(CorruptFile, match="geometry"):
        persist.load(path, persist.KIND_TRACKING, 2 * G, 1 << 20)
    with pytest.raises(CorruptFile, match="missing"):
        persist.load(tmp_path / "absent", persist.KIND_TRACKING, G, 1 << 20)


async def test_tracking_file_group_commit_and_in_place_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import os

    path = _saved(tmp_path)
    tf = persist.TrackingFile(path)
    syncs = 0
    real = os.fdatasync

    def counting(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    bm, _ = persist.load(path, persist.KIND_TRACKING, G, 1 << 20)
    news = [bm.set_range(c * G, G) for c in range(10, 60)]
    await asyncio.gather(*(tf.persist(bm, new) for new in news))
    assert 1 <= syncs <= 3  # 50 concurrent first-writes shared a handful of fsyncs
    back, _ = persist.load(path, persist.KIND_TRACKING, G, 1 << 20)
    assert back.to_bytes() == bm.to_bytes()
    bm.clear_run(10, 20)
    persist.write_bits_in_place(path, bm)
    back, _ = persist.load(path, persist.KIND_TRACKING, G, 1 << 20)
    assert list(back.runs()) == [(3, 1), (30, 30)]
    tf.close()
