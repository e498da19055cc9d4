"""The write gate: a mark waits for writes in flight and holds new ones back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deltavol.backend.file import FileBackend
from deltavol.backend.gate import WriteGate
from deltavol.errors import Protected
from deltavol.volumes import Volume
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


async def test_a_change_let_through_before_a_guard_is_refused_once_past_the_gate(tmp_path: Path) -> None:
    """A restore guards the volume, then holds its gate: a change that the export let through
    just before, and that waited at the gate, must not land after (the guard is checked
    again past the gate); changes under the gate (the restore's own) go down."""
    path = tmp_path / "v.img"
    path.write_bytes(bytes(8192))
    vol = Volume("v", str(path), 8192, False, "now", FileBackend("v", str(path)))
    try:
        async with vol.gate.closed():  # e.g. a mark of another session
            write = asyncio.create_task(vol.export.pwrite(0, b"\x66" * 4096))
            await asyncio.sleep(0)  # it passed the export's checks and waits at the gate
            assert not write.done()
            vol.write_guard = lambda: "session 's' is restoring it"
        with pytest.raises(Protected, match="restoring"):
            await write
        await vol.below_gate.pwrite(4096, b"\x77" * 4096)
        with pytest.raises(Protected):
            await vol.export.pwrite(0, b"\x66" * 4096)
        assert await vol.export.pread(0, 8192) == bytes(4096) + b"\x77" * 4096
    finally:
        await vol.backend.close()


async def test_shut_waits_for_writers_and_lets_none_pass_after() -> None:
    """The server stops: ``shut`` returns once the write in flight is done, and a write
    that comes after never passes, now or after a mark's ``closed``."""
    gate = WriteGate()
    await gate.enter()  # a write in flight
    shutting = asyncio.create_task(gate.shut())
    await until(lambda: not gate.open, "the gate shutting")
    assert not gate.enter_now()
    late = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    assert not shutting.done()  # the write in flight is not done yet
    gate.leave()
    await shutting
    async with gate.closed():  # another session's mark or shutdown still gets through
        pass
    await gate.shut()  # again: at once
    done, _ = await asyncio.wait([late], timeout=0.2)
    assert not done, "a write passed the shut gate"
    assert not gate.open and not gate.enter_now()
    late.cancel()
