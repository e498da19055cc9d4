"""The save area keeps old chunk contents durably, refuses past its limit, survives a
reopen, drops a torn tail, and names the file when it is corrupt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deltavol.copy.save_area import HEADER_SIZE, RECORD, SaveArea
from deltavol.errors import CorruptFile

G = 4096


def area(tmp_path: Path, limit: int = 1 << 20, update_id: int = 7) -> SaveArea:
    return SaveArea(tmp_path / "s.save", G, 64 * G, update_id, limit)


async def test_save_and_load(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    assert await sa.save(3, b"a" * G)
    assert await sa.save(5, b"b" * 100)
    assert 3 in sa and 5 in sa and 4 not in sa
    assert await sa.load(3) == b"a" * G
    assert await sa.load(5) == b"b" * 100


async def test_first_save_wins(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    await sa.save(1, b"old" * 10)
    await sa.save(1, b"new" * 10)
    assert await sa.load(1) == b"old" * 10


async def test_limit_refuses(tmp_path: Path) -> None:
    sa = area(tmp_path, limit=RECORD.size * 2 + 2 * G).create()
    assert await sa.save(0, bytes(G))
    assert await sa.save(1, bytes(G))
    assert not await sa.save(2, bytes(G))
    assert 2 not in sa


async def test_reopen_keeps_records(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    await sa.save(2, b"x" * G)
    await sa.save(9, b"y" * G)
    sa.close()
    again = area(tmp_path).open()
    assert sorted(again.index) == [2, 9]
    assert await again.load(9) == b"y" * G


async def test_torn_tail_is_dropped(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    await sa.save(2, b"x" * G)
    await sa.save(3, b"z" * G)
    sa.close()
    path = tmp_path / "s.save"
    size = path.stat().st_size
    os.truncate(path, size - 10)  # the second record was being written when power went
    again = area(tmp_path).open()
    assert sorted(again.index) == [2]
    assert path.stat().st_size == HEADER_SIZE + RECORD.size + G
    assert await again.save(3, b"w" * G)  # and it can append again after the cut
    assert await again.load(3) == b"w" * G


async def test_flipped_data_byte_ends_the_valid_records(tmp_path: Path) -> None:
    sa = area(tmp_path).create()
    await sa.save(1, b"a" * G)
    sa.close()
    path = tmp_path / "s.save"
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + RECORD.size + 10)
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
