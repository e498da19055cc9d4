"""``session reverse``: the target becomes the writable source of the session, the old source
its target, and the first update copies only what changed on either side.

Design notes
------------
* **What differs.** With no update under way, the target holds the source as of the point
  in time, and tracking has a bit wherever the source changed since (invariant 2). So the
  two volumes differ only where tracking says. The reversed session starts with that very
  tracking, and tracks the promoted volume from the moment it becomes writable: its first
  update copies the old source's changes (put back as they were at the point in time)
  and the promoted volume's new writes, no more. It is not consistent (its target is no
  image of its source), but it keeps ``point_in_time``, so that update is an incremental
  one. Reversing again works the same way and gives back the first direction.
* **One commit.** With both volumes' write gates closed (no change in flight on either,
  and the old source has no client connected), tracking is rewritten durably with no hot
  region: the file holds exactly the bits, and the same bits are right for both
  directions (both volumes have the same size). Then the row commits the new direction.
  A crash before it leaves the session as it was; after it, the file is the reversed
  session's as it stands. Only then are the hooks moved to the new source and the guards
  to the new target, with no await between the two.
* **Local targets only.** A plain NBD server cannot tell what was written to its export
  once it is promoted, so such a target can be restored from (``session restore``) but
  not reversed. Between two deltavol servers, the remote one would have to take the
  session over with the tracking bits (docs/operations.md has the design).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from deltavol.copy.targets import is_uri
from deltavol.errors import InUse, NotReversible
from deltavol.sessions.session import Session
from deltavol.sessions.states import State

if TYPE_CHECKING:
    from deltavol.sessions.manager import SessionManager

log = logging.getLogger("deltavol.session")


def _refusal(m: SessionManager, s: Session) -> str | None:
    if is_uri(s.target_spec):
        return (
            f"its target {s.target_spec} is an export of an NBD server, which cannot say what is "
            "written to it once promoted: restore from it ('session restore') instead"
        )
    if s.busy or s.state is not State.IDLE or s.transfer is not None:
        return f"it is {s.state.value}: reverse needs a session with no update or restore under way"
    if s.point_in_time is None:
        return "its target never received a complete copy: run 'session update --full' first"
    others = [o.name for o in m.of_source(s.source.name) if o is not s]
    if others:
        return f"its source {s.source.name!r} is also the source of session(s) {', '.join(others)}"
    return None


async def reverse(m: SessionManager, name: str) -> dict[str, Any]:
    s = m.get(name)
    async with s.operation():
        why = _refusal(m, s)
        if why is not None:
            raise NotReversible(name=name, why=why)
        old, new = s.source, m.volumes.get(s.target_spec)
        if new.size != old.size:
            raise NotReversible(
                name=name,
                why=f"its target {new.name!r} ({new.size} bytes) is larger than its source "
                f"{old.name!r} ({old.size} bytes), which could not hold it",
            )
        if old.connections:
            raise InUse(
                kind="volume",
                name=old.name,
                why=f"{old.connections} NBD connection(s) open; it becomes a target: disconnect them first",
            )
        await s.copier.drop_target()
        preparing = s.protector._preparing  # the save area's space, written ahead in a thread:
        if preparing is not None:  # the reversed session's marks use the same file
            with contextlib.suppress(Exception):
                await asyncio.shield(preparing)
        async with old.gate.closed(), new.gate.closed():
            if old.connections:  # one came while the gate closed
                raise InUse(kind="volume", name=old.name, why=f"{old.connections} NBD connection(s) open")
            await old.backend.flush()  # what tracking says differs is durable on both sides
            await new.backend.flush()
            s._rewrite_tracking()  # every bit durable, no hot region: the file is right both ways
            r = m._new(name, new, old.name, s.granularity, max_rate=s.max_rate, every=s.every)
            r.state = State.IDLE
            r.consistent = False
            r.point_in_time = s.point_in_time
            r.created_at = s.created_at
            r.next_update_id = s.next_update_id
            r.tracking = s.tracking.copy()
            try:
                m._persist(r)  # the commit point
            except BaseException:
                wiring = m._wiring.get(new.name)
                if wiring is not None and not wiring.sessions:
                    del m._wiring[new.name]
                raise
            s.removed = s.closed = True  # the old direction: no operation, no row written again
            s.tracker.close_file()
            m._detach(s)
            m._sessions[name] = r
            m._attach(r)
            try:  # the file on disk is right already; this gives the new session its handle
                r.tracker.open_file()
                r._rewrite_tracking()
            except Exception as exc:  # changes to the new source fail until a restart reloads it
                log.error("session %s: reopening tracking after the reverse failed: %s", name, exc)
    log.info("session %s: reversed: %s -> %s", name, new.name, old.name)
    m.events.publish("session.reversed", name=name, source=new.name, target=old.name)
    return r.status()
