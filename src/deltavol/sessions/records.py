"""What a session stores of its update and of its retries, and their rows.

Design notes
------------
* **The phase is stored and moved only through the table** (``states.next_phase``):
  ``UpdateRecord.move(action)`` is the one way forward, and ``put_back(phase)`` the one
  way back, allowed only to undo one move of the table (a step whose commit failed).
  Setting ``phase`` or ``protecting`` directly raises.
* ``protecting`` is kept beside the phase for the status JSON: True from a mark until
  the mark is given up (and still True once the update is done). The code asks the phase.
* **Rows are versioned** (``ROW_VERSION``). A row without a version is of version 1, from
  before the phase was stored: its phase is derived from ``protecting``, ``remark``,
  ``finished_at`` and the session's state, there and only there (``_migrate_v1``). A
  row of version 2 is taken with the phase it stores. A row of a newer version, with a
  field this version does not know, or with a phase no committed update has (``starting``,
  or a version 1 row whose fields imply none) is an error naming the session, never a
  record silently read wrong. ``update_to_row`` refuses to write a ``starting`` record.
* A deltavol from before version 2 rows cannot read them: the database's
  ``format_version`` (``store/db.py``) went to 2 with them, and such a deltavol refuses
  a database of a newer format at open.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from deltavol.errors import IllegalPhase, UnknownRecord
from deltavol.sessions.states import Phase, State, next_phase, undoes

ROW_VERSION = 2  # 1: no version, no phase (derived on reading); 2: ``phase`` stored

_MARK_HOLDS = {Phase.PROTECTING: True, Phase.STARTING: False, Phase.FULL_COPY: False, Phase.GIVEN_UP: False}
_GUARDED = frozenset({"phase", "protecting"})


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class UpdateRecord:
    """The running (or last) update, as persisted and as shown in status."""

    id: int
    kind: str  # "full" | "incremental"
    # True from its mark until the mark is given up (see the notes above); ask ``phase``
    protecting: bool = False
    marked_at: str | None = None
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_sent: int = 0
    cofw_saved_bytes: int = 0
    catchup_bytes: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    max_rate: int | None = None  # bytes/s for this update (--max-rate, else the session's)
    # why copy-before-write gave up this update's point in time; it goes on as of a new mark
    remark: str | None = None
    phase: Phase = Phase.STARTING

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))  # as given: only _migrate_v1 derives

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _GUARDED and name in self.__dict__:
            raise AttributeError(f"UpdateRecord.{name} moves only by move() or put_back()")
        object.__setattr__(self, name, value)

    def move(self, action: str, session: str) -> None:
        """Take the move ``action`` of the phase table; an illegal one raises."""
        self._set(next_phase(session, self.id, self.phase, action))

    def put_back(self, phase: Phase, session: str) -> None:
        """Undo a move whose commit failed: back to ``phase``, which the table must lead
        from to the phase now in one move."""
        if not undoes(phase, self.phase):
            raise IllegalPhase(
                name=session, id=self.id, phase=self.phase.value, action=f"go back to {phase.value}"
            )
        self._set(phase)

    def _set(self, phase: Phase) -> None:
        object.__setattr__(self, "phase", phase)
        holds = _MARK_HOLDS.get(phase)
        if holds is not None:  # done and cancelled keep what the mark was
            object.__setattr__(self, "protecting", holds)

    @property
    def running(self) -> bool:
        """Committed and not over: a full pass, a mark, or a mark given up."""
        return self.phase in (Phase.FULL_COPY, Phase.PROTECTING, Phase.GIVEN_UP)

    def status(self) -> dict[str, Any]:
        return asdict(self)


def _derive(u: UpdateRecord, running: bool) -> Phase:
    """The phase of a version 1 record, from the fields that implied it then."""
    if u.finished_at is not None:
        return Phase.DONE
    if not running:  # the session is idle with an unfinished update: it was cancelled
        return Phase.CANCELLED
    if u.protecting:
        return Phase.PROTECTING
    if u.remark is not None:
        return Phase.GIVEN_UP
    if u.kind == "full":
        return Phase.FULL_COPY
    return Phase.STARTING  # never committed as such: a row always had a mark or a full pass


_FIELDS = frozenset(f.name for f in fields(UpdateRecord))
_V1_FIELDS = _FIELDS - {"phase"}


def update_to_row(update: UpdateRecord, session: str) -> str:
    """The row of a committed update: a ``starting`` one (built, not committed) raises."""
    if update.phase is Phase.STARTING:
        raise IllegalPhase(name=session, id=update.id, phase=update.phase.value, action="be stored")
    return json.dumps({"version": ROW_VERSION, **asdict(update)})


def update_from_row(text: str, session: str, state: State) -> UpdateRecord:
    """The record of a session row's ``update_json`` (any version this deltavol knows)."""
    try:
        row = json.loads(text)
    except ValueError as exc:
        raise UnknownRecord(name=session, why=f"not JSON: {exc}") from None
    if not isinstance(row, dict):
        raise UnknownRecord(name=session, why="not a JSON object")
    version = row.pop("version", 1)
    if version == 1:
        return _migrate_v1(row, session, state)
    if version != ROW_VERSION:
        raise UnknownRecord(name=session, why=f"version {version!r}, this deltavol reads up to {ROW_VERSION}")
    unknown = set(row) - _FIELDS
    if unknown or "phase" not in row:
        why = f"unknown fields {sorted(unknown)}" if unknown else "no phase"
        raise UnknownRecord(name=session, why=why)
    try:
        update = UpdateRecord(**row)
    except (TypeError, ValueError) as exc:
        raise UnknownRecord(name=session, why=str(exc)) from None
    if update.phase is Phase.STARTING:
        raise UnknownRecord(name=session, why="phase 'starting': no update is stored before its commit")
    return update


def _migrate_v1(row: dict[str, Any], session: str, state: State) -> UpdateRecord:
    unknown = set(row) - _V1_FIELDS
    if unknown:
        raise UnknownRecord(name=session, why=f"unknown fields {sorted(unknown)} in a version 1 record")
    try:
        update = UpdateRecord(**row)
    except TypeError as exc:
        raise UnknownRecord(name=session, why=str(exc)) from None
    phase = _derive(update, running=state in (State.COPYING, State.PAUSED, State.FAILED))
    if phase is Phase.STARTING:
        why = f"a version 1 record of an unfinished {update.kind} update neither marked nor given up"
        raise UnknownRecord(name=session, why=why)
    update._set(phase)
    return update


@dataclass
class RetryPolicy:
    """Automatic resume of an update whose target failed: exponential backoff, bounded."""

    limit: int = 5
    backoff: float = 2.0
    max_backoff: float = 60.0
    attempts: int = 0
    next_at: float | None = None

    def delay(self) -> float:
        return min(self.max_backoff, self.backoff * 2**self.attempts)

    def status(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "limit": self.limit,
            "next_in": None if self.next_at is None else max(0.0, round(self.next_at - time.time(), 1)),
        }
