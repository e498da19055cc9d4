"""Zeroes a source stores as data (a thick image, a block device with no SEEK_DATA) go to a
local volume as zero requests, not as data, in the kernel copy too: the target stays
sparse, and its bytes are exactly the source's."""

from __future__ import annotations

import os

import pytest

from deltavol.backend.file import scan_extents
from deltavol.nbd.constants import STATE_HOLE, STATE_ZERO
from deltavol.service import Service
from deltavol.sessions.states import State
from tests.unit.sessions.test_kernel_copy import dst_sha, sha, svc  # noqa: F401  (fixture)
from tests.unit.sessions.test_operations import SIZE, G, MiB, consistent_session


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("seek", [True, False], ids=["thick-file", "no-seek-data"])
async def test_a_full_update_of_zeroes_stored_as_data_leaves_the_target_sparse(
    svc: Service,  # noqa: F811
    seek: bool,
) -> None:
    svc.create_volume("src", SIZE)
    svc.create_volume("dst", SIZE)
    src = svc.volumes.get("src")
    await src.backend.pwrite(0, bytes(SIZE))  # zeroes, but allocated data (a thick image)
    await src.backend.pwrite(MiB, b"A" * MiB)
    await src.backend.pwrite(3 * MiB + G, b"\0" * 4096 + b"Z" * 100)  # data after zeroed bytes
    await src.backend.flush()
    src.backend._seek = seek  # False: as a block device, all of it one data extent
    await svc.create_session(name="s", source="src", target="dst")
    s = svc.sessions.get("s")
    await s.start_update(True)
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    dst = svc.volumes.get("dst")
    await dst.backend.flush()
    assert await dst_sha(svc, 0, SIZE) == sha(await src.backend.pread(0, SIZE))
    assert allocated(dst.backend.path) <= MiB + 2 * G, "zeroes of the source were written as data"
    assert s.update is not None and s.update.bytes_sent <= MiB + 2 * G


async def test_a_chunk_zeroed_with_data_is_punched_on_the_target(svc: Service) -> None:  # noqa: F811
    """Under copy-on-first-write (the kernel path, the zero blocks punched after the locks
    are let go), a chunk a client filled with zero bytes becomes a hole on the target."""
    s = await consistent_session(svc)  # "A" over the first MiB
    src = svc.volumes.get("src")
    await src.export.pwrite(2 * G, bytes(G))  # zeroes written as data
    await src.export.pwrite(3 * G, b"B" * G)
    await s.start_update(False)
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    dst = svc.volumes.get("dst")
    await dst.backend.flush()
    assert await dst_sha(svc, 2 * G, 2 * G) == sha(bytes(G) + b"B" * G)
    hole = STATE_HOLE | STATE_ZERO
    assert scan_extents(dst.backend._fd, 2 * G, G) == [(G, hole)], "the zeroed chunk was written as data"
    assert scan_extents(dst.backend._fd, 3 * G, G) == [(G, 0)]
