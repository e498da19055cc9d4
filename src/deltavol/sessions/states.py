"""A session's states, its update's phases, and the tables of their legal moves.

``state`` says what the session is doing; ``consistent`` (kept beside it) says whether
the target holds exactly the source as of the last completed mark. An update's ``phase``
(stored in its record, ``records.UpdateRecord``) says where that update is: before its
commit, in a full pass, marked and protecting, its mark given up, done or cancelled. Each
moves only through its table; an illegal move raises, naming the session.
"""

from __future__ import annotations

import enum

from deltavol.errors import IllegalPhase, IllegalTransition


class State(enum.StrEnum):
    NEW = "new"  # created, never updated
    COPYING = "copying"  # an update is running
    IDLE = "idle"  # no update running
    PAUSED = "paused"  # an update is stopped by the user, bitmaps kept
    FAILED = "failed"  # an update stopped on an error (last_error), bitmaps kept
    RESTORING = "restoring"  # the source is being rolled back to the point in time (restore.py)


_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.NEW, "update"): State.COPYING,
    (State.IDLE, "update"): State.COPYING,
    (State.COPYING, "done"): State.IDLE,
    (State.COPYING, "pause"): State.PAUSED,
    (State.COPYING, "fail"): State.FAILED,
    (State.PAUSED, "resume"): State.COPYING,
    (State.FAILED, "resume"): State.COPYING,
    (State.COPYING, "cancel"): State.IDLE,
    (State.PAUSED, "cancel"): State.IDLE,
    (State.FAILED, "cancel"): State.IDLE,
    # a new mark ORs what changed since into the unfinished transfer (DESIGN: mark), or --full
    # starts over (the way back from a corrupt bitmap or save area)
    (State.FAILED, "update"): State.COPYING,
    (State.PAUSED, "update"): State.COPYING,
    # restore (sessions/restore.py): only from a finished update; one that failed is started
    # again (it goes on with what is left), and it ends idle and consistent
    (State.IDLE, "restore"): State.RESTORING,
    (State.RESTORING, "restore"): State.RESTORING,
    (State.RESTORING, "restored"): State.IDLE,
}


def next_state(name: str, state: State, action: str) -> State:
    try:
        return _TRANSITIONS[(state, action)]
    except KeyError:
        raise IllegalTransition(name=name, state=state.value, action=action) from None


class Phase(enum.StrEnum):
    """Where one update is (``UpdateRecord.phase``), moved only by ``next_phase``."""

    STARTING = "starting"  # built by start_update: neither marked nor committed yet
    FULL_COPY = "full-copy"  # a full update's pass: no mark, no protection
    PROTECTING = "protecting"  # marked: what it owes is protected by copy-on-first-write
    GIVEN_UP = "given-up"  # copy-before-write gave its mark up: it goes on as of a new mark
    DONE = "done"  # finished: the target is consistent as of the mark
    CANCELLED = "cancelled"  # cancelled: what it owed went back into tracking
    RESTORING = "restoring"  # a restore (sessions/restore.py): copying the target back to the source


_PHASES: dict[tuple[Phase, str], Phase] = {
    (Phase.STARTING, "start_full"): Phase.FULL_COPY,
    (Phase.STARTING, "mark"): Phase.PROTECTING,
    (Phase.FULL_COPY, "mark"): Phase.PROTECTING,  # the catch-up pass of a full update
    (Phase.GIVEN_UP, "mark"): Phase.PROTECTING,  # the re-mark
    (Phase.PROTECTING, "give_up"): Phase.GIVEN_UP,
    (Phase.PROTECTING, "finish"): Phase.DONE,
    (Phase.FULL_COPY, "cancel"): Phase.CANCELLED,
    (Phase.PROTECTING, "cancel"): Phase.CANCELLED,
    (Phase.GIVEN_UP, "cancel"): Phase.CANCELLED,
    (Phase.STARTING, "restore"): Phase.RESTORING,  # committed with the session's ``restoring``
    (Phase.RESTORING, "restored"): Phase.DONE,  # the source is the point in time again
}


def next_phase(name: str, update_id: int, phase: Phase, action: str) -> Phase:
    try:
        return _PHASES[(phase, action)]
    except KeyError:
        raise IllegalPhase(name=name, id=update_id, phase=phase.value, action=action) from None


def undoes(was: Phase, phase: Phase) -> bool:
    """True if going back from ``phase`` to ``was`` undoes one move of the table (a step
    whose commit failed puts the phase back)."""
    return was is phase or any(src is was and dst is phase for (src, _), dst in _PHASES.items())
