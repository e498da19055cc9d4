"""Export: every request is checked once, here; a refused one reaches no layer below."""

from __future__ import annotations

import pytest

from deltavol.backend.export import Export
from deltavol.errors import DeltavolError, NotSupported, OutOfRange, ReadOnly
from deltavol.nbd.constants import TransmissionFlag as TF
from tests.fakes import Disk

SIZE = 1 << 20


class NoTrim(Disk):
    def can_trim(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return False


def test_a_writable_export_advertises_what_its_stack_can() -> None:
    flags = Export(Disk(SIZE)).transmission_flags()
    for f in (TF.HAS_FLAGS, TF.SEND_FLUSH, TF.SEND_FUA, TF.SEND_TRIM, TF.SEND_WRITE_ZEROES, TF.SEND_DF):
        assert flags & f, f
    assert not flags & TF.READ_ONLY and not flags & TF.SEND_FAST_ZERO
    bare = Export(NoTrim(SIZE)).transmission_flags()
    assert not bare & TF.SEND_TRIM and not bare & TF.SEND_WRITE_ZEROES


def test_a_read_only_export_advertises_no_change() -> None:
    flags = Export(Disk(SIZE), read_only=lambda: True).transmission_flags()
    assert flags & TF.READ_ONLY
    assert not flags & (TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO)


@pytest.mark.parametrize("offset, length", [(SIZE, 1), (SIZE - 512, 1024), (0, SIZE + 1), (SIZE + 4096, 0)])
async def test_a_request_past_the_end_is_refused_before_any_layer(offset: int, length: int) -> None:
    disk = Disk(SIZE)
    export = Export(disk)
    for request in (
        export.pread(offset, length),
        export.pwrite(offset, b"x" * length),
        export.zero(offset, length),
        export.trim(offset, length),
        export.cache(offset, length),
        export.extents(offset, length),
    ):
        with pytest.raises(OutOfRange) as refused:
            await request
        assert refused.value.http_status == 400 and str(SIZE) in refused.value.message
    with pytest.raises(OutOfRange):
        export.pwrite_now(offset, b"x" * length)
    with pytest.raises(OutOfRange):
        export.pread_cached(offset, length)
    assert disk.landed == [] and disk.data == bytes(SIZE)


async def test_a_read_only_export_refuses_changes_and_serves_reads() -> None:
    disk = Disk(SIZE, b"\x5a" * SIZE)
    read_only = True
    export = Export(disk, read_only=lambda: read_only)
    for change in (export.pwrite(0, b"x"), export.zero(0, 512), export.trim(0, 512)):
        with pytest.raises(ReadOnly):
            await change
    with pytest.raises(ReadOnly):
        export.pwrite_now(0, b"x")
    assert disk.landed == [] and await export.pread(0, 4) == b"\x5a" * 4
    read_only = False  # asked at each request: a guard lifted applies at once
    await export.pwrite(0, b"x")
    assert disk.landed == [(0, 1)] and disk.data[:2] == b"x\x5a"


async def test_a_fast_zero_the_stack_cannot_do_is_refused_and_nothing_is_zeroed() -> None:
    disk = Disk(SIZE, b"\x5a" * SIZE)
    export = Export(disk)
    with pytest.raises(NotSupported) as refused:
        await export.zero(0, 4096, fast=True)
    assert isinstance(refused.value, DeltavolError) and refused.value.http_status == 400
    assert disk.landed == [] and disk.data[:4096] == b"\x5a" * 4096
    await export.zero(0, 4096)
    assert disk.landed == [(0, 4096)] and disk.data[:4096] == bytes(4096)


async def test_extents_of_nothing_ask_no_layer() -> None:
    class Counting(Disk):
        asked = 0

        async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
            self.asked += 1
            return await super().extents(offset, length)

    disk = Counting(SIZE)
    export = Export(disk)
    assert await export.extents(SIZE, 0) == [] and disk.asked == 0
    assert await export.extents(0, SIZE) == [(SIZE, 0)] and disk.asked == 1
