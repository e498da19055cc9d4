"""A session created while the last session of its source is removed tracks its writes.

The sessions of one source share one group commit (their tracking files' rounds), held
by the source's wiring, which goes when its last session does. ``create`` waits for the
source's write gate before it wires the new session in; if the source's last session
went meanwhile, the new session must not keep the group commit of the wiring that went:
its tracking rounds would be another group commit's than the one the source's writes
wait on, and every write to the source would fail with an untyped error.

Drives the real Service, SessionManager and SQLite in a tmp data dir; the source's file
backend holds one write back so that the removal waits at the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deltavol.config import ServerConfig
from deltavol.errors import DeltavolError, InUse
from deltavol.service import Service
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from deltavol.store.datadir import DataDir

MiB = 1 << 20


async def update(s: Session, full: bool) -> None:
    await s.start_update(full, None)
    await s.wait()
    assert s.state is State.IDLE and s.consistent, s.status()


async def test_a_session_created_while_the_last_one_goes_tracks_the_writes(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "data")
    svc = Service(dd.open(), dd, ServerConfig(data_dir=dd.root, save_limit=4 * MiB))
    try:
        svc.load()
        for name in ("src", "t1", "t2"):
            svc.create_volume(name, 4 * MiB)
        src, t2 = svc.volumes.get("src"), svc.volumes.get("t2")
        await src.export.pwrite(0, b"A" * MiB)
        await svc.create_session(name="a", source="src", target="t1")

        # a write held below the hooks keeps the gate from closing
        backend, down, release = src.backend, asyncio.Event(), asyncio.Event()
        real_pwrite = backend.pwrite

        async def held_pwrite(offset: int, data: bytes, fua: bool = False) -> None:
            down.set()
            await release.wait()
            await real_pwrite(offset, data, fua)

        backend.pwrite = held_pwrite  # type: ignore[method-assign]
        write = asyncio.ensure_future(src.export.pwrite(MiB, b"B" * 4096))
        await down.wait()
        backend.pwrite = real_pwrite  # type: ignore[method-assign]

        # the removal of "a" waits at the gate; then "b" is created and waits behind it
        gate, real_closed, closing = src.gate, src.gate.closed, asyncio.Event()

        @contextlib.asynccontextmanager
        async def watched_closed() -> AsyncIterator[None]:
            closing.set()
            async with real_closed():
                yield

        gate.closed = watched_closed  # type: ignore[method-assign]
        remove = asyncio.ensure_future(svc.remove_session("a"))
        await closing.wait()
        closing.clear()
        create = asyncio.ensure_future(svc.create_session(name="b", source="src", target="t2"))
        await closing.wait()
        gate.closed = real_closed  # type: ignore[method-assign]
        assert not remove.done() and not create.done()

        release.set()  # the removal takes the gate, "a" goes (and its wiring), then "b" comes
        await write
        await remove
        await create
        b = svc.sessions.get("b")

        await src.export.pwrite(2 * MiB, b"C" * 4096)  # tracked by "b"
        await update(b, full=True)
        await src.export.pwrite(3 * MiB, b"D" * 4096)
        await update(b, full=False)
        assert b.update is not None and b.update.kind == "incremental"
        assert await t2.backend.pread(0, 4 * MiB) == await src.backend.pread(0, 4 * MiB)
    finally:
        await svc.close()
        dd.close()


async def test_a_removed_sessions_target_is_not_taken_until_its_guards_are_gone(tmp_path: Path) -> None:
    """The removal clears its target's guards when its hooks go, after awaits; a create of
    another session onto that target meanwhile would have its guards cleared by it."""
    dd = DataDir(tmp_path / "data")
    svc = Service(dd.open(), dd, ServerConfig(data_dir=dd.root, save_limit=4 * MiB))
    try:
        svc.load()
        for name in ("src", "src2", "t1"):
            svc.create_volume(name, 4 * MiB)
        src, t1 = svc.volumes.get("src"), svc.volumes.get("t1")
        await svc.create_session(name="a", source="src", target="t1")

        backend, down, release = src.backend, asyncio.Event(), asyncio.Event()
        real_pwrite = backend.pwrite

        async def held_pwrite(offset: int, data: bytes, fua: bool = False) -> None:
            down.set()
            await release.wait()
            await real_pwrite(offset, data, fua)

        backend.pwrite = held_pwrite  # type: ignore[method-assign]
        write = asyncio.ensure_future(src.export.pwrite(0, b"B" * 4096))
        await down.wait()
        backend.pwrite = real_pwrite  # type: ignore[method-assign]

        gate, real_closed, closing = src.gate, src.gate.closed, asyncio.Event()

        @contextlib.asynccontextmanager
        async def watched_closed() -> AsyncIterator[None]:
            closing.set()
            async with real_closed():
                yield

        gate.closed = watched_closed  # type: ignore[method-assign]
        remove = asyncio.ensure_future(svc.remove_session("a"))
        await closing.wait()  # the removal waits at the gate, where the held write stops it
        gate.closed = real_closed  # type: ignore[method-assign]
        assert not remove.done() and "a" not in [s.name for s in svc.sessions.all()]
        with pytest.raises(InUse):
            await svc.create_session(name="b", source="src2", target="t1")

        release.set()
        await write
        await remove
        b = await svc.create_session(name="b", source="src2", target="t1")  # free once it is gone
        assert b["name"] == "b"
        with pytest.raises(DeltavolError):  # guarded as b's target
            await t1.export.pwrite(0, b"X" * 4096)
    finally:
        await svc.close()
        dd.close()
