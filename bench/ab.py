"""``python -m bench.ab SRC_A SRC_B``: the copy-on-first-write figure of two source trees
(each a ``src`` directory, e.g. ``git archive REV src | tar -x -C /tmp/a``), in alternation;
with ``--sessions N``, the tracking figure instead: the first writes after N sessions
start tracking (8 per hot region, so that nearly every region comes in while measured);
with ``--after-mark`` too, the first writes after the N sessions (made consistent once)
mark, the same number of writes at random having gone before the mark: the workload
writes the same regions before and after it. A third server (the first tree, no
session) runs the same writes, for the ratio to no session.
with ``--data RW:BS:IODEPTH`` (``write:1m:16``, say), that fio job on the volume with no
session, and the CPU time the server spent per GiB moved: on a shared machine the CPU
time per GiB moves much less from run to run than the throughput does.

For a change to the protected write path, whose effect is smaller than the noise between
two full ``make bench`` runs here. What made earlier A/B runs lie: each tree had its own
image file, and an image's page-cache state (large folios from readahead or from the
fill, small ones from random writes) moved a 4 KiB write's kernel cost as much as the
change did. So every server imports one shared image, and before every run the image's
pages are dropped and read back, the same for both trees.

Beside p99 and IOPS it gives the CPU time the server's event loop (its main thread) spent
per write: on a machine shared with other work, IOPS move with the load, while the loop's
cost of a write moves much less, and the loop is what limits the figure; and the CPU time
of all the server's threads per write (work moved off the loop still costs a core).
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

import click

from bench.figures import REGION, GiB, drop_cache, fill, owe_every_chunk
from bench.fio import FioResult, fio
from bench.peers import Deltavol

HERE = Path(__file__).parent


def reset_cache(image: Path) -> None:
    """Drop the image's pages and read it back: every run starts from the same page cache."""
    os.sync()  # nor does it inherit the other server's writeback
    drop_cache(image)
    with open(image, "rb") as f:
        while f.read(1 << 20):
            pass


def cpu_seconds(pid: int, thread: bool = False) -> float:
    """User and system CPU time so far of a process (all its threads), or with ``thread``
    of its main thread alone: the event loop's."""
    stat = f"/proc/{pid}/task/{pid}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_cpu(dv: Deltavol) -> float:
    assert dv.proc is not None
    return cpu_seconds(dv.proc.pid, thread=True)


def data_job(dv: Deltavol, job: str, runtime: float) -> tuple[FioResult, float]:
    """One fio ``RW:BS:IODEPTH`` run on the volume: its result, and the server's CPU
    seconds per GiB moved (ramp included, as the CPU time is)."""
    rw, bs, depth = job.split(":")
    assert dv.proc is not None
    before = cpu_seconds(dv.proc.pid)
    got = fio(dv.uri("bench"), rw, bs, int(depth), runtime)
    spent = cpu_seconds(dv.proc.pid) - before
    return got, spent / max(got.bw * (runtime + 1) / GiB, 1e-9)


def start(
    tree: Path,
    root: Path,
    image: Path,
    size: int,
    sessions: int,
    after_mark: bool = False,
    plain: bool = False,
) -> Deltavol:
    """A server running ``tree``'s code: with every chunk of its volume owed by the next
    mark, or (``sessions``) with the target volumes of that many sessions, and
    (``after_mark``) those sessions, consistent."""
    shutil.rmtree(root, ignore_errors=True)
    os.environ["PYTHONPATH"] = str(tree)  # ahead of the editable install
    try:
        dv = Deltavol(root)
        dv.start()
    finally:
        del os.environ["PYTHONPATH"]
    if plain:
        dv.volume("bench", path=image)
        return dv
    if not sessions:
        owe_every_chunk(dv, image, size)
        return dv
    dv.volume("bench", path=image)
    for i in range(sessions):
        dv.volume(f"copy{i}", size=size)
    if after_mark:
        for i in range(sessions):
            dv.session(f"s{i}", "bench", f"copy{i}")
            dv.update(f"s{i}", full=True)
        for i in range(sessions):
            dv.wait(f"s{i}")
    return dv


Spent = tuple[FioResult, float, float, float]  # the run; loop and all threads' CPU seconds; writes


def measured(dv: Deltavol, run: Callable[[], FioResult], writes: int = 0) -> Spent:
    """A fio run and the CPU seconds the server's loop and all its threads spent in it;
    ``writes`` (or, with 0, the IOPS times the runtime) to give them per write."""
    assert dv.proc is not None
    loop, total = loop_cpu(dv), cpu_seconds(dv.proc.pid)
    got = run()
    loop, total = loop_cpu(dv) - loop, cpu_seconds(dv.proc.pid) - total
    return got, loop, total, writes


def first_writes(dv: Deltavol, sessions: int, size: int, depth: int, runtime: float) -> Spent:
    """The first writes after ``sessions`` new sessions start tracking the volume."""
    for info in dv.call("GET", "/v1/sessions"):
        dv.call("DELETE", f"/v1/sessions/{info['name']}")
    for i in range(sessions):
        dv.session(f"s{i}", "bench", f"copy{i}")
    ios = 8 * (size // REGION)
    before = dv.tracking_syncs()
    spent = measured(dv, lambda: fio(dv.uri("bench"), "randwrite", "4k", depth, runtime, ios=ios), ios)
    click.echo(f"  tracking files synced during the first writes: {dv.tracking_syncs() - before}")
    return spent


def writes_after_a_mark(dv: Deltavol, sessions: int, size: int, depth: int, runtime: float) -> Spent:
    """The first writes after the sessions mark, as many at random before it (copied by the
    update, which is waited for: no copy-on-first-write in the figure)."""
    ios = 8 * (size // REGION)
    fio(dv.uri("bench"), "randwrite", "4k", depth, runtime, ios=ios)
    for i in range(sessions):
        dv.update(f"s{i}")
    for i in range(sessions):
        dv.wait(f"s{i}")
    os.sync()
    before = dv.tracking_syncs()
    spent = measured(dv, lambda: fio(dv.uri("bench"), "randwrite", "4k", depth, runtime, ios=ios), ios)
    click.echo(f"  tracking files synced during the writes after the mark: {dv.tracking_syncs() - before}")
    return spent


def protected_writes(dv: Deltavol, depth: int, runtime: float) -> Spent:
    """Writes while an update slowed to 8 MiB/s keeps most chunks owed: most save first."""
    dv.update("s", max_rate="8MiB/s")
    spent = measured(dv, lambda: fio(dv.uri("bench"), "randwrite", "4k", depth, runtime))
    dv.call("POST", "/v1/sessions/s/cancel")
    return spent


@click.command()
@click.argument("trees", nargs=2, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--depth", default=32, show_default=True, help="fio iodepth.")
@click.option("--runs", default=3, show_default=True, help="Runs of each tree (ABBA order).")
@click.option("--runtime", default=5.0, show_default=True, help="Seconds per fio run.")
@click.option("--sessions", default=0, show_default=True, help="Tracking figure with this many sessions.")
@click.option("--after-mark", is_flag=True, help="With --sessions: the first writes after a mark.")
@click.option("--data", "job", default="", help="A data-path figure instead: RW:BS:IODEPTH (write:1m:16).")
def main(
    trees: tuple[Path, Path], depth: int, runs: int, runtime: float, sessions: int, after_mark: bool, job: str
) -> None:
    work = HERE / "work"
    work.mkdir(exist_ok=True)
    image, size = work / "ab.img", 1 * GiB
    if not image.exists():
        fill(image, size)
    servers = [
        start(tree.resolve(), work / f"dv-ab{i}", image, size, sessions, after_mark, plain=bool(job))
        for i, tree in enumerate(trees)
    ]
    if job:
        data_ab(trees, servers, job, runs, runtime)
        return
    names = [str(t) for t in trees]
    if after_mark:  # the same writes with no session
        servers.append(start(trees[0].resolve(), work / "dv-ab-none", image, size, 1))
        names.append("no session")
    n = len(servers)
    results: list[list[tuple[float, float, float, float]]] = [[] for _ in servers]
    try:
        for r in range(runs):
            for i in range(n) if r % 2 == 0 else reversed(range(n)):
                dv = servers[i]
                reset_cache(image)
                if sessions and after_mark:
                    spent = writes_after_a_mark(dv, sessions if i < 2 else 0, size, depth, runtime)
                elif sessions:
                    spent = first_writes(dv, sessions, size, depth, runtime)
                else:
                    spent = protected_writes(dv, depth, runtime)
                got, cpu, total, writes = spent
                writes = writes or max(round(got.iops * runtime), 1)
                per_write, all_threads = 1e6 * cpu / writes, 1e6 * total / writes
                results[i].append((got.p99_us, got.iops, per_write, all_threads))
                click.echo(
                    f"{names[i]}: p99 {got.p99_us:,.0f} us, {got.iops:,.0f} IOPS, "
                    f"loop {per_write:.1f} us CPU per write, all threads {all_threads:.1f} us "
                    f"(load {os.getloadavg()[0]:.1f})"
                )
    finally:
        for dv in servers:
            dv.stop()
    for name, got in zip(names, results, strict=True):
        p99 = statistics.median(r[0] for r in got)
        iops = statistics.median(r[1] for r in got)
        cpu = statistics.median(r[2] for r in got)
        total = statistics.median(r[3] for r in got)
        click.echo(
            f"{name}: median p99 {p99:,.0f} us, median {iops:,.0f} IOPS, median loop {cpu:.1f} us "
            f"CPU per write (all threads {total:.1f} us) over {len(got)} runs"
        )


def data_ab(trees: tuple[Path, Path], servers: list[Deltavol], job: str, runs: int, runtime: float) -> None:
    """``--data``: the job on each tree in ABBA order, each run after ``sync``."""
    results: list[list[tuple[float, float]]] = [[], []]
    try:
        for r in range(runs):
            for i in (0, 1) if r % 2 == 0 else (1, 0):
                os.sync()
                got, per_gib = data_job(servers[i], job, runtime)
                results[i].append((got.bw / 2**20, per_gib))
                figures = f"{got.bw / 2**20:,.0f} MiB/s, {got.iops:,.0f} IOPS, {per_gib:.3f} CPU s/GiB"
                click.echo(f"{trees[i]}: {figures}")
    finally:
        for dv in servers:
            dv.stop()
    for tree, got in zip(trees, results, strict=True):
        bw = statistics.median(b for b, _ in got)
        per_gib = statistics.median(c for _, c in got)
        click.echo(f"{tree}: median {bw:,.0f} MiB/s, median {per_gib:.3f} CPU s/GiB over {len(got)} runs")
    click.echo(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
