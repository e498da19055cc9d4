"""The update record: its phase moves only through the table, and its rows are versioned.

A row stored before the phase was (version 1: no ``version``, no ``phase``) is read with
the phase its fields implied; a row of a newer version, or with a field this version does
not know, is refused with an error naming the session, never read wrong.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from deltavol.errors import IllegalPhase, UnknownRecord
from deltavol.sessions.records import ROW_VERSION, UpdateRecord, update_from_row, update_to_row
from deltavol.sessions.states import Phase, State
from tests.unit.sessions.test_startup import G, MiB, idle, paused, refused, started, status

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


def test_a_row_reads_back_as_it_was_written() -> None:
    update = UpdateRecord(id=7, kind="full", started_at="t", max_rate=5)
    update.move("start_full", "s")
    update.move("mark", "s")
    update.move("give_up", "s")
    text = update_to_row(update)
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


async def test_a_paused_update_stored_as_version_1_is_resumed_as_of_its_mark(paused: Path) -> None:
    """The whole way: the row rewritten as an older deltavol stored it; the start reads it,
    keeps the update's save area (it protects), and resume finishes as of the mark."""
    db = sqlite3.connect(paused / "deltavol.db")
    (text,) = db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone()
    row = json.loads(text)
    assert row.pop("version") == ROW_VERSION and row.pop("phase") == "protecting"
    with db:
        db.execute("UPDATE sessions SET update_json = ? WHERE name = 's'", (json.dumps(row),))
    db.close()
    async with started(paused) as svc:
        s = svc.sessions.get("s")
        assert s.update is not None and s.update.phase is Phase.PROTECTING
        assert s.save is not None and MiB // G in s.save, "the save area was not kept"
        await s.resume()
        await s.wait()
        st = status(svc)
        assert (st["state"], st["consistent"], st["point_in_time"]) == ("idle", True, s.update.marked_at)
        dst = await svc.volumes.get("dst").export.pread(MiB, G)
        assert dst == b"B" * G, "the target is not the image at the mark"


async def test_a_row_of_a_newer_version_fails_the_start_naming_the_session(idle: Path) -> None:
    db = sqlite3.connect(idle / "deltavol.db")
    (text,) = db.execute("SELECT update_json FROM sessions WHERE name = 's'").fetchone()
    row = json.loads(text) | {"version": ROW_VERSION + 1}
    with db:
        db.execute("UPDATE sessions SET update_json = ? WHERE name = 's'", (json.dumps(row),))
    db.close()
    err = await refused(idle)
    assert isinstance(err, UnknownRecord) and "session 's'" in err.message
