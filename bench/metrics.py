"""What the metrics cost the data path: 4 KiB random writes with the per-export counters on
(and /metrics scraped once a second, as Prometheus would) against the same server started
with ``--no-nbd-metrics``, which leaves the counters out of ``Export`` altogether."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from bench.fio import fio
from bench.peers import Deltavol, deltavol

if TYPE_CHECKING:
    from bench.figures import Row, Settings

JOBS = [
    ("4 KiB random write, iodepth 32, 1 job", "randwrite", 1),
    ("4 KiB random write, iodepth 32, 2 jobs", "randwrite", 2),
    ("4 KiB random read, iodepth 32, 1 job", "randread", 1),
]
ROUNDS = 6  # runs of each side, alternating; the figure is the median of each side's


def _scraping(dv: Deltavol, stop: threading.Event) -> None:
    import asyncio

    async def scrape() -> None:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=dv.api.unix_socket)) as http:
            while not stop.is_set():
                async with http.get("http://deltavol/metrics") as resp:
                    assert resp.status == 200
                    await resp.read()
                await asyncio.sleep(1.0)

    asyncio.run(scrape())


def metrics_overhead(s: Settings) -> Iterator[Row]:
    yield from counter_cost(s)
    yield from fio_figures(s)


def fio_figures(s: Settings) -> Iterator[Row]:
    """Each figure is the median of ``ROUNDS`` runs of each side, in the order on, off, off,
    on, on, off, ... (neither side always runs first on a machine whose load changes; a
    median, not the best run, so one lucky or unlucky run of either side moves neither);
    with metrics on, a thread scrapes /metrics every second during the run."""
    from bench.figures import Row, fio_image

    image = fio_image(s)

    def run(on: bool, rw: str, jobs: int) -> float:
        extra = () if on else ("--no-nbd-metrics",)
        with deltavol(s.work / ("dv-metrics-on" if on else "dv-metrics-off"), *extra) as dv:
            if not (dv.root / "imported").exists():
                dv.volume("bench", path=image)
                (dv.root / "imported").touch()
            stop = threading.Event()
            scraper = threading.Thread(target=_scraping, args=(dv, stop), daemon=True) if on else None
            if scraper is not None:
                scraper.start()
            try:
                return fio(dv.uri("bench"), rw, "4k", 32, s.runtime, jobs).figure("IOPS")
            finally:
                stop.set()
                if scraper is not None:
                    scraper.join(5)

    for name, rw, jobs in JOBS:
        on: Callable[[], float] = lambda: run(True, rw, jobs)  # noqa: E731, B023
        off: Callable[[], float] = lambda: run(False, rw, jobs)  # noqa: E731, B023
        ons, offs = [], []
        for n in range(ROUNDS):  # on, off, off, on, ...: neither side always runs first
            first, second = (on, off) if n % 2 == 0 else (off, on)
            x, y = first(), second()
            ons.append(x if first is on else y)
            offs.append(y if first is on else x)
        yield Row("metrics overhead (page cache)", name, "IOPS", statistics.median(ons), "--no-nbd-metrics",
                  statistics.median(offs), (">=", 0.98))  # fmt: skip


def _per_call(rounds: int = 20, calls: int = 50_000) -> tuple[float, float]:
    """Nanoseconds per ``Export.pwrite_now`` of 4 KiB on a layer that takes it at once, with
    the counters and without: their own cost, without the noise of a server. Rounds of each
    alternate and the fastest of each counts (a shared machine only ever slows a round)."""
    import time

    from deltavol.backend import export

    class Now:
        name, size = "bench", 1 << 30

        def pwrite_now(self, offset: int, data: bytes) -> bool:
            return True

    def make(counting: bool) -> Callable[[int, bytes], bool]:
        was, export.COUNTING = export.COUNTING, counting
        try:
            return export.Export(Now()).pwrite_now  # type: ignore[arg-type]
        finally:
            export.COUNTING = was

    data, best = bytes(4096), {True: float("inf"), False: float("inf")}
    calls_of = {True: make(True), False: make(False)}
    for n in range(rounds):
        for counting in (n % 2 == 0, n % 2 == 1):
            call = calls_of[counting]
            start = time.perf_counter()
            for i in range(calls):
                call((i * 4096) & ((1 << 29) - 1), data)
            best[counting] = min(best[counting], (time.perf_counter() - start) / calls)
    return best[True] * 1e9, best[False] * 1e9


def counter_cost(s: Settings) -> Iterator[Row]:
    from bench.figures import Row

    on, off = _per_call()
    yield Row("metrics overhead (page cache)", "4 KiB write taken at once, in process", "ns per call", on,
              "--no-nbd-metrics", off)  # fmt: skip
