"""``session verify``: compare source and target on every chunk not changed since the mark.

A chunk whose tracking bit is set was written after the point in time, so the target is
not expected to hold it; every other chunk must be equal byte for byte. Reads go in
requests of up to ``MAX_REQUEST`` with a few in flight on both sides (as the copy does),
and the comparison is chunk by chunk so a difference is reported by its chunk's offset.

A verify is one operation on the session (``Session.operation``), held from its check to its
result: no update marks meanwhile -- a mark would reset the tracking bitmap it reads and
drop its target connection (false mismatches, or a spurious failure). A user's update or
pause waits for the verify's end; the scheduler skips the session until then. Removing the
session or stopping the server does not wait: it interrupts the verify, which fails.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from deltavol.copy.engine import MAX_REQUEST, requests, run_pipeline
from deltavol.copy.throttle import Throttle
from deltavol.errors import NotVerifiable, VerifyInterrupted
from deltavol.sessions.session import Session, one_at_a_time
from deltavol.sessions.states import State

log = logging.getLogger("deltavol.session")

INFLIGHT = 4
_INTERRUPTED = "the session is being removed or the server is stopping"
MAX_REPORTED = 100


@one_at_a_time
async def verify(session: Session) -> dict[str, Any]:
    s = session
    if s.busy or s.state is not State.IDLE or not s.consistent:
        state = s.state.value + ("" if s.consistent else ", not consistent")
        raise NotVerifiable(name=s.name, state=state)
    await s.copier.drop_target()  # idle: nothing else uses it, and a kept connection may be dead
    target = await s.ensure_target()
    g, tracking = s.granularity, s.tracking
    compared = skipped = 0
    mismatches: list[int] = []

    async def compare(first: int, count: int) -> None:
        nonlocal compared, skipped
        offset = first * g
        length = min(count * g, s.source.size - offset)
        theirs = await target.pread(offset, length)
        ours = await s.source.backend.pread(offset, length)
        if ours == theirs:
            changed = sum(tracking.test(c) for c in range(first, first + count))
            compared += count - changed
            skipped += changed
            return
        for c in range(first, first + count):
            if tracking.test(c):  # changed since the mark: not comparable
                skipped += 1
                continue
            a = c * g - offset
            compared += 1
            if ours[a : a + g] != theirs[a : a + g]:
                mismatches.append(c * g)

    if s.verify_interrupted:  # a removal or shutdown came while the target opened
        raise VerifyInterrupted(name=s.name, why=_INTERRUPTED)
    work = s._verifying = asyncio.ensure_future(
        run_pipeline(
            requests(iter([(0, tracking.nbits)]), max(1, MAX_REQUEST // g)),
            compare,
            throttle=Throttle(None),
            request_bytes=lambda first, count: count * g,
            inflight=INFLIGHT,
        )
    )
    try:
        await work
    except asyncio.CancelledError:
        this = asyncio.current_task()
        if work.cancelled() and (this is None or not this.cancelling()):  # Session.closing
            raise VerifyInterrupted(name=s.name, why=_INTERRUPTED) from None
        raise
    finally:
        s._verifying = None
    mismatches.sort()
    result = {
        "session": s.name,
        "ok": not mismatches,
        "chunks_compared": compared,
        "chunks_skipped": skipped,
        "mismatches": len(mismatches),
        "mismatch_offsets": mismatches[:MAX_REPORTED],
        "point_in_time": s.point_in_time,
    }
    log.info("session %s: verify %s", s.name, result)
    return result
