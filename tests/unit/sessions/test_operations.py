"""Operations on one session are serialized: never two copy tasks, never a copy that outlives
a pause, a cancel or a removal, never a removed session's row written back.

The races come from an update's mark: it awaits the save area's preparation and the source's
write gate (a write in flight), and any other operation must wait for it to commit.
Here a test holds the write gate (``WriteGate.enter``, as a write half-way down the stack) so
the mark is stopped exactly there, then asks for the other operation.

The sessions run in a real ``Service`` (SQLite, volumes, the source's write path) on a data
dir in ``tmp_path``; the target is a local volume.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deltavol.backend.file import FileBackend
from deltavol.bitmap import persist
from deltavol.config import ServerConfig
from deltavol.copy.targets import LocalTarget
from deltavol.errors import AlreadyCopying, DeltavolError, NotFound, TargetError, VerifyInterrupted
from deltavol.service import Service
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from deltavol.store.datadir import DataDir
from tests.fakes import until

KiB = 1 << 10
Spans = list[tuple[int, int]]
MiB = 1 << 20
G = 64 * KiB  # the default granularity
SIZE = 4 * MiB


def open_service(root: Path, **config: Any) -> tuple[Service, DataDir]:
    dd = DataDir(root)
    db = dd.open()
    svc = Service(db, dd, ServerConfig(data_dir=root, save_limit=4 * MiB, **config))
    svc.load()
    return svc, dd


class Server:
    """A service on a data dir that a test can restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.svc, self._dd = open_service(root)

    async def restart(self) -> Service:
        await self.stop()
        self.svc, self._dd = open_service(self.root)
        await self.svc.start()
        return self.svc

    async def stop(self) -> None:
        if self._dd.db is not None:
            await self.svc.close()
            self._dd.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    srv = Server(tmp_path / "data")
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def svc(server: Server) -> Service:
    return server.svc


def copy_tasks(name: str = "s") -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"session-{name}" and not t.done()]


def rows(svc: Service) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in svc.db.conn.execute("SELECT name, state FROM sessions")]


async def consistent_session(svc: Service, **params: Any) -> Session:
    """Volumes src and dst, session s between them, its first (full) update done."""
    svc.create_volume("src", SIZE)
    svc.create_volume("dst", SIZE)
    await svc.volumes.get("src").export.pwrite(0, b"A" * MiB)
    await svc.create_session(name="s", source="src", target="dst", **params)
    s = svc.sessions.get("s")
    await s.start_update(True)
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    return s


async def test_remove_during_a_mark_waits_for_it_then_leaves_no_row_no_copy_and_no_guard(
    server: Server, svc: Service
) -> None:
    s = await consistent_session(svc)
    src, dst = svc.volumes.get("src"), svc.volumes.get("dst")
    s.max_rate = 256 * KiB  # a copy that lasts: still running when the removal comes
    await src.export.pwrite(MiB, b"B" * MiB)
    await s._gate.enter()  # a write in flight: the mark waits for it
    update = asyncio.create_task(s.start_update(False))
    await until(lambda: not s._gate.open)  # the update is in its mark
    remove = asyncio.create_task(svc.remove_session("s"))
    await asyncio.wait({remove}, timeout=0.5)  # time to finish, if it did not wait for the mark
    s._gate.leave()
    await update
    await remove

    assert rows(svc) == []
    assert svc.sessions.all() == []
    assert not s.busy and copy_tasks() == []
    assert dst.write_guard() is None and dst.open_guard() is None
    data = server.root
    assert [p.name for d in ("bitmaps", "save") for p in (data / d).iterdir()] == []
    # the target is the user's again: nothing copies over what they write
    await dst.export.pwrite(MiB, b"U" * MiB)
    await asyncio.sleep(0)
    assert await dst.backend.pread(MiB, MiB) == b"U" * MiB
    with pytest.raises(NotFound):
        await s.start_update(False)  # a reference kept to it
    assert rows(svc) == []

    again = await server.restart()
    assert again.sessions.all() == []
    assert not again.volumes.get("dst").export.read_only


async def test_remove_returns_only_once_the_copy_write_its_stop_left_in_a_thread_has_landed(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    dst = svc.volumes.get("dst")
    await svc.volumes.get("src").export.pwrite(MiB, b"B" * MiB)
    writing, release = threading.Event(), threading.Event()
    landed: list[int] = []
    pwrite_full = FileBackend._pwrite_full

    def first_write_slow(self: FileBackend, offset: int, data: bytes, fua: bool) -> None:
        if self.name == "dst" and not writing.is_set():  # the copy's first write to dst
            writing.set()
            release.wait(timeout=30)
        pwrite_full(self, offset, data, fua)
        if self.name == "dst" and data[:1] == b"B":
            landed.append(offset)

    copy_from = FileBackend._copy_from

    def first_copy_slow(self: FileBackend, source: FileBackend, offset: int, length: int) -> None:
        # a copy to a local volume goes in the kernel (copy_file_range), not through _pwrite_full
        if self.name == "dst" and not writing.is_set():
            writing.set()
            release.wait(timeout=30)
        copy_from(self, source, offset, length)
        if self.name == "dst" and source.name == "src":
            landed.append(offset)

    monkeypatch.setattr(FileBackend, "_pwrite_full", first_write_slow)
    monkeypatch.setattr(FileBackend, "_copy_from", first_copy_slow)
    await s.start_update(False)
    await until(writing.is_set)

    async def remove_then_use_the_target() -> None:
        await svc.remove_session("s")
        await dst.export.pwrite(MiB, b"U" * MiB)  # the volume is the user's again

    user = asyncio.create_task(remove_then_use_the_target())
    await asyncio.wait({user}, timeout=0.5)
    release.set()
    await user
    await until(lambda: bool(landed))
    assert await dst.backend.pread(MiB, MiB) == b"U" * MiB


async def test_a_second_full_update_during_the_first_ones_start_is_refused(svc: Service) -> None:
    svc.create_volume("src", SIZE)
    svc.create_volume("dst", SIZE)
    await svc.create_session(name="s", source="src", target="dst", max_rate=1 * MiB)
    s = svc.sessions.get("s")
    await svc.volumes.get("src").export.pwrite(0, b"D" * SIZE)
    await s._gate.enter()  # a write in flight: the first update's start waits for it
    first = asyncio.create_task(s.start_update(True))
    second = asyncio.create_task(s.start_update(True))
    await until(lambda: not s._gate.open)
    s._gate.leave()
    results = await asyncio.gather(first, second, return_exceptions=True)

    assert isinstance(results[0], dict) and results[0]["update"]["id"] == 1
    assert isinstance(results[1], AlreadyCopying) and "already copying" in results[1].message
    assert len(copy_tasks()) == 1
    await s.pause()
    assert copy_tasks() == [] and not s.busy
    assert s.state is State.PAUSED and rows(svc) == [("s", "paused")]


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_pause_or_cancel_during_a_mark_stops_the_update_it_started(
    svc: Service, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    await svc.volumes.get("src").export.pwrite(0, b"B" * MiB)  # chunks 0-15
    never = asyncio.Event()

    async def hung_pwrite(self: LocalTarget, offset: int, data: bytes) -> None:
        await never.wait()  # no chunk is copied: the update owes all it marked

    async def hung_copy(self: LocalTarget, source: FileBackend, spans: list[tuple[int, int]], *_: Any) -> int:
        await never.wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(LocalTarget, "pwrite", hung_pwrite)
    monkeypatch.setattr(LocalTarget, "copy_spans", hung_copy)
    await s._gate.enter()
    update = asyncio.create_task(s.start_update(False))
    await until(lambda: not s._gate.open)
    stop = asyncio.create_task(getattr(s, action)())
    await asyncio.wait({stop}, timeout=0.2)
    s._gate.leave()
    await update
    answer = await stop

    expected = "paused" if action == "pause" else "idle"
    assert answer["state"] == expected and s.state.value == expected
    assert rows(svc) == [("s", expected)]
    assert not s.busy and copy_tasks() == []
    changed = [(0, MiB // G)]
    if action == "pause":  # the update is kept, with everything still to copy
        assert s.transfer is not None and list(s.transfer.runs()) == changed
    else:  # the update is over; what it had to copy is tracked again, on disk too
        await s.files.transfer_gone()  # removed in a thread, after the commit
        assert s.transfer is None and not s.files.transfer_path.exists()
        assert list(s.tracking.runs()) == changed
        on_disk, _ = persist.load(s.files.tracking_path, persist.KIND_TRACKING, G, SIZE)
        assert list(on_disk.runs()) == changed


async def test_an_update_asked_for_during_verify_waits_for_its_result(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    await svc.volumes.get("src").export.pwrite(2 * MiB, b"C" * G)  # after the point in time
    reading, release, verified = asyncio.Event(), asyncio.Event(), asyncio.Event()
    pread, pwrite = LocalTarget.pread, LocalTarget.pwrite

    async def held_pread(self: LocalTarget, offset: int, length: int) -> bytes:
        reading.set()
        await release.wait()
        return await pread(self, offset, length)

    async def pwrite_after_verify(self: LocalTarget, offset: int, data: bytes) -> None:
        await verified.wait()  # no copy lands before the verify has compared
        await pwrite(self, offset, data)

    monkeypatch.setattr(LocalTarget, "pread", held_pread)
    copy_spans = LocalTarget.copy_spans

    async def copy_after_verify(
        self: LocalTarget, source: FileBackend, spans: list[tuple[int, int]], *rest: Any
    ) -> int:
        await verified.wait()
        return await copy_spans(self, source, spans, *rest)

    monkeypatch.setattr(LocalTarget, "pwrite", pwrite_after_verify)
    monkeypatch.setattr(LocalTarget, "copy_spans", copy_after_verify)
    verify = asyncio.create_task(svc.verify_session("s"))
    await reading.wait()
    update = asyncio.create_task(s.start_update(False))
    # time to mark (and clear the tracking bits verify reads), if it did not wait for verify
    await asyncio.wait({update}, timeout=0.5)
    release.set()
    result = await verify
    verified.set()

    assert result["ok"] and result["mismatches"] == 0
    assert result["chunks_skipped"] == 1  # the chunk changed after the point in time
    assert result["chunks_compared"] == SIZE // G - 1
    await update
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert await svc.volumes.get("dst").backend.pread(2 * MiB, G) == b"C" * G


async def test_remove_interrupts_a_verify_instead_of_waiting_for_it(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    reading = asyncio.Event()
    never = asyncio.Event()

    async def hung_pread(self: LocalTarget, offset: int, length: int) -> bytes:
        reading.set()
        await never.wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(LocalTarget, "pread", hung_pread)
    verify = asyncio.create_task(svc.verify_session("s"))
    await reading.wait()
    await asyncio.wait_for(svc.remove_session("s"), timeout=10)

    with pytest.raises(VerifyInterrupted, match="interrupted"):
        await asyncio.wait_for(verify, timeout=5)
    assert rows(svc) == [] and s._verifying is None


async def test_remove_while_verify_opens_its_target_stops_the_verify_before_it_compares(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    opening, opened, never = asyncio.Event(), asyncio.Event(), asyncio.Event()
    open_target = s._open_target

    async def slow_open(session: Session) -> Any:
        opening.set()
        await opened.wait()
        return await open_target(session)

    async def hung_pread(self: LocalTarget, offset: int, length: int) -> bytes:
        await never.wait()
        raise AssertionError("unreachable")

    s._open_target = slow_open
    monkeypatch.setattr(LocalTarget, "pread", hung_pread)
    verify = asyncio.create_task(svc.verify_session("s"))
    await opening.wait()
    remove = asyncio.create_task(svc.remove_session("s"))
    await asyncio.wait({remove}, timeout=0.2)
    opened.set()

    await asyncio.wait_for(remove, timeout=5)
    with pytest.raises(VerifyInterrupted, match="interrupted"):
        await asyncio.wait_for(verify, timeout=5)
    assert rows(svc) == []


async def test_pause_is_durable_when_its_checkpoint_fails(
    server: Server, svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await consistent_session(svc)
    s.max_rate = 256 * KiB
    await svc.volumes.get("src").export.pwrite(0, b"B" * MiB)
    await s.start_update(False)
    await until(lambda: s.target is not None)  # the copy runs: pause's checkpoint flushes it

    async def failing_flush(self: LocalTarget) -> None:
        raise TargetError(msg="target: flush failed")

    monkeypatch.setattr(LocalTarget, "flush", failing_flush)
    await s.pause()
    assert rows(svc) == [("s", "paused")]  # not copying: a restart must not resume it

    monkeypatch.undo()
    s2 = (await server.restart()).sessions.get("s")
    assert s2.state is State.PAUSED and not s2.busy
    assert s2.transfer is not None and list(s2.transfer.runs()) == [(0, MiB // G)]


async def test_a_retry_whose_row_commit_fails_leaves_a_failed_session_that_resume_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, dd = open_service(tmp_path, retry_limit=1, retry_backoff=0.01)
    try:
        s = await consistent_session(svc)
        await svc.volumes.get("src").export.pwrite(0, b"B" * MiB)
        pwrite = LocalTarget.pwrite
        failures = {"writes": 1, "rows": 0}

        async def pwrite_failing_once(self: LocalTarget, offset: int, data: bytes) -> None:
            if failures["writes"]:
                failures["writes"] -= 1
                raise TargetError(msg="target: connection lost")
            await pwrite(self, offset, data)

        copy_spans = LocalTarget.copy_spans

        async def copy_failing_once(self: LocalTarget, source: FileBackend, spans: Spans, *rest: Any) -> int:
            if failures["writes"]:
                failures["writes"] -= 1
                raise TargetError(msg="target: connection lost")
            return await copy_spans(self, source, spans, *rest)

        persist_row = s._persist_row

        def persist_failing_on_retry(session: Session) -> None:
            if session.state is State.COPYING and session.retry.attempts == 1 and not failures["rows"]:
                failures["rows"] += 1
                raise sqlite3.DatabaseError("database disk image is malformed")
            persist_row(session)

        monkeypatch.setattr(LocalTarget, "pwrite", pwrite_failing_once)
        monkeypatch.setattr(LocalTarget, "copy_spans", copy_failing_once)
        s._persist_row = persist_failing_on_retry
        await s.start_update(False)
        await until(lambda: failures["rows"] == 1 and s._retry_task is not None and s._retry_task.done())

        assert s.state is State.FAILED and not s.busy  # not "copying" with no copy task
        assert s.last_error is not None and "malformed" in s.last_error
        await s.resume()
        await s.wait()
        assert s.state is State.IDLE and s.consistent
        assert rows(svc) == [("s", "idle")]
        assert await svc.volumes.get("dst").backend.pread(0, MiB) == b"B" * MiB
    finally:
        await svc.close()
        dd.close()


async def test_resume_restarts_an_update_left_copying_with_no_copy_task(svc: Service) -> None:
    s = await consistent_session(svc)
    await svc.volumes.get("src").export.pwrite(0, b"B" * MiB)
    await s.start_update(False)
    await s._stop_task()  # as a step that failed after stopping the copy leaves it (a cancel)
    assert s.state is State.COPYING and not s.busy

    await s.resume()
    assert s.busy
    await s.wait()
    assert s.state is State.IDLE and s.consistent
    assert await svc.volumes.get("dst").backend.pread(0, MiB) == b"B" * MiB


async def test_no_operation_runs_on_a_session_once_the_server_shut_it_down(svc: Service) -> None:
    s = await consistent_session(svc)
    await s.shutdown()
    for op in (lambda: s.start_update(False), s.pause, s.resume, s.cancel):
        with pytest.raises(DeltavolError, match="shut down"):
            await op()
    assert not s.busy
