"""Each figure of the table: deltavol and its peer measured one after the other, same files."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from bench.fio import fio
from bench.metrics import metrics_overhead
from bench.peers import (
    Deltavol,
    deltavol,
    nbd_unix,
    nbdkit_file,
    nbdkit_file_cmd,
    qemu_nbd,
    qemu_storage_daemon,
    rss_of,
    serve,
)
from bench.restore import restore
from deltavol.server.nbd_client import NbdClient

MiB = 2**20
GiB = 2**30
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Row:
    group: str
    figure: str
    unit: str
    deltavol: float
    peer_name: str = ""
    peer: float | None = None
    aim: tuple[str, float] | None = None  # (">=" or "<=", bound) on the ratio, or on the value if no peer

    @property
    def ratio(self) -> float | None:
        return None if self.peer is None or not self.peer else self.deltavol / self.peer

    @property
    def met(self) -> bool | None:
        if self.aim is None:
            return None
        value = self.ratio if self.peer is not None else self.deltavol
        if value is None:
            return None
        op, bound = self.aim
        return value >= bound if op == ">=" else value <= bound


@dataclass
class Settings:
    work: Path
    runtime: float = 4.0  # seconds per fio run
    fio_size: int = 1 * GiB
    copy_size: int = 4 * GiB


def fill(path: Path, size: int, data_every: int = 0) -> None:
    """A raw file of ``size`` with random-looking data; with ``data_every`` only every other extent."""
    block = random.Random(7).randbytes(MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        step = data_every or size
        for start in range(0, size, 2 * step if data_every else step):
            f.seek(start)
            for _ in range(min(step, size - start) // MiB):
                f.write(block)
        os.fsync(f.fileno())


def fio_image(s: Settings) -> Path:
    """The raw file every fio figure runs on, made once per run."""
    image = s.work / "fio.img"
    if not image.exists():
        fill(image, s.fio_size)
    return image


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read ``path`` into the page cache."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_copy(src: Path, dst: Path, offsets: list[int], length: int, *, kernel: bool) -> float:
    """Seconds a bare loop takes to copy ``length`` bytes at each of ``offsets`` from ``src`` to
    the same place in ``dst`` and fsync ``dst``: no server, no mark, no commit, one thread,
    with ``copy_file_range`` (``kernel``, as a copy to a local volume does) or a read and a
    write each (as a restore does). The caller has the source's bytes in the page cache and
    the page cache written back: the figure is this disk's floor for the same bytes made
    durable, beside the figure of deltavol that copies them."""
    s, d = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        start = time.perf_counter()
        for offset in sorted(offsets):
            if kernel:
                os.copy_file_range(s, d, length, offset, offset)
            else:
                os.pwrite(d, os.pread(s, length, offset), offset)
        os.fsync(d)
        return time.perf_counter() - start
    finally:
        os.close(s)
        os.close(d)


def fresh(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


FIO_JOBS = [
    ("seq 1 MiB read, iodepth 16", "read", "1m", 16, 1, "MiB/s"),
    ("seq 1 MiB write, iodepth 16", "write", "1m", 16, 1, "MiB/s"),
    ("4 KiB random read, iodepth 32, 1 job", "randread", "4k", 32, 1, "IOPS"),
    ("4 KiB random read, iodepth 32, 2 jobs", "randread", "4k", 32, 2, "IOPS"),
    ("4 KiB random write, iodepth 32, 1 job", "randwrite", "4k", 32, 1, "IOPS"),
    ("4 KiB random write, iodepth 32, 2 jobs", "randwrite", "4k", 32, 2, "IOPS"),
]


PEERS: list[tuple[str, Callable[[Path, Path], AbstractContextManager[str]]]] = [
    ("qemu-nbd", qemu_nbd),
    ("nbdkit file", nbdkit_file),
]


def data_path(s: Settings) -> Iterator[Row]:
    """fio through deltavol, qemu-nbd and nbdkit's file plugin on the same raw file in page
    cache; each figure is the better of two runs, taken in the order deltavol, qemu-nbd,
    nbdkit, nbdkit, qemu-nbd, deltavol, so no side always inherits another's dirty pages
    (the two-job figures beside qemu-nbd only, to keep ``make bench`` near 15 minutes)."""
    image = fio_image(s)
    with deltavol(s.work / "dv-fio") as dv:
        dv.volume("bench", path=image)
        for name, rw, bs, depth, jobs, unit in FIO_JOBS:

            def run(peer: int) -> float:
                if peer < 0:
                    return fio(dv.uri("bench"), rw, bs, depth, s.runtime, jobs).figure(unit)  # noqa: B023
                with PEERS[peer][1](image, s.work / "peer.sock") as uri:
                    return fio(uri, rw, bs, depth, s.runtime, jobs).figure(unit)  # noqa: B023

            got: dict[int, list[float]] = {-1: [], 0: [], 1: []}
            peers = (0, 1) if jobs == 1 else (0,)  # two jobs: beside qemu-nbd only, for time
            for peer in (-1, *peers, *peers[::-1], -1):
                got[peer].append(run(peer))
            for peer in peers:
                yield Row("data path (page cache)", name, unit, max(got[-1]), PEERS[peer][0], max(got[peer]),
                          (">=", 1.0))  # fmt: skip


def cold_cache(s: Settings) -> Iterator[Row]:
    """The same figures from a cold page cache: before every run, of every server, the
    file is synced and its pages dropped (``posix_fadvise(DONTNEED)``), and fio runs with
    no ramp, so no unmeasured warm-up reads it back in. The sequential jobs go over the
    whole file once; the random ones run for ``runtime`` (a random read may hit a page an
    earlier one brought in: as often on each side). One run each, in the order deltavol,
    qemu-nbd, nbdkit."""
    image = fio_image(s)
    with deltavol(s.work / "dv-cold") as dv:
        dv.volume("bench", path=image)
        for name, rw, bs, depth, jobs, unit in FIO_JOBS:
            if jobs != 1:
                continue
            drop_cache(image)
            ours = fio(dv.uri("bench"), rw, bs, depth, s.runtime, jobs, cold=True).figure(unit)
            for peer_name, peer in PEERS:
                with peer(image, s.work / "peer.sock") as uri:
                    drop_cache(image)
                    theirs = fio(uri, rw, bs, depth, s.runtime, jobs, cold=True).figure(unit)
                yield Row("data path (page cache dropped before each run)", name, unit, ours, peer_name,
                          theirs)  # fmt: skip


REGION = 4 * MiB  # a hot region of the tracking file (deltavol.bitmap.persist.HOT_REGION)
SMALL_HOT_SET = 4 * REGION  # the hot set of the eviction figure


def tracking(s: Settings) -> Iterator[Row]:
    """4 KiB random writes on a volume that 1 and 4 sessions track, against the same writes
    on the same volume with no session, in alternation (each run after ``sync``, the better
    of two runs each). One volume, not a twin: two files of the same size differed by up to
    10 % in IOPS with no session on either.

    First writes after a mark wait for a group fsync of the tracking files each time they
    enter a hot region (4 MiB): those figures are each job's first ``8 x regions`` writes,
    no ramp, the same on both sides, so nearly every region comes in during the
    measurement (after a 1 s ramp none would be left). The eviction figure is the same
    with a hot set of 4 regions: the writes hop across more regions than it holds, so a
    write to a new chunk nearly always brings its region in again. In the steady state
    every chunk is already tracked.

    Those first writes follow the start of new sessions: nothing was written before, no
    region is hot. After a real mark the regions written since the last one are carried
    hot, so the figure "after a mark" runs the same writes after consistent sessions
    marked, as many having gone before the mark (the update is waited for: no
    copy-on-first-write in it), against a second server with no session on the same
    image running the same writes, in alternation."""
    regions = s.fio_size // REGION
    first_ios = 8 * regions

    def run(dv: Deltavol, jobs: int, ios: int = 0) -> float:
        os.sync()
        return fio(dv.uri("bench"), "randwrite", "4k", 32, s.runtime, jobs, ios=ios).iops

    def sessions(dv: Deltavol, n: int, tracked: bool = False) -> None:
        """n sessions, their tracking bitmaps empty or (tracked) every chunk set."""
        for info in dv.call("GET", "/v1/sessions"):
            dv.call("DELETE", f"/v1/sessions/{info['name']}")
        for i in range(1, n + 1):
            dv.session(f"s{i}", "bench", f"copy{i}")
        if n and tracked:
            _write_chunks(dv.uri("bench"), list(range(s.fio_size // CHUNK)))

    def after_mark(dv: Deltavol, n: int) -> float:
        """The first writes after sessions s1..sn mark, as many at random before it."""
        fio(dv.uri("bench"), "randwrite", "4k", 32, s.runtime, ios=first_ios)
        for i in range(1, n + 1):
            dv.update(f"s{i}")
        for i in range(1, n + 1):
            dv.wait(f"s{i}")
        return run(dv, 1, first_ios)

    def volumes(dv: Deltavol, n: int) -> None:
        dv.volume("bench", path=fio_image(s))
        for i in range(1, n + 1):
            dv.volume(f"copy{i}", size=s.fio_size)

    first_base: dict[int, list[float]] = {1: [], 2: []}  # no session, first writes, by jobs
    with deltavol(s.work / "dv-track") as dv:
        volumes(dv, 4)
        for jobs in (1, 2):
            for n in (1, 4):
                first, steady, base = [], [], []
                for _ in range(2):
                    sessions(dv, n)
                    first.append(run(dv, jobs, first_ios))
                    sessions(dv, 0)
                    first_base[jobs].append(run(dv, jobs, first_ios))
                    base.append(run(dv, jobs))
                    sessions(dv, n, tracked=True)
                    steady.append(run(dv, jobs))
                what = f"first {first_ios} writes after the sessions start ({regions} regions), no ramp"
                yield Row(
                    "tracking overhead",
                    f"4 KiB random write, {jobs} job(s), {n} session(s) tracking, {what}",
                    "IOPS", max(first), "no session", max(first_base[jobs][-2:]), (">=", 0.95),
                )  # fmt: skip
                yield Row(
                    "tracking overhead",
                    f"4 KiB random write, {jobs} job(s), {n} session(s) tracking, steady state",
                    "IOPS", max(steady), "no session", max(base), (">=", 0.95),
                )  # fmt: skip
        with deltavol(s.work / "dv-track-none") as none:
            none.volume("bench", path=fio_image(s))
            for n in (1, 4):
                sessions(dv, n)
                for i in range(1, n + 1):
                    dv.update(f"s{i}", full=True)
                for i in range(1, n + 1):
                    dv.wait(f"s{i}")
                marked, base = [], []
                for _ in range(2):
                    marked.append(after_mark(dv, n))
                    base.append(after_mark(none, 0))
                yield Row(
                    "tracking overhead",
                    f"4 KiB random write, 1 job, {n} session(s) tracking, first {first_ios} writes after "
                    f"a mark ({regions} regions), as many before it, no ramp",
                    "IOPS", max(marked), "no session", max(base), (">=", 0.95),
                )  # fmt: skip
        sessions(dv, 0)
    with deltavol(s.work / "dv-evict", "--hot-set", f"{SMALL_HOT_SET // MiB}MiB") as dv:
        volumes(dv, 1)
        evicting = []
        for _ in range(2):
            sessions(dv, 1)
            evicting.append(run(dv, 1, first_ios))
        sessions(dv, 0)
    yield Row(
        "tracking overhead",
        f"4 KiB random write, 1 job, 1 session tracking, first {first_ios} writes after it starts, "
        f"hot set {SMALL_HOT_SET // REGION} of {regions} regions (eviction cost)",
        "IOPS", max(evicting), "no session", max(first_base[1]),
    )  # fmt: skip


def _write_chunks(uri: str, chunks: list[int]) -> None:
    async def go() -> None:
        client = await NbdClient.connect(uri)
        try:
            data = random.Random(3).randbytes(CHUNK)
            room = asyncio.Semaphore(64)  # a bounded pipeline, not a GiB of requests at once

            async def write(c: int) -> None:
                async with room:
                    await client.pwrite(c * CHUNK, data)

            await asyncio.gather(*(write(c) for c in chunks))
            await client.flush()
        finally:
            await client.close()

    asyncio.run(go())


def copies(s: Settings) -> Iterator[Row]:
    """Full update of a half-data, half-hole volume vs nbdcopy; then 1 % incremental vs full.

    nbdcopy copies the same files without deltavol in its path, as deltavol's update does
    (it reads the source file and writes the target in-process): to a local volume,
    nbdcopy copies file to file, each to a fresh sparse file beside the source; to
    qemu-nbd, both read the source file directly and write through the same qemu-nbd, to
    a fresh file each time. An update is done when its target is durable, so nbdcopy runs
    with ``--flush`` too. Before each timed copy the page cache is written back (none
    inherits another's writeback) and the source is read into it, the same for both: the
    figures are of the copy, not of this machine's shared disk. Each is the better of two,
    in the order deltavol, nbdcopy, nbdcopy, deltavol: the first copy after the GiBs
    written before was up to 1.9x slower, whoever made it. The incremental update is
    timed as ``session update --wait`` sees it: from its request to the server's
    ``update.finished`` event (``Deltavol.timed_update``), with no polling interval in it."""
    size = s.copy_size
    source = s.work / "copy-src.img"
    fill(source, size, data_every=32 * MiB)

    def ready() -> None:
        os.sync()
        warm(source)

    with deltavol(s.work / "dv-copy") as dv:
        dv.volume("src", path=source)
        peer = s.work / "dst-nbdcopy.img"  # beside the source, as the volume's file is

        def ours() -> float:
            for info in dv.call("GET", "/v1/sessions"):
                dv.call("DELETE", f"/v1/sessions/{info['name']}")
            if any(v["name"] == "dst" for v in dv.call("GET", "/v1/volumes")):
                dv.call("DELETE", "/v1/volumes/dst")
            local = dv.volume("dst", size=size)
            dv.session("local", "src", "dst")
            ready()
            took = timed(lambda: (dv.update("local", full=True), dv.wait("local")))
            assert local.stat().st_blocks * 512 <= size // 2 + 64 * MiB, "target not sparse"
            return took

        def theirs() -> float:
            fresh(peer, size)
            ready()
            took = timed(lambda: subprocess.run(["nbdcopy", "--flush", str(source), str(peer)], check=True))
            assert peer.stat().st_blocks * 512 <= size // 2 + 64 * MiB, "nbdcopy's target not sparse"
            peer.unlink()
            return took

        a, b, c, d = ours(), theirs(), theirs(), ours()
        full = min(a, d)

        nchunks = size // CHUNK
        changed = random.Random(11).sample(range(nchunks), nchunks // 100)
        _write_chunks(dv.uri("src"), changed)
        ready()
        incr = dv.timed_update("local")
        sent = dv.call("GET", "/v1/sessions/local")["update"]["bytes_sent"]
        assert sent == len(changed) * CHUNK, f"incremental sent {sent}, expected {len(changed) * CHUNK}"
        yield Row("copy", f"full update, {size / GiB:g} GiB half data, to a local volume",
                  "s", full, "nbdcopy", min(b, c), ("<=", 1.0))  # fmt: skip
        yield Row("copy", "incremental update, 1 % of chunks changed", "s", incr, "full update", full,
                  ("<=", 0.03))  # fmt: skip
        # the same bytes again over the idle target (they are there already: nothing changes)
        ready()
        dst = Path(next(v["path"] for v in dv.call("GET", "/v1/volumes") if v["name"] == "dst"))
        floor = bare_copy(source, dst, [c * CHUNK for c in changed], CHUNK, kernel=True)
        yield Row("copy", "floor: those chunks copied and fsynced by a bare loop, no deltavol", "s", floor,
                  "full update", full)  # fmt: skip

        remote = s.work / "copy-remote.img"

        def to_qemu_nbd(copy: Callable[[str], object]) -> float:
            fresh(remote, size)
            ready()
            with qemu_nbd(remote, s.work / "qemu.sock") as uri:
                return timed(lambda: copy(uri))

        def ours_remote(uri: str) -> None:
            dv.session("remote", "src", uri)
            dv.update("remote", full=True)
            dv.wait("remote")
            dv.call("DELETE", "/v1/sessions/remote")

        def theirs_remote(uri: str) -> None:
            subprocess.run(["nbdcopy", "--flush", str(source), uri], check=True)

        a, b = to_qemu_nbd(ours_remote), to_qemu_nbd(theirs_remote)
        c, d = to_qemu_nbd(theirs_remote), to_qemu_nbd(ours_remote)
        remote.unlink()
        yield Row("copy", f"full update, {size / GiB:g} GiB half data, to qemu-nbd",
                  "s", min(a, d), "nbdcopy", min(b, c), ("<=", 1.0))  # fmt: skip


def owe_every_chunk(dv: Deltavol, image: Path, size: int) -> None:
    """Volume "bench" on ``image`` and session "s" to a local volume, its full update done
    and every chunk changed since: the next mark owes them all."""
    dv.volume("bench", path=image)
    dv.volume("copy", size=size)
    dv.session("s", "bench", "copy")
    dv.update("s", full=True)
    dv.wait("s")
    _write_chunks(dv.uri("bench"), list(range(size // CHUNK)))


def cofw_latency(s: Settings) -> Iterator[Row]:
    """4 KiB random writes while copy-on-first-write protects every chunk, against the same
    writes unprotected, beside QEMU's copy-before-write filter doing the same job.

    deltavol: every chunk of the volume is owed by the next mark, and an update copying at
    8 MiB/s keeps most of them waiting, so most writes save first; idle is the same volume
    with no update. QEMU: ``qemu-storage-daemon`` exports the same file (every cluster full
    of data) through a copy-before-write filter whose target is a fresh raw fleecing file;
    idle is the file exported without the filter. At iodepth 1 (one protected write's
    latency) and 32 (protected writes queued behind each other, and IOPS). Each figure is
    the better of two runs, in the order deltavol idle, protected, QEMU idle, protected,
    protected, idle, deltavol protected, idle, each after ``sync``: one 5 s run's p99
    moves 1.5-5 ms with the disk's writeback alone."""
    image = fio_image(s)
    fleece = s.work / "fleece.img"
    with deltavol(s.work / "dv-cofw") as dv:
        owe_every_chunk(dv, image, s.fio_size)

        def ours(depth: int, protect: bool) -> tuple[float, float]:
            os.sync()  # no run inherits another's writeback
            if protect:
                dv.update("s", max_rate="8MiB/s")
            got = fio(dv.uri("bench"), "randwrite", "4k", depth, s.runtime)
            if protect:
                saved = dv.call("GET", "/v1/sessions/s")["update"]["cofw_saved_bytes"]
                dv.call("POST", "/v1/sessions/s/cancel")  # its chunks go back to tracking: the next owes them
                assert saved > 0, "no copy-on-first-write happened"
            return got.p99_us, got.iops

        def qemu(depth: int, protect: bool) -> tuple[float, float]:
            target = fresh(fleece, s.fio_size) if protect else None
            os.sync()
            with qemu_storage_daemon(image, s.work / "qsd.sock", target) as uri:
                got = fio(uri, "randwrite", "4k", depth, s.runtime)
            if protect:
                assert fleece.stat().st_blocks > 0, "no copy-before-write happened"
                fleece.unlink()
            return got.p99_us, got.iops

        for depth in (1, 32):
            runs: dict[tuple[str, bool], list[tuple[float, float]]] = {}
            order = [("dv", False), ("dv", True), ("q", False), ("q", True)]
            for who, protect in order + order[::-1]:
                run = ours if who == "dv" else qemu
                runs.setdefault((who, protect), []).append(run(depth, protect))

            def p99(who: str, protect: bool) -> float:
                return min(p for p, _ in runs[(who, protect)])  # noqa: B023

            def iops(who: str, protect: bool) -> float:
                return max(n for _, n in runs[(who, protect)])  # noqa: B023

            group, cbw = "copy-on-first-write", "QEMU copy-before-write"
            yield Row(group, f"4 KiB random write p99 protected / idle, iodepth {depth}", "ratio",
                      p99("dv", True) / p99("dv", False), cbw, p99("q", True) / p99("q", False),
                      ("<=", 1.0))  # fmt: skip
            yield Row(group, f"4 KiB random write p99 protected, iodepth {depth}", "p99 µs",
                      p99("dv", True), cbw, p99("q", True))  # fmt: skip
            yield Row(group, f"4 KiB random write p99 idle, iodepth {depth}", "p99 µs",
                      p99("dv", False), "qemu-storage-daemon", p99("q", False))  # fmt: skip
            if depth > 1:
                yield Row(group, f"4 KiB random write IOPS protected, iodepth {depth}", "IOPS",
                          iops("dv", True), cbw, iops("q", True), (">=", 1.0))  # fmt: skip


def memory(s: Settings) -> Iterator[Row]:
    """RSS of a server with a 16 TiB sparse volume and two sessions after their full
    updates; then the peak RSS of a fresh server under 256 concurrent requests of 4-128
    KiB (fio random reads and writes, iodepth 256), beside nbdkit's under the same load."""
    tmpfs = s.work / "tmpfs"
    tmpfs.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2G", "tmpfs", str(tmpfs)], check=True)
    try:
        with deltavol(tmpfs / "data") as dv:
            size = 16 * 2**40
            dv.volume("big", size=size)
            _write_chunks(dv.uri("big"), [0, 1, 1000, 2**24, size // CHUNK - 1])
            for i in (1, 2):
                dv.volume(f"copy{i}", size=size)
                dv.session(f"s{i}", "big", f"copy{i}")
                dv.update(f"s{i}", full=True)
                dv.wait(f"s{i}")
            _write_chunks(dv.uri("big"), [5, 2**20])
            for i in (1, 2):
                dv.update(f"s{i}")
                dv.wait(f"s{i}")
            rss, peak = dv.rss()
        yield Row("memory", "server RSS, 16 TiB sparse volume, 2 sessions", "MiB", rss / MiB,
                  aim=("<=", 200))  # fmt: skip
        yield Row("memory", "server peak RSS, same", "MiB", peak / MiB, aim=("<=", 200))
    finally:
        subprocess.run(["umount", str(tmpfs)], check=False)

    image = fio_image(s)
    load = ("--bsrange=4k-128k", "--rwmixread=50")

    def peak_under_load(uri: str, pid: int) -> float:
        fio(uri, "randrw", "4k", 256, s.runtime, extra=load)
        return rss_of(pid)[1] / MiB

    with deltavol(s.work / "dv-rss") as dv:
        dv.volume("bench", path=image)
        assert dv.proc is not None
        ours = peak_under_load(dv.uri("bench"), dv.proc.pid)
    sock = s.work / "peer.sock"
    with serve(nbdkit_file_cmd(image, sock), sock, "nbdkit") as proc:
        theirs = peak_under_load(nbd_unix("bench", sock), proc.pid)
    yield Row("memory", "server peak RSS, 256 concurrent requests of 4-128 KiB", "MiB", ours,
              "nbdkit file", theirs)  # fmt: skip


SECTIONS: dict[str, Callable[[Settings], Iterator[Row]]] = {
    "data": data_path,
    "tracking": tracking,
    "copy": copies,
    "cofw": cofw_latency,
    "memory": memory,
    "cold": cold_cache,
    "restore": restore,
    "metrics": metrics_overhead,
}

__all__ = ["SECTIONS", "Deltavol", "Row", "Settings", "nbd_unix"]
