"""The write gate: a mark waits for writes in flight and holds new ones back."""

from __future__ import annotations

import asyncio

from deltavol.backend.gate import WriteGate


async def test_closed_waits_for_writers_and_blocks_new_ones() -> None:
    gate = WriteGate()
    log: list[str] = []

    await gate.enter()  # a write in flight

    async def mark() -> None:
        async with gate.closed():
            log.append("mark")
            await asyncio.sleep(0.01)
            log.append("mark done")

    async def late_writer() -> None:
        await asyncio.sleep(0.001)
        await gate.enter()
        log.append("late write")
        gate.leave()

    marking = asyncio.create_task(mark())
    late = asyncio.create_task(late_writer())
    await asyncio.sleep(0.005)
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
