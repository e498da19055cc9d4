"""A session's states and the one table of legal transitions.

``state`` says what the session is doing; ``consistent`` (kept beside it) says whether
the target holds exactly the source as of the last completed mark.
"""

from __future__ import annotations

import enum

from deltavol.errors import IllegalTransition


class State(enum.StrEnum):
    NEW = "new"  # created, never updated
    COPYING = "copying"  # an update is running
    IDLE = "idle"  # no update running
    PAUSED = "paused"  # an update is stopped by the user, bitmaps kept
    FAILED = "failed"  # an update stopped on an error (last_error), bitmaps kept


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
}


def next_state(name: str, state: State, action: str) -> State:
    try:
        return _TRANSITIONS[(state, action)]
    except KeyError:
        raise IllegalTransition(name=name, state=state.value, action=action) from None
