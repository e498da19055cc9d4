"""The copy pipeline: runs of set bits -> requests of bounded size -> many in flight.

Shape (after nbdcopy): a bitmap's runs are cut into requests of at most ``max_chunks``
chunks; ``inflight`` workers take requests in ascending order, each drawing from the
throttle first; the work of one request (read, zero-detect, write, clear bits) is the
caller's ``job``. Progress counts completions, not submissions. An error in one worker
stops the others and is raised once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from deltavol.copy.targets import CopyTarget
from deltavol.copy.throttle import Throttle

MAX_REQUEST = 4 * 1024 * 1024
INFLIGHT = 16
_ZEROES = bytes(MAX_REQUEST)


@dataclass
class Progress:
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    _window: list[tuple[float, int]] = field(default_factory=list, repr=False)

    def done(self, n: int) -> None:
        self.bytes_done += n
        now = time.monotonic()
        self._window.append((now, self.bytes_done))
        while len(self._window) > 2 and now - self._window[0][0] > 5.0:
            self._window.pop(0)

    @property
    def rate(self) -> float:
        """Bytes per second over the last few seconds."""
        if len(self._window) < 2:
            elapsed = time.monotonic() - self.started
            return self.bytes_done / elapsed if elapsed > 0 else 0.0
        (t0, b0), (t1, b1) = self._window[0], self._window[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        left = self.bytes_total - self.bytes_done
        if left <= 0:
            return 0.0
        return left / rate if rate > 0 else None


def requests(runs: Iterator[tuple[int, int]], max_chunks: int) -> Iterator[tuple[int, int]]:
    """Cut runs of chunks (first, count) into requests of at most ``max_chunks``."""
    for first, count in runs:
        while count > 0:
            n = min(count, max_chunks)
            yield first, n
            first += n
            count -= n


async def run_pipeline(
    work: Iterator[tuple[int, int]],
    job: Callable[[int, int], Awaitable[None]],
    *,
    throttle: Throttle,
    request_bytes: Callable[[int, int], int],
    inflight: int = INFLIGHT,
) -> None:
    """Run ``job(first, count)`` for every request in ``work``, ``inflight`` at a time."""

    async def worker() -> None:
        for first, count in work:  # a shared iterator: each request goes to one worker
            await throttle.take(request_bytes(first, count))
            await job(first, count)

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(inflight):
                tg.create_task(worker())
    except ExceptionGroup as group:  # the first failure is the story; the rest followed it
        raise _first(group) from None


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    if n <= MAX_REQUEST:
        return data == _ZEROES[:n]
    return all(
        data[i : i + MAX_REQUEST] == _ZEROES[: len(data[i : i + MAX_REQUEST])]
        for i in range(0, n, MAX_REQUEST)
    )


async def write_piece(target: CopyTarget, offset: int, data: bytes | None, length: int) -> int:
    """Write one piece (None = known zeroes) zero-aware; returns the bytes sent as data."""
    if data is None or is_zero(data):
        if await target.zero(offset, length):
            return 0
        data = _ZEROES[:length] if length <= MAX_REQUEST else bytes(length)
    await target.pwrite(offset, data)
    return length
