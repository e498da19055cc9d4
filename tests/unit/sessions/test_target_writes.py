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

    async def trim(self, offset: int, length: int) -> None:
        self.reached.append("trim")

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
    "trim": (0, 4096),
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


class Discarding(Target):
    """A target with a way of writing that no list names."""

    async def discard(self, offset: int, length: int) -> None:
        self.reached.append("discard")


def test_a_target_with_an_unknown_coroutine_method_is_refused() -> None:
    writes, target = TargetWrites(), Discarding()
    writes.started(untouched=True)
    with pytest.raises(TypeError, match="discard"):
        writes.watch(target)  # type: ignore[arg-type]
    assert writes.untouched and target.reached == []


class Keywords(Target):
    async def zero(self, offset: int, length: int, may_trim: bool = False) -> bool:
        self.reached.append(f"zero may_trim={may_trim}")
        return True


def test_the_watch_passes_keyword_arguments_on() -> None:
    writes, target = TargetWrites(), Keywords()
    writes.started(untouched=True)
    writes.watch(target)  # type: ignore[arg-type]
    assert asyncio.run(target.zero(0, 4096, may_trim=True))
    assert target.reached == ["zero may_trim=True"]
    assert not writes.untouched


def test_every_target_of_the_project_is_accepted(tmp_path: Any) -> None:
    """The real targets' coroutine methods are all listed (a new one must be)."""
    from deltavol.backend.file import FileBackend
    from deltavol.copy.targets import LocalTarget, NbdTarget

    path = tmp_path / "t"
    path.write_bytes(bytes(4096))
    backend = FileBackend("t", str(path))
    for target in (LocalTarget(backend), NbdTarget("nbd://localhost/t")):
        assert TargetWrites().watch(target) is target  # type: ignore[arg-type]
    asyncio.run(backend.close())
