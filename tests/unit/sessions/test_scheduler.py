"""The ``--every`` scheduler: one session's failing update is logged and kept in its
``last_error``, and every session goes on being updated; raw OS errors on the mark's paths
come out as the project's errors, naming the file."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deltavol.config import ServerConfig
from deltavol.copy.save_area import SaveArea
from deltavol.errors import DeltavolError
from deltavol.service import Service
from deltavol.sessions import manager as manager_module
from deltavol.sessions.session import Session
from deltavol.sessions.states import State
from deltavol.store.datadir import DataDir
from tests.fakes import until

MiB = 1 << 20
G = 64 * 1024


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    dd = DataDir(tmp_path / "data")
    service = Service(dd.open(), dd, ServerConfig(data_dir=tmp_path / "data", save_limit=4 * MiB))
    service.load()
    try:
        yield service
    finally:
        await service.close()
        dd.close()


def last_error_row(svc: Service, name: str) -> Any:
    return svc.db.conn.execute("SELECT last_error FROM sessions WHERE name = ?", (name,)).fetchone()[0]


async def test_a_scheduled_update_that_raises_stops_no_other_session_nor_the_next_one(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "SCHEDULER_TICK", 0.01, raising=False)
    for vol in ("src", "dst", "dst2"):
        svc.create_volume(vol, 4 * MiB)
    sessions: list[Session] = []
    for name, dst in (("a", "dst"), ("b", "dst2")):
        await svc.create_session(name=name, source="src", target=dst, every=60)
        s = svc.sessions.get(name)
        await s.start_update(True)
        await s.wait()
        sessions.append(s)
    a, b = sessions
    persist_row = a._persist_row
    failures: list[str] = []

    def commit_of_the_mark_fails_once(s: Session) -> None:
        if s.state is State.COPYING and not failures:  # not a DeltavolError: a bug, a broken database
            failures.append(s.name)
            raise sqlite3.DatabaseError("database disk image is malformed")
        persist_row(s)

    a._persist_row = commit_of_the_mark_fails_once
    await svc.volumes.get("src").export.pwrite(0, b"C" * G)
    a.last_started = b.last_started = time.monotonic() - 1000  # both due at the first tick
    await svc.start()

    await until(lambda: bool(failures) and b.update is not None and b.update.id == 2, timeout=5)
    await until(lambda: b.state is State.IDLE)
    assert b.state is State.IDLE and b.consistent and b.last_error is None
    assert a.state is State.IDLE and a.update is not None and a.update.id == 1  # rolled back
    assert a.last_error is not None and "malformed" in a.last_error
    assert "malformed" in last_error_row(svc, "a")
    scheduler = svc.sessions._scheduler
    assert scheduler is not None and not scheduler.done()

    a.last_started = time.monotonic() - 1000  # due again: the scheduler still runs a's updates
    await until(lambda: a.update is not None and a.update.id > 1, timeout=5)
    await until(lambda: a.state is State.IDLE)
    assert a.state is State.IDLE and a.consistent and a.last_error is None
    assert await svc.volumes.get("dst").backend.pread(0, G) == b"C" * G


def test_an_os_error_creating_a_save_area_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    area = SaveArea(tmp_path / "s.save", G, 4 * MiB, 1, MiB)
    real_open = os.open

    def no_more_files(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if str(path).endswith(".tmp"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", no_more_files)
    with pytest.raises(DeltavolError, match=r"s\.save.*Too many open files"):
        area.create()
