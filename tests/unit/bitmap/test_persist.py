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
from deltavol.errors import CorruptFile, DeltavolError, NoSpace
from deltavol.store.fsio import boot_id
from deltavol.store.group_commit import GroupCommit

G = 4096
SIZE = 100 * G - 512  # 100 bits: the last byte is partly padding, the last chunk short
R = 4 * G  # the hot region of the tracking files these tests write themselves: 25 of them
# from the module notes: magic, version, gran, size, nbits, gen, kind, hot region bytes, boot
HEADER = struct.Struct(">8sIIQQQBI16s")
FIELDS = {
    name: i
    for i, name in enumerate(
        ["magic", "version", "granularity", "size", "nbits", "gen", "kind", "region", "boot"]
    )
}
CHUNK_BYTES = (100 + 7) // 8  # 13
HOT_AT = 2 * 4096  # header page, then one page for the 13 bytes of chunk bits


def saved(
    tmp_path: Path,
    bits: tuple[int, ...] = (0, 3, 64, 99),
    kind: int = persist.KIND_TRACKING,
    hot: Bitmap | None = None,
) -> Path:
    path = tmp_path / "t.bitmap"
    bm = Bitmap(SIZE, G)
    for c in bits:
        bm.set(c)
    persist.save_atomic(path, bm, 7, kind, hot)
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


def header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    assert struct.unpack_from(">I", raw, HEADER.size)[0] == zlib.crc32(raw[: HEADER.size])
    return dict(zip(FIELDS, HEADER.unpack_from(raw), strict=True))


# --- round trips ---------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    nbits=st.sampled_from([1, 7, 8, 9, 63, 64, 65, 200, 32768, 32769]),
    tail=st.sampled_from([0, 1, G - 1]),
    bits=st.sets(st.integers(0, 32768)),
    generation=st.integers(0, 2**64 - 1),
    kind=st.sampled_from([persist.KIND_TRACKING, persist.KIND_TRANSFER]),
    region=st.sampled_from([None, G, 4 * G, persist.HOT_REGION]),
    hot=st.sets(st.integers(0, 32768)),
)
def test_any_bitmap_saved_then_loaded_is_equal(
    tmp_path_factory: pytest.TempPathFactory,
    nbits: int,
    tail: int,
    bits: set[int],
    generation: int,
    kind: int,
    region: int | None,
    hot: set[int],
) -> None:
    """In the boot it was written in, a tracking file's hot regions add nothing."""
    path = tmp_path_factory.mktemp("bm") / "x.bitmap"
    size = nbits * G - tail
    bm = Bitmap(size, G)
    for c in bits:
        if c < nbits:
            bm.set(c)
    hot_bm = None
    if kind == persist.KIND_TRACKING and region is not None:
        hot_bm = Bitmap(size, region)
        for r in hot:
            if r < hot_bm.nbits:
                hot_bm.set(r)
    persist.save_atomic(path, bm, generation, kind, hot_bm)
    back, gen = persist.load(path, kind, G, size)
    assert gen == generation and back.to_bytes() == bm.to_bytes() and back.count() == bm.count()
    raw = path.read_bytes()
    head = header(path)
    assert (head["magic"], head["version"], head["nbits"], head["kind"]) == (b"DVBITMAP", 2, nbits, kind)
    bit_bytes = (nbits + 7) // 8
    assert raw[4096 : 4096 + bit_bytes] == bm.to_bytes()
    if kind == persist.KIND_TRACKING:
        used = region or persist.HOT_REGION  # no hot bitmap given: an empty one of the default region
        hot_at = 4096 + -(-bit_bytes // 4096) * 4096
        hot_bytes = (-(-size // used) + 7) // 8
        assert (head["region"], head["boot"]) == (used, boot_id())
        assert len(raw) == hot_at + hot_bytes
        assert raw[hot_at:] == (hot_bm.to_bytes() if hot_bm else bytes(hot_bytes))
    else:
        assert (head["region"], head["boot"]) == (0, bytes(16))
        assert len(raw) == 4096 + bit_bytes
    assert [p.name for p in path.parent.iterdir()] == ["x.bitmap"]  # no tmp file left behind


def test_save_replaces_the_old_file_whole(tmp_path: Path) -> None:
    hot = Bitmap(SIZE, R)
    hot.set(3)
    path = saved(tmp_path, hot=hot)
    persist.save_atomic(path, Bitmap(SIZE, G), 8, persist.KIND_TRACKING)
    back, gen = persist.load(path, persist.KIND_TRACKING, G, SIZE)
    assert gen == 8 and back.is_empty()
    assert path.stat().st_size == HOT_AT + 1  # the default region: one hot bit, clear
    assert path.read_bytes()[HOT_AT:] == b"\0"


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
        ("version", 1, "version 1"),
        ("version", 3, "version 3"),
        ("version", 0, "version 0"),
        ("kind", persist.KIND_TRANSFER, "transfer"),
        ("kind", 9, "is a 9 bitmap"),
        ("granularity", 2 * G, "geometry"),
        ("size", SIZE + 1, "geometry"),
        ("size", SIZE - G, "geometry"),
        ("nbits", 99, "length"),
        ("nbits", 101, "length"),
        ("region", 0, "hot region of 0 bytes"),  # a tracking file without hot regions
        ("region", 3 * G, "hot region of 12288 bytes"),  # not a power of two
        ("region", 6 * G, "hot region of 24576 bytes"),  # a multiple of G, not a power of two
        ("region", G // 2, "hot region of 2048 bytes"),  # a power of two, less than a chunk
        ("region", G + 1, "hot region of 4097 bytes"),
        ("region", G, "length 8193 bytes, expected 8205"),  # valid, but then 100 hot bits
    ],
)
def test_a_damaged_header_field_is_refused_by_name(
    tmp_path: Path, field: str, value: object, words: str
) -> None:
    path = saved(tmp_path)
    set_field(path, field, value, fix_crc=True)  # a consistent header with a wrong field
    refused(path, words)


@pytest.mark.parametrize("region", [G, R, persist.HOT_REGION])
def test_a_transfer_file_with_a_hot_region_is_refused(tmp_path: Path, region: int) -> None:
    path = saved(tmp_path, kind=persist.KIND_TRANSFER)
    set_field(path, "region", region, fix_crc=True)
    refused(path, f"hot region of {region} bytes", kind=persist.KIND_TRANSFER)


@pytest.mark.parametrize("region", [32 * 1024 * 1024, 2**31])
def test_a_hot_region_too_large_for_a_bitmap_is_refused_by_name(tmp_path: Path, region: int) -> None:
    path = saved(tmp_path)
    set_field(path, "region", region, fix_crc=True)
    refused(path, "hot region")


def test_a_changed_boot_with_its_checksum_is_read(tmp_path: Path) -> None:
    """The boot is no geometry: another one only means the hot regions count (tested in
    test_hot_regions); with no hot region the chunk bits come back as they are."""
    path = saved(tmp_path)
    set_field(path, "boot", b"\x01" * 16, fix_crc=True)
    assert list(load(path).runs()) == [(0, 1), (3, 1), (64, 1), (99, 1)]


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", 3),
        ("granularity", 2 * G),
        ("size", 1),
        ("gen", 8),
        ("kind", 2),
        ("region", 2 * persist.HOT_REGION),
        ("boot", b"\x01" * 16),
    ],
)
def test_a_changed_field_without_its_checksum_is_refused(tmp_path: Path, field: str, value: object) -> None:
    path = saved(tmp_path)
    set_field(path, field, value, fix_crc=False)
    refused(path, "checksum")


# every field's first and last byte, then the checksum's
@pytest.mark.parametrize("offset", [0, 7, 8, 11, 12, 16, 23, 24, 31, 32, 39, 40, 41, 44, 45, 52, 60, 61, 64])
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
    "one byte short": (lambda raw: raw[:-1], "length"),
    "one byte extra": (lambda raw: raw + b"\0", "length"),
    "a page extra": (lambda raw: raw + bytes(4096), "length"),
}
# a tracking file is header, chunk bits, padding to the next page, one hot bit (a byte)
TRACKING_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "no hot section": (lambda raw: raw[:HOT_AT], "length 8192 bytes, expected 8193"),
    "no padding before the hot section": (
        lambda raw: raw[: 4096 + CHUNK_BYTES] + raw[HOT_AT:],
        "length 4110 bytes, expected 8193",
    ),
    "two bytes of hot bits": (lambda raw: raw + b"\0", "length 8194 bytes, expected 8193"),
    "the layout of a transfer file": (lambda raw: raw[: 4096 + CHUNK_BYTES], "length 4109"),
}
TRANSFER_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "a hot section": (
        lambda raw: raw.ljust(HOT_AT, b"\0") + b"\0",
        "length 8193 bytes, expected 4109",
    ),
}


@pytest.mark.parametrize(
    "kind, how",
    [(k, how) for k in (persist.KIND_TRACKING, persist.KIND_TRANSFER) for how in DAMAGE]
    + [(persist.KIND_TRACKING, how) for how in TRACKING_DAMAGE]
    + [(persist.KIND_TRANSFER, how) for how in TRANSFER_DAMAGE],
)
def test_a_file_of_the_wrong_length_is_refused(tmp_path: Path, kind: int, how: str) -> None:
    damage, words = {**DAMAGE, **(TRACKING_DAMAGE if kind == persist.KIND_TRACKING else TRANSFER_DAMAGE)}[how]
    path = saved(tmp_path, kind=kind)
    path.write_bytes(damage(path.read_bytes()))
    refused(path, words, kind=kind)


@pytest.mark.parametrize("kind", [persist.KIND_TRACKING, persist.KIND_TRANSFER])
def test_set_padding_bits_are_not_read_as_chunks(tmp_path: Path, kind: int) -> None:
    """Bits past the last chunk cannot stand for data: a file with them is damaged."""
    path = saved(tmp_path, bits=(), kind=kind)
    raw = bytearray(path.read_bytes())
    raw[4096 + CHUNK_BYTES - 1] |= 0x80  # bit 103 of a 100-bit map
    path.write_bytes(bytes(raw))
    refused(path, "past the end", "chunk 100", kind=kind)


@pytest.mark.parametrize(
    "region, bit, words",
    [
        (persist.HOT_REGION, 1, "hot region 1 or later"),  # one hot bit: 7 bits of padding
        (persist.HOT_REGION, 7, "hot region 1 or later"),
        (R, 25, "hot region 25 or later"),  # 25 hot bits: the 4th byte has one
        (R, 31, "hot region 25 or later"),
    ],
)
def test_set_padding_bits_of_the_hot_section_are_refused(
    tmp_path: Path, region: int, bit: int, words: str
) -> None:
    hot = Bitmap(SIZE, region)
    hot.set(hot.nbits - 1)  # the last real hot bit is fine
    path = saved(tmp_path, bits=(), hot=hot)
    assert load(path).is_empty()
    raw = bytearray(path.read_bytes())
    raw[HOT_AT + bit // 8] |= 1 << (bit % 8)
    path.write_bytes(bytes(raw))
    refused(path, "past the end", words)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    refused(tmp_path / "absent", "missing")


@pytest.mark.parametrize("err", [errno.EIO, errno.EACCES, errno.EISDIR], ids=["EIO", "EACCES", "EISDIR"])
def test_a_file_that_cannot_be_read_is_an_io_error_not_a_corrupt_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """The start-up sets a corrupt file aside and asks for a full copy: a bad sector, a
    permission or a directory in the way is an error to fix, and the file may be fine."""
    path = tmp_path / "s.tracking"
    persist.save_atomic(path, Bitmap(SIZE, G), 1, persist.KIND_TRACKING)

    def unreadable(self: Path) -> bytes:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    with pytest.raises(DeltavolError) as info:
        persist.load(path, persist.KIND_TRACKING, G, SIZE)
    assert not isinstance(info.value, CorruptFile)
    assert str(path) in info.value.message and os.strerror(err) in info.value.message


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
    """Counts fdatasync calls (what a group-commit round syncs a TrackingFile with)."""
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def tracking_file(
    path: Path, commit: GroupCommit | None = None, bm: Bitmap | None = None
) -> persist.TrackingFile:
    tf = persist.TrackingFile(path, SIZE, G, commit or GroupCommit(), region=R)
    tf.rewrite(bm or Bitmap(SIZE, G), 1)
    return tf


async def first_write(tf: persist.TrackingFile, bm: Bitmap, new: list[int]) -> None:
    """What a session does before it lets a first change go down: the new chunk bits into
    the file, then the rounds that make their hot regions durable (or, if they are durable
    already, one that syncs the bits themselves)."""
    tf.write_bits(bm, new)
    rounds = {id(fut): fut for c in new if (fut := tf.cover(c)) is not None}
    for fut in list(rounds.values()) or [tf.round()]:
        await asyncio.shield(fut)


def other_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persist, "boot_id", lambda: bytes(range(16)))


async def test_concurrent_first_writes_share_fsyncs(
    tmp_path: Path, syncs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.bitmap"
    tf = tracking_file(path)
    try:
        bm = Bitmap(SIZE, G)
        news = [bm.set_range(c * G, G) for c in range(0, 100, 2)]
        await asyncio.gather(*(first_write(tf, bm, new) for new in news))
        assert 1 <= len(syncs) <= 3, len(syncs)  # 50 first-writes in 25 regions, a handful of syncs
        assert load(path).to_bytes() == bm.to_bytes()
        other_boot(monkeypatch)  # every region was written to: after a reboot, all of it
        assert load(path).count() == 100
    finally:
        tf.close()


async def test_a_writer_returns_only_after_its_region_was_made_durable_after_its_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the start of a sync that then completed, the writer's region was hot in the file
    (a reboot brings its chunks back) and, as the page cache holds the file, its chunk bit
    was in the file as soon as ``write_bits`` returned (a killed server loses nothing)."""
    path = tmp_path / "t.bitmap"
    tf = tracking_file(path)
    durable = {"hot": Bitmap(SIZE, R)}  # the hot bits at the start of the last completed sync
    real = os.fdatasync

    def snapshot(fd: int) -> None:
        hot = Bitmap.from_bytes(SIZE, R, path.read_bytes()[HOT_AT:])
        real(fd)
        durable["hot"] = hot

    monkeypatch.setattr(os, "fdatasync", snapshot)
    bm = Bitmap(SIZE, G)

    async def write(c: int) -> None:
        await asyncio.sleep(0.001 * (c % 7))
        new = bm.set_range(c * G, G)
        tf.write_bits(bm, new)
        assert load(path).test(c), f"chunk {c}: its bit is not in the file"
        fut = tf.cover(c)
        if fut is not None:
            await asyncio.shield(fut)
        assert durable["hot"].test(c * G // R), f"chunk {c} acknowledged before its region was synced"

    try:
        await asyncio.gather(*(write(c) for c in range(100)))
    finally:
        tf.close()
    assert load(path).count() == 100


async def test_a_failed_sync_fails_every_waiter_and_the_next_write_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.bitmap"
    tf = tracking_file(path)
    real = os.fdatasync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    bm = Bitmap(SIZE, G)
    try:
        results = await asyncio.gather(
            *(first_write(tf, bm, bm.set_range(c * G, G)) for c in range(10)), return_exceptions=True
        )
        assert len(results) == 10 and all(isinstance(r, NoSpace) for r in results), results
        monkeypatch.setattr(os, "fdatasync", real)
        await first_write(tf, bm, bm.set_range(50 * G, G))
        assert not tf.covered(range(8, 12))
        await first_write(tf, bm, bm.set_range(11 * G, G))  # a region whose round failed asks again
        assert tf.covered(range(8, 12)) and tf.covered(range(48, 52))
        # the failed sync may have dropped pages: even in this boot, the hot regions come back
        assert load(path).count() == 16
        await tf.settle()  # writes the file again from memory
        assert tf.lost is None and load(path).count() == 12
    finally:
        tf.close()


async def test_rewrite_clears_bits_and_writes_go_on_in_the_new_file(tmp_path: Path) -> None:
    path = saved(tmp_path)
    tf = persist.TrackingFile(path, SIZE, G, GroupCommit(), region=R)
    try:
        bm = load(path)
        with pytest.raises(DeltavolError):  # no file open before the first rewrite
            tf.write_bits(bm, bm.set_range(5 * G, G))
        bm.clear_all()
        tf.rewrite(bm, 8)
        back, gen = persist.load(path, persist.KIND_TRACKING, G, SIZE)
        assert gen == 8 and back.is_empty()
        await first_write(tf, bm, bm.set_range(5 * G, 2 * G))
        assert list(load(path).runs()) == [(5, 2)]
        bm.clear_all()
        tf.rewrite(bm, 9)
        assert load(path).is_empty()
        await first_write(tf, bm, bm.set_range(6 * G, G))
        assert list(load(path).runs()) == [(6, 1)]
    finally:
        tf.close()


async def test_two_tracking_files_sharing_a_group_commit_are_synced_by_one_round(
    tmp_path: Path, syncs: list[int]
) -> None:
    commit = GroupCommit()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a" / "t.bitmap", tmp_path / "b" / "t.bitmap"]
    files = [tracking_file(p, commit) for p in paths]
    try:
        assert all(tf.commit is commit for tf in files)
        bms = [Bitmap(SIZE, G), Bitmap(SIZE, G)]
        news = [bms[0].set_range(3 * G, 2 * G), bms[1].set_range(70 * G, G)]
        for tf, bm, new in zip(files, bms, news, strict=True):
            tf.write_bits(bm, new)
        r0, r1 = files[0].round(), files[1].round()
        assert r0 is not r1, "a file's writers wait for another file's sync"
        assert not syncs
        await asyncio.gather(asyncio.shield(r0), asyncio.shield(r1))
        assert sorted(syncs) == sorted(tf._fd for tf in files), "one fdatasync per file, in one round"
        assert [list(load(p).runs()) for p in paths] == [[(3, 2)], [(70, 1)]]
        # first writes of both in one turn: one more round, again one sync per file
        news = [bms[0].set_range(10 * G, G), bms[1].set_range(11 * G, G)]
        await asyncio.gather(
            *(first_write(tf, bm, new) for tf, bm, new in zip(files, bms, news, strict=True))
        )
        assert len(syncs) == 4 and sorted(syncs[2:]) == sorted(tf._fd for tf in files)
        assert [load(p).to_bytes() for p in paths] == [bm.to_bytes() for bm in bms]
        assert all(tf.covered(range(8, 12)) for tf in files)
    finally:
        for tf in files:
            tf.close()
