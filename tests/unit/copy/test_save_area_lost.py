"""Save records that are not synced as they are written (version 5) can be lost behind the
server's back: a background writeback error, reported to no one who wrote them, lets the
kernel drop the page, and a later read returns what the disk holds. The save area must not
hand such bytes out as the mark's contents, must not call itself intact when its sync at
start-up reports that error, and its syncs in a pool thread must not outlive its fd.

A dropped page is simulated by writing what the disk would hold over the record through a
second file descriptor."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from deltavol.copy.save_area import BLOCK, HEADER_SIZE, RECORD, SEAL, SEAL_AT, SaveArea
from deltavol.errors import CorruptFile, DeltavolError, SaveRecordLost
from deltavol.store import fs

G = 16 * BLOCK
SIZE = 16 * G


def area(path: Path) -> SaveArea:
    return SaveArea(path, G, SIZE, 1, 1 << 20)


def overwrite(path: Path, at: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, at)
    finally:
        os.close(fd)


async def test_a_record_that_reads_back_wrong_is_no_piece(tmp_path: Path) -> None:
    p = tmp_path / "s.save"
    a = area(p).create()
    try:
        assert await a.save(3, 0, b"A" * BLOCK) and await a.save(5, 0, b"B" * BLOCK)
        assert await a.pieces(3) == [(0, b"A" * BLOCK)]
        overwrite(p, HEADER_SIZE + RECORD.size, bytes(BLOCK))  # chunk 3's data: what the disk holds
        with pytest.raises(SaveRecordLost, match="chunk 3"):
            await a.pieces(3)
        assert await a.pieces(5) == [(0, b"B" * BLOCK)], "the other record still reads back"
        overwrite(p, HEADER_SIZE + RECORD.size + BLOCK, bytes(RECORD.size))  # chunk 5's header
        with pytest.raises(SaveRecordLost, match="chunk 5"):
            await a.pieces(5)
    finally:
        a.close()


async def test_pieces_of_one_record_split_in_the_index_are_checked(tmp_path: Path) -> None:
    """A block saved earlier splits a later record into two pieces: each reads back checked."""
    p = tmp_path / "s.save"
    a = area(p).create()
    try:
        assert await a.save(2, BLOCK, b"x" * BLOCK)
        assert await a.save(2, 0, b"y" * 3 * BLOCK)  # its middle block is saved already
        assert await a.pieces(2) == [(BLOCK, b"x" * BLOCK), (0, b"y" * BLOCK), (2 * BLOCK, b"y" * BLOCK)]
        second = HEADER_SIZE + RECORD.size + BLOCK
        overwrite(p, second + RECORD.size + BLOCK, b"z")  # the block no piece of it uses
        with pytest.raises(SaveRecordLost):
            await a.pieces(2)
    finally:
        a.close()


async def test_open_after_a_writeback_error_is_not_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sync after a writeback error fails once (the kernel reports it once per
    file): that start-up must distrust the area, not fail and leave the next start to
    trust an area whose lost records it took for a torn tail."""
    assert fs.boot_id(), "this test needs a boot id (an area is intact after a restart in one boot)"
    p = tmp_path / "s.save"
    a = area(p).create()
    assert await a.save(3, 0, b"A" * BLOCK) and await a.save(5, 0, b"B" * BLOCK)
    a.close()
    overwrite(p, HEADER_SIZE, bytes(RECORD.size))  # chunk 3's record was dropped
    real, calls = os.fdatasync, []

    def once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "writeback error, reported once")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", once)
    b = area(p).open()  # no start-up error
    try:
        assert calls, "open syncs what it read"
        assert not b.intact, "records may be lost: the update must re-mark"
        assert b.failed and not await b.save(1, 0, b"C" * BLOCK), "no save over a file that lost pages"
    finally:
        b.close()
    c = area(p).open()  # the error was reported: this start's sync succeeds
    try:
        assert c.intact and 3 not in c and 5 not in c  # why the first start had to re-mark
    finally:
        c.close()


def test_close_waits_for_a_sync_in_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group-commit round syncs the area in a pool thread; closing it meanwhile must wait,
    or the thread would fdatasync whatever file reused the fd (and eat its error)."""
    a = area(tmp_path / "s.save").create()
    fd = a._fd
    entered, release, synced = threading.Event(), threading.Event(), []
    real = fs.fdatasync

    def slow(n: int) -> None:
        entered.set()
        assert release.wait(10)
        synced.append(os.readlink(f"/proc/self/fd/{n}"))
        real(n)

    monkeypatch.setattr(fs, "fdatasync", slow)
    syncer = threading.Thread(target=a.sync)
    syncer.start()
    assert entered.wait(10)
    closer = threading.Thread(target=a.close)
    closer.start()
    closer.join(0.3)
    try:
        assert closer.is_alive(), "close() did not wait for the sync using its fd"
    finally:
        release.set()
        syncer.join(10)
        closer.join(10)
    assert synced == [str(tmp_path / "s.save")] and a._fd == -1
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError):  # closed: no fd to sync, said so (not a sync of fd -1 or another)
        a.sync()


async def test_durable_syncs_the_records_once_and_a_failure_ends_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "s.save"
    a = area(p).create()
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    try:
        await a.durable()
        assert calls == [], "nothing written since the header: nothing to sync"
        assert await a.save(3, 0, b"A" * BLOCK)
        assert a.unsynced
        await a.durable()
        assert len(calls) == 1 and not a.unsynced
        await a.durable()
        assert len(calls) == 1

        def fail(fd: int) -> None:
            raise OSError(errno.EIO, "writeback error")

        monkeypatch.setattr(os, "fdatasync", fail)
        assert await a.save(4, 0, b"B" * BLOCK)
        with pytest.raises(DeltavolError, match="save area"):
            await a.durable()
        assert a.failed and not await a.save(6, 0, b"C" * BLOCK)
        with pytest.raises(DeltavolError):
            await a.durable()  # failed for good: no later sync may vouch for the records
    finally:
        a.close()


async def test_a_sealed_area_is_intact_after_a_reboot_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean stop seals the records (synced, the header says where they end): a start in
    another boot trusts them, and takes the seal off (durably) before saving again."""
    p = tmp_path / "s.save"
    a = area(p).create()
    assert await a.save(3, 0, b"A" * BLOCK) and await a.save(5, 0, b"B" * BLOCK)
    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    assert await a.seal()
    assert len(syncs) == 2, "the records, then the seal"
    assert not await a.save(6, 0, b"C" * BLOCK), "a save after the seal: its record is not sealed"
    a.close()
    monkeypatch.setattr(fs.current(), "boot_id", lambda: b"\x07" * 16)  # the machine restarted
    b = area(p).open()
    try:
        assert b.intact and sorted(b.index) == [3, 5] and not b.sealed
        assert await b.pieces(5) == [(0, b"B" * BLOCK)]
        assert await b.save(6, 0, b"C" * BLOCK)
    finally:
        b.close()
    with open(p, "rb") as f:
        f.seek(SEAL_AT)
        assert f.read(SEAL.size + 4) == bytes(SEAL.size + 4), "the seal is still on"
    c = area(p).open()  # killed after saving again, in the same boot: the records are there
    try:
        assert c.intact and sorted(c.index) == [3, 5, 6]
    finally:
        c.close()
    monkeypatch.setattr(fs.current(), "boot_id", lambda: b"\x08" * 16)
    d = area(p).open()  # and after another reboot, the unsealed record may be lost
    try:
        assert not d.intact
    finally:
        d.close()


async def test_a_sealed_area_whose_records_end_early_is_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "s.save"
    a = area(p).create()
    assert await a.save(3, 0, b"A" * BLOCK) and await a.save(5, 0, b"B" * BLOCK)
    assert await a.seal()
    a.close()
    overwrite(p, HEADER_SIZE + RECORD.size + BLOCK, bytes(RECORD.size))  # the second record
    with pytest.raises(CorruptFile, match="sealed"):
        area(p).open()
