"""A restore taking back an incremental update that has not written its target yet.

Drives the real Service, write path and SQLite in a tmp data dir (local targets). The
update's copy is held before its first target write; the restore claims it, and then
either takes it back or, when the target does not answer the restore, gives it back.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deltavol.backend.file import FileBackend
from deltavol.copy.save_area import SaveArea
from deltavol.copy.targets import CopyTarget, LocalTarget
from deltavol.errors import MetadataError, RestoreNotStarted, TargetError
from deltavol.events import Event
from deltavol.service import Service
from deltavol.sessions import copier as copier_mod
from deltavol.sessions.protector import Protector
from deltavol.sessions.records import RetryPolicy
from deltavol.sessions.session import Session
from deltavol.sessions.states import Phase, State
from tests.unit.sessions.service_rig import SIZE, WAIT, MiB, ServiceRig, idle, image, svc_rig

__all__ = ["svc_rig"]

Opener = Callable[[Session], Awaitable[CopyTarget]]


async def consistent_session(svc: Service) -> tuple[Session, bytes]:
    """src -> t1 ('a'), consistent with 0x01 everywhere; then src's first MiB changes.
    Returns the session and the source's image at its point in time."""
    for v in ("src", "t1"):
        svc.create_volume(v, SIZE)
    await svc.start()
    src = svc.volumes.get("src")
    await src.export.pwrite(0, b"\x01" * SIZE)
    await svc.create_session(name="a", source="src", target="t1")
    await svc.update_session("a", True, None)
    await idle(svc, "a")
    at_pit = await image(svc, "src")
    await src.export.pwrite(0, b"\x02" * MiB)
    return svc.sessions.get("a"), at_pit


def fail_once(s: Session) -> None:
    """The next open of the target fails (the restore's), the ones after it work."""
    raw = s._open_raw

    async def no_target(_s: Session) -> CopyTarget:
        s._open_target = raw
        raise TargetError(msg="target down (test)")

    s._open_target = no_target


def row_state(svc: Service, name: str) -> str:
    return str(svc.db.conn.execute("SELECT state FROM sessions WHERE name=?", (name,)).fetchone()["state"])


async def held_update(svc: Service, s: Session, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Start an incremental update whose copy requests wait, before any target write, for
    the event returned; returns once one waits."""
    waiting, go = asyncio.Event(), asyncio.Event()
    orig = copier_mod.Copier.copy_batch

    async def held(self: copier_mod.Copier, *args: Any) -> None:
        waiting.set()
        await go.wait()
        await orig(self, *args)

    monkeypatch.setattr(copier_mod.Copier, "copy_batch", held)
    await svc.update_session("a", False, None)
    async with asyncio.timeout(WAIT):
        await waiting.wait()
    assert s.target_writes.untouched
    return go


async def test_a_request_meeting_the_claim_stops_the_update_without_failing_it(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy request ready in the same step as the claim hits it: the update is stopped,
    not failed; the restore's target does not answer, so the update is given back and
    finishes as of its mark."""
    svc = svc_rig.open()
    s, _ = await consistent_session(svc)
    go = await held_update(svc, s, monkeypatch)
    events: list[Event] = []
    s.events.listen(events.append)
    fail_once(s)
    go.set()  # the held requests resume in the next step, before their task group is cancelled
    with pytest.raises(TargetError, match="target down"):
        await svc.restore_session("a")
    assert s.state is State.COPYING and s.busy
    assert s.last_error is None and s.retry.next_at is None
    assert not [e for e in events if e.kind in ("update.failed", "update.retry")]
    assert s._task is not None
    async with asyncio.timeout(WAIT):
        await asyncio.shield(s._task)
    assert s.state is State.IDLE and s.consistent
    assert s.update is not None and s.update.phase is Phase.DONE
    assert s.point_in_time == s.update.marked_at
    assert row_state(svc, "a") == "idle"
    assert await image(svc, "t1") == await image(svc, "src")


async def test_given_back_to_a_target_still_down_the_update_fails_and_retries(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race, with the target down for good: the update given back fails as any
    update whose target is down (a retry armed), and its task does not die on its state."""
    svc = svc_rig.open()
    s, _ = await consistent_session(svc)
    go = await held_update(svc, s, monkeypatch)

    async def no_target(_s: Session) -> CopyTarget:
        raise TargetError(msg="target down (test)")

    s._open_target = no_target
    go.set()
    with pytest.raises(TargetError, match="target down"):
        await svc.restore_session("a")
    assert s._task is not None
    task = s._task
    async with asyncio.timeout(WAIT):
        await asyncio.shield(task)
    assert task.exception() is None
    assert s.state is State.FAILED and s.last_error is not None and "target down" in s.last_error
    assert s.transfer is not None and s.update is not None and s.update.phase is Phase.PROTECTING
    assert s.retry.attempts == 1 and s.retry.next_at is not None
    assert row_state(svc, "a") == "failed"


async def test_a_failed_restore_keeps_a_failed_updates_retry(svc_rig: ServiceRig) -> None:
    """A failed update with a retry pending: a restore whose target does not answer leaves
    the retry as it was."""
    svc = svc_rig.open()
    s, _ = await consistent_session(svc)
    s.retry = RetryPolicy(backoff=300.0)  # pending for the whole test
    raw = s._open_raw

    async def no_target(_s: Session) -> CopyTarget:
        raise TargetError(msg="target down (test)")

    s._open_target = no_target
    await svc.update_session("a", False, None)
    await idle(svc, "a")
    assert s.state is State.FAILED and s.target_writes.untouched
    retry, next_at = s._retry_task, s.retry.next_at
    assert retry is not None and next_at is not None and s.retry.attempts == 1
    with pytest.raises(TargetError, match="target down"):
        await svc.restore_session("a")
    assert s._retry_task is retry and not retry.done()
    assert s.retry.attempts == 1 and s.retry.next_at == next_at
    assert s.state is State.FAILED and s.source.restoring_by is None

    s._open_target = raw  # the target is back: the restore takes the update back
    st = await svc.restore_session("a")
    assert st["state"] == "restoring" and "cancelled first" in st["notice"]
    await asyncio.gather(retry, return_exceptions=True)
    assert retry.cancelled()
    assert s._retry_task is None and s.retry.attempts == 0


async def test_copy_before_write_while_the_restore_opens_leaves_its_connection_alone(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client write that needs copy-before-write (save area full) while the restore opens
    its target: the write does not wait for that connection nor write the target, and the
    restore's connection is not aborted under it."""
    svc = svc_rig.open()
    for v in ("src", "t1"):
        svc.create_volume(v, SIZE)
    await svc.start()
    src, t1 = svc.volumes.get("src"), svc.volumes.get("t1")
    await src.export.pwrite(0, b"\x01" * SIZE)
    await svc.create_session(name="a", source="src", target="t1")
    s = svc.sessions.get("a")
    opened: list[Abortable] = []
    open_go, opening = asyncio.Event(), asyncio.Event()
    open_go.set()

    async def opener(_s: Session) -> CopyTarget:
        opening.set()
        await open_go.wait()
        t = Abortable(t1.backend)
        opened.append(t)
        return t

    s._open_target = opener
    await svc.update_session("a", True, None)
    await idle(svc, "a")
    at_pit = await image(svc, "src")
    await src.export.pwrite(0, b"\x02" * MiB)

    copying = asyncio.Event()

    async def never(*args: Any) -> None:
        copying.set()
        await asyncio.Event().wait()

    async def refused(*args: Any) -> bool:
        return False

    monkeypatch.setattr(copier_mod.Copier, "copy_batch", never)  # the copy never writes
    monkeypatch.setattr(copier_mod.Copier, "copy_run", never)
    monkeypatch.setattr(SaveArea, "save", refused)  # the save area is full: copy-before-write
    monkeypatch.setattr(Protector, "_save_at_once", refused)
    monkeypatch.setattr(Protector, "_save_now", lambda *args: False)  # nor at once, inline
    await svc.update_session("a", False, None)
    async with asyncio.timeout(WAIT):
        await copying.wait()
    assert s.target_writes.untouched
    open_go.clear()
    opening.clear()
    restoring = asyncio.ensure_future(svc.restore_session("a"))
    async with asyncio.timeout(WAIT):
        await opening.wait()  # the restore waits for its connection
    try:
        # an owed chunk: the write goes down without waiting for the restore's connection
        await asyncio.wait_for(src.export.pwrite(4096, b"\x03" * 4096), WAIT / 2)
        assert s.update is not None and s.update.phase is Phase.GIVEN_UP
    finally:
        open_go.set()
    st = await restoring
    assert st["state"] == "restoring" and "cancelled first" in st["notice"]
    assert s._task is not None
    async with asyncio.timeout(WAIT):
        await asyncio.shield(s._task)
    assert s.state is State.IDLE and s.last_error is None and s.consistent
    assert not any(t.aborted for t in opened)
    assert await image(svc, "src") == at_pit


class Abortable(LocalTarget):
    """As an NBD connection: after ``abort`` every request fails."""

    aborted = False

    def abort(self) -> None:
        self.aborted = True

    async def pread(self, offset: int, length: int) -> bytes:
        if self.aborted:
            raise TargetError(msg="aborted connection")
        return await super().pread(offset, length)


async def test_a_failed_restore_commit_after_the_take_back_says_the_update_was_cancelled(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = svc_rig.open()
    s, _ = await consistent_session(svc)
    await held_update(svc, s, monkeypatch)
    persist = s._persist_row

    def no_restoring_row(sess: Session) -> None:
        if sess.state is State.RESTORING:
            raise MetadataError(path="sessions.db", why="disk I/O error (test)")
        persist(sess)

    s._persist_row = no_restoring_row
    with pytest.raises(RestoreNotStarted) as raised:
        await svc.restore_session("a")
    message = raised.value.message
    assert "was cancelled first" in message and "disk I/O error (test)" in message
    assert s.state is State.IDLE and s.consistent and s.source.restoring_by is None
    assert row_state(svc, "a") == "idle"


def _data_at(path: str, offset: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


async def test_a_zeroed_piece_over_a_hole_leaves_the_hole(svc_rig: ServiceRig) -> None:
    """The point in time has an unallocated chunk; since, it was written then punched: the
    restore writes nothing there, and the source stays sparse."""
    svc = svc_rig.open()
    for v in ("src", "t1"):
        svc.create_volume(v, SIZE)
    await svc.start()
    src = svc.volumes.get("src")
    await src.export.pwrite(MiB, b"\x01" * MiB)  # the first MiB is a hole
    await svc.create_session(name="a", source="src", target="t1")
    await svc.update_session("a", True, None)
    await idle(svc, "a")
    at_pit = await image(svc, "src")
    s = svc.sessions.get("a")
    await src.export.pwrite(0, b"\x02" * 4096)
    await src.export.trim(0, s.granularity)
    await src.export.pwrite(MiB, b"\x02" * 4096)  # and a data chunk to copy back
    path = src.backend.path
    assert _data_at(path, 0) >= MiB  # the file system punched it
    assert s.tracking.test(0)
    await svc.restore_session("a")
    assert s._task is not None
    async with asyncio.timeout(WAIT):
        await asyncio.shield(s._task)
    assert s.state is State.IDLE and s.last_error is None
    assert await image(svc, "src") == at_pit
    assert _data_at(path, 0) >= MiB


async def test_zeroes_that_find_the_disk_full_are_punched(
    svc_rig: ServiceRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small zeroed piece over data meets ENOSPC: it is punched instead, and the restore
    finishes."""
    svc = svc_rig.open()
    s, at_pit = await consistent_session(svc)
    src = svc.volumes.get("src")
    await svc.update_session("a", False, None)
    await idle(svc, "a")
    await src.export.pwrite(0, b"\x01" * MiB)
    # the point in time: chunk 1 zeroed, with data around it
    await src.export.pwrite(s.granularity, bytes(s.granularity))
    await svc.update_session("a", False, None)
    await idle(svc, "a")
    at_pit = await image(svc, "src")
    assert at_pit[s.granularity : 2 * s.granularity] == bytes(s.granularity)
    await src.export.pwrite(s.granularity, b"\x04" * s.granularity)
    orig = FileBackend._pwrite_full
    refused: list[int] = []

    def full(self: FileBackend, offset: int, data: bytes, fua: bool) -> None:
        if self is src.backend and data == bytes(len(data)):
            refused.append(offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        orig(self, offset, data, fua)

    monkeypatch.setattr(FileBackend, "_pwrite_full", full)
    await svc.restore_session("a")
    assert s._task is not None
    async with asyncio.timeout(WAIT):
        await asyncio.shield(s._task)
    assert refused and s.state is State.IDLE and s.last_error is None
    assert await image(svc, "src") == at_pit
