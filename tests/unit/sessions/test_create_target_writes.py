"""A create whose target a client opens while it waits is refused, after that client's
queued writes landed.

``create`` checks the target's connections, then waits for the source's writes in
flight (the source's gate). Meanwhile a client can open the target and queue writes in
its write lane: each passed the export's checks at once, before the session's guard
existed, and lands whenever a lane thread gets to it. Had the session come in, such a
write could land on the target after the first update copied that chunk, and nothing
would repair it. Drives the real Service, SessionManager and SQLite in a tmp data dir.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from deltavol.config import ServerConfig
from deltavol.errors import InUse
from deltavol.service import Service
from deltavol.store.datadir import DataDir

MiB = 1 << 20


async def test_a_create_waits_for_a_target_clients_queued_writes_then_refuses_it(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "data")
    svc = Service(dd.open(), dd, ServerConfig(data_dir=dd.root, save_limit=4 * MiB))
    try:
        svc.load()
        svc.create_volume("src", 4 * MiB)
        svc.create_volume("dst", 4 * MiB)
        src, dst = svc.volumes.get("src"), svc.volumes.get("dst")

        backend, down, release = src.backend, asyncio.Event(), asyncio.Event()
        real_pwrite = backend.pwrite

        async def held_pwrite(offset: int, data: bytes, fua: bool = False) -> None:
            down.set()
            await release.wait()
            await real_pwrite(offset, data, fua)

        backend.pwrite = held_pwrite  # type: ignore[method-assign]
        write = asyncio.ensure_future(src.export.pwrite(0, b"B" * 4096))
        await down.wait()  # the source's gate has a writer: a create waits for it
        backend.pwrite = real_pwrite  # type: ignore[method-assign]

        closing = asyncio.Event()  # set when a create waits at the target's gate
        real_closed = dst.gate.closed

        @asynccontextmanager
        async def closed() -> AsyncIterator[None]:
            closing.set()
            async with real_closed():
                yield

        dst.gate.closed = closed  # type: ignore[method-assign]
        create = asyncio.ensure_future(svc.create_session(name="s", source="src", target="dst"))
        async with asyncio.timeout(20):
            while src.gate.open:  # past its check of the target's connections, at the gate
                await asyncio.sleep(0)

        export = svc.open_export("dst")  # a client opens the target, and queues a write
        job = export.pwrite_soon(0, b"X" * 4096)
        assert job is not None  # agreed to: no guard yet; it holds the target's gate

        release.set()
        await write
        watch = asyncio.ensure_future(closing.wait())
        await asyncio.wait([create, watch], return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        # before: the session came in here, the client's write still to land on its target
        assert not create.done(), "the session came in with a target write still queued"

        await asyncio.to_thread(job.run)  # the lane gets to it: it lands, then the create goes on
        job.finish(None)
        with pytest.raises(InUse, match="1 NBD connection"):
            await asyncio.wait_for(create, 20)
        assert svc.sessions.all() == []
        assert await dst.backend.pread(0, 4096) == b"X" * 4096
        svc.close_export("dst")
    finally:
        await svc.close()
        dd.close()
