"""Bitmap files: round trips, every damage refused by name, in-place bits, group commit."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.errors import CorruptFile, NoSpace
from deltavol.store.group_commit import GroupCommit

G = 4096
SIZE = 100 * G - 512  # 100 bits: the last byte is partly padding, the last chunk short
HEADER = struct.Struct(">8sIIQQQB")  # from the module notes: magic, version, gran, size, nbits, gen, kind
FIELDS = {
    name: i for i, name in enumerate(["magic", "version", "granularity", "size", "nbits", "gen", "kind"])
}


def saved(tmp_path: Path, bits: tuple[int, ...] = (0, 3, 64, 99), kind: int = persist.KIND_TRACKING) -> Path:
    path = tmp_path / "t.bitmap"
    bm = Bitmap(SIZE, G)
    for c in bits:
        bm.set(c)
    persist.save_atomic(path, bm, 7, kind)
    return path


def load(path: Path, kind: int = persist.KIND_TRACKING, granularity: int = G, size: int = SIZE) -> Bitmap:
    return persist.load(path, kind, granularity, size)[0]


def refused(path: Path, *words: str, **expect: int) -> None:
    with pytest.raises(CorruptFile) as err:
        persist.load(path, expect.get("kind", persist.KIND_TRACKING), G, SIZE)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def set_field(path: Path, field: str, value: object, *, fix_crc: bool) -> None:
    raw = bytearray(path.read_bytes())
    values = list(HEADER.unpack_from(raw))
    values[FIELDS[field]] = value
    raw[: HEADER.size] = HEADER.pack(*values)
    if fix_crc:
        raw[HEADER.size : HEADER.size + 4] = struct.pack(">I", zlib.crc32(raw[: HEADER.size]))
    path.write_bytes(bytes(raw))


# --- round trips ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    nbits=st.sampled_from([1, 7, 8, 9, 63, 64, 65, 200]),
    tail=st.sampled_from([0, 1, G - 1]),
    bits=st.sets(st.integers(0, 199)),
    generation=st.integers(0, 2**64 - 1),
    kind=st.sampled_from([persist.KIND_TRACKING, persist.KIND_TRANSFER]),
)
def test_any_bitmap_saved_then_loaded_is_equal(
    tmp_path_factory: pytest.TempPathFactory,
    nbits: int,
    tail: int,
    bits: set[int],
    generation: int,
    kind: int,
) -> None:
    path = tmp_path_factory.mktemp("bm") / "x.bitmap"
    size = nbits * G - tail
    bm = Bitmap(size, G)
    for c in bits:
        if c < nbits:
            bm.set(c)
    persist.save_atomic(path, bm, generation, kind)
    back, gen = persist.load(path, kind, G, size)
    assert gen == generation and back.to_bytes() == bm.to_bytes() and back.count() == bm.count()
    assert path.stat().st_size == persist.HEADER_SIZE + (nbits + 7) // 8
    assert [p.name for p in path.parent.iterdir()] == ["x.bitmap"]  # no tmp file left behind


def test_save_replaces_the_old_file_whole(tmp_path: Path) -> None:
    path = saved(tmp_path)
    persist.save_atomic(path, Bitmap(SIZE, G), 8, persist.KIND_TRACKING)
    back, gen = persist.load(path, persist.KIND_TRACKING, G, SIZE)
    assert gen == 8 and back.is_empty()


def test_a_failed_save_leaves_the_old_file_and_no_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    bm = Bitmap(SIZE, G)
    with pytest.raises(NoSpace):
        persist.save_atomic(path, bm, 8, persist.KIND_TRACKING)
    monkeypatch.undo()
    assert list(load(path).runs()) == [(0, 1), (3, 1), (64, 1), (99, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bitmap"]


# --- damage ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, words",
    [
        ("magic", b"DVBITMAQ", "bad magic"),
        ("version", 2, "version 2"),
        ("version", 0, "version 0"),
        ("kind", persist.KIND_TRANSFER, "transfer"),
        ("kind", 9, "is a 9 bitmap"),
        ("granularity", 2 * G, "geometry"),
        ("size", SIZE + 1, "geometry"),
        ("size", SIZE - G, "geometry"),
        ("nbits", 99, "length"),
        ("nbits", 101, "length"),
    ],
)
def test_a_damaged_header_field_is_refused_by_name(
    tmp_path: Path, field: str, value: object, words: str
) -> None:
    path = saved(tmp_path)
    set_field(path, field, value, fix_crc=True)  # a consistent header with a wrong field
    refused(path, words)


@pytest.mark.parametrize(
    "field, value", [("version", 2), ("granularity", 2 * G), ("size", 1), ("gen", 8), ("kind", 2)]
)
def test_a_changed_field_without_its_checksum_is_refused(tmp_path: Path, field: str, value: object) -> None:
    path = saved(tmp_path)
    set_field(path, field, value, fix_crc=False)
    refused(path, "checksum")


@pytest.mark.parametrize("offset", [0, 7, 8, 11, 12, 16, 23, 24, 31, 32, 39, 40, 41, 44])
def test_any_flipped_header_byte_is_refused(tmp_path: Path, offset: int) -> None:
    path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))
    refused(path)


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda raw: b"", "truncated (0 bytes)"),
    "half a header": (lambda raw: raw[:100], "truncated (100 bytes)"),
    "header only": (lambda raw: raw[: persist.HEADER_SIZE], "length 4096"),
    "one bit byte short": (lambda raw: raw[:-1], "length"),
    "one byte extra": (lambda raw: raw + b"\0", "length"),
    "a page extra": (lambda raw: raw + bytes(4096), "length"),
}


@pytest.mark.parametrize("how", DAMAGE)
def test_a_file_of_the_wrong_length_is_refused(tmp_path: Path, how: str) -> None:
    damage, words = DAMAGE[how]
    path = saved(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    refused(path, words)


def test_set_padding_bits_are_not_read_as_chunks(tmp_path: Path) -> None:
    """Bits past the last chunk cannot stand for data: a file with them is damaged."""
    path = saved(tmp_path, bits=())
    raw = bytearray(path.read_bytes())
    raw[-1] |= 0x80  # bit 103 of a 100-bit map
    path.write_bytes(bytes(raw))
    refused(path, "past the end")


def test_missing_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    refused(tmp_path / "absent", "missing")
    (tmp_path / "dir").mkdir()
    refused(tmp_path / "dir")


@pytest.mark.parametrize(
    "kind, granularity, size, words",
    [
        (persist.KIND_TRANSFER, G, SIZE, "expected transfer"),
        (persist.KIND_TRACKING, 2 * G, SIZE, "expected 8192 of"),
        (persist.KIND_TRACKING, G, SIZE + G, "geometry"),
        (persist.KIND_TRACKING, G, SIZE - 1, "geometry"),  # same number of bits, another size
    ],
)
def test_what_the_caller_expects_is_checked(
    tmp_path: Path, kind: int, granularity: int, size: int, words: str
) -> None:
    path = saved(tmp_path)
    with pytest.raises(CorruptFile, match=words) as err:
        persist.load(path, kind, granularity, size)
    assert str(path) in str(err.value)


# --- in-place bits -------------------------------------------------------------------------
def test_write_bits_in_place_then_load_reflects_the_bits(tmp_path: Path) -> None:
    path = saved(tmp_path, bits=(0, 3, 64, 99), kind=persist.KIND_TRANSFER)
    bm = load(path, persist.KIND_TRANSFER)
    bm.clear(3)
    bm.clear(99)
    persist.write_bits_in_place(path, bm)
    back, gen = persist.load(path, persist.KIND_TRANSFER, G, SIZE)
    assert gen == 7 and list(back.runs()) == [(0, 1), (64, 1)]


def test_write_bits_in_place_needs_the_file(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="absent"):
        persist.write_bits_in_place(tmp_path / "absent", Bitmap(SIZE, G))
    assert not (tmp_path / "absent").exists()


# --- the tracking file ---------------------------------------------------------------------
@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts fdatasync calls (what TrackingFile.persist syncs with)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


async def test_concurrent_persists_share_fsyncs(tmp_path: Path, syncs: list[int]) -> None:
    path = saved(tmp_path, bits=())
    tf = persist.TrackingFile(path)
    try:
        bm = load(path)
        news = [bm.set_range(c * G, G) for c in range(0, 100, 2)]
        await asyncio.gather(*(tf.persist(bm, new) for new in news))
        assert 1 <= len(syncs) <= 3, len(syncs)  # 50 first-writes, a handful of syncs
        assert load(path).to_bytes() == bm.to_bytes()
    finally:
        tf.close()


async def test_a_persist_returns_only_after_a_sync_that_began_after_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved(tmp_path, bits=())
    tf = persist.TrackingFile(path)
    durable = Bitmap(SIZE, G)  # what the file held at the start of the last sync
    real = os.fdatasync

    def snapshot(fd: int) -> None:
        durable._bits[:] = load(path).to_bytes()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", snapshot)
    bm = Bitmap(SIZE, G)

    async def first_write(c: int) -> None:
        await asyncio.sleep(0.001 * (c % 7))
        new = bm.set_range(c * G, G)
        await tf.persist(bm, new)
        assert durable.test(c), f"chunk {c} acknowledged before its bit was synced"

    try:
        await asyncio.gather(*(first_write(c) for c in range(100)))
    finally:
        tf.close()
    assert load(path).count() == 100


async def test_a_failed_sync_fails_every_waiter_and_the_next_persist_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved(tmp_path, bits=())
    tf = persist.TrackingFile(path)
    real = os.fdatasync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    bm = Bitmap(SIZE, G)
    try:
        results = await asyncio.gather(
            *(tf.persist(bm, bm.set_range(c * G, G)) for c in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, NoSpace) for r in results), results
        monkeypatch.setattr(os, "fdatasync", real)
        await tf.persist(bm, bm.set_range(50 * G, G))
        assert load(path).count() == 11
    finally:
        tf.close()


async def test_rewrite_clears_bits_and_persist_goes_on_in_the_new_file(tmp_path: Path) -> None:
    path = saved(tmp_path)
    tf = persist.TrackingFile(path)
    try:
        bm = load(path)
        bm.clear_all()
        tf.rewrite(bm, 8)
        back, gen = persist.load(path, persist.KIND_TRACKING, G, SIZE)
        assert gen == 8 and back.is_empty()
        await tf.persist(bm, bm.set_range(5 * G, 2 * G))
        assert list(load(path).runs()) == [(5, 2)]
    finally:
        tf.close()


async def test_two_tracking_files_sharing_a_group_commit_are_synced_by_one_round(
    tmp_path: Path, syncs: list[int]
) -> None:
    commit = GroupCommit()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [saved(tmp_path / "a", bits=()), saved(tmp_path / "b", bits=())]
    files = [persist.TrackingFile(p, commit) for p in paths]
    try:
        assert all(tf.commit is commit for tf in files)
        bms = [Bitmap(SIZE, G), Bitmap(SIZE, G)]
        news = [bms[0].set_range(3 * G, 2 * G), bms[1].set_range(70 * G, G)]
        for tf, bm, new in zip(files, bms, news, strict=True):
            tf.write_bits(bm, new)
        r0, r1 = files[0].round(), files[1].round()
        assert r0 is r1, "two files of one group commit got different rounds"
        assert not syncs
        await asyncio.shield(r0)
        assert sorted(syncs) == sorted(tf._fd for tf in files), "one fdatasync per file, in one round"
        assert [list(load(p).runs()) for p in paths] == [[(3, 2)], [(70, 1)]]
        # persist of both in one turn: one more round, again one sync per file
        news = [bms[0].set_range(10 * G, G), bms[1].set_range(11 * G, G)]
        await asyncio.gather(*(tf.persist(bm, new) for tf, bm, new in zip(files, bms, news, strict=True)))
        assert len(syncs) == 4 and sorted(syncs[2:]) == sorted(tf._fd for tf in files)
        assert [load(p).to_bytes() for p in paths] == [bm.to_bytes() for bm in bms]
    finally:
        for tf in files:
            tf.close()
