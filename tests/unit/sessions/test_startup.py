"""Start-up never takes an I/O error for a corrupt file, and never loses evidence.

A full or failing data dir at start-up leaves every file as it is and fails the start-up
with a message naming the session and the cause; once fixed, the next start finds the
session as it was (its point in time, its tracked chunks). A corrupt file is set aside
once, under a name of its own, and the first cause stays in ``last_error``. A new session
never adopts the files a removed session of the same name left behind.

These drive the real Service, SessionManager and SQLite in a tmp data dir.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deltavol.bitmap import persist
from deltavol.bitmap.bitmap import Bitmap
from deltavol.config import ServerConfig
from deltavol.copy import save_area
from deltavol.errors import CorruptFile, DeltavolError
from deltavol.service import Service
from deltavol.sessions import files as files_module
from deltavol.store.datadir import DataDir

MiB = 1 << 20
G = 64 * 1024


@asynccontextmanager
async def started(root: Path) -> AsyncIterator[Service]:
    """The data dir opened and loaded, as ``serve`` does; closed after."""
    dd = DataDir(root)
    db = dd.open()
    svc = Service(db, dd, ServerConfig(data_dir=root, save_limit=4 * MiB))
    try:
        svc.load()
        yield svc
    finally:
        await svc.close()
        dd.close()


async def refused(root: Path) -> DeltavolError:
    """The start-up fails: the error it raises."""
    with pytest.raises(DeltavolError) as info:
        async with started(root):
            pass
    return info.value


def files(root: Path) -> dict[str, bytes]:
    return {
        f"{d}/{p.name}": p.read_bytes()
        for d in ("bitmaps", "save")
        for p in sorted((root / d).iterdir())
        if p.is_file()
    }


@pytest.fixture
async def idle(tmp_path: Path) -> Path:
    """A data dir with session s: consistent after a full update, one chunk tracked since."""
    root = tmp_path / "data"
    async with started(root) as svc:
        svc.create_volume("src", 4 * MiB)
        svc.create_volume("dst", 4 * MiB)
        await svc.create_session(name="s", source="src", target="dst")
        await svc.volumes.get("src").export.pwrite(0, b"A" * MiB)
        s = svc.sessions.get("s")
        await s.start_update(True, None)
        await s.wait()
        await svc.volumes.get("src").export.pwrite(MiB, b"B" * G)
        assert (s.state.value, s.consistent, s.status()["tracked_bytes"]) == ("idle", True, G)
    return root


@pytest.fixture
async def paused(idle: Path) -> Path:
    """The same, with an incremental update paused before it copied the tracked chunk,
    which a change then saved."""
    async with started(idle) as svc:
        s = svc.sessions.get("s")
        await s.start_update(False, None)
        await s.pause()  # before its task ran: every chunk still owed
        await svc.volumes.get("src").export.pwrite(MiB, b"C" * G)  # owed: saved first
        assert s.state.value == "paused" and s.save is not None and MiB // G in s.save
    return idle


def status(svc: Service) -> dict[str, Any]:
    return svc.sessions.get("s").status()


async def test_a_full_data_dir_at_start_up_keeps_the_files_and_the_point_in_time(
    idle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(idle) as svc:
        before = status(svc)
    kept = files(idle)

    def full_disk(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persist, "_write_all", full_disk)  # the tracking rewrite at load
    err = await refused(idle)
    assert not isinstance(err, CorruptFile)
    assert "session s" in err.message and "no space" in err.message
    assert files(idle) == kept, "a file was set aside, changed or removed"
    monkeypatch.undo()  # space freed
    async with started(idle) as svc:
        st = status(svc)
        assert (st["state"], st["consistent"], st["point_in_time"]) == ("idle", True, before["point_in_time"])
        assert st["tracked_bytes"] == G and st["last_error"] is None


async def test_an_unreadable_bitmap_at_start_up_is_no_corruption(
    idle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = files(idle)
    tracking = idle / "bitmaps" / "s.tracking"
    real = Path.read_bytes

    def bad_sector(self: Path) -> bytes:
        if self == tracking:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", bad_sector)
    err = await refused(idle)
    monkeypatch.undo()
    assert str(tracking) in err.message and "Input/output error" in err.message
    assert files(idle) == kept
    async with started(idle) as svc:
        assert (status(svc)["state"], status(svc)["consistent"]) == ("idle", True)


async def test_an_unreadable_save_area_at_start_up_keeps_the_paused_update(
    paused: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = files(paused)
    path = paused / "save" / "s.save"
    inode = path.stat().st_ino
    real = os.pread

    def bad_sector(fd: int, n: int, at: int) -> bytes:
        if os.fstat(fd).st_ino == inode:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, n, at)

    monkeypatch.setattr(save_area.os, "pread", bad_sector)
    err = await refused(paused)
    monkeypatch.undo()
    assert not isinstance(err, CorruptFile)
    assert str(path) in err.message and "Input/output error" in err.message
    assert files(paused) == kept
    async with started(paused) as svc:
        s = svc.sessions.get("s")
        assert s.state.value == "paused" and s.update is not None and s.update.id == 2
        assert s.save is not None and MiB // G in s.save


def damage(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF  # the magic
    path.write_bytes(bytes(raw))


def aside(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "bitmaps").glob("*.corrupt-*"))


async def test_a_set_aside_session_is_set_aside_once_and_keeps_its_first_cause(idle: Path) -> None:
    damage(idle / "bitmaps" / "s.tracking")
    async with started(idle) as svc:
        first = status(svc)
        assert first["state"] == "failed" and not first["consistent"] and first["point_in_time"] is None
        assert "s.tracking is corrupt" in first["last_error"] and "--full" in first["last_error"]
    evidence = aside(idle)
    assert len(evidence) == 1
    for _ in range(2):  # later starts find nothing new
        async with started(idle) as svc:
            st = status(svc)
            assert (st["state"], st["last_error"]) == ("failed", first["last_error"])
        assert aside(idle) == evidence
    async with started(idle) as svc:  # and an update (a full one) brings it back
        s = svc.sessions.get("s")
        assert (await s.start_update(False, None))["update"]["kind"] == "full"
        await s.wait()
        assert (s.state.value, s.consistent, s.last_error) == ("idle", True, None)


async def test_two_set_asides_in_one_second_keep_both_files(
    idle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = dt.datetime(2026, 11, 30, 3, 11, 6, tzinfo=dt.UTC)
    clock = SimpleNamespace(datetime=SimpleNamespace(now=lambda tz=None: frozen), UTC=dt.UTC)
    monkeypatch.setattr(files_module, "dt", clock)
    tracking = idle / "bitmaps" / "s.tracking"
    damage(tracking)
    first = tracking.read_bytes()
    async with started(idle) as svc:
        cause = status(svc)["last_error"]
    damage(tracking)  # the fresh tracking file is damaged too
    second = tracking.read_bytes()
    async with started(idle) as svc:
        assert status(svc)["last_error"] == cause, "the first cause was overwritten"
    kept = sorted((idle / "bitmaps").glob("*.corrupt-*"))
    assert len(kept) == 2 and sorted(p.read_bytes() for p in kept) == sorted([first, second])


async def test_setting_aside_on_a_full_disk_fails_the_start_and_keeps_the_cause(
    idle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    damage(idle / "bitmaps" / "s.tracking")

    def full_disk(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persist, "_write_all", full_disk)  # the fresh tracking file
    err = await refused(idle)
    assert "s.tracking is corrupt" in err.message and "no space" in err.message
    monkeypatch.undo()
    async with started(idle) as svc:  # the tracking file is missing now: the cause is not that
        st = status(svc)
        assert st["state"] == "failed" and "not a deltavol bitmap" in st["last_error"]
        assert (idle / "bitmaps" / "s.tracking").exists()
    assert len(aside(idle)) == 1


async def create_session(svc: Service, granularity: int = G) -> None:
    await svc.create_session(name="s", source="src", target="dst", granularity=granularity)


async def test_a_new_session_never_adopts_the_files_of_a_removed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    async with started(root) as svc:
        svc.create_volume("src", 4 * MiB)
        svc.create_volume("dst", 4 * MiB)
    # what a removed session s left (its unlinks never became durable)
    persist.save_atomic(root / "bitmaps" / "s.transfer", Bitmap(4 * MiB, G), 3, persist.KIND_TRANSFER)
    old = save_area.SaveArea(root / "save" / "s.save", G, 4 * MiB, 3, MiB).create()
    old.close()
    synced: list[tuple[Path, set[str]]] = []
    real = files_module.sync_dir

    def sync_dir(path: Path) -> None:
        synced.append((path, {p.name for p in path.iterdir()}))
        real(path)

    monkeypatch.setattr(files_module, "sync_dir", sync_dir)
    async with started(root) as svc:
        await create_session(svc, granularity=2 * G)
    monkeypatch.undo()
    gone = [(p, names) for p, names in synced if not names & {"s.transfer", "s.save"}]
    assert {p.name for p, _ in gone} >= {"bitmaps", "save"}, "the unlinks were not made durable"
    async with started(root) as svc:  # a restart before its first update
        st = status(svc)
        assert (st["state"], st["last_error"], st["tracked_bytes"]) == ("new", None, 0)


async def test_remove_makes_the_unlinks_durable(idle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[str, set[str]]] = []
    real: Callable[[Path], None] = files_module.sync_dir

    def sync_dir(path: Path) -> None:
        synced.append((path.name, {p.name for p in path.iterdir()}))
        real(path)

    async with started(idle) as svc:
        monkeypatch.setattr(files_module, "sync_dir", sync_dir)
        await svc.sessions.remove("s")
    assert ("bitmaps", set()) in synced and ("save", set()) in synced


async def test_a_session_whose_source_is_missing_keeps_its_name_files_and_target(
    idle: Path,
) -> None:
    """Not loaded, it still owns its row, its files and its target: a new session of its
    name is refused, and its target is neither written nor opened."""
    before = files(idle)
    img = next(idle.rglob("src.img"))
    img.rename(img.with_name("src.img.offline"))  # the source cannot be opened at this start
    async with started(idle) as svc:
        assert [s.name for s in svc.sessions.all()] == []
        (st,) = svc.list_sessions()  # listed all the same, saying why
        assert (st["name"], st["state"]) == ("s", "unavailable") and "'src' is missing" in st["last_error"]
        assert svc.session_status("s") | {"rpo_seconds": 0} == st | {"rpo_seconds": 0}
        svc.create_volume("other", 4 * MiB)
        svc.create_volume("dst2", 4 * MiB)
        with pytest.raises(DeltavolError):
            await svc.create_session(name="s", source="other", target="dst2")
        with pytest.raises(DeltavolError):
            await svc.create_session(name="t", source="other", target="dst")
        assert svc.volumes.get("dst").write_guard() is not None
    assert files(idle) == before
    img.with_name("src.img.offline").rename(img)
    async with started(idle) as svc:
        (s,) = svc.sessions.all()
        assert (s.name, s.source.name, s.target_spec) == ("s", "src", "dst")
        assert s.status()["tracked_bytes"] > 0


async def test_after_a_reboot_a_protecting_update_gives_up_its_mark_before_it_re_marks(
    paused: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Save records are not synced: after a reboot they may be lost, so the paused update
    gives up its mark at start-up, in its row too. The re-mark then writes a new save area
    header (of this boot): a crash before it commits must find the mark given up, never an
    update protecting with an area that looks intact and holds none of the old records."""
    from deltavol.copy.save_area import SEAL, SEAL_AT
    from deltavol.sessions.states import Phase
    from deltavol.store import fs

    with open(paused / "save" / "s.save", "r+b") as f:  # killed, not stopped: no seal
        f.seek(SEAL_AT)
        f.write(bytes(SEAL.size + 4))
    monkeypatch.setattr(fs.current(), "boot_id", lambda: b"\x02" * 16)  # the machine restarted
    async with started(paused) as svc:
        s = svc.sessions.get("s")
        assert s.update is not None and s.update.phase is Phase.GIVEN_UP
        assert s.update.remark is not None and "restarted" in s.update.remark
        assert s.state.value == "paused" and s.tracking.test(MiB // G), "the saved chunk's bit is gone"
        update_id, old_mark = s.update.id, s.update.marked_at
        area = s.protector.save_area(update_id)
    area.create().close()  # as the re-mark does before its commit; then a crash
    async with started(paused) as svc:
        s = svc.sessions.get("s")
        assert s.update is not None and s.update.phase is Phase.GIVEN_UP, "the old mark protects again"
        await s.resume()
        await s.wait()
        assert s.state.value == "idle" and s.consistent and s.point_in_time != old_mark
        src, dst = svc.volumes.get("src").export, svc.volumes.get("dst").export
        assert await dst.pread(0, 4 * MiB) == await src.pread(0, 4 * MiB)
        assert await dst.pread(MiB, G) == b"C" * G, "the target is not the source at the re-mark"


async def test_after_a_clean_stop_and_a_reboot_the_update_keeps_its_mark(
    paused: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clean stop sealed the save area (its records synced, the header says so): the
    reboot loses none of them, and the old mark is finished, as after a kill."""
    from deltavol.sessions.states import Phase
    from deltavol.store import fs

    monkeypatch.setattr(fs.current(), "boot_id", lambda: b"\x03" * 16)  # the machine restarted
    async with started(paused) as svc:
        s = svc.sessions.get("s")
        assert s.update is not None and s.update.phase is Phase.PROTECTING and s.update.remark is None
        assert s.save is not None and not s.save.sealed, "saves after the start must not be sealed"
        old_mark = s.update.marked_at
        await s.resume()
        await s.wait()
        assert s.consistent and s.point_in_time == old_mark
        assert await svc.volumes.get("dst").export.pread(MiB, G) == b"B" * G, "not the image of the mark"


async def test_after_a_restart_in_the_same_boot_the_update_keeps_its_mark(paused: Path) -> None:
    """A killed server: the page cache kept every record, and the old mark is finished."""
    from deltavol.sessions.states import Phase

    async with started(paused) as svc:
        s = svc.sessions.get("s")
        assert s.update is not None and s.update.phase is Phase.PROTECTING and s.update.remark is None
        old_mark = s.update.marked_at
        await s.resume()
        await s.wait()
        assert s.consistent and s.point_in_time == old_mark
        assert await svc.volumes.get("dst").export.pread(MiB, G) == b"B" * G, "not the image of the mark"


async def test_a_session_back_after_its_row_was_unreadable_copies_what_was_written_meanwhile(
    idle: Path,
) -> None:
    """Unavailable, it tracked nothing while its source was written: once its row is
    repaired, every chunk is tracked and the next update brings the target up to date."""
    import sqlite3

    db = sqlite3.connect(idle / "deltavol.db")
    (good,) = db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone()
    with db:
        db.execute("UPDATE sessions SET update_json = '{not json' WHERE name = 's'")
    async with started(idle) as svc:
        assert svc.session_status("s")["state"] == "unavailable"
        await svc.volumes.get("src").export.pwrite(2 * MiB, b"U" * G)  # untracked by s
    with db:
        db.execute("UPDATE sessions SET update_json = ? WHERE name = 's'", (good,))
    async with started(idle) as svc:
        st = status(svc)
        assert st["state"] == "idle" and st["tracked_bytes"] == 4 * MiB, st
        assert st["recopy_bytes"] == 4 * MiB - G and "unavailable" in st["full_reason"], st
        s = svc.sessions.get("s")
        await s.start_update(False, None)
        await s.wait()
        assert await svc.volumes.get("dst").export.pread(2 * MiB, G) == b"U" * G
    assert db.execute("SELECT count(*) FROM meta WHERE key LIKE 'untracked:%'").fetchone() == (0,)
    db.close()
    async with started(idle) as svc:  # once only
        assert status(svc)["tracked_bytes"] == 0 and status(svc)["full_reason"] is None
