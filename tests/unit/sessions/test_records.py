"""The update record: its phase moves only through the table, and its rows are versioned.

A row stored before the phase was (version 1: no ``version``, no ``phase``) is read with
the phase its fields implied, and its database is brought to format 2 as it opens; a row
of version 2 is read with the phase it stores. A row of a newer version, with a field
this version does not know, or with a phase no committed update has, is refused with an
error naming the session, never read wrong; and no ``starting`` record is ever written.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from deltavol.errors import IllegalPhase, SessionUnavailable, UnknownRecord
from deltavol.sessions import manager
from deltavol.sessions.records import ROW_VERSION, UpdateRecord, update_from_row, update_to_row
from deltavol.sessions.states import Phase, State
from tests.unit.sessions.test_startup import G, MiB, idle, paused, started, status

__all__ = ["idle", "paused"]  # fixtures


def v1(**fields: Any) -> str:
    """A row as deltavol stored it before rows had a version: every field but the phase."""
    row = {"id": 3, "kind": "incremental", "protecting": False, "marked_at": None, "bytes_total": 0}
    row |= {"bytes_done": 0, "bytes_sent": 0, "cofw_saved_bytes": 0, "catchup_bytes": 0, "started_at": "t"}
    row |= {"finished_at": None, "max_rate": None, "remark": None}
    row |= fields
    return json.dumps(row)


@pytest.mark.parametrize(
    ("fields", "state", "phase"),
    [
        ({"protecting": True, "marked_at": "m"}, State.COPYING, Phase.PROTECTING),
        ({"protecting": True, "marked_at": "m", "remark": "r"}, State.PAUSED, Phase.PROTECTING),  # re-marked
        ({"protecting": False, "marked_at": "m", "remark": "gone"}, State.FAILED, Phase.GIVEN_UP),
        ({"kind": "full"}, State.COPYING, Phase.FULL_COPY),
        ({"protecting": True, "marked_at": "m", "finished_at": "f"}, State.IDLE, Phase.DONE),
        ({"protecting": True, "marked_at": "m"}, State.IDLE, Phase.CANCELLED),
        ({"kind": "full"}, State.IDLE, Phase.CANCELLED),
    ],
)
def test_a_version_1_row_gets_the_phase_its_fields_implied(
    fields: dict[str, Any], state: State, phase: Phase
) -> None:
    update = update_from_row(v1(**fields), "s", state)
    assert update.phase is phase
    assert update.protecting is fields.get("protecting", False)  # as it was stored
    assert update.remark == fields.get("remark")


def test_a_version_1_row_of_no_phase_a_committed_update_had_is_refused() -> None:
    """Unfinished, incremental, neither marked nor given up: no deltavol committed that."""
    with pytest.raises(UnknownRecord) as info:
        update_from_row(v1(), "s", State.PAUSED)
    assert "session 's'" in info.value.message and "neither marked nor given up" in info.value.message


MOVES = {
    Phase.FULL_COPY: ["start_full"],
    Phase.PROTECTING: ["mark"],
    Phase.GIVEN_UP: ["mark", "give_up"],
    Phase.DONE: ["mark", "finish"],
    Phase.CANCELLED: ["start_full", "cancel"],
    Phase.RESTORING: ["restore"],
}


@pytest.mark.parametrize("phase", list(MOVES))
@pytest.mark.parametrize("state", list(State))
def test_a_version_2_row_is_read_with_the_phase_it_stores(phase: Phase, state: State) -> None:
    """Whatever its other fields and the session's state would have implied in version 1
    (a given-up update's ``remark``, a cancelled one read in a copying session...)."""
    update = UpdateRecord(id=2, kind="incremental", started_at="t", marked_at="m", remark="r")
    for action in MOVES[phase]:
        update.move(action, "s")
    again = update_from_row(update_to_row(update, "s"), "s", state)
    assert again.phase is phase and asdict(again) == asdict(update)


def test_a_record_is_built_with_the_phase_it_is_given() -> None:
    update = UpdateRecord(id=1, kind="incremental", protecting=True, marked_at="m", finished_at="f")
    assert update.phase is Phase.STARTING  # no phase is derived from the fields but in migration


def test_a_starting_record_is_never_written() -> None:
    update = UpdateRecord(id=4, kind="incremental", started_at="t")
    with pytest.raises(IllegalPhase) as info:
        update_to_row(update, "s")
    assert info.value.message == "update 4 of session 's' is starting: cannot be stored"


def test_a_row_reads_back_as_it_was_written() -> None:
    update = UpdateRecord(id=7, kind="full", started_at="t", max_rate=5)
    update.move("start_full", "s")
    update.move("mark", "s")
    update.move("give_up", "s")
    text = update_to_row(update, "s")
    assert json.loads(text)["version"] == ROW_VERSION and json.loads(text)["phase"] == "given-up"
    again = update_from_row(text, "s", State.FAILED)
    assert asdict(again) == asdict(update) and again.phase is Phase.GIVEN_UP


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (json.dumps({"version": ROW_VERSION + 1, "id": 1, "kind": "full"}), "version"),
        (
            json.dumps({"version": ROW_VERSION, "id": 1, "kind": "full", "phase": "done", "nbytes": 1}),
            "nbytes",
        ),
        (json.dumps({"version": ROW_VERSION, "id": 1, "kind": "full"}), "no phase"),
        (json.dumps({"version": ROW_VERSION, "id": 1, "kind": "full", "phase": "halfway"}), "halfway"),
        (json.dumps({"version": ROW_VERSION, "id": 1, "kind": "full", "phase": "starting"}), "'starting'"),
        (
            json.dumps(
                {"version": ROW_VERSION, "id": 1, "kind": "incremental", "phase": "starting"}
                | {"protecting": True, "marked_at": "m"}
            ),
            "'starting'",
        ),
        (v1(renamed=1), "renamed"),
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_a_row_this_version_cannot_read_is_refused_by_name(text: str, why: str) -> None:
    with pytest.raises(UnknownRecord) as info:
        update_from_row(text, "s", State.COPYING)
    assert "session 's'" in info.value.message and why in info.value.message


def test_the_phase_moves_only_through_the_table() -> None:
    update = UpdateRecord(id=1, kind="incremental", started_at="t")
    assert update.phase is Phase.STARTING and not update.protecting
    with pytest.raises(IllegalPhase) as info:
        update.move("finish", "s")  # never marked
    assert info.value.message == "update 1 of session 's' is starting: cannot finish"
    assert update.phase is Phase.STARTING
    update.move("mark", "s")
    assert update.phase is Phase.PROTECTING and update.protecting
    with pytest.raises(AttributeError):
        update.phase = Phase.DONE
    with pytest.raises(AttributeError):
        update.protecting = False
    with pytest.raises(IllegalPhase):
        update.put_back(Phase.DONE, "s")  # no move leads from done to protecting
    update.put_back(Phase.STARTING, "s")  # undoes the mark
    assert update.phase is Phase.STARTING and not update.protecting
    update.move("mark", "s")
    update.move("finish", "s")
    assert update.phase is Phase.DONE and update.protecting  # what the mark was stays
    with pytest.raises(IllegalPhase):
        update.move("cancel", "s")


def stored(root: Path) -> tuple[str, dict[str, Any]]:
    """The database's format version and session s's update row."""
    db = sqlite3.connect(root / "deltavol.db")
    try:
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        (text,) = db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone()
        return version, json.loads(text)
    finally:
        db.close()


async def test_a_paused_update_stored_as_version_1_is_resumed_as_of_its_mark(paused: Path) -> None:
    """The whole way: the database rewritten as an older deltavol left it (format 1, a
    row of version 1); the start brings it to format 2, reads the row with its phase
    derived, keeps the update's save area (it protects), and resume finishes as of the mark."""
    db = sqlite3.connect(paused / "deltavol.db")
    (text,) = db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone()
    row = json.loads(text)
    assert row.pop("version") == ROW_VERSION and row.pop("phase") == "protecting"
    with db:
        db.execute("UPDATE sessions SET update_json = ? WHERE name = 's'", (json.dumps(row),))
        db.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    db.close()
    async with started(paused) as svc:
        assert stored(paused) == ("2", row), "not migrated at open, or the row was rewritten"
        s = svc.sessions.get("s")
        assert s.update is not None and s.update.phase is Phase.PROTECTING
        assert s.save is not None and MiB // G in s.save, "the save area was not kept"
        await s.resume()
        await s.wait()
        st = status(svc)
        assert (st["state"], st["consistent"], st["point_in_time"]) == ("idle", True, s.update.marked_at)
        dst = await svc.volumes.get("dst").export.pread(MiB, G)
        assert dst == b"B" * G, "the target is not the image at the mark"
    version, again = stored(paused)
    assert (version, again["version"], again["phase"]) == ("2", ROW_VERSION, "done")


async def test_a_row_of_a_newer_version_makes_the_session_unavailable_naming_it(idle: Path) -> None:
    """The start goes on: the session is unavailable, its row is left as it is (a newer
    deltavol reads it), every action but remove is refused with the reason."""
    db = sqlite3.connect(idle / "deltavol.db")
    (text,) = db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone()
    row = json.loads(text) | {"version": ROW_VERSION + 1}
    with db:
        db.execute("UPDATE sessions SET update_json = ? WHERE name = 's'", (json.dumps(row),))
    async with started(idle) as svc:
        (st,) = svc.list_sessions()
        assert st["state"] == "unavailable" and f"version {ROW_VERSION + 1}" in st["last_error"], st
        with pytest.raises(SessionUnavailable) as info:
            await svc.update_session("s", False, None)
        assert "session 's'" in info.value.message and info.value.http_status == 409
    assert db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone() == (json.dumps(row),)
    async with started(idle) as svc:
        await svc.remove_session("s")
        assert svc.list_sessions() == []
    assert db.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    db.close()


async def test_a_cancel_during_a_start_waits_and_cancels_a_committed_update(
    idle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update is ``starting`` from its start until its mark commits. A cancel issued
    meanwhile waits for the start (one operation at a time) and cancels the marked update;
    a start whose commit fails leaves the update before it in place: no row is ever
    written while an update is ``starting``."""
    written: list[str] = []
    real = manager.update_to_row

    def recording(update: UpdateRecord, session: str) -> str:
        written.append(update.phase.value)
        return real(update, session)

    monkeypatch.setattr(manager, "update_to_row", recording)
    async with started(idle) as svc:
        s = svc.sessions.get("s")
        backend = s.source.backend
        flushing, go = asyncio.Event(), asyncio.Event()
        real_flush = backend.flush

        async def held() -> None:
            flushing.set()
            await go.wait()
            await real_flush()

        monkeypatch.setattr(backend, "flush", held)
        start = asyncio.ensure_future(s.start_update(False, None))
        await flushing.wait()  # the start holds the session, its new update not marked yet
        cancel = asyncio.ensure_future(s.cancel())
        while not s._ops._waiters:  # the cancel waits for the start
            await asyncio.sleep(0)
        assert s.update is not None and s.update.phase is Phase.DONE  # the last one's, not the new
        go.set()
        started_st, cancelled = await start, await cancel
        assert started_st["update"]["phase"] == "protecting" and started_st["update"]["id"] == 2
        assert cancelled["state"] == "idle" and cancelled["update"]["phase"] == "cancelled"
        assert cancelled["update"]["id"] == 2 and cancelled["tracked_bytes"] == G
        monkeypatch.setattr(backend, "flush", real_flush)

        # a start whose commit fails: its update never becomes the session's
        failing = [True]

        def failing_commit(update: UpdateRecord, session: str) -> str:
            if failing[0] and update.phase is Phase.PROTECTING:
                raise OSError(28, "No space left on device")
            return recording(update, session)

        monkeypatch.setattr(manager, "update_to_row", failing_commit)
        with pytest.raises(OSError):
            await s.start_update(False, None)
        assert s.update is not None and (s.update.id, s.update.phase) == (2, Phase.CANCELLED)
        failing[0] = False
    assert "starting" not in written and written.count("cancelled") >= 1
    async with started(idle) as svc:  # what was written reads back
        st = status(svc)
        assert (st["state"], st["update"]["id"], st["update"]["phase"]) == ("idle", 2, "cancelled")
