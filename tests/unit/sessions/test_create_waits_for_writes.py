"""Creating a session waits for the writes already in flight on its source.

Such a write passed the source's hooks before the new session's tracking hook existed
(on a source with no session yet, it passed no gate either).
Had the session been wired in meanwhile, the write could land after its first (full)
update copied the chunk: the target differs and no bit says so, and no later update
repairs it. Every write must either go down before the session exists (the first update
copies it) or be tracked.

These drive the real Service, SessionManager and SQLite in a tmp data dir, the source's
file backend held back in one write.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from deltavol.config import ServerConfig
from deltavol.service import Service
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from deltavol.store.datadir import DataDir

MiB = 1 << 20


async def update(s: Session, full: bool) -> None:
    await s.start_update(full, None)
    await s.wait()
    assert s.state is State.IDLE and s.consistent, s.status()


async def test_a_write_in_flight_at_create_is_copied_or_tracked(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "data")
    svc = Service(dd.open(), dd, ServerConfig(data_dir=dd.root, save_limit=4 * MiB))
    try:
        svc.load()
        svc.create_volume("src", 4 * MiB)
        svc.create_volume("dst", 4 * MiB)
        src, dst = svc.volumes.get("src"), svc.volumes.get("dst")
        await src.export.pwrite(0, b"A" * MiB)

        backend, down, release = src.backend, asyncio.Event(), asyncio.Event()
        real_pwrite = backend.pwrite

        async def held_pwrite(offset: int, data: bytes, fua: bool = False) -> None:
            down.set()
            await release.wait()
            await real_pwrite(offset, data, fua)

        backend.pwrite = held_pwrite  # type: ignore[method-assign]
        write = asyncio.ensure_future(src.export.pwrite(0, b"B" * 4096))
        await down.wait()  # the write is past every hook, on its way to the disk
        backend.pwrite = real_pwrite  # type: ignore[method-assign]

        create = asyncio.ensure_future(svc.create_session(name="s", source="src", target="dst"))
        await asyncio.sleep(0)  # create runs until it first has to wait
        if create.done():  # it did not wait for the write: the first update runs meanwhile
            await update(svc.sessions.get("s"), full=True)
        release.set()
        await write
        await create
        s = svc.sessions.get("s")
        if s.state is State.NEW:
            await update(s, full=True)
        await update(s, full=False)

        assert (
            await dst.backend.pread(0, MiB)
            == await src.backend.pread(0, MiB)
            == b"B" * 4096 + b"A" * (MiB - 4096)
        )
    finally:
        await svc.close()
        dd.close()
