"""A mark's tracking reset, an update's end and a restore's end replace and remove files in
threads, never on the event loop (an fsync, a directory sync or an unlink there holds up
every client of every volume for as long as the disk takes); and the orders that keeps:

* the mark's new tracking file is written beside the old one before the row commits, and
  replaces it only after: a crash at the commit finds the old tracking file in place;
* a cancel of the update's start while the reset runs does not roll back the committed mark;
* the transfer file an update leaves is removed before the next mark writes its own.

Drives the real Service, SessionManager, write path and SQLite in a tmp data dir (local
targets), with the ``store/fs.py`` seam recording the thread of every call.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deltavol.bitmap import persist
from deltavol.service import Service
from deltavol.sessions.states import Phase, State
from deltavol.store import fs
from tests.unit.sessions.service_rig import WAIT, MiB, OnLoopFS, ServiceRig, idle, image, svc_rig

__all__ = ["svc_rig"]

G = 64 * 1024  # the sessions' granularity (the default)


class Recording(OnLoopFS):
    """The real file system, noting each sync, rename and unlink on the loop's thread;
    ``hold_replace`` holds a rename of a path ending so until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_replace: str | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def replace(self, src: str | Path, dst: str | Path) -> None:
        self._note("replace", dst)
        if self.hold_replace is not None and str(dst).endswith(self.hold_replace):
            self.held.set()
            assert self.release.wait(WAIT)
        super().replace(src, dst)

    def unlink(self, path: str | Path, missing_ok: bool = False) -> None:
        self._note("unlink", path)
        super().unlink(path, missing_ok)


@pytest.fixture
def recording() -> Iterator[Recording]:
    rec = Recording()
    old = fs.use(rec)
    try:
        yield rec
    finally:
        rec.release.set()
        fs.use(old)


async def consistent_session(svc: Service, size: int = 4 * MiB) -> None:
    for v in ("src", "dst"):
        svc.create_volume(v, size)
    await svc.start()
    await svc.volumes.get("src").export.pwrite(0, b"\x01" * size)
    await svc.create_session(name="s", source="src", target="dst")
    await svc.update_session("s", True, None)
    await idle(svc, "s")


def tracked(path: Path, size: int = 4 * MiB) -> set[int]:
    bits, _ = persist.load(path, persist.KIND_TRACKING, G, size)
    return {c for first, n in bits.runs() for c in range(first, first + n)}


async def test_an_incremental_update_syncs_renames_and_unlinks_nothing_on_the_loop(
    svc_rig: ServiceRig, recording: Recording
) -> None:
    """Mark (its tracking reset included), copy, end (the transfer file's removal
    included), and the next update's mark after it: nothing on the loop."""
    svc = svc_rig.open()
    await consistent_session(svc)
    src, s = svc.volumes.get("src"), svc.sessions.get("s")
    for n in range(2):
        await src.export.pwrite((1 + n) * MiB, bytes([2 + n]) * MiB)
        recording.on_loop.clear()
        await svc.update_session("s", False, None)
        await idle(svc, "s")
        await s.files.transfer_gone()
        assert recording.on_loop == [], f"update {n + 1}: {recording.on_loop}"
        assert s.state is State.IDLE and s.consistent
        assert not s.files.transfer_path.exists() and not s.files.tracking_aside.exists()
        assert await image(svc, "src") == await image(svc, "dst")
        assert tracked(s.files.tracking_path) == set(), "the mark's reset replaced the file"


async def test_a_restore_ends_with_nothing_synced_on_the_loop(
    svc_rig: ServiceRig, recording: Recording
) -> None:
    svc = svc_rig.open()
    await consistent_session(svc)
    src, s = svc.volumes.get("src"), svc.sessions.get("s")
    before = await image(svc, "src")
    await src.export.pwrite(MiB, b"\x07" * MiB)
    assert tracked(s.files.tracking_path) != set()
    flushed: list[bool] = []  # the source's last flush is over before the tracking file goes
    backend_flush = src.backend.flush

    async def flush() -> None:
        await backend_flush()
        flushed.append(True)

    src.backend.flush = flush  # type: ignore[method-assign]
    put_in_place = persist.TrackingFile.put_in_place
    at_reset: list[int] = []

    async def noting(self: persist.TrackingFile, aside: persist.Aside, bitmap: Any) -> None:
        at_reset.append(len(flushed))
        await put_in_place(self, aside, bitmap)

    recording.on_loop.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(persist.TrackingFile, "put_in_place", noting)
        await svc.restore_session("s")
        await idle(svc, "s")
        async with asyncio.timeout(WAIT):
            while s.state is not State.IDLE:
                await asyncio.sleep(0.01)
    assert recording.on_loop == [], recording.on_loop
    assert at_reset and at_reset[0] >= 1, "tracking emptied before the source's flush"
    assert await image(svc, "src") == before
    assert tracked(s.files.tracking_path) == set()


async def test_a_crash_at_the_marks_commit_finds_the_old_tracking_file(
    svc_rig: ServiceRig, recording: Recording, tmp_path: Path
) -> None:
    """At the commit the new (empty) tracking file is written and durable, but aside: the
    row still names the last update, and the tracking file in place holds what changed
    since it. A kill there (the data dir as it is at that moment) comes back idle with
    those chunks tracked, the aside file gone, and the next update copies them."""
    svc = svc_rig.open()
    await consistent_session(svc)
    src, s = svc.volumes.get("src"), svc.sessions.get("s")
    await src.export.pwrite(MiB, b"\x05" * MiB)
    changed = set(range(MiB // G, 2 * MiB // G))
    snap = tmp_path / "crash"
    persist_row = s._persist_row
    seen: dict[str, Any] = {}

    def committing(session: Any) -> None:
        if not snap.exists():
            aside = s.files.tracking_aside
            seen["aside"] = aside.exists() and tracked(aside) == set()
            seen["tracking"] = tracked(s.files.tracking_path)
            shutil.copytree(svc_rig.root, snap)
        persist_row(session)

    s._persist_row = committing
    await svc.update_session("s", False, None)
    await idle(svc, "s")
    assert seen["aside"], "the new tracking file is not written before the commit"
    assert changed <= seen["tracking"], "the tracking file in place lost its bits before the commit"
    target_after = await image(svc, "dst")
    await svc_rig.close()

    # the kill: a new server on the files as they were at the commit
    crashed = ServiceRig(snap)
    try:
        again = crashed.open()
        await again.start()
        s2 = again.sessions.get("s")
        assert s2.state is State.IDLE and s2.update is not None and s2.update.phase is Phase.DONE
        assert changed <= {c for first, n in s2.tracking.runs() for c in range(first, first + n)}
        assert not s2.files.tracking_aside.exists(), "the start-up leaves the aside file"
        await again.update_session("s", False, None)
        await idle(again, "s")
        assert await image(again, "dst") == await image(again, "src")
        assert await image(again, "dst") == target_after
    finally:
        await crashed.close()


async def test_a_cancel_during_the_reset_after_the_commit_keeps_the_mark(
    svc_rig: ServiceRig, recording: Recording
) -> None:
    """The start of an update is cancelled while its committed mark renames the new
    tracking file into place: the cancel waits for the reset, and memory keeps the mark
    the row has (no rollback to idle); the copy runs and ends consistent."""
    svc = svc_rig.open()
    await consistent_session(svc)
    src, s = svc.volumes.get("src"), svc.sessions.get("s")
    await src.export.pwrite(2 * MiB, b"\x09" * MiB)
    first = s.update.id if s.update is not None else 0
    recording.hold_replace = "s.tracking"
    start = asyncio.ensure_future(svc.update_session("s", False, None))
    async with asyncio.timeout(WAIT):
        while not recording.held.is_set():
            await asyncio.sleep(0.005)
    start.cancel()
    await asyncio.sleep(0.05)  # the cancel arrives while the rename is held
    assert not start.done(), "the cancel did not wait for the reset"
    recording.hold_replace = None
    recording.release.set()
    with pytest.raises(asyncio.CancelledError):
        await start
    assert s.update is not None and s.update.id > first, "the committed mark was rolled back"
    assert s.update.phase in (Phase.PROTECTING, Phase.DONE)
    assert s._gate.open
    await idle(svc, "s")
    rows = [tuple(r) for r in svc.db.conn.execute("SELECT state FROM sessions WHERE name = 's'")]
    assert rows == [("idle",)] and s.state is State.IDLE and s.consistent
    assert await image(svc, "src") == await image(svc, "dst")
    assert tracked(s.files.tracking_path) == set()


async def test_the_next_mark_writes_its_transfer_file_after_the_last_one_is_removed(
    svc_rig: ServiceRig, recording: Recording
) -> None:
    """An update's end removes its transfer file in a thread; an update started at once
    waits for that before it writes its own (else the removal could take the new one)."""
    svc = svc_rig.open()
    await consistent_session(svc)
    src = svc.volumes.get("src")
    order: list[str] = []
    unlink = recording.unlink
    gone = threading.Event()

    def slow_unlink(path: str | Path, missing_ok: bool = False) -> None:
        if str(path).endswith("s.transfer") and threading.get_ident() != recording.loop_thread:
            gone.wait(WAIT)  # held until the next mark has been asked for
            order.append("unlink")
        unlink(path, missing_ok)

    recording.unlink = slow_unlink  # type: ignore[method-assign]
    save_atomic = persist.save_atomic

    def noting(path: Path, *args: Any, **kw: Any) -> None:
        if path.name == "s.transfer":
            order.append("transfer file")
        save_atomic(path, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(persist, "save_atomic", noting)
        await src.export.pwrite(MiB, b"\x02" * MiB)
        await svc.update_session("s", False, None)
        await idle(svc, "s")  # ended: its file's removal is held
        await src.export.pwrite(3 * MiB, b"\x03" * MiB)
        order.clear()
        second = asyncio.ensure_future(svc.update_session("s", False, None))
        await asyncio.sleep(0.05)
        gone.set()
        await second
        await idle(svc, "s")
    assert order[:2] == ["unlink", "transfer file"], order
    assert await image(svc, "src") == await image(svc, "dst")
