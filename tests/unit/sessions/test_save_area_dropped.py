"""A copy-before-write whose save area is dropped under it: no raw internal error.

With the save area full, a client's write to a chunk the update still owes copies the
chunk's contents as of the mark to the target first: the source as it is, with the save
area's records laid over it. If the save area is dropped while that copy reads the
source (what the update's end, a cancel, a new mark or a removal do after their commit),
the mark it protected is over: the write must go down (there is nothing left to
protect), not fail with an internal error, and nothing may be copied as the mark's image.

These drive the real Service, SessionManager and SQLite in a tmp data dir.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from deltavol.config import ServerConfig
from deltavol.service import Service
from deltavol.sessions.states import State
from deltavol.store.datadir import DataDir

MiB = 1 << 20
G = 64 * 1024


async def test_a_write_whose_copy_before_write_loses_its_save_area_goes_down(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "data")
    # a save area with room for no chunk: every protected write copies before it goes down
    svc = Service(dd.open(), dd, ServerConfig(data_dir=dd.root, save_limit=4096))
    try:
        svc.load()
        svc.create_volume("src", 4 * MiB)
        svc.create_volume("dst", 4 * MiB)
        src, dst = svc.volumes.get("src"), svc.volumes.get("dst")
        await src.export.pwrite(0, b"A" * MiB)
        await svc.create_session(name="s", source="src", target="dst")
        s = svc.sessions.get("s")
        await s.start_update(True, None)
        await s.wait()
        await src.export.pwrite(0, b"B" * MiB)  # tracked: the next update owes chunks 0-15
        await s.start_update(False, None)
        await s.pause()  # the mark stands, the chunks stay owed and protected
        assert s.state is State.PAUSED and s.transfer is not None and s.transfer.test(1)
        target_before = await dst.backend.pread(0, MiB)

        backend, reading, release = src.backend, asyncio.Event(), asyncio.Event()
        real_pread = backend.pread

        async def held_pread(offset: int, length: int) -> bytes:
            if offset == G:  # the copy-before-write of chunk 1 reads its old contents
                reading.set()
                await release.wait()
            return await real_pread(offset, length)

        backend.pread = held_pread  # type: ignore[method-assign]
        write = asyncio.ensure_future(src.export.pwrite(G, b"C" * G))
        await reading.wait()
        s.protector.drop_save_area()  # as after a commit that ends the mark
        release.set()
        await write  # raised an internal error (AssertionError) before
        backend.pread = real_pread  # type: ignore[method-assign]

        assert await src.backend.pread(0, 2 * G) == b"B" * G + b"C" * G
        assert await dst.backend.pread(0, MiB) == target_before  # nothing copied meanwhile
    finally:
        await svc.close()
        dd.close()
