"""The save area keeps the old contents of blocks durably, each block once, refuses past
its limit, survives a reopen, drops a torn tail, names the file when it is corrupt, and
reuses its space from one update to the next with none of the old records."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltavol.copy import save_area
from deltavol.copy.save_area import BLOCK, HEADER_SIZE, RECORD, SaveArea
from deltavol.errors import CorruptFile, DeltavolError
from deltavol.store import fs
from tests.fakes import until

G = 4 * BLOCK  # chunks of four blocks
SIZE = 64 * G - BLOCK // 2  # the last chunk ends half-way through a block


def area(tmp_path: Path, limit: int = 1 << 20, update_id: int = 7) -> SaveArea:
    return SaveArea(tmp_path / "s.save", G, SIZE, update_id, limit)


def header(version: int, nonce: int, boot: bytes = b"", update_id: int = 7) -> bytes:
    """A save area's header of ``version`` (3 and 4 have no boot)."""
    if version == save_area.VERSION:
        head = save_area.HEADER.pack(save_area.MAGIC, version, G, SIZE, update_id, nonce, boot)
    else:
        head = save_area.HEADER_V4.pack(save_area.MAGIC, version, G, SIZE, update_id, nonce)
    return (head + struct.pack(">I", zlib.crc32(head))).ljust(HEADER_SIZE, b"\0")


def v4_area(tmp_path: Path) -> SaveArea:
    """An area of version 4 reopened (an update interrupted before an upgrade): it syncs
    each save before the overwrite, as that version promised."""
    sa = area(tmp_path).create()
    sa.close()
    with open(tmp_path / "s.save", "r+b") as f:
        f.write(header(4, sa.nonce))
    old = area(tmp_path).open()
    assert old.synced_saves and old.intact
    return old


async def test_save_and_read_back_pieces(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    assert await sa.save(3, 0, b"a" * G)
    assert await sa.save(5, BLOCK, b"b" * BLOCK)
    assert 3 in sa and 5 in sa and 4 not in sa
    assert await sa.pieces(3) == [(0, b"a" * G)]
    assert await sa.pieces(5) == [(BLOCK, b"b" * BLOCK)]
    assert await sa.pieces(4) == []


async def test_missing_is_what_is_not_saved_in_whole_blocks(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    assert sa.missing(1, 100, 200) == [(0, BLOCK)]  # widened to its block
    assert sa.missing(1, 0, G) == [(0, G)]
    await sa.save(1, BLOCK, b"x" * BLOCK)
    assert sa.missing(1, 0, G) == [(0, BLOCK), (2 * BLOCK, G)]
    assert sa.missing(1, BLOCK + 5, 2 * BLOCK) == []
    last = SIZE // G
    tail = SIZE - last * G
    assert sa.missing(last, 0, tail) == [(0, tail)]  # clipped to the volume
    assert await sa.save(last, 0, b"e" * tail)
    assert sa.missing(last, 0, tail) == []


def missing_block_by_block(sa: SaveArea, chunk: int, start: int, end: int) -> list[tuple[int, int]]:
    """What ``missing`` means, one block at a time."""
    saved, limit = sa._saved.get(chunk, 0), min(G, SIZE - chunk * G)
    runs: list[tuple[int, int]] = []
    for b in range(start // BLOCK, -(-end // BLOCK)):
        if saved >> b & 1:
            continue
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, limit)
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


@given(
    chunk=st.sampled_from([0, 1, SIZE // G]),  # the last chunk ends inside a block
    saved=st.integers(0, (1 << (G // BLOCK)) - 1),
    span=st.tuples(st.integers(0, G), st.integers(0, G)),
)
def test_missing_runs_are_the_unsaved_blocks(chunk: int, saved: int, span: tuple[int, int]) -> None:
    sa = area(Path("/nonexistent"))  # missing needs no file
    limit = min(G, SIZE - chunk * G)
    start, end = sorted(min(x, limit) for x in span)
    sa._saved[chunk] = saved & ((1 << -(-limit // BLOCK)) - 1)
    assert sa.missing(chunk, start, end) == missing_block_by_block(sa, chunk, start, end)


async def test_a_block_saved_again_keeps_its_first_record(tmp_path: Path) -> None:
    """Two changes raced to it (see Session._save_at_once): the later one may have read the
    block after the first change went down, so only the first record holds the old contents."""
    sa = area(tmp_path).create()
    old = b"old" * (BLOCK // 3) + b"o"
    assert await sa.save(1, BLOCK, old)
    assert await sa.save(1, 0, b"n" * 3 * BLOCK)  # blocks 0 and 2 are new, block 1 is not
    want = [(0, b"n" * BLOCK), (BLOCK, old), (2 * BLOCK, b"n" * BLOCK)]
    assert sorted(await sa.pieces(1)) == want and sa.missing(1, 0, 3 * BLOCK) == []
    with pytest.raises(ValueError, match="whole blocks"):
        await sa.save(2, 10, b"n" * BLOCK)  # not on a block boundary
    sa.close()
    assert sorted(await area(tmp_path).open().pieces(1)) == want, "a reopen counts another record"


async def test_limit_refuses(tmp_path: Path) -> None:
    sa = area(tmp_path, limit=RECORD.size * 2 + 2 * G).create()
    assert await sa.save(0, 0, bytes(G))
    assert await sa.save(1, 0, bytes(G))
    assert not await sa.save(2, 0, bytes(G))
    assert 2 not in sa and sa.missing(2, 0, G) == [(0, G)]


async def test_reopen_keeps_records(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    await sa.save(2, 0, b"x" * G)
    await sa.save(9, 2 * BLOCK, b"y" * BLOCK)
    sa.close()
    again = area(tmp_path).open()
    assert sorted(again.index) == [2, 9]
    assert await again.pieces(9) == [(2 * BLOCK, b"y" * BLOCK)]
    assert again.missing(9, 0, G) == [(0, 2 * BLOCK), (3 * BLOCK, G)]


async def test_torn_tail_is_dropped(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    await sa.save(2, 0, b"x" * G)
    await sa.save(3, 0, b"z" * G)
    sa.close()
    path = tmp_path / "s.save"
    size = path.stat().st_size
    os.truncate(path, size - 10)  # the second record was being written when power went
    again = area(tmp_path).open()
    assert sorted(again.index) == [2]
    assert await again.save(3, 0, b"w" * G)  # and it can append again after the cut
    assert await again.pieces(3) == [(0, b"w" * G)]
    again.close()
    third = area(tmp_path).open()  # the new record went where the torn one began
    assert sorted(third.index) == [2, 3] and await third.pieces(3) == [(0, b"w" * G)]
    assert third.used == 2 * (RECORD.size + G)


@pytest.mark.parametrize("at", [RECORD.size + 10, 15])  # a data byte; the record's start field
async def test_a_flipped_byte_ends_the_valid_records(tmp_path: Path, at: int) -> None:
    sa = area(tmp_path).create()
    await sa.save(1, 0, b"a" * G)
    sa.close()
    path = tmp_path / "s.save"
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + at)
        f.write(b"!")
    assert area(tmp_path).open().index == {}


@pytest.mark.parametrize(
    ("offset", "value", "why"),
    [(0, b"X", "bad magic"), (12, b"\x09", "checksum"), (40, b"\xff", "checksum")],
)
def test_corrupt_header_names_file(tmp_path: Path, offset: int, value: bytes, why: str) -> None:
    area(tmp_path).create().close()
    path = tmp_path / "s.save"
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)
    with pytest.raises(CorruptFile, match=why) as info:
        area(tmp_path).open()
    assert str(path) in info.value.message


def test_other_update_is_refused(tmp_path: Path) -> None:
    area(tmp_path, update_id=7).create().close()
    with pytest.raises(CorruptFile, match="another update"):
        area(tmp_path, update_id=8).open()


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorruptFile, match="missing"):
        area(tmp_path).open()


async def test_a_new_update_keeps_the_file_and_none_of_the_old_records(tmp_path: Path) -> None:
    path = tmp_path / "s.save"
    old = area(tmp_path, update_id=7)
    old.prepare()
    old.create()
    for c in range(6):
        assert await old.save(c, 0, bytes([c + 1]) * G)
    old.close()
    inode, size = path.stat().st_ino, path.stat().st_size
    new = area(tmp_path, update_id=8)
    new.prepare()
    new.create()
    assert new.index == {} and new.used == 0
    assert await new.save(9, BLOCK, b"n" * BLOCK)
    new.close()
    assert (path.stat().st_ino, path.stat().st_size) == (inode, size), "the space was not reused in place"
    again = area(tmp_path, update_id=8).open()
    assert sorted(again.index) == [9], "a record of the previous update came back"
    assert await again.pieces(9) == [(BLOCK, b"n" * BLOCK)]


async def test_space_written_ahead_is_overwritten_not_appended(tmp_path: Path) -> None:
    path = tmp_path / "s.save"
    sa = area(tmp_path, limit=64 * G)
    sa.prepare()
    assert path.stat().st_size == HEADER_SIZE + 64 * G  # the limit, below SPACE_AHEAD
    sa.create()
    before = os.stat(path).st_blocks
    for c in range(8):
        assert await sa.save(c, 0, b"s" * G)
    assert path.stat().st_size == HEADER_SIZE + 64 * G and os.stat(path).st_blocks == before
    sa.close()
    assert sorted(area(tmp_path, limit=64 * G).open().index) == list(range(8))


async def test_a_record_of_another_nonce_ends_the_valid_records(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * G)
    sa.nonce ^= 1  # what a block of source data that looks like a record would carry
    assert await sa.save(2, 0, b"b" * G)
    sa.close()
    assert sorted(area(tmp_path).open().index) == [1]


def test_a_full_disk_while_writing_space_ahead_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save_area.os, "pwrite", full)
    area(tmp_path).prepare()  # logs, and the saves will append
    monkeypatch.undo()
    assert (tmp_path / "s.save").stat().st_size == 0, "space taken on a full disk was kept"
    sa = area(tmp_path).create()
    assert sa.used == 0 and sa.index == {}


def test_no_space_is_written_ahead_on_a_nearly_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fstatvfs

    def nearly_full(fd: int) -> Any:
        fs = real(fd)
        return type(
            "Fs", (), {"f_bavail": 3 * (HEADER_SIZE + (1 << 20)) // fs.f_frsize, "f_frsize": fs.f_frsize}
        )

    monkeypatch.setattr(save_area.os, "fstatvfs", nearly_full)
    area(tmp_path).prepare()
    assert (tmp_path / "s.save").stat().st_size == 0


async def test_concurrent_saves_share_an_fdatasync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa = v4_area(tmp_path)
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(save_area.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    blocks = {c: os.urandom(BLOCK) for c in range(20)}
    assert all(await asyncio.gather(*(sa.save(c, 0, b) for c, b in blocks.items())))
    assert 1 <= len(syncs) <= 2, f"{len(syncs)} fdatasyncs for one burst of 20 saves"
    sa.close()
    again = area(tmp_path).open()
    for c, b in blocks.items():
        assert await again.pieces(c) == [(0, b)]


async def test_a_failed_sync_fails_its_saves_and_every_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = v4_area(tmp_path)
    assert await sa.save(1, 0, b"a" * BLOCK)

    def eio(self: SaveArea) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(SaveArea, "sync", eio)
    assert await asyncio.gather(sa.save(2, 0, b"b" * BLOCK), sa.save(3, 0, b"c" * BLOCK)) == [False, False]
    monkeypatch.undo()
    # the kernel may have dropped those records: nothing after them is trusted
    assert not await sa.save(4, 0, b"d" * BLOCK)
    assert set(sa.index) == {1} and sa.missing(2, 0, BLOCK) == [(0, BLOCK)]
    assert await sa.pieces(1) == [(0, b"a" * BLOCK)]


async def test_a_full_disk_on_a_record_write_fills_the_area(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * BLOCK)

    def full(self: SaveArea, record: bytes, pos: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SaveArea, "_put", full)
    assert not await sa.save(2, 0, b"b" * BLOCK)
    monkeypatch.undo()
    assert not await sa.save(3, 0, b"c" * BLOCK), "a save after a full disk went on"
    assert sa.limit == sa.used == RECORD.size + BLOCK


def held_sync(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> tuple[threading.Event, threading.Event]:
    """The save area's fdatasync sets ``entered`` and waits for ``go`` (a slow disk), then
    succeeds or fails. Returns (go, entered)."""
    go, entered = threading.Event(), threading.Event()
    real = SaveArea.sync

    def sync(self: SaveArea) -> None:
        entered.set()
        go.wait(5)
        if fail:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self)

    monkeypatch.setattr(SaveArea, "sync", sync)
    return go, entered


async def test_a_save_cancelled_while_its_round_runs_still_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = v4_area(tmp_path)
    go, entered = held_sync(monkeypatch)
    first = asyncio.ensure_future(sa.save(1, 0, b"a" * BLOCK))
    await until(entered.is_set, "the round's sync")  # its record is in the file, its round waits
    first.cancel()  # the client's write is abandoned: it never overwrites the block
    with pytest.raises(asyncio.CancelledError):
        await first
    go.set()
    await until(lambda: 1 in sa, "the round's end")
    monkeypatch.undo()
    assert 1 in sa and sa.missing(1, 0, BLOCK) == [], "a durable record left out of the index"
    assert await sa.save(2, 0, b"b" * BLOCK)
    sa.close()
    again = area(tmp_path).open()
    assert await again.pieces(1) == [(0, b"a" * BLOCK)] and await again.pieces(2) == [(0, b"b" * BLOCK)]


async def test_open_reads_on_past_a_block_saved_twice(tmp_path: Path) -> None:
    """Two records of one block (the first save's waiter went away before its round
    ended): the first counts, and the records after the second are still found."""
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * BLOCK)
    sa._saved.clear()  # as if the first save were unknown: its block is saved again
    sa.index.clear()
    assert await sa.save(1, 0, b"a" * (2 * BLOCK))
    assert await sa.save(2, 0, b"b" * BLOCK)
    sa.close()
    again = area(tmp_path).open()
    assert sorted(again.index) == [1, 2]
    assert b"".join(d for _, d in sorted(await again.pieces(1))) == b"a" * (2 * BLOCK)
    assert await again.pieces(2) == [(0, b"b" * BLOCK)]


async def test_a_failed_round_whose_saves_were_all_cancelled_still_ends_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = v4_area(tmp_path)
    go, entered = held_sync(monkeypatch, fail=True)
    first = asyncio.ensure_future(sa.save(1, 0, b"a" * BLOCK))
    await until(entered.is_set, "the round's sync")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    go.set()
    await until(lambda: sa.failed, "the round's end")  # the kernel may have dropped chunk 1's record
    monkeypatch.undo()
    assert not await sa.save(2, 0, b"b" * BLOCK), "a record made durable behind a possible gap"


def test_create_in_place_makes_the_directory_entry_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(save_area.os, "fstatvfs", lambda fd: Full())
    synced: list[Path] = []
    monkeypatch.setattr(save_area, "sync_dir", lambda p: synced.append(p))
    sa = area(tmp_path)
    sa.prepare()  # a nearly full disk: creates the file, writes nothing ahead, no sync_dir
    sa.create()  # in place, since the file exists
    assert synced == [tmp_path], "a new save area's directory entry was never made durable"


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_damage_in_a_round_that_completed_is_corrupt(tmp_path: Path) -> None:
    """One bad byte in a record whose round was synced (bit rot, a disk that lied about a
    flush) must not silently void it and every later record: the copy would read those
    blocks from the overwritten source. A later record says that it was durable."""
    sa = v4_area(tmp_path)
    for c in range(4):  # four saves, each its own completed round
        assert await sa.save(c, 0, bytes([c + 1]) * G)
    sa.close()
    flip(tmp_path / "s.save", HEADER_SIZE + (RECORD.size + G) + RECORD.size + 100)  # record 1's data
    with pytest.raises(CorruptFile, match="damaged") as info:
        area(tmp_path).open()
    assert str(tmp_path / "s.save") in info.value.message


async def test_a_bad_record_no_later_round_vouches_for_is_a_torn_tail(tmp_path: Path) -> None:
    """The records of the last round were written together: a later one of them does not
    say the first was durable (its round may never have ended, its overwrite never
    happened), so a bad first one ends the records as a torn write would."""
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * G)
    last = [sa.put(2, 0, b"b" * G), sa.put(3, 0, b"c" * G)]  # one round
    for done in last:
        assert done is not None
        await sa.wait(done)
    sa.close()
    bad = HEADER_SIZE + RECORD.size + G
    flip(tmp_path / "s.save", bad + RECORD.size + 7)
    again = area(tmp_path).open()
    assert sorted(again.index) == [1] and again.used == bad - HEADER_SIZE
    assert await again.save(4, 0, b"d" * BLOCK)  # over the bad record
    again.close()
    third = area(tmp_path).open()  # chunk 3's record is still there, and vouches for nothing new
    assert sorted(third.index) == [1, 4] and await third.pieces(4) == [(0, b"d" * BLOCK)]


async def test_records_written_after_a_reopen_vouch_for_the_ones_before(tmp_path: Path) -> None:
    """A reopen syncs what it read (after a killed server it may be only in the page
    cache), so the records of the next round say that it was durable."""
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * G)
    sa.close()
    again = area(tmp_path).open()
    assert await again.save(2, 0, b"b" * G)
    again.close()
    flip(tmp_path / "s.save", HEADER_SIZE + RECORD.size + 5)
    with pytest.raises(CorruptFile, match="damaged"):
        area(tmp_path).open()


async def test_a_version_3_area_is_read_and_goes_on_in_version_3(tmp_path: Path) -> None:
    """An update interrupted before an upgrade: its records (without the synced field)
    still count, and its later saves keep the file in one format."""
    path = tmp_path / "s.save"
    nonce = 0x1234_5678_9ABC_DEF0
    head = header(3, nonce)
    fields = save_area.RECORD_V3.pack(save_area.RECORD_MAGIC, nonce, 5, BLOCK, BLOCK, 0)[:-4]
    data = b"v" * BLOCK
    record = fields + struct.pack(">I", zlib.crc32(data, zlib.crc32(fields))) + data
    path.write_bytes(head + record)
    old = area(tmp_path).open()
    assert old.synced_saves and old.intact, "its saves were synced: intact after any crash"
    assert await old.pieces(5) == [(BLOCK, data)]
    assert await old.save(6, 0, b"w" * G)
    old.close()
    assert path.stat().st_size == HEADER_SIZE + 2 * save_area.RECORD_V3.size + BLOCK + G
    again = area(tmp_path).open()
    assert sorted(again.index) == [5, 6] and await again.pieces(6) == [(0, b"w" * G)]


@pytest.mark.parametrize("call", ["open", "pread"])
async def test_a_save_area_that_cannot_be_read_is_an_io_error_not_a_corrupt_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * G)
    sa.close()

    def eio(*args: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(save_area.os, call, eio)
    with pytest.raises(DeltavolError) as info:
        area(tmp_path).open()
    monkeypatch.undo()
    assert not isinstance(info.value, CorruptFile)
    assert str(tmp_path / "s.save") in info.value.message and "Input/output error" in info.value.message
    assert sorted(area(tmp_path).open().index) == [1]


async def test_a_save_writes_its_record_and_calls_no_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 5: the record goes into the page cache and the save returns; nothing is
    synced on the write path, and the record is there for a restart in this boot."""
    sa = area(tmp_path).create()
    calls: list[str] = []
    for name in ("fdatasync", "fsync", "sync"):
        monkeypatch.setattr(fs.current(), name, lambda *a, _n=name: calls.append(_n), raising=False)
    blocks = {c: os.urandom(BLOCK) for c in range(20)}
    assert all(await asyncio.gather(*(sa.save(c, 0, b) for c, b in blocks.items())))
    assert all(c in sa for c in blocks), "a record not indexed when its save returned"
    assert calls == [], f"a save synced: {calls}"
    monkeypatch.undo()
    sa.close()
    again = area(tmp_path).open()
    assert again.intact, "records written in this boot (a killed server) are not trusted"
    for c, b in blocks.items():
        assert await again.pieces(c) == [(0, b)]


@pytest.mark.parametrize("boot", [b"\x01" * 16, b""], ids=["another boot", "boot unknown"])
async def test_records_written_in_another_boot_are_not_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot: bytes
) -> None:
    """The header names the boot the records were written in: after a reboot (or when the
    boot is unknown) unsynced records may be lost, and the area says so."""
    sa = area(tmp_path).create()
    assert sa.boot == fs.boot_id() and sa.boot
    assert await sa.save(3, 0, b"a" * BLOCK)
    sa.close()
    monkeypatch.setattr(fs.current(), "boot_id", lambda: boot)
    again = area(tmp_path).open()
    assert not again.intact
    assert await again.pieces(3) == [(0, b"a" * BLOCK)], "what survived is still read"


async def test_a_failed_record_write_ends_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO on a record's write, as a failed fdatasync: nothing after it is trusted, and
    saves return False (the caller copies before writing)."""
    sa = area(tmp_path).create()
    assert await sa.save(1, 0, b"a" * BLOCK)

    def eio(self: SaveArea, record: bytes, pos: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(SaveArea, "_put", eio)
    assert not await sa.save(2, 0, b"b" * BLOCK)
    monkeypatch.undo()
    assert sa.failed and not await sa.save(3, 0, b"c" * BLOCK)
    assert set(sa.index) == {1} and await sa.pieces(1) == [(0, b"a" * BLOCK)]


async def test_a_version_4_area_is_read_and_goes_on_in_version_4(tmp_path: Path) -> None:
    """Its records were each synced: intact after any crash, and its later saves are
    synced too, until its update ends; the next update's area is version 5."""
    old = v4_area(tmp_path)
    assert await old.save(2, 0, b"x" * G)
    old.close()
    raw = (tmp_path / "s.save").read_bytes()
    assert struct.unpack_from(">I", raw, 8)[0] == 4
    again = area(tmp_path).open()
    assert again.intact and again.synced_saves and await again.pieces(2) == [(0, b"x" * G)]
    again.close()
    new = area(tmp_path, update_id=8).create()
    assert not new.synced_saves
    assert struct.unpack_from(">I", (tmp_path / "s.save").read_bytes(), 8)[0] == save_area.VERSION
