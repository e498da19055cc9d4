"""The copy pipeline: runs of set bits -> requests of bounded size -> many in flight.

Shape (after nbdcopy): a bitmap's runs are cut into requests of at most ``max_chunks``
chunks (a full pass also cuts them at the source's holes, and sends each hole as one
request); ``inflight`` workers take requests in ascending order, each drawing from the
throttle first; the work of one request (read, zero-detect, write, clear bits) is the
caller's ``job``. ``batches`` instead groups scattered runs many to a request (for a
target that copies them in one hand-over). Progress counts completions, not
submissions. An error in one worker stops the others and is raised once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deltavol.copy.throttle import Throttle
from deltavol.nbd.constants import STATE_HOLE

if TYPE_CHECKING:
    from deltavol.copy.targets import CopyTarget

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


def batches(
    runs: Iterator[tuple[int, int]], max_chunks: int, max_runs: int
) -> Iterator[tuple[tuple[tuple[int, int], ...]]]:
    """Runs of chunks (first, count) grouped into requests of at most ``max_chunks`` chunks
    and ``max_runs`` runs, each request as ``(runs,)``: scattered chunks go many to a
    request, so each costs the copy one hand-over to a thread for a batch, not its own."""
    batch: list[tuple[int, int]] = []
    chunks = 0
    for first, count in runs:
        while count > 0:
            n = min(count, max_chunks - chunks)
            batch.append((first, n))
            chunks += n
            first += n
            count -= n
            if chunks == max_chunks or len(batch) == max_runs:
                yield (tuple(batch),)
                batch, chunks = [], 0
    if batch:
        yield (tuple(batch),)


Extents = Callable[[int, int], Awaitable[list[tuple[int, int]]]]
SCAN_WINDOW = 1 << 30  # bytes of source asked for extents at a time


async def split_at_holes(
    runs: Iterator[tuple[int, int]],
    extents: Extents,
    granularity: int,
    size: int,
    max_chunks: int,
    scan_window: int = SCAN_WINDOW,
) -> AsyncIterator[tuple[int, int, bool]]:
    """Requests (first, count, hole) for runs of chunks: data cut to ``max_chunks``, each run
    of whole chunks the source holds as a hole sent as one request, however long."""
    window = max(1, scan_window // granularity)
    hole: tuple[int, int] | None = None  # not yet yielded: it may go on in the next window
    for first, count in runs:
        end = first + count
        for pos in range(first, end, window):
            stop = min(end, pos + window)
            lo, hi = pos * granularity, min(stop * granularity, size)
            cursor = pos
            for a, b in _hole_chunks(await extents(lo, hi - lo), lo, granularity, size):
                if a > cursor:
                    if hole:
                        yield (*hole, True)
                        hole = None
                    for f, n in requests(iter([(cursor, a - cursor)]), max_chunks):
                        yield f, n, False
                if hole and hole[0] + hole[1] == a:
                    hole = (hole[0], b - hole[0])
                else:
                    if hole:
                        yield (*hole, True)
                    hole = (a, b - a)
                cursor = b
            if cursor < stop:
                if hole:
                    yield (*hole, True)
                    hole = None
                for f, n in requests(iter([(cursor, stop - cursor)]), max_chunks):
                    yield f, n, False
        if hole:
            yield (*hole, True)
            hole = None


def _hole_chunks(
    extents: list[tuple[int, int]], offset: int, granularity: int, size: int
) -> Iterator[tuple[int, int]]:
    """[a, b) of the whole chunks inside each hole extent (a hole to the end of the volume
    includes its short last chunk)."""
    at = offset
    for n, flags in extents:
        start, at = at, at + n
        if flags & STATE_HOLE:
            a = -(-start // granularity)
            b = at // granularity if at < size else -(-size // granularity)
            if b > a:
                yield a, b


async def _aiter(items: Iterable[tuple[int, ...]]) -> AsyncIterator[tuple[int, ...]]:
    for item in items:
        yield item


async def run_pipeline(
    work: Iterable[tuple[Any, ...]] | AsyncIterator[tuple[Any, ...]],
    job: Callable[..., Awaitable[None]],
    *,
    throttle: Throttle,
    request_bytes: Callable[..., int],
    inflight: int = INFLIGHT,
) -> None:
    """Run ``job(*request)`` for every request in ``work``, ``inflight`` at a time."""
    items = work if isinstance(work, AsyncIterator) else _aiter(work)
    taking = asyncio.Lock()  # an async generator must not be resumed by two workers at once

    async def worker() -> None:
        while True:
            async with taking:
                item = await anext(items, None)
            if item is None:
                return
            await throttle.take(request_bytes(*item))
            await job(*item)

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


def split_zeroes(offset: int, data: bytes, granularity: int) -> list[tuple[int, bytes | int]]:
    """``data`` (read at ``offset``) as runs of data (bytes) and of zeroes (their length),
    cut at ``granularity`` boundaries: a zeroed chunk among data chunks goes as one zero
    request, not as a chunk of zero bytes. All data comes back as the one piece it was."""
    runs: list[list[int]] = []  # [start, end, zero] in data
    end = len(data)
    pos = 0
    while pos < end:
        nxt = min(end, (offset + pos) // granularity * granularity + granularity - offset)
        # most data chunks differ from zeroes in their first bytes: no slice of the whole
        zero = data[pos : pos + 8] == _ZEROES[: min(8, nxt - pos)] and is_zero(data[pos:nxt])
        if runs and runs[-1][2] == zero:
            runs[-1][1] = nxt
        else:
            runs.append([pos, nxt, zero])
        pos = nxt
    if len(runs) == 1 and not runs[0][2]:
        return [(offset, data)]
    return [(offset + a, b - a if z else bytes(data[a:b])) for a, b, z in runs]


async def write_piece(
    target: CopyTarget, offset: int, data: bytes | None, length: int, granularity: int
) -> int:
    """Write one piece (None = known zeroes) zero-aware, its zeroed chunks as zero writes
    (``split_zeroes``); returns the bytes sent as data."""
    if data is None:
        return await _write_zeroes(target, offset, length)
    sent = 0
    for at, part in split_zeroes(offset, data, granularity):
        if isinstance(part, int):
            sent += await _write_zeroes(target, at, part)
        else:
            await target.pwrite(at, part)
            sent += len(part)
    return sent


async def _write_zeroes(target: CopyTarget, offset: int, length: int) -> int:
    """A zero request, or zero buffers where the target has none; the bytes sent as data."""
    if await target.zero(offset, length):
        return 0
    for at in range(offset, offset + length, MAX_REQUEST):
        await target.pwrite(at, _ZEROES[: min(MAX_REQUEST, offset + length - at)])
    return length
