"""Every way a target is written counts as the update's first write (restore relies on it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deltavol.errors import TargetError
from deltavol.sessions.target_writes import WRITES, TargetWrites


class Target:
    """Records the writes that reached it; has every writing method of a local volume."""

    description = "volume 'dst'"

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def pwrite(self, offset: int, data: bytes) -> None:
        self.reached.append("pwrite")

    async def zero(self, offset: int, length: int) -> bool:
        self.reached.append("zero")
        return True

    async def copy_from(self, source: Any, offset: int, length: int) -> None:
        self.reached.append("copy_from")

    async def copy_spans(self, source: Any, spans: list[tuple[int, int]], zeroes: Any = None) -> int:
        self.reached.append("copy_spans")
        return 0

    async def zero_spans(self, spans: list[tuple[int, int]]) -> None:
        self.reached.append("zero_spans")


ARGS: dict[str, tuple[Any, ...]] = {
    "pwrite": (0, b"x"),
    "zero": (0, 4096),
    "copy_from": (None, 0, 4096),
    "copy_spans": (None, [(0, 4096)]),
    "zero_spans": ([(0, 4096)],),
}


@pytest.mark.parametrize("method", WRITES)
def test_each_write_method_ends_untouched(method: str) -> None:
    writes, target = TargetWrites(), Target()
    writes.started(untouched=True)
    writes.watch(target)  # type: ignore[arg-type]
    asyncio.run(getattr(target, method)(*ARGS[method]))
    assert target.reached == [method]
    assert not writes.untouched
    assert not writes.claim()


@pytest.mark.parametrize("method", WRITES)
def test_after_a_claim_no_write_method_reaches_the_target(method: str) -> None:
    writes, target = TargetWrites(), Target()
    writes.started(untouched=True)
    writes.watch(target)  # type: ignore[arg-type]
    assert writes.claim()
    with pytest.raises(TargetError):
        asyncio.run(getattr(target, method)(*ARGS[method]))
    assert target.reached == []
