"""The write gate: a mark waits for writes in flight and holds new ones back."""

from __future__ import annotations

import asyncio

from deltavol.backend.gate import WriteGate
from tests.fakes import until


async def test_closed_waits_for_writers_and_blocks_new_ones() -> None:
    gate = WriteGate()
    log: list[str] = []

    await gate.enter()  # a write in flight
    late_came = asyncio.Event()

    async def mark() -> None:
        async with gate.closed():
            log.append("mark")
            await late_came.wait()  # a new write comes while the mark holds the gate
            log.append("mark done")

    async def late_writer() -> None:
        late_came.set()
        await gate.enter()
        log.append("late write")
        gate.leave()

    marking = asyncio.create_task(mark())
    await until(lambda: not gate.open, "the mark closing the gate")
    late = asyncio.create_task(late_writer())
    assert log == []  # the mark waits for the write in flight
    log.append("write done")
    gate.leave()
    await asyncio.gather(marking, late)
    assert log == ["write done", "mark", "mark done", "late write"]


async def test_marks_do_not_overlap() -> None:
    gate = WriteGate()
    inside = 0
    peak = 0

    async def mark() -> None:
        nonlocal inside, peak
        async with gate.closed():
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.002)
            inside -= 1

    await asyncio.gather(*(mark() for _ in range(5)))
    assert peak == 1
